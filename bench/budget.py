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
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, OOD, publish  # noqa: E402

from serve_pruned.compress.data import calibration_samples, eval_tokens, read_sources  # noqa: E402
from serve_pruned.compress.distill import DistillSettings, distill  # noqa: E402
from serve_pruned.compress.evaluate import evaluate  # noqa: E402
from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.model_io import load_model, load_tokenizer, resolve_model  # noqa: E402
from serve_pruned.compress.package import _generated, package, source_fingerprint  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402

DEFAULTS = {k: PackageOptions.model_fields[k].default for k in (
    "distill_lr", "distill_batch_size", "distill_seq_len", "distill_samples", "distill_temperature",
    "distill_hidden_weight", "distill_train_embeddings", "distill_dtype", "seed")}
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
    budgets = sorted({int(s) for s in args.steps.split(",")})
    if len(budgets) < 2 or budgets[0] < 1:
        sys.exit("--steps needs at least two positive budgets")
    calib = (str(DOCS / "howto"), str(DOCS / "faq"), "generated:32")
    seq_len, batch = DEFAULTS["distill_seq_len"], DEFAULTS["distill_batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        src = materialize(Path(tmp) / "smol")
        start = Path(tmp) / "refit"
        package(PackageOptions(model=str(src), out=start, target_params=0.75, distill_steps=0, calib=calib),
                progress=False)
        tok = load_tokenizer(src, trust_remote_code=False)
        teacher = load_model(src, dtype="float32", trust_remote_code=False)
        student0 = load_model(start, dtype="float32", trust_remote_code=False)
        sources = read_sources(list(calib))
        # the same generated texts the packaging used (cached by the model's fingerprint)
        sources[2].docs = _generated(teacher, tok, 32, fingerprint=source_fingerprint(resolve_model(str(src))),
                                     seq_len=seq_len, seed=DEFAULTS["seed"], progress=False, log=lambda _m: None)
    texts = [eval_tokens(tok, read_sources([str(p)]), max_tokens=args.eval_tokens) for p in (DOCS / "tutorial", OOD)]

    def ppl(model) -> tuple[float, float]:
        held_out, ood = (evaluate(model, ids, seq_len=512).perplexity for ids in texts)
        return held_out, ood

    orig, refit = ppl(teacher), ppl(student0)
    rows = []
    for n in budgets:
        # the window pool of `--distill-samples max(640, 4N)`; a shorter one is a prefix of a longer one
        pool = calibration_samples(tok, sources, num_samples=max(DEFAULTS["distill_samples"], batch * n),
                                   seq_len=seq_len, seed=DEFAULTS["seed"] + 1)
        student = copy.deepcopy(student0)
        r = distill(student, teacher, pool, settings=DistillSettings(
            steps=n, lr=DEFAULTS["distill_lr"], batch_size=batch, temperature=DEFAULTS["distill_temperature"],
            hidden_weight=DEFAULTS["distill_hidden_weight"], warmup_steps=max(1, min(10, n // 10)),
            dtype=DEFAULTS["distill_dtype"], seed=DEFAULTS["seed"],
            train_embeddings=DEFAULTS["distill_train_embeddings"]))
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
