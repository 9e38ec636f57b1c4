"""Memory and time against depth: `serve-pruned package --target-params 0.75 --quant w8a8 --distill-steps 0`
(refit on) on random Llama models of TinyLlama-1.1B's width (hidden 2048, FFN 5632, 32 query / 8 KV heads of 64,
untied embeddings, SmolLM2's tokenizer, bf16 weights) at several depths. Each run is its own process: its peak
RSS is the kernel's high-water mark of that process, and the stage times come from its manifest.

With ``--before REV`` the same runs are made, interleaved, with the code of commit REV (a git worktree run with
this environment), so the two columns are measured side by side.

    .venv/bin/python bench/scale.py [--depths 2,4,8] [--before REV] [--scorer auto] [--samples 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTH = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8, head_dim=64)


def random_model(dest: Path, layers: int, tokenizer_dir: Path) -> Path:
    """A random bf16 Llama of TinyLlama's width and ``layers`` layers, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(**WIDTH, num_hidden_layers=layers, vocab_size=len(tok), tie_word_embeddings=False,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(layers)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def run(model: Path, out: Path, *, code: Path, scorer: str, samples: int) -> dict:
    """One `package` run in a child process: its peak RSS (GiB), wall time and stage times (s)."""
    argv = [sys.executable, "-c", "from serve_pruned.cli.main import main; main()", "package", str(model),
            "--out", str(out), "--target-params", "0.75", "--quant", "w8a8", "--distill-steps", "0",
            "--calib", str(DOCS / "howto"), "--num-samples", str(samples), "--seq-len", "256",
            "--scorer", scorer, "--no-progress", "--format", "json"]
    # the child measures itself: RUSAGE_CHILDREN of a fresh wrapper is that one run's high-water mark
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t); "
               "sys.stderr.write(r.stderr[-3000:] if r.returncode else ''); sys.exit(r.returncode)")
    # an empty cache per run: statistics or generated text cached by another run would skip their stages
    env = {**os.environ, "PYTHONPATH": str(code), "SERVE_PRUNED_CACHE": str(out.parent / f"cache-{out.name}")}
    res = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"package failed at {code}:\n{res.stderr}")
    rss_kib, wall = res.stdout.split()
    manifest = json.loads((out / "serve_pruned.json").read_text())
    return {"rss": int(rss_kib) / 2**20, "wall": float(wall), "stages": manifest.get("timings_s", {}),
            "peaks": manifest.get("peak_memory", {}).get("host_gib", {}), "params": manifest.get("params_before")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="2,4,8")
    ap.add_argument("--before", help="a commit to measure side by side (run from a git worktree)")
    ap.add_argument("--scorer", default="auto")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples of 256 tokens")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from serve_pruned.compress.example_model import materialize

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        smol = materialize(tmp / "smol")
        codes = {"this commit": ROOT}
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tmp / "before"),
                            args.before], check=True)
            codes = {f"before ({args.before})": tmp / "before", **codes}
        rows = []
        try:
            for depth in depths:
                model = random_model(tmp / f"d{depth}", depth, smol)
                row = {"depth": depth}
                for name, code in codes.items():
                    row[name] = run(model, tmp / f"out-{depth}-{len(row)}", code=code, scorer=args.scorer,
                                    samples=args.samples)
                    print(depth, name, f"{row[name]['rss']:.2f} GiB", f"{row[name]['wall']:.0f} s", flush=True)
                rows.append(row)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                               check=False)
    layer_gib = (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632) * 4 / 2**30  # q, o; k, v; gate, up, down
    head = "| layers | parameters | " + " | ".join(f"{n}: peak RSS (GiB) | {n}: wall (s)" for n in codes) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(codes))]
    for row in rows:
        cells = [str(row["depth"]), f"{row['this commit']['params'] / 1e9:.2f} B"]
        for n in codes:
            cells += [f"{row[n]['rss']:.2f}", f"{row[n]['wall']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    stages = sorted({k for row in rows for k in row["this commit"]["stages"]})
    lines += ["", "Stage times of this commit (s):", "",
              "| layers | " + " | ".join(stages) + " |", "|" + "---|" * (1 + len(stages))]
    for row in rows:
        t = row["this commit"]["stages"]
        lines.append(f"| {row['depth']} | " + " | ".join(f"{t.get(s, 0):.0f}" for s in stages) + " |")
    stages = [s for s in stages if s.removesuffix("_s") in rows[-1]["this commit"]["peaks"]]
    lines += ["", "Peak RSS of each stage of this commit (GiB; sampled every 20 ms):", "",
              "| layers | " + " | ".join(s.removesuffix("_s") for s in stages) + " |", "|" + "---|" * (1 + len(stages))]
    for row in rows:
        p = row["this commit"]["peaks"]
        cells = [f"{p.get(s.removesuffix('_s'), 0):.2f}" for s in stages]
        lines.append(f"| {row['depth']} | " + " | ".join(cells) + " |")
    body = (f"Random Llama models of TinyLlama-1.1B's width, packaged to 0.75 + W8A8 with the refit and no "
            f"distillation, {args.samples} calibration samples of 256 tokens (Python's HOWTOs), scorer "
            f"`{args.scorer}`, no evaluation text. One decoder layer is {layer_gib:.2f} GiB in float32 (the compute "
            "dtype).\n\n" + "\n".join(lines))
    publish("scale", body.splitlines())


if __name__ == "__main__":
    main()
