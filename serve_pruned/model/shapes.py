"""Model shapes, parameter arithmetic and the search from a parameter target to uniform counts.

Torch-free: shapes come from config.json and safetensors headers, so ``--target-params`` can be
turned into counts (and rejected early) before any weight is loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from serve_pruned.errors import GQAGroupingError, InvalidTargetError, ModelLoadError
from serve_pruned.model.config import config_int

LAYER_RE = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<idx>\d+)\.(?P<rest>.+)$")

# How each tensor resizes: the (axis, what its size along that axis counts) pairs it is sliced on.
#   "q" -> num_heads * head_dim,  "kv" -> num_kv_heads * head_dim,  "ffn" -> intermediate_size,
#   "hidden" -> hidden_size: the residual stream's channels, which every layer reads (the input columns of
#   q/k/v/gate/up, its norms) and writes (the output rows of o_proj/down_proj), as do the embedding and the head.
# Per-layer tensors not listed keep their shape (Qwen3's q_norm/k_norm, per head_dim).
RESIZE: dict[str, tuple[tuple[int, str], ...]] = {
    "self_attn.q_proj.weight": ((0, "q"), (1, "hidden")),
    "self_attn.q_proj.bias": ((0, "q"),),
    "self_attn.k_proj.weight": ((0, "kv"), (1, "hidden")),
    "self_attn.k_proj.bias": ((0, "kv"),),
    "self_attn.v_proj.weight": ((0, "kv"), (1, "hidden")),
    "self_attn.v_proj.bias": ((0, "kv"),),
    "self_attn.o_proj.weight": ((0, "hidden"), (1, "q")),
    "self_attn.o_proj.bias": ((0, "hidden"),),
    "mlp.gate_proj.weight": ((0, "ffn"), (1, "hidden")),
    "mlp.gate_proj.bias": ((0, "ffn"),),
    "mlp.up_proj.weight": ((0, "ffn"), (1, "hidden")),
    "mlp.up_proj.bias": ((0, "ffn"),),
    "mlp.down_proj.weight": ((0, "hidden"), (1, "ffn")),
    "mlp.down_proj.bias": ((0, "hidden"),),
    "input_layernorm.weight": ((0, "hidden"),),
    "post_attention_layernorm.weight": ((0, "hidden"),),
}
# Outside the decoder layers: the embedding, the final norm and the head (tied or not) live in hidden channels.
RESIZE_OUTSIDE: dict[str, tuple[tuple[int, str], ...]] = {
    "model.embed_tokens.weight": ((1, "hidden"),),
    "model.norm.weight": ((0, "hidden"),),
    "lm_head.weight": ((1, "hidden"),),
}
# The norms of the residual stream, in the order a forward pass meets them in one layer.
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
_KEPT_WHOLE = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}


@dataclass(frozen=True)
class Shape:
    """The per-layer sizes that structured pruning changes (uniform across layers)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Mapping) -> Shape:
        heads = config_int(config, "num_attention_heads")
        kv = config_int(config, "num_key_value_heads", default=heads)
        head_dim = config_int(config, "head_dim", default=config_int(config, "hidden_size") // heads)
        if heads % kv:
            raise GQAGroupingError(
                f"config.json has {heads} attention heads and {kv} KV heads, which do not form equal groups",
                field="num_key_value_heads",
            )
        return cls(
            num_layers=config_int(config, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=config_int(config, "intermediate_size"),
            hidden_size=config_int(config, "hidden_size"),
        )

    def size(self, kind: str) -> int:
        if kind == "q":
            return self.num_heads * self.head_dim
        if kind == "kv":
            return self.num_kv_heads * self.head_dim
        if kind == "hidden":
            return self.hidden_size
        return self.intermediate_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for every layer: layers x KV heads x head_dim x 2 x bytes per element."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * dtype_bytes


def llama_tensor_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a Llama-family checkpoint of ``config`` stores (no biases): what its safetensors headers
    would say, for plans about a model whose weights are not here (a config alone describes its sizes)."""
    shape = Shape.from_config(config)
    h, v = config_int(config, "hidden_size"), config_int(config, "vocab_size")
    q, kv, f = shape.size("q"), shape.size("kv"), shape.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    per_layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    for i in range(shape.num_layers):
        out.update({f"model.layers.{i}.{rest}": dims for rest, dims in per_layer.items()})
    return out


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None outside layers."""
    m = LAYER_RE.match(name)
    return (int(m["idx"]), m["rest"]) if m else None


def resizing(name: str) -> tuple[tuple[int, str], ...]:
    """The (axis, kind) pairs tensor ``name`` is sliced on when the model is pruned (empty: kept whole)."""
    parts = split_layer_name(name)
    if parts is None:
        return RESIZE_OUTSIDE.get(name, ())
    rest = parts[1]
    if rest in _KEPT_WHOLE:
        return ()
    if rest not in RESIZE:
        raise ModelLoadError(
            f"tensor {name} is not part of a Llama-family decoder layer; cannot prune this model",
            path=name,
            hint="only the architectures in the README support table can be pruned",
        )
    return RESIZE[rest]


def resized(name: str, shape: tuple[int, ...], before: Shape, after: Shape) -> tuple[int, ...]:
    """The shape tensor ``name`` takes when the model goes from ``before`` to ``after``."""
    new = list(shape)
    for axis, kind in resizing(name):
        if shape[axis] != before.size(kind):
            raise ModelLoadError(
                f"tensor {name} has size {shape[axis]} on axis {axis}, config.json implies {before.size(kind)}",
                path=name,
                hint="config.json and the weights disagree; re-save the model",
            )
        new[axis] = after.size(kind)
    return tuple(new)


def count_params(tensors: Mapping[str, tuple[int, ...]], before: Shape, after: Shape | None = None) -> int:
    """Parameters of the model after pruning to ``after`` (``before`` itself when None).

    Layers are uniform, so the count only depends on how many layers remain, not which ones.
    """
    after = after or before
    total = 0
    for name, shape in tensors.items():
        parts = split_layer_name(name)
        if parts is not None and parts[0] >= after.num_layers:
            continue  # stands for one of the dropped layers
        total += math.prod(resized(name, shape, before, after))
    return total


@dataclass(frozen=True)
class Candidate:
    """One uniform shape that meets the target, with its parameter count."""

    shape: Shape
    params: int
    fraction: float


def _check_counts(
    before: Shape,
    *,
    keep_heads: int | None,
    keep_kv_heads: int | None,
    keep_ffn: int | None,
    keep_hidden: int | None,
    drop_layers: int,
    multiple_of: int,
    prune_heads: bool,
    heads_divide_hidden: bool,
) -> None:
    if keep_kv_heads is not None and not 1 <= keep_kv_heads <= before.num_kv_heads:
        raise GQAGroupingError(
            f"--keep-kv-heads {keep_kv_heads} is outside 1..{before.num_kv_heads} (the model's KV heads)",
            field="keep_kv_heads",
            hint=f"pass --keep-kv-heads between 1 and {before.num_kv_heads}",
        )
    if keep_heads is not None:
        if not 1 <= keep_heads <= before.num_heads:
            raise GQAGroupingError(
                f"--keep-heads {keep_heads} is outside 1..{before.num_heads} (the model's query heads)",
                field="keep_heads",
                hint=f"pass --keep-heads between 1 and {before.num_heads}",
            )
        kv = keep_kv_heads if keep_kv_heads is not None else before.num_kv_heads
        if keep_heads % kv or keep_heads // kv > before.heads_per_group:
            valid = [kv * q for q in range(1, before.heads_per_group + 1)]
            raise GQAGroupingError(
                f"--keep-heads {keep_heads} cannot be split evenly over {kv} KV groups of at most "
                f"{before.heads_per_group} query heads",
                field="keep_heads",
                hint=f"with {kv} KV heads, --keep-heads must be one of {valid} (or change --keep-kv-heads)",
            )
    hidden = keep_hidden or before.hidden_size
    if keep_heads is not None and heads_divide_hidden and hidden % keep_heads:
        ok = [h for h in range(1, before.num_heads + 1) if hidden % h == 0]
        raise GQAGroupingError(
            f"--keep-heads {keep_heads} does not divide hidden_size {hidden}, which this architecture's "
            "config class requires",
            field="keep_heads",
            hint=f"choose --keep-heads from {ok}" + (" (or another --keep-hidden)" if keep_hidden else ""),
        )
    if not prune_heads and (
        (keep_heads is not None and keep_heads != before.num_heads)
        or (keep_kv_heads is not None and keep_kv_heads != before.num_kv_heads)
        or (keep_hidden is not None and keep_hidden != before.hidden_size)
    ):
        raise GQAGroupingError(
            "this architecture's vLLM implementation derives head_dim from hidden_size, so neither heads nor the "
            "hidden size can be pruned",
            field="keep_hidden" if keep_hidden is not None else "keep_heads",
            hint="prune FFN channels and layers only (drop --keep-heads/--keep-kv-heads/--keep-hidden)",
        )
    for value, name, size in ((keep_ffn, "ffn", before.intermediate_size), (keep_hidden, "hidden", before.hidden_size)):
        if value is None:
            continue
        if not 1 <= value <= size:
            raise InvalidTargetError(
                f"--keep-{name} {value} is outside 1..{size}", field=f"keep_{name}",
                hint=f"pass --keep-{name} between {multiple_of} and {size}, a multiple of {multiple_of}",
            )
        if value % multiple_of and value != size:
            raise InvalidTargetError(
                f"--keep-{name} {value} is not a multiple of {multiple_of}",
                field=f"keep_{name}",
                hint=f"use a multiple of {multiple_of}, or change --multiple-of "
                     "(quantization group sizes must divide it)",
            )
    droppable = max(0, before.num_layers - 2)  # the first and last layers are never dropped
    if not 0 <= drop_layers <= droppable:
        raise InvalidTargetError(
            f"--drop-layers {drop_layers} is outside 0..{droppable}: the model has {before.num_layers} layers and "
            "its first and last are always kept",
            field="drop_layers",
            hint=f"pass --drop-layers between 0 and {droppable}",
        )


# The search never cuts the hidden size below this share of the original's (Minitron's widest cut, 4B-Width from
# Llama-3.1-8B, keeps 0.75), and tries at most this many hidden sizes: each one multiplies the shapes to score.
HIDDEN_FLOOR = 0.5
HIDDEN_STEPS = 16


def hidden_options(before: Shape, multiple_of: int) -> list[int]:
    """The hidden sizes the search tries, widest first: the original's, then multiples of ``multiple_of`` (coarsened
    so there are at most about ``HIDDEN_STEPS``) down to ``HIDDEN_FLOOR`` of it."""
    h = before.hidden_size
    step = multiple_of * max(1, math.ceil(h / (HIDDEN_STEPS * multiple_of)))
    top = h - h % step if h % step else h - step
    return [h] + [w for w in range(top, 0, -step) if w >= HIDDEN_FLOOR * h]


def plan_shapes(
    tensors: Mapping[str, tuple[int, ...]],
    before: Shape,
    *,
    target: float | None = None,
    keep_heads: int | None = None,
    keep_kv_heads: int | None = None,
    keep_ffn: int | None = None,
    keep_hidden: int | None = None,
    drop_layers: int = 0,
    multiple_of: int = 64,
    prune_heads: bool = True,
    heads_divide_hidden: bool = False,
    search_hidden: bool = False,
    fits: Callable[[Shape], bool] | None = None,
) -> list[Candidate]:
    """Turn counts and/or a target into the uniform shapes worth trying.

    Counts that are given are fixed; with ``target`` the remaining dimensions are searched: for every
    allowed (KV groups, query heads per group, and with ``search_hidden`` hidden size), the widest FFN (a multiple
    of ``multiple_of``) that keeps the total at or below ``target`` of the original parameters. ``fits`` (a target
    in bytes or instances, which the caller predicts for a shape) is searched the same way, the widest FFN it
    admits. With neither, exactly one candidate (the counts given, the rest unchanged) is returned.

    ``prune_heads`` False (vLLM derives head_dim from hidden_size) fixes the heads and the hidden size;
    ``heads_divide_hidden`` (the config class checks it) admits only head counts that divide the hidden size.

    Returns:
        Candidates, the largest parameter count first (with ``fits``: empty when it admits none).

    Raises:
        InvalidTargetError: target outside (0, 1), already met, or below the smallest allowed shape.
        GQAGroupingError: head counts that do not split evenly over KV groups.
    """
    if multiple_of < 1:
        raise InvalidTargetError(f"--multiple-of must be at least 1, got {multiple_of}", field="multiple_of")
    _check_counts(
        before,
        keep_heads=keep_heads,
        keep_kv_heads=keep_kv_heads,
        keep_ffn=keep_ffn,
        keep_hidden=keep_hidden,
        drop_layers=drop_layers,
        multiple_of=multiple_of,
        prune_heads=prune_heads,
        heads_divide_hidden=heads_divide_hidden,
    )
    total = count_params(tensors, before)
    layers = before.num_layers - drop_layers
    if target is not None:
        _check_target(target)
        admits = _within(tensors, before, math.floor(target * total))
    elif fits is not None:
        admits = fits
    else:
        return [_exact(tensors, before, total, layers=layers, keep_heads=keep_heads, keep_kv_heads=keep_kv_heads,
                       keep_ffn=keep_ffn, keep_hidden=keep_hidden)]
    if keep_heads is not None and keep_kv_heads is None:
        keep_kv_heads = before.num_kv_heads
    if keep_hidden is not None:
        hiddens = [keep_hidden]
    elif search_hidden and prune_heads:
        hiddens = hidden_options(before, multiple_of)
    else:
        hiddens = [before.hidden_size]
    candidates, smallest = _widest_fitting(tensors, before, total, admits, layers=layers, keep_heads=keep_heads,
                                           keep_kv_heads=keep_kv_heads, keep_ffn=keep_ffn, hiddens=hiddens,
                                           multiple_of=multiple_of, prune_heads=prune_heads,
                                           heads_divide_hidden=heads_divide_hidden)
    if not candidates and target is None:
        return []
    if not candidates:
        raise InvalidTargetError(
            f"--target-params {target} is below the smallest allowed shape "
            f"({smallest / total:.3f} of the parameters with these options)",
            field="target_params",
            hint="raise the target, allow more structures (heads, --drop-layers), or lower --multiple-of",
        )
    candidates.sort(key=lambda c: c.params, reverse=True)
    return candidates


def _exact(tensors: Mapping[str, tuple[int, ...]], before: Shape, total: int, *, layers: int,
           keep_heads: int | None, keep_kv_heads: int | None, keep_ffn: int | None,
           keep_hidden: int | None) -> Candidate:
    """The one shape the counts name (the rest unchanged)."""
    kv = keep_kv_heads if keep_kv_heads is not None else before.num_kv_heads
    heads = keep_heads if keep_heads is not None else kv * before.heads_per_group
    shape = Shape(layers, heads, kv, before.head_dim, keep_ffn or before.intermediate_size,
                  keep_hidden or before.hidden_size)
    if shape == before:
        raise InvalidTargetError(
            "nothing to prune: no --target-params and every count equals the model's",
            field="target_params",
            hint="pass --target-params 0.75, or counts such as --keep-ffn / --keep-heads / --drop-layers",
        )
    params = count_params(tensors, before, shape)
    return Candidate(shape, params, params / total)


def _check_target(target: float) -> None:
    if not (0.0 < target <= 1.0) or math.isnan(target):
        raise InvalidTargetError(
            f"--target-params must be a fraction in (0, 1), got {target}",
            field="target_params",
            hint="e.g. --target-params 0.75 keeps three quarters of the parameters",
        )
    if target >= 1.0:
        raise InvalidTargetError(
            "--target-params 1.0 is already met by the original model: nothing would be pruned",
            field="target_params",
            hint="ask for a smaller fraction, e.g. 0.75",
        )


def _within(tensors: Mapping[str, tuple[int, ...]], before: Shape, budget: int) -> Callable[[Shape], bool]:
    return lambda shape: count_params(tensors, before, shape) <= budget


def _widest_fitting(tensors: Mapping[str, tuple[int, ...]], before: Shape, total: int, fits: Callable[[Shape], bool],
                    *, layers: int, keep_heads: int | None, keep_kv_heads: int | None, keep_ffn: int | None,
                    hiddens: list[int], multiple_of: int, prune_heads: bool,
                    heads_divide_hidden: bool) -> tuple[list[Candidate], int]:
    """For every allowed (KV groups, query heads per group, hidden size), the widest FFN that ``fits``; also the
    smallest parameter count seen (for the error when nothing fits)."""
    if prune_heads:
        kv_options = [keep_kv_heads] if keep_kv_heads else list(range(1, before.num_kv_heads + 1))
    else:
        kv_options = [before.num_kv_heads]
    if keep_ffn is not None:
        ffn_options = [keep_ffn]
    else:
        top = before.intermediate_size - before.intermediate_size % multiple_of
        ffn_options = list(range(top, 0, -multiple_of)) or [before.intermediate_size]
    candidates: list[Candidate] = []
    smallest = total
    for hidden in hiddens:
        for kv in kv_options:
            if keep_heads is not None:
                q_options = [keep_heads // kv]
            elif prune_heads:
                q_options = list(range(1, before.heads_per_group + 1))
            else:
                q_options = [before.heads_per_group]
            for q in q_options:
                if heads_divide_hidden and hidden % (kv * q):
                    continue
                # widest first
                shapes = [Shape(layers, kv * q, kv, before.head_dim, ffn, hidden) for ffn in ffn_options]
                first = _first_fitting(shapes, fits)
                smallest = min(smallest, count_params(tensors, before, shapes[-1]))
                if first is not None:
                    params = count_params(tensors, before, first)
                    candidates.append(Candidate(first, params, params / total))
    return candidates, smallest


def _first_fitting(shapes: list[Shape], fits: Callable[[Shape], bool]) -> Shape | None:
    """The first of ``shapes`` (widest first) that ``fits``, by bisection: a narrower FFN only ever fits more
    easily (fewer parameters and bytes, more instances), and an 8B model has 448 widths to try per head count."""
    lo, hi = 0, len(shapes)  # shapes[:lo] do not fit, shapes[hi:] do
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(shapes[mid]):
            hi = mid
        else:
            lo = mid + 1
    return shapes[lo] if lo < len(shapes) else None
