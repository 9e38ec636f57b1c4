"""The quality / size frontier of SmolLM2-135M-Instruct: perplexity against kept parameters (0.9, 0.8, 0.75,
0.6), without recovery, with one-shot pruning + recovery, and with iterative pruning + the same recovery
budget; held out in domain (Python tutorial) and out of domain (GPL-3). Writes a table into
docs/benchmarks.md and the plot docs/frontier.png.

    .venv/bin/python bench/frontier.py [--distill-steps 60] [--targets 0.9 0.8 0.75 0.6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOC, DOCS, OOD, publish  # noqa: E402

from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.compress.steps import step_targets  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402

PLOT = DOC.parent / "frontier.png"
VARIANTS = {"no recovery": dict(recover=False, schedule="one-shot"),
            "one-shot + recovery": dict(schedule="one-shot"),
            "iterative + recovery": dict(schedule="iterative")}


def run(src: Path, out: Path, target: float, variant: str, args: argparse.Namespace) -> dict:
    opts = PackageOptions(
        model=str(src), out=out, target_params=target, calib=(str(DOCS / "howto"), str(DOCS / "faq"), "generated:32"),
        num_samples=args.num_samples, distill_steps=args.distill_steps, eval_text=(str(DOCS / "tutorial"),),
        eval_ood_text=(str(OOD),), eval_max_tokens=args.eval_tokens, eval_baseline=True, **VARIANTS[variant])
    t = time.perf_counter()
    result = package(opts, progress=False, log=lambda msg: print(f"  [{target} {variant}] {msg}", file=sys.stderr))
    m = result.manifest.to_dict()
    q = m["quality"]
    final = q["recovered"] if "recovered" in q else q["pruned"]
    return {"fraction": m["params_fraction"], "ppl": final["perplexity"], "ood": final["out_of_domain"]["perplexity"],
            "orig": q["original"]["perplexity"], "orig_ood": q["original"]["out_of_domain"]["perplexity"],
            "facts": final["prompts"]["prefix_agreement"], "shape": m["shape_after"],
            "steps": len(m["recovery"].get("steps") or [1]), "seconds": time.perf_counter() - t}


def plot(results: dict[tuple[float, str], dict], orig: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, base, title in ((axes[0], "ppl", orig[0], "held out, in domain (Python tutorial)"),
                                 (axes[1], "ood", orig[1], "out of domain (GPL-3)")):
        for variant, style in zip(VARIANTS, ("o:", "s--", "^-"), strict=True):
            pts = sorted((r["fraction"], r[key]) for (_t, v), r in results.items() if v == variant)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=variant)
        ax.axhline(base, color="grey", lw=0.8)
        ax.text(0.99, base, f"original {base:.2f}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=8, color="grey")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of parameters kept")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: quality against size (serve-pruned)", fontsize=11)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.75, 0.6])
    ap.add_argument("--distill-steps", type=int, default=60)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    results: dict[tuple[float, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = materialize(Path(tmp) / "smol")
        for target in args.targets:
            for variant in VARIANTS:
                if variant == "iterative + recovery" and len(step_targets(target, 0.125)) == 1:
                    results[(target, variant)] = results[(target, "one-shot + recovery")]  # one step either way
                    continue
                results[(target, variant)] = run(src, Path(tmp) / f"{target}-{len(results)}", target, variant, args)
                r = results[(target, variant)]
                print(f"{target} {variant}: {r['fraction']:.3f} ppl {r['ppl']:.2f} ood {r['ood']:.2f} "
                      f"({r['seconds']:.0f} s)", file=sys.stderr)
    any_r = next(iter(results.values()))
    orig = (any_r["orig"], any_r["orig_ood"])
    plot(results, orig)
    budget = args.distill_steps * 4 * 256
    lines = ["## Frontier: perplexity against kept parameters, with and without recovery, one-shot vs iterative", "",
             f"SmolLM2-135M-Instruct; calibration Python HOWTOs + FAQ + 32 generated texts ({args.num_samples} x 512 "
             f"tokens for scores, search and refit); recovery = refit + {args.distill_steps} distillation steps "
             f"({budget:,} tokens) in all, the same budget for one-shot and iterative (steps of at most 12.5% of the "
             f"parameters); perplexity on {args.eval_tokens} tokens of the Python tutorial (held out) and of GPL-3 "
             f"(out of domain). Original: {orig[0]:.2f} / {orig[1]:.2f}. Plot: [frontier.png](frontier.png).", "",
             "| target | kept | shape (layers/heads/kv/ffn) | variant | steps | ppl held out | x orig "
             "| ppl out of domain | x orig | fact prompts | time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (target, variant), r in results.items():
        s = r["shape"]
        lines.append(f"| {target} | {r['fraction']:.3f} | {s['num_layers']}/{s['num_heads']}/{s['num_kv_heads']}/"
                     f"{s['intermediate_size']} | {variant} | {r['steps']} | {r['ppl']:.2f} | {r['ppl'] / orig[0]:.2f} "
                     f"| {r['ood']:.2f} | {r['ood'] / orig[1]:.2f} | {r['facts']:.2f} | {r['seconds']:.0f} s |")
    publish("frontier", lines)


if __name__ == "__main__":
    main()
