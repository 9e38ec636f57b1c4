"""Distillation settings side by side: SmolLM2-135M-Instruct pruned one-shot to 0.75 and refit (the starting
point is the same for every row), then the same number of logit-distillation steps on the same batches with
different peak learning rates, with the token embedding / LM head trained or frozen. Perplexity held out in
domain (Python tutorial) and out of domain (GPL-3), and training throughput.

    .venv/bin/python bench/distill.py [--steps 64] [--eval-tokens 4096] [--refit-target block|stream] [--default-only]
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import publish  # noqa: E402
from _start import refit_start  # noqa: E402

from serve_pruned.compress.data import calibration_samples  # noqa: E402
from serve_pruned.compress.distill import distill  # noqa: E402
from serve_pruned.compress.steps import distill_settings  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402

# (peak lr, train the embedding); DEFAULT is what `serve-pruned package` uses
DEFAULT = (PackageOptions.model_fields["distill_lr"].default,
           PackageOptions.model_fields["distill_train_embeddings"].default)
SETTINGS = [(1e-4, True), (4e-4, True), (4e-4, False), (1e-3, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--refit-target", choices=("block", "stream"), default="block", help="how the start is refit")
    ap.add_argument("--default-only", action="store_true", help="only the package default setting")
    args = ap.parse_args()
    start = refit_start(eval_tokens_max=args.eval_tokens, refit_target=args.refit_target)
    tok, teacher, student0, ppl = start.tokenizer, start.teacher, start.student, start.ppl
    dsamples = calibration_samples(tok, start.sources, num_samples=512, seq_len=256, seed=1)

    orig, refit = ppl(teacher), ppl(student0)
    rows = []
    for lr, train_emb in [DEFAULT] if args.default_only else SETTINGS:
        student = copy.deepcopy(student0)
        settings = replace(distill_settings(start.opts, args.steps), lr=lr, train_embeddings=train_emb)
        r = distill(student, teacher, dsamples, settings=settings)
        rows.append((lr, train_emb, r, ppl(student)))
        print(lr, train_emb, r["seconds"], rows[-1][3], file=sys.stderr)
    tokens = args.steps * 4 * 256
    title = "## Distillation settings: learning rate, embedding trained or frozen"
    if args.refit_target != "block":
        title += f" (from a {args.refit_target}-target refit)"
    lines = [title, "",
             f"SmolLM2-135M-Instruct pruned one-shot to its 0.75 shape and refit (calibration Python HOWTOs + FAQ + "
             f"32 generated texts; refit target {args.refit_target}), then {args.steps} distillation steps "
             f"({tokens:,} tokens, the same batches) from "
             f"that same start; perplexity on {args.eval_tokens} tokens of the Python tutorial (held out) and GPL-3 "
             f"(out of domain). Original: {orig[0]:.2f} / {orig[1]:.2f}; pruned + refit: {refit[0]:.2f} "
             f"({refit[0] / orig[0]:.2f}x) / {refit[1]:.2f} ({refit[1] / orig[1]:.2f}x).", "",
             "| peak lr | embedding | KL first -> last | seconds | tokens/s | ppl held out | x orig "
             "| ppl out of domain | x orig |", "|---|---|---|---|---|---|---|---|---|"]
    for lr, train_emb, r, (a, b) in rows:
        lines.append(f"| {lr:g} | {'trained' if train_emb else 'frozen'} | {r['loss_first']:.3f} -> "
                     f"{r['loss_last']:.3f} | {r['seconds']:.0f} | {r['tokens'] / r['seconds']:.0f} | {a:.2f} | "
                     f"{a / orig[0]:.2f} | {b:.2f} | {b / orig[1]:.2f} |")
    # the default start keeps its section; another refit target gets its own beside it
    publish("distill" if args.refit_target == "block" else f"distill-{args.refit_target}", lines)


if __name__ == "__main__":
    main()
