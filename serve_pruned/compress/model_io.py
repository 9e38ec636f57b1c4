"""Loading a resolved model into torch (transformers), for the stages that need its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_pruned.errors import ModelLoadError


def load_model(path: Path, *, dtype: str, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise ModelLoadError(f"transformers could not load {path}: {exc}", path=str(path)) from exc
    model.eval()
    return model


def load_tokenizer(path: Path, *, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} has no usable tokenizer ({type(exc).__name__}); vLLM needs one beside the weights",
            path=str(path),
            hint="save the tokenizer into the model folder (tokenizer.save_pretrained(DIR))",
        ) from exc


def quiet_transformers(progress: bool) -> None:
    """Without progress bars, transformers' own ("Loading weights", "Writing shards") go too."""
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
