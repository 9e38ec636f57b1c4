"""How recovery grows with the distillation budget: SmolLM2-135M-Instruct pruned one-shot to 0.75 and refit with
the package defaults (the same start for every row), then `--distill-steps N` for several N, each run with its
own warm-up and cosine schedule, as `serve-pruned package --distill-steps N --distill-samples max(640, 4N)`
trains. Perplexity held out in domain (Python tutorial) and out of domain (GPL-3), seconds per step, and a
power-law fit of the excess log-perplexity, ln(ppl / ppl_original) = A * N^-b, through the rows: how many steps
the fit says each quality goal needs, and how long that is on this machine.

    .venv/bin/python bench/budget.py [--steps 64,160,320] [--eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import publish  # noqa: E402
from _start import refit_start  # noqa: E402

from serve_pruned.compress.data import calibration_samples  # noqa: E402
from serve_pruned.compress.distill import distill  # noqa: E402
from serve_pruned.compress.steps import distill_settings  # noqa: E402

GOALS = {"held out": 1.25, "out of domain": 1.5}  # issue #7's quality goals, as ratios to the original


def power_fit(steps: list[int], ratios: list[float]) -> tuple[float, float]:
    """Least-squares line through (ln N, ln ln ratio): ln ratio = A * N^-b. Returns (A, b)."""
    xs = [math.log(n) for n in steps]
    ys = [math.log(math.log(r)) for r in ratios]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), -slope


def steps_for(ratio: float, a: float, b: float) -> float:
    """Steps at which the fit reaches ``ratio`` (inf when the fit does not fall)."""
    return (math.log(ratio) / a) ** (-1.0 / b) if b > 0 else math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="64,160,320", help="comma-separated step budgets")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    try:
        budgets = sorted({int(s) for s in args.steps.split(",")})
    except ValueError:
        budgets = []
    if len(budgets) < 2 or budgets[0] < 1:
        ap.error(f"--steps {args.steps!r}: give at least two positive step counts, e.g. --steps 64,160,320")
    start = refit_start(eval_tokens_max=args.eval_tokens)
    opts, tok, teacher, student0, ppl = start.opts, start.tokenizer, start.teacher, start.student, start.ppl
    seq_len, batch = opts.distill_seq_len, opts.distill_batch_size

    orig, refit = ppl(teacher), ppl(student0)
    rows = []
    for n in budgets:
        # the window pool of `--distill-samples max(640, 4N)`; a shorter one is a prefix of a longer one
        pool = calibration_samples(tok, start.sources, num_samples=max(opts.distill_samples, batch * n),
                                   seq_len=seq_len, seed=opts.seed + 1)
        student = copy.deepcopy(student0)
        r = distill(student, teacher, pool, settings=distill_settings(opts, n))
        rows.append((n, len(pool), r, ppl(student)))
        print(n, r["seconds"], rows[-1][3], file=sys.stderr)
        del student
    per_step = sum(r["seconds"] for _, _, r, _ in rows) / sum(n for n, *_ in rows)
    lines = ["## Distillation budget: quality against steps, and what the goals would take", "",
             f"SmolLM2-135M-Instruct pruned one-shot to 0.75 and refit with the package defaults (calibration Python "
             f"HOWTOs + FAQ + 32 generated texts), then N distillation steps of {batch} x {seq_len} tokens from that "
             f"same start, each N with its own warm-up and cosine schedule and the pool of windows "
             f"`--distill-samples max(640, 4N)` draws (all the calibration text has; a pool smaller than 4N is "
             f"seen more than once). Perplexity on {args.eval_tokens} tokens of the Python tutorial (held out) and "
             f"GPL-3 (out of domain), before quantization. Original: {orig[0]:.2f} / {orig[1]:.2f}; pruned + refit: "
             f"{refit[0]:.2f} ({refit[0] / orig[0]:.2f}x) / {refit[1]:.2f} ({refit[1] / orig[1]:.2f}x).", "",
             "| steps | windows in pool | tokens | KL first -> last | seconds | s/step | ppl held out | x orig "
             "| ppl out of domain | x orig |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, windows, r, (a, b) in rows:
        lines.append(f"| {n} | {windows} | {r['tokens']:,} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
                     f"{r['seconds']:.0f} | {r['seconds'] / n:.2f} | {a:.2f} | {a / orig[0]:.3f} | {b:.2f} | "
                     f"{b / orig[1]:.3f} |")
    lines += ["", f"Fit through the {len(rows)} rows, ln(ppl / ppl_original) = A * N^-b, extrapolated (an order of "
              f"magnitude, no more: it assumes more of the same text keeps helping as it did), at "
              f"{per_step:.2f} s per step:", ""]
    for k, (label, goal) in enumerate(GOALS.items()):
        a, b = power_fit([n for n, *_ in rows], [q[k] / orig[k] for *_, q in rows])
        need = steps_for(goal, a, b)
        when = "never (the fit does not fall)" if math.isinf(need) else (
            f"about {need:,.0f} steps, {need * per_step / 3600:.1f} h of distillation")
        lines.append(f"- {label}: b = {b:.3f}; {goal}x the original at {when}.")
    publish("budget", lines)


if __name__ == "__main__":
    main()
