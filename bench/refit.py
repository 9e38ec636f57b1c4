"""What the closed-form refit buys: SmolLM2-135M-Instruct pruned to its 0.75 shape at --multiple-of 64
(FFN 832), perplexity before and after the least-squares refit, in and out of the calibration domain, with
the two targets side by side: "block" (every down_proj reproduces the original MLP on the same input) and
"stream" (every o_proj and down_proj brings the residual stream back onto the original model's, correcting
earlier layers' drift too).

    .venv/bin/python bench/refit.py [--num-samples 64] [--eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import DOCS, OOD, publish  # noqa: E402

from serve_pruned.compress.data import calibration_samples, eval_tokens, read_sources  # noqa: E402
from serve_pruned.compress.evaluate import evaluate  # noqa: E402
from serve_pruned.compress.example_model import materialize  # noqa: E402
from serve_pruned.compress.importance import collect_stats, compute_scores, select  # noqa: E402
from serve_pruned.compress.model_io import load_model, load_tokenizer  # noqa: E402
from serve_pruned.compress.prune import prune_model  # noqa: E402
from serve_pruned.compress.refit import refit, refit_down_proj  # noqa: E402
from serve_pruned.model.shapes import Shape  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = materialize(Path(tmp) / "smol")
        cfg = json.loads((src / "config.json").read_text())
        tok = load_tokenizer(src, trust_remote_code=False)
        model = load_model(src, dtype="float32", trust_remote_code=False)
    samples = calibration_samples(tok, read_sources([str(DOCS / "howto"), str(DOCS / "faq")]),
                                  num_samples=args.num_samples, seq_len=512, seed=0)
    texts = {name: eval_tokens(tok, read_sources([str(path)]), max_tokens=args.eval_tokens)
             for name, path in (("tutorial (in domain)", DOCS / "tutorial"), ("GPL-3 (out of domain)", OOD))}
    before = Shape.from_config(cfg)
    after = Shape(before.num_layers, before.num_heads, before.num_kv_heads, before.head_dim, 832, before.hidden_size)
    sel = select(compute_scores(collect_stats(model, samples), before, "activation"), before, after)
    pruned, _ = prune_model(model, cfg, before, after, sel)
    rows = {"original": {k: evaluate(model, v).perplexity for k, v in texts.items()},
            "pruned (activation scores)": {k: evaluate(pruned, v).perplexity for k, v in texts.items()}}
    stream = copy.deepcopy(pruned)
    t = time.perf_counter()
    report = refit_down_proj(pruned, model, sel.layers, samples)
    seconds = time.perf_counter() - t
    rows["pruned + refit, block target (down_proj)"] = {k: evaluate(pruned, v).perplexity for k, v in texts.items()}
    t = time.perf_counter()
    refit(stream, model, sel.layers, samples, target="stream")
    stream_seconds = time.perf_counter() - t
    rows["pruned + refit, stream target (o_proj + down_proj)"] = {
        k: evaluate(stream, v).perplexity for k, v in texts.items()}
    names = list(texts)
    lines = ["## Closed-form refit: SmolLM2-135M-Instruct at its 0.75 shape, --multiple-of 64 (FFN 1536 -> 832)", "",
             f"Calibration: Python HOWTOs + FAQ, {args.num_samples} x 512 tokens; perplexity on the first "
             f"{args.eval_tokens} tokens of each text, float32. Block refit: {seconds:.0f} s on this machine, mean "
             f"relative MLP reconstruction error {report['mlp_rel_error_before']:.3f} -> "
             f"{report['mlp_rel_error_after']:.3f} on the calibration tokens; stream refit: {stream_seconds:.0f} s.",
             "",
             "| model | " + " | ".join(f"ppl {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{r[n]:.2f} ({r[n] / rows['original'][n]:.2f}x)" for n in names) + " |"
              for m, r in rows.items()]
    publish("refit", lines)


if __name__ == "__main__":
    main()
