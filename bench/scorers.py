"""Perplexity of SmolLM2-135M-Instruct pruned to 0.75 of its parameters, per scorer, with no recovery and
after the closed-form refit alone (no distillation).

Calibration: Python's HOWTOs and FAQ (python3-doc). Evaluation: Python's tutorial (held out), and an
out-of-domain text (the GPL-3 licence) to show what calibrating on one domain costs elsewhere.
The activation, fluctuation and magnitude scorers share one calibration pass (cached); obs makes its own,
which also accumulates the FFN Gram matrices.

    .venv/bin/python bench/scorers.py [--target 0.75] [--num-samples 64] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, OOD, publish  # noqa: E402

from serve_pruned.compress.evaluate import evaluate_folder  # noqa: E402
from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--scorers", default="activation,fluctuation,magnitude,obs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-scorers-") as tmp:
        os.environ["SERVE_PRUNED_CACHE"] = str(Path(tmp) / "cache")  # an empty cache: wall times include scoring
        base = materialize(Path(tmp) / "SmolLM2-135M-Instruct")
        rows = []
        texts = {"tutorial (in domain)": [str(DOCS / "tutorial")], "GPL-3 (out of domain)": [str(OOD)]}
        original = {k: evaluate_folder(str(base), v, max_tokens=args.eval_tokens, progress=False)["perplexity"]
                    for k, v in texts.items()}
        for scorer in args.scorers.split(","):
            for refit in (False, True):
                t = time.perf_counter()
                opts = PackageOptions(model=str(base), out=Path(tmp) / f"{scorer}-{refit}", target_params=args.target,
                                      scorer=scorer, calib=(str(DOCS / "howto"), str(DOCS / "faq")),
                                      num_samples=args.num_samples, recover=refit, refit=refit, distill_steps=0)
                result = package(opts, progress=False, log=lambda m: print(m, file=sys.stderr))
                elapsed = time.perf_counter() - t
                m = result.manifest.to_dict()
                ppl = {k: evaluate_folder(str(result.out), v, max_tokens=args.eval_tokens, progress=False)["perplexity"]
                       for k, v in texts.items()}
                s = m["shape_after"]
                rows.append((scorer, refit, s, m["params_fraction"], ppl, elapsed))
                print(json.dumps({"scorer": scorer, "refit": refit, "shape": s, "ppl": ppl, "s": elapsed}),
                      file=sys.stderr)

    names = list(texts)
    lines = [
        f"## Scorers: SmolLM2-135M-Instruct at `--target-params {args.target}`, no recovery / refit only",
        "",
        f"Calibration: Python HOWTOs + FAQ, {args.num_samples} x 512 tokens. Perplexity on the first "
        f"{args.eval_tokens} tokens of each text, 512-token windows, float32. The shape is chosen by the "
        "search (lowest calibration loss among all fitting shapes) with each scorer's own selection. Recovery: none, "
        "or the closed-form least-squares refit of every pruned down_proj (`--distill-steps 0`).",
        "",
        "| scorer | recovery | kept shape (heads/kv, FFN, layers) | params kept | "
        + " | ".join(f"ppl {n}" for n in names) + " | ratio to original (in / out) | wall time |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|",
        "| original | | 9/3, 1536, 30 | 1.000 | " + " | ".join(f"{original[n]:.2f}" for n in names)
        + " | 1.00 / 1.00 | |",
    ]
    for scorer, refit, s, frac, ppl, elapsed in rows:
        ratios = " / ".join(f"{ppl[n] / original[n]:.2f}" for n in names)
        lines.append(f"| {scorer} | {'refit' if refit else 'none'} | {s['num_heads']}/{s['num_kv_heads']}, "
                     f"{s['intermediate_size']}, {s['num_layers']} | {frac:.3f} | "
                     + " | ".join(f"{ppl[n]:.2f}" for n in names) + f" | {ratios} | {elapsed:.0f} s |")
    lines += ["", "Wall time is the whole `package` run: the first run of activation pays for the shared calibration "
              "pass, which later runs reuse; obs's first run pays for its own (with Gram matrices and the greedy "
              "elimination)."]
    publish("scorers", lines)


if __name__ == "__main__":
    main()
