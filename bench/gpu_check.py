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
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--gpu", required=True)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--instances", type=int)
    ap.add_argument("--port", type=int, default=8300)
    args = ap.parse_args()
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
