"""``serve_pruned.json``: what a packaged folder holds, how it was made, and the sha256 of every file.

Torch-free: the Hub, serving and deploy commands read manifests without the packaging extras.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_pruned.atomic import Owner
from serve_pruned.errors import ManifestError
from serve_pruned.model.shapes import Shape

MANIFEST_NAME = "serve_pruned.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What shape_before / shape_after must hold: a Shape's fields (the planner, push and the report read them), but
# hidden_size, which manifests written before the hidden size could be pruned leave out (config.json has it).
SHAPE_KEYS = tuple(f.name for f in dataclasses.fields(Shape) if f.name != "hidden_size")


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` for every file except the manifest itself."""
    folder = Path(folder)
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            rel = p.relative_to(folder).as_posix()
            table[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


class SourceInfo(BaseModel):
    """Which model a package was made from."""

    model_config = ConfigDict(extra="allow")

    model: str
    revision: str | None = None
    fingerprint: str | None = None  # sha256 over config.json and every weight file's sha256
    architecture: str | None = None
    model_type: str | None = None
    base_model: str | None = None
    license: str | None = None


class QuantizationInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    scheme: str
    group_size: int | None = None


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class Manifest(BaseModel):
    """``serve_pruned.json``: the hand-off from packaging to push, pull, plan, serve and the exporter.

    Format 2 is format 1 typed: the same keys, so a format-1 manifest (serve-pruned 0.1) reads as it is;
    keys this version does not know are kept (``extra="allow"``) and written back unchanged.
    """

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    kind: str = ""
    created_by: str = ""
    source: SourceInfo
    architecture: str = ""
    shape_before: dict[str, int]
    shape_after: dict[str, int]
    params_before: int
    params_after: int
    params_fraction: float = 1.0
    dtype: str = ""
    quantization: QuantizationInfo | None = None
    weight_bytes: int
    weight_bytes_before: int
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_token_before: int
    pruning: dict[str, Any] | None = None
    target: dict[str, Any] | None = None  # a target in bytes or instances: asked, predicted, written
    guard: dict[str, Any] | None = None  # --max-ppl-ratio: the candidates, what each tried one measured, the choice
    recovery: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    peak_memory: dict[str, dict[str, float]] = Field(default_factory=dict)  # host_gib / device_gib per stage
    memory_plan: dict[str, Any] | None = None  # what the plan predicted for each stage, beside peak_memory
    peak_rss_bytes: int | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    @field_validator("shape_before", "shape_after")
    @classmethod
    def _whole_shape(cls, shape: dict[str, int]) -> dict[str, int]:
        missing = [k for k in SHAPE_KEYS if k not in shape]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return shape

    @property
    def scheme(self) -> str:
        """The quantization scheme, ``none`` when not quantized."""
        return self.quantization.scheme if self.quantization is not None else "none"

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, exactly the keys it was read or built with."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def parse(cls, data: Any, *, where: str) -> Manifest:
        """A manifest from its JSON document (format 1 or 2), or a ManifestError naming ``where``."""
        if not isinstance(data, dict) or data.get("format_version") not in READABLE_VERSIONS:
            raise ManifestError(f"{where} has an unknown format_version", path=where,
                                hint="upgrade serve-pruned, or re-package the model")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ManifestError(f"{where} lacks the sizes the planner needs ({field}: {err['msg']})", path=where,
                                hint="re-package the model with serve-pruned package") from exc


def write_manifest(folder: Path, body: dict[str, Any]) -> Manifest:
    """Add the file table to ``body`` and write it as the folder's manifest; returns what was written."""
    manifest = Manifest.model_validate({"format_version": FORMAT_VERSION, **body, "files": file_table(folder)})
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    return manifest


def _not_in_manifest(folder: Path) -> list[str]:
    """Entries of ``folder`` that its manifest does not list (all of them when it has no readable one)."""
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if not p.is_dir())
    try:
        manifest = read_manifest(folder)
    except ManifestError:
        return files or sorted(p.name for p in Path(folder).iterdir())
    if not manifest.created_by.startswith("serve-pruned"):
        return files
    listed = {*manifest.files, MANIFEST_NAME}
    return [f for f in files if f not in listed]


# A packaged (or pulled) model folder: every file is listed in its serve_pruned.json.
PACKAGE_OWNER = Owner("packaged model", _not_in_manifest)


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_NAME}; it was not made by `serve-pruned package`",
            path=str(folder),
            hint="package the model first: serve-pruned package MODEL --out DIR",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})", path=str(path),
                            hint="the manifest was damaged: re-package the model, or pull it again") from exc
    return Manifest.parse(data, where=str(path))


def verify_files(folder: Path, manifest: Manifest) -> list[str]:
    """Names of files that are missing or whose sha256 differs from the manifest (empty when intact)."""
    bad = []
    for rel, meta in manifest.files.items():
        p = Path(folder) / rel
        if not p.is_file() or p.stat().st_size != meta.bytes or sha256_file(p) != meta.sha256:
            bad.append(rel)
    return bad
