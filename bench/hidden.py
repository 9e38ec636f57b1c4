"""The hidden axis on SmolLM2-135M-Instruct at 0.75 + W8A8 with the default recovery budget, in one run:

* ``FFN-only (default search)``: today's search (KV groups, query heads, FFN width);
* ``search with --prune-hidden``: the same search with the hidden size allowed too. It is run first without
  recovery or quantization, for its choice and its table: when it picks the FFN-only run's shape, every later
  stage is the same deterministic computation as that run's, so its row is that run's; otherwise it is packaged
  through the same recovery;
* ``best hidden cut, forced``: when the search still picks a full hidden size, the hidden-cut shape it ranked
  best, packaged through the same recovery, so the cost of cutting the hidden axis is measured rather than
  guessed from the search's pre-recovery loss.

Each row: shape, kept parameters, weight bytes, held-out and out-of-domain perplexity after quantization, and
the fact prompts' agreement with the original; the search's table (every shape it tried) follows.

    .venv/bin/python bench/hidden.py [--target 0.75] [--quant w8a8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, OOD, publish  # noqa: E402

from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.package import package  # noqa: E402
from serve_pruned.options import PackageOptions  # noqa: E402

SHAPE = ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_layers")


def run(src: Path, out: Path, label: str, args: argparse.Namespace, **kw) -> dict:
    opts = PackageOptions(**{
        "model": str(src), "out": out, "quant": args.quant,
        "calib": (str(DOCS / "howto"), str(DOCS / "faq"), "generated:32"),
        "eval_text": (str(DOCS / "tutorial"),), "eval_ood_text": (str(OOD),), "eval_max_tokens": args.eval_tokens,
        **kw})
    t = time.perf_counter()
    m = package(opts, progress=False, log=lambda msg: print(f"  [{label}] {msg}", file=sys.stderr)).manifest.to_dict()
    return row(m, label, time.perf_counter() - t)


def row(m: dict, label: str, seconds: float) -> dict:
    """One table row from a package run's manifest."""
    q = m["quality"]
    final = q.get("quantized") or q.get("recovered") or q["pruned"]
    return {"label": label, "shape": m["shape_after"], "fraction": m["params_fraction"], "bytes": m["weight_bytes"],
            "ppl": final["perplexity"], "ood": final["out_of_domain"]["perplexity"],
            "facts": final["prompts"]["prefix_agreement"], "orig": q["original"],
            "hidden_before": m["shape_before"]["hidden_size"], "scorer": (m.get("pruning") or {}).get("scorer"),
            "search": (m.get("pruning") or {}).get("shape_search") or [], "seconds": seconds}


def shape_text(s: dict) -> str:
    return (f"hidden {s['hidden_size']}, heads {s['num_heads']}/{s['num_kv_heads']}, FFN {s['intermediate_size']}, "
            f"layers {s['num_layers']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--quant", default="w8a8")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--source", type=Path, help="an already materialized SmolLM2 folder: recovery checkpoints are "
                    "keyed by the source's path too, so a rerun on the same folder resumes them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.source or materialize(Path(tmp) / "smol")
        rows = [run(src, Path(tmp) / "ffn", "FFN-only (default search)", args, target_params=args.target)]
        search = run(src, Path(tmp) / "search", "search with --prune-hidden", args, target_params=args.target,
                     prune_hidden=True, distill_steps=0, recover=False, quant="none",
                     scorer=rows[0]["scorer"])  # auto would not take obs without the refit: score as that run did
        base_hidden = rows[0]["hidden_before"]
        if search["shape"] == rows[0]["shape"]:
            rows.append({**rows[0], "label": "search with --prune-hidden (chose the FFN-only shape: same model)"})
        else:
            rows.append(run(src, Path(tmp) / "hidden", "search with --prune-hidden", args,
                            target_params=args.target, prune_hidden=True))
        rows[-1]["search"] = search["search"]
        cut = sorted((r for r in search["search"] if r["hidden_size"] < base_hidden), key=lambda r: r["calib_loss"])
        if rows[1]["shape"]["hidden_size"] == base_hidden and cut:
            best = cut[0]
            rows.append(run(src, Path(tmp) / "forced", "best hidden cut, forced", args, keep_hidden=best["hidden_size"],
                            keep_heads=best["num_heads"], keep_kv_heads=best["num_kv_heads"],
                            keep_ffn=best["intermediate_size"]))
    publish("hidden", section(rows, args))


def section(rows: list[dict], args: argparse.Namespace, note: str = "") -> list[str]:
    orig = rows[0]["orig"]
    lines = [f"SmolLM2-135M-Instruct at {args.target} of its parameters + {args.quant.upper()}, default recovery "
             f"(refit, then distillation), calibration on Python's HOWTOs and FAQ plus 32 generated texts; "
             f"perplexity after quantization on the Python tutorial (held out) and GPL-3 (out of domain), "
             f"{args.eval_tokens} tokens each. Original: {orig['perplexity']:.2f} / "
             f"{orig['out_of_domain']['perplexity']:.2f}.", "",
             "| run | shape | kept params | weight bytes | held-out ppl | out-of-domain ppl | fact prompts | time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {shape_text(r['shape'])} | {r['fraction']:.3f} | {r['bytes'] / 2**20:.1f} MiB "
                     f"| {r['ppl']:.2f} | {r['ood']:.2f} | {r['facts']:.2f} | {r['seconds'] / 60:.1f} min |")
    lines += ["", "Shapes the `--prune-hidden` search tried (calibration loss right after pruning, before any "
              "recovery; the lowest wins):", "",
              "| hidden | heads / KV | FFN | kept params | calibration loss |", "|---|---|---|---|---|"]
    for s in sorted(rows[1]["search"], key=lambda r: r["calib_loss"]):
        lines.append(f"| {s['hidden_size']} | {s['num_heads']} / {s['num_kv_heads']} | {s['intermediate_size']} | "
                     f"{s['fraction']:.3f} | {s['calib_loss']:.3f} |")
    return lines + (["", note] if note else [])


if __name__ == "__main__":
    main()
