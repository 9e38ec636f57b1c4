"""Apply a :class:`Selection`: slice weights, rewrite config.json, build the smaller model."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from serve_pruned.compress.importance import Selection
from serve_pruned.compress.stream import Streamed
from serve_pruned.model.shapes import RESIZE, Shape, split_layer_name


def _channel_index(units: list[int], width: int) -> torch.Tensor:
    """Rows/columns of whole units (heads of ``width`` channels) in the given order."""
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def prune_state_dict(
    state: Iterable[tuple[str, torch.Tensor]], before: Shape, after: Shape, sel: Selection
) -> dict[str, torch.Tensor]:
    """Slice every layer tensor down to ``after``; dropped layers vanish and the rest are renumbered.

    ``state`` is read one tensor at a time (a streamed model's tensors come straight from its files), so only
    the pruned tensors and the one being sliced are in memory together."""
    hd = before.head_dim
    new_index = {old: new for new, old in enumerate(sel.layers)}
    index_cache: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state:
        parts = split_layer_name(name)
        if parts is None:
            out[name] = tensor
            continue
        old, rest = parts
        if old not in new_index:
            continue
        new = new_index[old]
        if new not in index_cache:
            index_cache[new] = {
                "q": _channel_index(sel.heads[new], hd),
                "kv": _channel_index(sel.kv_groups[new], hd),
                "ffn": torch.tensor(sel.ffn[new], dtype=torch.long),
            }
        new_name = name.replace(f"layers.{old}.", f"layers.{new}.", 1)
        if rest in RESIZE:
            axis, kind = RESIZE[rest]
            tensor = tensor.index_select(axis, index_cache[new][kind]).contiguous()
        out[new_name] = tensor
    return out


def pruned_config(config: dict, after: Shape, sel: Selection) -> dict:
    """config.json for the pruned model, in a form stock vLLM and transformers both read."""
    cfg = copy.deepcopy(config)
    cfg["num_attention_heads"] = after.num_heads
    cfg["num_key_value_heads"] = after.num_kv_heads
    cfg["head_dim"] = after.head_dim  # explicit: num_heads * head_dim no longer equals hidden_size
    cfg["intermediate_size"] = after.intermediate_size
    cfg["num_hidden_layers"] = after.num_layers
    if isinstance(cfg.get("layer_types"), list) and len(cfg["layer_types"]) > max(sel.layers):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in sel.layers]
    if isinstance(cfg.get("max_window_layers"), int):
        # Qwen2/3: layers below max_window_layers use full attention; keep each kept layer's kind.
        cfg["max_window_layers"] = sum(1 for i in sel.layers if i < config["max_window_layers"])
    for key in ("_name_or_path", "quantization_config"):
        cfg.pop(key, None)
    return cfg


def build_model(model: Any, cfg: dict, state: dict[str, torch.Tensor]) -> Any:
    """A new model of ``type(model)`` from ``cfg`` holding exactly ``state`` (no random init)."""
    from accelerate import init_empty_weights

    config = type(model.config).from_dict(cfg)
    with init_empty_weights():  # parameters on meta; buffers (rotary) stay real
        new = type(model)(config)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if (set(missing) - ({"lm_head.weight"} if tied else set())) or unexpected:
        raise RuntimeError(f"pruned state does not fit the pruned config: missing {missing}, unexpected {unexpected}")
    if tied:
        # assign=True makes lm_head its own Parameter even when it shares storage; re-tie so that
        # dtype casts and save_pretrained keep one copy
        new.lm_head.weight = new.model.embed_tokens.weight
    new.eval()
    return new


def prune_model(model: Any, config: dict, before: Shape, after: Shape, sel: Selection) -> tuple[Any, dict]:
    """The pruned model (whole, in memory) of ``model`` (in memory, or :class:`Streamed`), and its config dict."""
    cfg = pruned_config(config, after, sel)
    if isinstance(model, Streamed):
        return build_model(model.skeleton, cfg, prune_state_dict(model.state(), before, after, sel)), cfg
    return build_model(model, cfg, prune_state_dict(model.state_dict().items(), before, after, sel)), cfg
