"""The quality guard on SmolLM2-135M: `package --max-ppl-ratio R --quant w8a8` with the default ladder.

What it chose, every candidate it packaged and measured (held-out perplexity ratio, out of domain, fact prompts,
seconds), and its cost in time; then a guard nothing on a one-rung ladder can meet, which must refuse, list what it
measured and leave no output folder.

    .venv/bin/python bench/guard.py [--ratio 1.1] [--distill-steps 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, OOD, publish  # noqa: E402

EXE = str(Path(sys.executable).parent / "serve-pruned")


def package(src: Path, out: Path, cache: Path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [EXE, "package", str(src), "--out", str(out), "--quant", "w8a8", "--calib", str(DOCS / "howto"),
           "--calib", str(DOCS / "faq"), "--eval-text", str(DOCS / "tutorial"), "--eval-ood-text", str(OOD),
           "--eval-max-tokens", "8192", "--format", "json", "--no-progress", *flags]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SERVE_PRUNED_CACHE": str(cache)})
    return proc, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", default="1.1")
    ap.add_argument("--distill-steps", default="0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, cache = Path(tmp) / "smol", Path(tmp) / "cache"
        subprocess.run([EXE, "example-model", str(src)], check=True, capture_output=True)
        proc, wall = package(src, Path(tmp) / "out", cache, "--max-ppl-ratio", args.ratio,
                             "--distill-steps", args.distill_steps)
        if proc.returncode:
            sys.exit(proc.stderr)
        m = json.loads(proc.stdout)
        refused, refused_wall = package(src, Path(tmp) / "refused", cache, "--max-ppl-ratio", "1.001",
                                        "--guard-fractions", "0.9", "--distill-steps", args.distill_steps)
        refusal = next((ln for ln in refused.stderr.splitlines() if ln.startswith("error:")), refused.stderr[-500:])
        left = (Path(tmp) / "refused").exists() or any(p.name.startswith(".refused") for p in Path(tmp).iterdir())
    g = m["guard"]
    lines = [f"SmolLM2-135M, `--max-ppl-ratio {args.ratio} --quant w8a8 --distill-steps {args.distill_steps}` "
             f"(refit on), the default ladder ({', '.join(_name(c) for c in g['candidates'])}), calibrated on the "
             "Python HOWTOs and FAQ, measured on the tutorial (held out, 8192 tokens) and GPL-3 (out of domain).", "",
             "| candidate | weight bytes | ppl x orig | out of domain x orig | fact prompts | within | seconds |",
             "|---|---|---|---|---|---|---|"]
    for t in g["tried"]:
        lines.append(f"| {_name(t)} | {t['weight_bytes']:,} | {t['ppl_ratio']:.3f} | "
                     f"{t['ood_ratio']:.3f} | {t['facts']:.2f} | {'yes' if t['passed'] else 'no'} | "
                     f"{t['seconds']:.0f} |")
    lines += ["", f"Chosen: {_name(g['chosen'])} ({g['why']}), measured {g['measured_ppl_ratio']:.3f}x; "
              f"{len(g['tried'])} of {len(g['candidates'])} candidates packaged, {wall / 60:.1f} min in all.", "",
              f"A guard nothing meets (`--max-ppl-ratio 1.001 --guard-fractions 0.9`): exit {refused.returncode} "
              f"after {refused_wall / 60:.1f} min, output folder or scratch left behind: {'yes' if left else 'no'}.",
              "", f"    {refusal}"]
    publish("guard", lines)


def _name(rung: dict) -> str:
    cut = f"{rung['fraction']:g}" if rung["fraction"] is not None else "unpruned"
    return f"{cut} + {rung['quant']}"


if __name__ == "__main__":
    main()
