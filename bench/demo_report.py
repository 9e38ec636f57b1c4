"""What `make demo` packaged: the quality guard's tries and choice, and the quality report of every stage of the
chosen model, read from the output's manifest (the demo measures them; this script only writes them down).

    make demo && .venv/bin/python bench/demo_report.py [out/demo/smollm2-w8a8] [--wall-min M]

``--wall-min`` records how long the demo's package step took, when it was timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import write_section  # noqa: E402
from guard import _name  # noqa: E402
from pipeline import STAGES  # noqa: E402


def section(m: dict, wall_min: float | None) -> list[str]:
    g, q, o = m["guard"], m["quality"], m["options"]
    lines = [f"`make demo`'s package step: SmolLM2-135M-Instruct, `--max-ppl-ratio {g['max_ppl_ratio']:g} "
             f"--guard-fractions {' '.join(f'{f:g}' for f in o['guard_fractions'])} --quant {o['quant']}` with the "
             f"default recovery ({o['distill_steps']} distillation steps), calibrated on Python's HOWTOs and FAQ plus "
             "32 texts the original generated; held out: the Python tutorial, out of domain: GPL-3, 8192 tokens each.",
             "", "| candidate | weight bytes | ppl x orig | out of domain x orig | fact prompts | within | minutes |",
             "|---|---|---|---|---|---|---|"]
    for t in g["tried"]:
        lines.append(f"| {_name(t)} | {t['weight_bytes']:,} | {t['ppl_ratio']:.3f} | {t['ood_ratio']:.3f} | "
                     f"{t['facts']:.2f} | {'yes' if t['passed'] else 'no'} | {t['seconds'] / 60:.1f} |")
    lines += ["", f"Chosen: {_name(g['chosen'])} ({g['why']}), {m['params_fraction']:.3f} of the parameters, "
              f"{m['weight_bytes']:,} bytes of weights" + (f"; the package step took {wall_min:.1f} min." if wall_min
                                                           else "."), "",
              "The chosen model's report, every stage:", "",
              "| stage | ppl held out | x orig | ppl out of domain | x orig | fact prompts |",
              "|---|---|---|---|---|---|"]
    base = q["original"]
    for stage in (s for s in STAGES if s in q):
        e = q[stage]
        lines.append(f"| {stage} | {e['perplexity']:.2f} | {e['perplexity'] / base['perplexity']:.2f} | "
                     f"{e['out_of_domain']['perplexity']:.2f} | "
                     f"{e['out_of_domain']['perplexity'] / base['out_of_domain']['perplexity']:.2f} | "
                     f"{e['prompts']['prefix_agreement']:.2f} |")
    completions = q[next(s for s in reversed(STAGES) if s in q)]["prompts"].get("completions") or {}
    if completions:
        lines += ["", "Greedy completions of the chosen model: " + "; ".join(
            f"{p!r} -> {c!r}" for p, c in list(completions.items())[:4])]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=Path("out/demo/smollm2-w8a8"))
    ap.add_argument("--wall-min", type=float)
    args = ap.parse_args()
    m = json.loads((args.folder / "serve_pruned.json").read_text())
    if not m.get("guard"):
        sys.exit(f"{args.folder} was not packaged with a quality guard (--max-ppl-ratio): not the demo's output")
    lines = section(m, args.wall_min)
    command = "make demo && .venv/bin/python bench/demo_report.py " + " ".join(sys.argv[1:])
    write_section("demo", "\n".join(lines), command)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
