"""``serve_pruned.json``: what a packaged folder holds, how it was made, and the sha256 of every file.

Torch-free: the Hub, serving and deploy commands read manifests without the packaging extras.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from serve_pruned.atomic import Owner
from serve_pruned.errors import ManifestError

MANIFEST_NAME = "serve_pruned.json"
FORMAT_VERSION = 1


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


def write_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Add the file table to ``body`` and write it as the folder's manifest; returns what was written."""
    manifest = {"format_version": FORMAT_VERSION, **body, "files": file_table(folder)}
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def _not_in_manifest(folder: Path) -> list[str]:
    """Entries of ``folder`` that its manifest does not list (all of them when it has no readable one)."""
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if not p.is_dir())
    try:
        manifest = read_manifest(folder)
    except ManifestError:
        return files or sorted(p.name for p in Path(folder).iterdir())
    if not str(manifest.get("created_by", "")).startswith("serve-pruned"):
        return files
    listed = {*manifest.get("files", {}), MANIFEST_NAME}
    return [f for f in files if f not in listed]


# A packaged (or pulled) model folder: every file is listed in its serve_pruned.json.
PACKAGE_OWNER = Owner("packaged model", _not_in_manifest)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_NAME}; it was not made by `serve-pruned package`",
            path=str(folder),
            hint="package the model first: serve-pruned package MODEL --out DIR",
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})", path=str(path),
                            hint="the manifest was damaged: re-package the model, or pull it again") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has an unknown format_version", path=str(path),
                            hint="upgrade serve-pruned, or re-package the model")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Names of files that are missing or whose sha256 differs from the manifest (empty when intact)."""
    bad = []
    for rel, meta in manifest.get("files", {}).items():
        p = Path(folder) / rel
        if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            bad.append(rel)
    return bad
