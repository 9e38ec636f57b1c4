"""Apply a :class:`Selection`: slice weights, rewrite config.json, build the smaller model."""

from __future__ import annotations

import copy
from typing import Any

import torch

from serve_pruned.compress.importance import Selection
from serve_pruned.compress.stream import Streamed, cast_floating
from serve_pruned.compress.weights import ModuleTensors, Tensors
from serve_pruned.model.shapes import LAYER_NORMS, Shape, resizing, split_layer_name

FINAL_NORM = "model.norm.weight"
_NORM_WEIGHTS = {f"{norm}.weight": k for k, norm in enumerate(LAYER_NORMS)}  # a layer's norm -> its norm_scales slot


def _channel_index(units: list[int], width: int) -> torch.Tensor:
    """Rows/columns of whole units (heads of ``width`` channels) in the given order."""
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


class PrunedTensors:
    """The tensors of ``source`` as the pruned model names them: kept layers renumbered, sliced to the kept heads,
    KV groups, FFN channels and hidden channels (norm weights rescaled for the last), each read (and sliced) only
    when asked for."""

    def __init__(self, source: Tensors, before: Shape, sel: Selection, *, slice_on: Any = None) -> None:
        """``slice_on``: a device each tensor is moved to before it is sliced (None: sliced where it is read)."""
        self.source, self.sel, self._hd, self._slice_on = source, sel, before.head_dim, slice_on
        new_index = {old: new for new, old in enumerate(sel.layers)}
        self._from: dict[str, tuple[str, int | None, str]] = {}  # new name -> (old name, new layer, rest)
        for name in source.names():
            parts = split_layer_name(name)
            if parts is None:
                self._from[name] = (name, None, "")
            elif parts[0] in new_index:
                new = new_index[parts[0]]
                self._from[name.replace(f"layers.{parts[0]}.", f"layers.{new}.", 1)] = (name, new, parts[1])
        self._index: dict[int, dict[str, torch.Tensor]] = {}
        # the indices live where the slicing happens, made there once
        self._hidden = torch.tensor(sel.hidden, dtype=torch.long, device=slice_on) if sel.hidden is not None else None

    def names(self) -> list[str]:
        return list(self._from)

    def get(self, name: str) -> torch.Tensor:
        old, layer, rest = self._from[name]
        tensor = self.source.get(old)
        if self._slice_on is not None:
            tensor = tensor.to(self._slice_on)
        for axis, kind in resizing(old):
            if kind == "hidden":
                if self._hidden is None:
                    continue
                index = self._hidden
            elif layer is None:
                continue
            else:
                index = self._indices(layer)[kind]
            tensor = tensor.index_select(axis, index)
        scale = self._norm_scale(layer, rest, name)
        return tensor * scale if scale is not None else tensor.contiguous()

    def _norm_scale(self, layer: int | None, rest: str, name: str) -> float | None:
        scales = self.sel.norm_scales
        if scales is None:
            return None
        if layer is None:
            return scales[-1][0] if name == FINAL_NORM else None
        slot = _NORM_WEIGHTS.get(rest)
        return scales[layer][slot] if slot is not None else None

    def _indices(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._index:
            sel, hd = self.sel, self._hd
            index = {"q": _channel_index(sel.heads[layer], hd), "kv": _channel_index(sel.kv_groups[layer], hd),
                     "ffn": torch.tensor(sel.ffn[layer], dtype=torch.long)}
            if self._slice_on is not None:
                index = {k: v.to(self._slice_on) for k, v in index.items()}
            self._index[layer] = index
        return self._index[layer]


def pruned_config(config: dict, after: Shape, sel: Selection) -> dict:
    """config.json for the pruned model, in a form stock vLLM and transformers both read."""
    cfg = copy.deepcopy(config)
    cfg["num_attention_heads"] = after.num_heads
    cfg["num_key_value_heads"] = after.num_kv_heads
    cfg["head_dim"] = after.head_dim  # explicit: num_heads * head_dim no longer equals hidden_size
    cfg["intermediate_size"] = after.intermediate_size
    cfg["hidden_size"] = after.hidden_size
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


def tensors_of(model: Any) -> Tensors:
    """Where ``model``'s tensors are read from: a :class:`Streamed` model as it is stored (sliced before it is cast to
    the compute dtype: the cast then copies only what is kept), or a model in memory."""
    return model.as_stored() if isinstance(model, Streamed) else ModuleTensors(model)


def _compute_dtype(model: Any) -> torch.dtype | None:
    return model.dtype if isinstance(model, Streamed) else None


def pruned_view(model: Any, config: dict, before: Shape, after: Shape, sel: Selection, *,
                device: Any = None, slice_on_device: bool = False) -> Streamed:
    """The pruned model as a :class:`Streamed` one: nothing is sliced until a part is onloaded.

    With ``slice_on_device`` each stored tensor goes to ``device`` whole and is sliced there: on an accelerator
    the host's single-threaded bf16 ``index_select`` (about 0.4 GB/s here) is what a shape search otherwise
    waits on, once per candidate and layer. Only a view that is computed with, never written, takes it."""
    like = model.skeleton if isinstance(model, Streamed) else model
    device = torch.device(device if device is not None else (model.device if isinstance(model, Streamed) else "cpu"))
    slice_on = device if slice_on_device and device.type != "cpu" else None
    return Streamed.skeleton_of(type(like.config).from_dict(pruned_config(config, after, sel)), type(like),
                                PrunedTensors(tensors_of(model), before, sel, slice_on=slice_on), device=device,
                                dtype=_compute_dtype(model))


def prune_model(model: Any, config: dict, before: Shape, after: Shape, sel: Selection) -> tuple[Any, dict]:
    """The pruned model (whole, in memory) of ``model`` (in memory, or :class:`Streamed`), and its config dict."""
    cfg = pruned_config(config, after, sel)
    view = PrunedTensors(tensors_of(model), before, sel)
    like = model.skeleton if isinstance(model, Streamed) else model
    dtype = _compute_dtype(model)
    return build_model(like, cfg, {name: cast_floating(view.get(name), dtype) for name in view.names()}), cfg


def whole_model(model: Any, dtype: torch.dtype | None = None) -> Any:
    """``model`` whole in memory on the host (a :class:`Streamed` one read tensor by tensor, each cast to ``dtype``
    as it is read, so the model is never held twice)."""
    if not isinstance(model, Streamed):
        return model.to(dtype) if dtype is not None else model
    state = {}
    for name in model.names():
        state[name] = cast_floating(model.get(name), dtype)
    return build_model(model.skeleton, model.config.to_dict(), state)
