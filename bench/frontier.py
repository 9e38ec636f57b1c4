"""The size / quality frontier of SmolLM2-135M-Instruct: kept parameters (0.9, 0.8, 0.75, 0.6) x quantization
(none, W8A8, W4A16), quantization alone and the original, each packaged with today's defaults: weight bytes on disk
against perplexity held out (Python tutorial) and out of domain (GPL-3), and fact prompts. The points no other
point beats on both bytes and held-out perplexity form the Pareto front, marked in the table and in
docs/frontier.png.

    .venv/bin/python bench/frontier.py [--fractions 0.9 0.8 0.75 0.6] [--quants none w8a8 w4a16]
                                       [--distill-steps N] [--num-samples N] [--eval-tokens N]

The cuts of one fraction share one recovery: the run with the first scheme prunes and recovers, the others reuse its
checkpoint (the run key leaves quantization out), so their times are quantization and evaluation only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOC, DOCS, OOD, publish  # noqa: E402

from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402

PLOT = DOC.parent / "frontier.png"
DEFAULTS = PackageOptions.model_fields


@dataclass
class Point:
    fraction: float | None  # None: not pruned
    quant: str
    kept: float
    shape: dict
    disk_bytes: int
    ppl: float
    ood: float
    facts: float
    seconds: float
    front: bool = False

    @property
    def name(self) -> str:
        cut = f"{self.fraction:g}" if self.fraction is not None else "unpruned"
        return f"{cut} + {self.quant}" if self.quant != "none" else cut


def run(src: Path, out: Path, fraction: float | None, quant: str, args: argparse.Namespace) -> tuple[Point, dict]:
    opts = PackageOptions(
        model=str(src), out=out, target_params=fraction, quant=quant,
        calib=(str(DOCS / "howto"), str(DOCS / "faq"), "generated:32"), num_samples=args.num_samples,
        distill_steps=args.distill_steps, eval_text=(str(DOCS / "tutorial"),), eval_ood_text=(str(OOD),),
        eval_max_tokens=args.eval_tokens)
    t = time.perf_counter()
    result = package(opts, progress=False, log=lambda msg: print(f"  [{fraction} {quant}] {msg}", file=sys.stderr))
    seconds = time.perf_counter() - t
    m = result.manifest.to_dict()
    q = m["quality"]
    final = next(q[s] for s in ("quantized", "recovered", "pruned") if s in q)
    # the manifest's weight_bytes is the size of the written safetensors files
    point = Point(fraction, quant, m["params_fraction"], m["shape_after"], m["weight_bytes"], final["perplexity"],
                  final["out_of_domain"]["perplexity"], final["prompts"]["prefix_agreement"], seconds)
    return point, q["original"]


def original_point(src: Path, original: dict) -> Point:
    disk = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return Point(None, "none", 1.0, {}, disk, original["perplexity"], original["out_of_domain"]["perplexity"],
                 original["prompts"]["prefix_agreement"], 0.0)


def mark_front(points: list[Point]) -> None:
    """A point is on the front when no other has fewer (or equal) bytes and a lower (or equal) held-out
    perplexity, one of them strictly."""
    for p in points:
        p.front = not any(o is not p and o.disk_bytes <= p.disk_bytes and o.ppl <= p.ppl
                          and (o.disk_bytes < p.disk_bytes or o.ppl < p.ppl) for o in points)


def plot(points: list[Point]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig = next(p for p in points if p.fraction is None and p.quant == "none")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    markers = {"none": "o", "w8a8": "s", "w4a16": "^"}
    for ax, key, title in ((axes[0], "ppl", "held out, in domain (Python tutorial)"),
                           (axes[1], "ood", "out of domain (GPL-3)")):
        for quant, marker in markers.items():
            pts = [p for p in points if p.quant == quant]
            ax.scatter([p.disk_bytes / 2**20 for p in pts], [getattr(p, key) for p in pts], marker=marker,
                       label=f"quant {quant}", zorder=3)
            for p in pts:
                ax.annotate(f"{p.fraction:g}" if p.fraction is not None else "1", (p.disk_bytes / 2**20,
                            getattr(p, key)), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = sorted((p for p in points if p.front), key=lambda p: p.disk_bytes)
        ax.plot([p.disk_bytes / 2**20 for p in front], [getattr(p, key) for p in front], "k-", lw=1, alpha=0.6,
                label="Pareto front (held out)", zorder=2)
        base = getattr(orig, key)
        ax.axhline(base, color="grey", lw=0.8)
        ax.text(0.99, base, f"original {base:.2f}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("weight bytes on disk (MiB)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: quality against bytes (serve-pruned; labels: kept parameters)", fontsize=11)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def section(points: list[Point], args: argparse.Namespace) -> list[str]:
    orig = next(p for p in points if p.fraction is None and p.quant == "none")
    lines = ["## Frontier: bytes on disk against quality, pruning x quantization", "",
             f"SmolLM2-135M-Instruct, today's defaults (one-shot, refit, distillation, search over heads and FFN) "
             f"but for the budget: {args.distill_steps} distillation steps, {args.num_samples} calibration samples "
             f"(Python HOWTOs + FAQ + 32 generated texts), perplexity on {args.eval_tokens} tokens of the Python "
             f"tutorial (held out) and of GPL-3 (out of domain). Front: no other point has fewer bytes and a lower "
             f"held-out perplexity. Plot: [frontier.png](frontier.png).", "",
             "| candidate | kept | shape (layers/heads/kv/ffn) | bytes on disk | ppl held out | x orig "
             "| ppl out of domain | x orig | fact prompts | front | time |", "|---" * 11 + "|"]
    for p in sorted(points, key=lambda p: p.disk_bytes):
        s = p.shape or {}
        shape = (f"{s['num_layers']}/{s['num_heads']}/{s['num_kv_heads']}/{s['intermediate_size']}" if s else
                 "original")
        lines.append(f"| {p.name if p is not orig else 'original (bf16)'} | {p.kept:.3f} | {shape} | "
                     f"{p.disk_bytes / 2**20:.1f} MiB | {p.ppl:.2f} | {p.ppl / orig.ppl:.2f} | {p.ood:.2f} | "
                     f"{p.ood / orig.ood:.2f} | {p.facts:.2f} | {'yes' if p.front else ''} | "
                     f"{p.seconds:.0f} s |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.8, 0.75, 0.6])
    ap.add_argument("--quants", nargs="+", default=["none", "w8a8", "w4a16"])
    ap.add_argument("--distill-steps", type=int, default=DEFAULTS["distill_steps"].default)
    ap.add_argument("--num-samples", type=int, default=DEFAULTS["num_samples"].default)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SERVE_PRUNED_CACHE"] = str(Path(tmp) / "cache")  # a clean cache: every recovery is measured
        src = materialize(Path(tmp) / "smol")
        original = None
        for fraction in [*args.fractions, None]:
            for quant in args.quants:
                if fraction is None and quant == "none":
                    continue  # the original itself
                point, original = run(src, Path(tmp) / f"{fraction}-{quant}", fraction, quant, args)
                points.append(point)
                print(f"{point.name}: {point.disk_bytes / 2**20:.1f} MiB ppl {point.ppl:.2f} ood {point.ood:.2f} "
                      f"({point.seconds:.0f} s)", file=sys.stderr)
        assert original is not None, "no candidate ran"
        points.append(original_point(src, original))
    mark_front(points)
    plot(points)
    publish("frontier", section(points, args))


if __name__ == "__main__":
    main()
