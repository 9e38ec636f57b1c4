"""Quantization through llmcompressor into the compressed-tensors format stock vLLM loads.

Schemes:

``w8a8``  INT8 weights and dynamic per-token INT8 activations: SmoothQuant (migrates activation
          outliers into the weights) then GPTQ, channel-wise weights.
``w4a16`` INT4 weights, 16-bit activations: GPTQ with a group size derived from the pruned shapes
          (the largest of 128/64/32 that divides every quantized layer's input width -- the preset's
          128 fails on hidden 576).
``fp8``   FP8 weights (per channel) and dynamic per-token FP8 activations (FP8_DYNAMIC); no data.

With ``kv_cache="fp8"`` (``--kv-cache-dtype fp8``) llmcompressor also calibrates one static FP8 scale per layer
for the keys and one for the values on the same data; they are saved in the checkpoint (``k_scale`` / ``v_scale``,
``kv_cache_scheme`` in its config), where vLLM reads them when it serves with ``--kv-cache-dtype fp8`` (without
them it takes 1.0).

``lm_head`` stays in 16 bits (vLLM's default for these schemes). The llmcompressor recipe is saved
beside the weights as ``recipe.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_pruned.errors import UsageError

SCHEMES = ("none", "w8a8", "w4a16", "fp8")
GROUP_SIZES = (128, 64, 32)
# Static per-tensor FP8 (E4M3) for the keys and values, the scheme vLLM's FP8 KV cache reads scales for.
FP8_KV = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


@dataclass(frozen=True)
class QuantPlan:
    """What will be quantized and how (decided before any heavy work)."""

    scheme: str
    group_size: int | None = None
    smoothing_strength: float = 0.8
    needs_data: bool = True
    kv_cache: str = "auto"  # fp8: calibrated FP8 scales for the KV cache in the checkpoint

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "format": "compressed-tensors",
                "ignore": ["lm_head"], **({"smoothing_strength": self.smoothing_strength}
                                          if self.scheme == "w8a8" else {}),
                **({"kv_cache": self.kv_cache} if self.kv_cache != "auto" else {})}


def plan_quantization(scheme: str, in_widths: Iterable[int], *, group_size: int | None = None,
                      kv_cache: str = "auto") -> QuantPlan | None:
    """Validate a scheme against the layer input widths (hidden, heads x head_dim, FFN) it will quantize
    (``kv_cache="fp8"``: and calibrate the KV cache's FP8 scales with it).

    Raises:
        UsageError: unknown scheme, or a W4A16 group size that does not divide every width.
    """
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return None
    widths = sorted(set(in_widths))
    if scheme == "w4a16":
        if group_size is not None:
            bad = [w for w in widths if w % group_size]
            if bad:
                raise UsageError(
                    f"W4A16 group size {group_size} does not divide layer input width(s) {bad}",
                    hint=f"omit --group-size to derive it, or choose one dividing {widths}")
            return QuantPlan("w4a16", group_size=group_size, kv_cache=kv_cache)
        for g in GROUP_SIZES:
            if all(w % g == 0 for w in widths):
                return QuantPlan("w4a16", group_size=g, kv_cache=kv_cache)
        raise UsageError(f"no W4A16 group size in {GROUP_SIZES} divides the layer widths {widths}",
                         hint="prune to sizes that are multiples of 32 (--multiple-of)")
    if group_size is not None:
        raise UsageError(f"--group-size only applies to w4a16, not {scheme}")
    return QuantPlan(scheme, needs_data=scheme != "fp8" or kv_cache == "fp8", kv_cache=kv_cache)


def _modifiers(plan: QuantPlan) -> list[Any]:
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    kv = QuantizationArgs(**FP8_KV) if plan.kv_cache == "fp8" else None
    if plan.scheme == "fp8":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"], kv_cache_scheme=kv)]
    if plan.scheme == "w8a8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=plan.smoothing_strength),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], kv_cache_scheme=kv)]
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": plan.group_size}
    return [GPTQModifier(targets="Linear", ignore=["lm_head"],
                         config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, kv_cache_scheme=kv)]


def apply_quantization(model: Any, tokenizer: Any, plan: QuantPlan, samples: Any) -> list[Any]:
    """Quantize ``model`` in place with llmcompressor (GPTQ/SmoothQuant on ``samples``); returns the recipe.

    The model stays usable afterwards (fake-quantized forward), so its quality can be measured before
    it is saved.
    """
    _quiet_llmcompressor()
    from llmcompressor import oneshot

    dataset = None
    if plan.needs_data:
        from datasets import Dataset

        rows = samples.tolist()
        dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    recipe = _modifiers(plan)
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=dataset,
            num_calibration_samples=len(samples) if dataset is not None else 0,
            max_seq_length=samples.shape[1] if dataset is not None else None,
            pipeline="sequential" if dataset is not None else "datafree")
    return recipe


def _quiet_llmcompressor() -> None:
    """llmcompressor logs every layer through loguru to STDOUT, our data channel: keep errors, on stderr.

    Its logger is configured (and warns) while it is imported, so the level goes in through its
    environment variable first.
    """
    import os
    import sys

    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    from llmcompressor.logger import LoggerConfig, configure_logger
    from loguru import logger

    configure_logger(LoggerConfig(console_log_level=None))  # removes its stdout sink
    logger.add(sys.stderr, level="ERROR", filter="llmcompressor")


def load_offloaded(folder: Path, *, dtype: Any, host_bytes: int | None, offload_dir: Path,
                   trust_remote_code: bool = False) -> Any:
    """The model saved in ``folder``, for llmcompressor's sequential pipeline to onload layer by layer.

    Up to ``host_bytes`` of its weights are held in host memory (None: what the host has free, less a reserve);
    the rest stay in ``folder``'s safetensors files, read when a layer is onloaded (compressed-tensors' disk
    offload, which writes what quantization changes to ``offload_dir``).
    """
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": "auto_offload", "offload_folder": str(offload_dir)}
    if host_bytes is not None:
        kwargs["max_memory"] = {"cpu": host_bytes}
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    **kwargs)


def save_quantized(model: Any, tokenizer: Any, recipe: list[Any], out: Path, *, max_shard_bytes: int) -> None:
    """Save in the compressed-tensors format, with the llmcompressor recipe beside the weights."""
    from llmcompressor.recipe import Recipe

    model.save_pretrained(out, save_compressed=True, max_shard_size=max_shard_bytes)
    tokenizer.save_pretrained(out)
    Recipe.from_modifiers(recipe).yaml(str(out / "recipe.yaml"))
