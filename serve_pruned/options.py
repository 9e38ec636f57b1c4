"""Validated options, built once at the boundary (CLI flags today, recipe files too)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PackageOptions(BaseModel):
    """Everything `serve-pruned package` needs; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="local Hugging Face folder or Hub id")
    out: Path
    revision: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False

    calib: tuple[str, ...] = ()
    text_field: str = "text"
    num_samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    scorer: Literal["activation", "fluctuation", "magnitude"] = "activation"
    target_params: float | None = None
    keep_heads: int | None = None
    keep_kv_heads: int | None = None
    keep_ffn: int | None = None
    drop_layers: int = 0
    multiple_of: int = 64
    max_candidates: int = Field(12, ge=1)
    search_samples: int = Field(4, ge=1)

    refit: bool = True
    quant: Literal["none", "w8a8", "w4a16", "fp8"] = "none"
    group_size: int | None = Field(None, ge=1)

    eval_text: tuple[str, ...] = ()
    eval_max_tokens: int = Field(16384, ge=2)
    eval_seq_len: int = Field(512, ge=2)
    eval_baseline: bool = True

    def public(self) -> dict:
        """The options as recorded in the manifest (paths as strings)."""
        d = self.model_dump(mode="json")
        d.pop("overwrite", None)
        return d
