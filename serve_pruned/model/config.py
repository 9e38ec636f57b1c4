"""config.json: read once, checked, and the few values every stage asks it for."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from serve_pruned.errors import ModelLoadError


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder as a dict, or a ModelLoadError that says what is wrong with it."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; is it a Hugging Face model folder?", path=str(folder),
                             hint="pass a folder written by save_pretrained (config.json beside the weights)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({exc})", path=str(cfg_path),
                             hint="fix config.json, or re-save the model with save_pretrained") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read {cfg_path}: {exc.strerror}", path=str(cfg_path)) from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object of settings",
                             path=str(cfg_path), hint="fix config.json, or re-save the model with save_pretrained")
    return config


def config_int(config: Mapping, key: str, *, default: int | None = None) -> int:
    """A positive whole number from config.json, or a ModelLoadError that names the key and the fix."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise ModelLoadError(f"config.json has no {key}", path="config.json",
                             hint="a causal LM's config.json needs it; re-save the model with save_pretrained")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"config.json: {key} must be a positive whole number, got {value!r}",
                             path="config.json", hint=f"fix {key} in config.json, or re-save the model")
    return value


def config_dtype(config: Mapping) -> str | None:
    """The dtype config.json declares for the weights (transformers 5 writes ``dtype``, older ``torch_dtype``)."""
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None


_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def compute_dtype_for(requested: str, stored: Iterable[str]) -> str:
    """The dtype the heavy stages compute in: ``requested``, or for ``auto`` bfloat16 when every floating tensor
    is stored in bfloat16 (casting loses nothing, and it is some 3x faster than float32 where the hardware has
    bf16 products) and float32 otherwise (a float32 or float16 checkpoint would be rounded through bfloat16).
    ``stored``: the safetensors dtype names of the checkpoint's tensors."""
    if requested != "auto":
        return requested
    floating = {d for d in stored if d in _FLOATING}
    return "bfloat16" if floating == {"BF16"} else "float32"
