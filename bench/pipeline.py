"""The whole default packaging pipeline on SmolLM2-135M-Instruct, as a user runs it: `serve-pruned package`
at --target-params 0.75 with recovery (iterative, refit + logit distillation) and W8A8, calibrated on a mix
of Python's docs and the original model's own generations; wall time, peak RSS, and the quality report
(held-out Python tutorial, an out-of-domain licence, fact prompts) for every stage.

    .venv/bin/python bench/pipeline.py [--distill-steps 160] [-- extra package flags]
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

from _report import DOCS, OOD, publish  # noqa: E402

from serve_pruned.options import PackageOptions  # noqa: E402

EXE = str(Path(sys.executable).parent / "serve-pruned")
STAGES = ("original", "pruned", "recovered", "quantized")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="0.75")
    ap.add_argument("--distill-steps", default=str(PackageOptions.model_fields["distill_steps"].default))
    ap.add_argument("extra", nargs="*", help="more `serve-pruned package` flags")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "smol"
        subprocess.run([EXE, "example-model", str(src)], check=True, capture_output=True)
        cmd = [EXE, "package", str(src), "--out", str(Path(tmp) / "out"), "--target-params", args.target,
               "--quant", "w8a8", "--calib", str(DOCS / "howto"), "--calib", str(DOCS / "faq"),
               "--calib", "generated:32", "--distill-steps", args.distill_steps,
               "--eval-text", str(DOCS / "tutorial"), "--eval-ood-text", str(OOD), "--eval-max-tokens", "8192",
               "--format", "json", "--no-progress", *args.extra]
        # an empty cache: generated calibration text and scores are computed, as on a user's first run
        env = {**os.environ, "SERVE_PRUNED_CACHE": str(Path(tmp) / "cache")}
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        m = json.loads(proc.stdout)
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    q = m["quality"]
    lines = [f"## The whole pipeline: SmolLM2-135M-Instruct -> {args.target} of the parameters, recovered, W8A8", "",
             f"`serve-pruned package` end to end (load, generated calibration text, {len(m['recovery']['steps'])} "
             f"pruning step(s) each with refit + distillation ({args.distill_steps} steps in all), W8A8 "
             f"SmoothQuant+GPTQ, evaluation of every stage, write): **{wall / 60:.1f} min** wall on this machine, "
             f"peak RSS {max(child_rss, m['peak_rss_bytes']) / 2**30:.2f} GiB. Parameters "
             f"{m['params_before']:,} -> {m['params_after']:,} ({m['params_fraction']:.3f}); weight bytes "
             f"{m['weight_bytes_before']:,} -> {m['weight_bytes']:,}.", "",
             "Calibration: Python HOWTOs + FAQ + 32 texts the original model generated from everyday prompts "
             "(`--calib generated:32`). Held out: the Python tutorial (in domain), GPL-3 (out of domain), "
             "8192 tokens each; fact prompts: greedy continuations compared with the original's.", "",
             "| stage | ppl held out | x orig | ppl out of domain | x orig | top-1 agreement | fact prompts |",
             "|---|---|---|---|---|---|---|"]
    for s in STAGES:
        if s not in q:
            continue
        e, o = q[s], q[s].get("out_of_domain", {})
        agree = e.get("top1_agreement")
        facts = (e.get("prompts") or {}).get("prefix_agreement")
        lines.append(f"| {s} | {e['perplexity']:.2f} | {e.get('perplexity_ratio', 1.0):.2f} | "
                     f"{o.get('perplexity', float('nan')):.2f} | {o.get('perplexity_ratio', 1.0):.2f} | "
                     f"{'–' if agree is None else f'{agree:.3f}'} | {'–' if facts is None else f'{facts:.2f}'} |")
    timings = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in m["timings_s"].items())
    lines += ["", f"Stage timings (s): {timings}",
              "", "Greedy completions of the final model: " + "; ".join(
                  f"{p!r} -> {c!r}" for p, c in list(q["quantized"]["prompts"]["completions"].items())[:4])]
    publish("pipeline", lines)


if __name__ == "__main__":
    main()
