"""Targets in what users pay for: the output's weight bytes, or instances of it per GPU (torch-free).

``--target-weight-bytes B`` and ``--target-instances N --gpu G --max-model-len L --concurrency C`` become
candidate shapes before a weight is loaded. For every allowed (KV groups, query heads per group) the shape search
keeps the widest FFN whose predicted output fits: its weight bytes with the chosen quantization at most B, or, for
instances, at least N instances on G by the serving planner (weights, the KV cache that the shape's KV groups
need for C sequences of L tokens, activations, the backend's overhead). The search then ranks them by their loss,
as it ranks any candidates, so the KV groups a shape keeps are traded against its FFN width.

The bytes are predicted tensor by tensor as compressed-tensors stores them: every decoder-layer projection
quantized (INT8 or FP8 with one scale per output channel; INT4 packed eight to an int32 with one scale per group
and its shape), everything else (embedding, head, norms) in the save dtype, plus the safetensors header.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from serve_pruned.compress.quantize import QuantPlan
from serve_pruned.errors import InvalidTargetError, UsageError
from serve_pruned.model.shapes import RESIZE, Candidate, Shape, resized, split_layer_name
from serve_pruned.options import SizeTarget
from serve_pruned.serving.memory import GIB, ModelFootprint, gpu, plan

# A safetensors header entry beside the tensor's name: {"dtype":"BF16","shape":[4096,14336],"data_offsets":[..]}
_HEADER_BYTES_PER_TENSOR = 72
_PROJECTIONS = {name for name in RESIZE if name.endswith("_proj.weight")}


@dataclass(frozen=True)
class Sizer:
    """Predicts what an output of a given shape weighs and how many instances of it a GPU holds."""

    tensors: Mapping[str, tuple[int, ...]]  # the source's
    before: Shape
    config: Mapping[str, Any]
    save_bytes: int
    quantization: Callable[[Shape], QuantPlan | None]  # the scheme (and W4A16 group) for a shape

    @cached_property
    def _layouts(self) -> tuple[list[tuple[str, tuple[int, ...]]], dict[tuple, list[int]]]:
        """The tensors outside the decoder layers, and the layers grouped by their tensors (all alike, as a rule:
        a layer's bytes are then worked out once, not once per layer, for each of the thousands of shapes the
        search asks about)."""
        outside: list[tuple[str, tuple[int, ...]]] = []
        layers: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
        for name, dims in self.tensors.items():
            parts = split_layer_name(name)
            if parts is None:
                outside.append((name, dims))
            else:
                layers.setdefault(parts[0], []).append((parts[1], dims))
        alike: dict[tuple, list[int]] = {}
        for i, tensors in layers.items():
            alike.setdefault(tuple(sorted(tensors)), []).append(i)
        return outside, alike

    def weight_bytes(self, shape: Shape) -> int:
        quant = self.quantization(shape)
        outside, alike = self._layouts
        total = 8 + sum(_entry_bytes(name, resized(name, dims, self.before, shape), None, self.save_bytes)
                        for name, dims in outside)
        for tensors, indices in alike.items():
            kept = sum(1 for i in indices if i < shape.num_layers)
            if kept:
                layer = sum(_entry_bytes(f"model.layers.{indices[0]}.{rest}",
                                         resized(f"model.layers.0.{rest}", dims, self.before, shape),
                                         quant if rest in _PROJECTIONS else None, self.save_bytes)
                            for rest, dims in tensors)
                total += kept * layer
        return total

    def footprint(self, shape: Shape) -> ModelFootprint:
        return ModelFootprint(name=f"the shape {shape.to_dict()}", weight_bytes=self.weight_bytes(shape),
                              kv_bytes_per_token=shape.kv_cache_bytes_per_token(2),
                              hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                              vocab_size=int(self.config["vocab_size"]))

    def instances(self, shape: Shape, target: SizeTarget) -> int:
        """How many instances of ``shape`` fit ``target.gpu`` (0: not one)."""
        try:
            return plan(self.footprint(shape), device=str(target.gpu), max_model_len=target.max_model_len,
                        concurrency=target.concurrency, kv_cache_dtype=target.kv_cache_dtype).max_instances
        except UsageError:
            return 0

    def fits(self, shape: Shape, target: SizeTarget) -> bool:
        if target.weight_bytes is not None:
            return self.weight_bytes(shape) <= target.weight_bytes
        return self.instances(shape, target) >= int(target.instances or 1)


def _entry_bytes(name: str, dims: tuple[int, ...], quant: QuantPlan | None, save_bytes: int) -> int:
    """The bytes of the tensors that store weight ``name`` of ``dims``, their header entries included."""
    return sum(n + len(name) + len(suffix) + _HEADER_BYTES_PER_TENSOR for n, suffix in _stored(dims, quant, save_bytes))


def _stored(dims: tuple[int, ...], quant: QuantPlan | None, save_bytes: int) -> list[tuple[int, str]]:
    """(bytes, name suffix) of each tensor that stores a weight of ``dims``."""
    if quant is None or len(dims) != 2:
        return [(math.prod(dims) * save_bytes, "")]
    out, inp = dims
    if quant.scheme == "w4a16":
        group = int(quant.group_size or inp)
        return [(out * inp // 2, "_packed"), (out * (inp // group) * save_bytes, "_scale"), (16, "_shape")]
    return [(out * inp, ""), (out * save_bytes, "_scale")]  # INT8 or FP8, a scale per output channel


@dataclass(frozen=True)
class TargetFit:
    """The shapes a size target admits, and what was predicted for the largest of them."""

    target: SizeTarget
    candidates: list[Candidate]  # empty: the source, only quantized, fits already
    weight_bytes: int  # predicted for the largest candidate (or the source)
    instances: int | None  # how many of it fit (an instances target)
    source_weight_bytes: int
    source_instances: int | None

    def lines(self) -> list[str]:
        what = "the source as it is (quantized)" if not self.candidates else (
            f"{len(self.candidates)} shape(s), the largest {self.candidates[0].shape.to_dict()} = "
            f"{self.candidates[0].fraction:.3f} of the parameters")
        out = [f"target: {self.target.describe()}: {what}",
               f"  predicted weights {self.weight_bytes / GIB:.3f} GiB (the source: "
               f"{self.source_weight_bytes / GIB:.3f} GiB)"]
        if self.instances is not None:
            out.append(f"  predicted instances per {self.target.gpu}: {self.instances} (the source: "
                       f"{self.source_instances})")
        return out

    def as_manifest(self, *, weight_bytes: int, shape: Shape, sizer: Sizer) -> dict[str, Any]:
        """What was asked, predicted and (from the written weights) measured."""
        t = self.target
        body: dict[str, Any] = {"asked": t.describe(), "weight_bytes": t.weight_bytes, "instances": t.instances,
                                "gpu": t.gpu, "max_model_len": t.max_model_len or None,
                                "concurrency": t.concurrency or None,
                                "predicted_weight_bytes": sizer.weight_bytes(shape),
                                "weight_bytes_written": weight_bytes}
        if t.instances is not None:
            fp = replace(sizer.footprint(shape), weight_bytes=weight_bytes)
            body["instances_fit"] = plan(fp, device=str(t.gpu), max_model_len=t.max_model_len,
                                         concurrency=t.concurrency, kv_cache_dtype=t.kv_cache_dtype).max_instances
            body["kv_cache_dtype"] = t.kv_cache_dtype
        return body


def fit_target(target: SizeTarget, sizer: Sizer,
               search: Callable[[Callable[[Shape], bool]], list[Candidate]]) -> TargetFit:
    """The candidates ``target`` admits (``search`` is the shape search with the run's options, given a predicate).

    Raises:
        InvalidTargetError: no allowed shape fits, or (unquantized) the source already does.
    """
    if target.instances is not None and target.gpu != "cpu":
        gpu(str(target.gpu))  # an unknown GPU type says so, rather than fitting nothing
    before = sizer.before
    source_bytes = sizer.weight_bytes(before)
    source_n = sizer.instances(before, target) if target.instances is not None else None
    if sizer.fits(before, target):
        if sizer.quantization(before) is None:
            raise InvalidTargetError(
                f"the source already fits {target.describe()} (it predicts {source_bytes / GIB:.3f} GiB"
                + (f", {source_n} instances" if source_n is not None else "") + "): nothing would be pruned",
                field="target", hint="ask for less (more instances, fewer bytes), or leave the target out")
        return TargetFit(target, [], source_bytes, source_n, source_bytes, source_n)
    found = search(lambda shape: sizer.fits(shape, target))
    if not found:
        need = (f"the source needs {source_bytes / GIB:.3f} GiB" if target.instances is None else
                f"{source_n} instance(s) of the source fit, and no smaller shape gets to {target.instances}")
        raise InvalidTargetError(
            f"no shape these options allow fits {target.describe()}: {need}", field="target",
            hint="ask for fewer instances, a shorter --max-model-len or lower --concurrency, a larger GPU, a "
                 "stronger --quant (w4a16), or allow more structures (heads, --drop-layers)")
    best = found[0].shape
    return TargetFit(target, found, sizer.weight_bytes(best),
                     sizer.instances(best, target) if target.instances is not None else None,
                     source_bytes, source_n)
