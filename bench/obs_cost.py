"""What the obs scorer's greedy elimination costs per decoder layer against the FFN width, on this machine.

`obs_order` on a Gram matrix of random activations ([F, F], as one layer's down_proj inputs give it) at each
width, timed once each in one run. Its cost is cubic in the width (each round of 16 channels rewrites the
remaining F x F inverse), so the fitted seconds per width cubed is what ``--scorer auto`` predicts obs's cost
with (serve_pruned/compress/scorer_choice.py) before it chooses.

    .venv/bin/python bench/obs_cost.py [--widths 1536,2816,4096,5632]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import publish  # noqa: E402


def main() -> None:
    import torch

    from serve_pruned.compress.importance import obs_order
    from serve_pruned.compress.scorer_choice import OBS_SECONDS_PER_WIDTH_CUBED

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="1536,2816,4096,5632")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for f in (int(w) for w in args.widths.split(",")):
        a = torch.randn(2048, f, generator=gen)  # 2048 tokens of activations: a full-rank Gram matrix
        gram, weight = a.T @ a, torch.randn(f // 3, f, generator=gen)
        t = time.perf_counter()
        obs_order(gram, weight)
        rows.append((f, time.perf_counter() - t))
        print(f, f"{rows[-1][1]:.1f} s", flush=True)
    fitted = sum(s for _, s in rows) / sum(f ** 3 for f, _ in rows)  # least squares through 0 would weigh the
    # largest width almost alone; the ratio of sums does too, and is what the prediction is used for
    lines = ["| FFN width | seconds per layer | predicted (fitted) | predicted (code's constant) |",
             "|---|---|---|---|"]
    for f, s in rows:
        lines.append(f"| {f} | {s:.1f} | {fitted * f ** 3:.1f} | {OBS_SECONDS_PER_WIDTH_CUBED * f ** 3:.1f} |")
    lines += ["", f"Fitted: {fitted * 1e9:.3f} s per 10^9 width^3 (code: {OBS_SECONDS_PER_WIDTH_CUBED * 1e9:.3f}). At "
              f"Llama-3.1-8B's FFN (14336) that is {fitted * 14336 ** 3 / 60:.0f} min a layer, "
              f"{fitted * 14336 ** 3 * 32 / 3600:.1f} h for 32 layers."]
    publish("obs-cost", ["One `obs_order` per width (chunks of 16 channels, float64, as `--scorer obs` runs it) "
                         "on the host CPU.", "", *lines])


if __name__ == "__main__":
    main()
