"""Where a package comes from: the source's fingerprint, Hub id and licence, the tools, the memory it took."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from serve_pruned import __version__
from serve_pruned.manifest import sha256_file
from serve_pruned.model.source import ModelSource


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"serve_pruned": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "accelerate", "safetensors", "llmcompressor", "compressed-tensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hub_id_of(src: ModelSource) -> str | None:
    """The Hub id the source model is known by: its Hub id, or the ``_name_or_path`` it was saved with."""
    if src.revision is not None:
        return src.ref
    name = str(src.config.get("_name_or_path") or "")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def source_license(folder: Path) -> str | None:
    """The licence id from the source's model card metadata, or recognized in its LICENSE file."""
    import yaml

    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            try:
                meta = yaml.safe_load(text[3:end]) if end > 0 else None
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    for f in sorted(folder.glob("LICENSE*")):
        head = f.read_text(encoding="utf-8", errors="replace")[:2000].lower()
        for needle, spdx in (("apache license", "apache-2.0"), ("mit license", "mit"),
                             ("gnu general public license", "gpl-3.0"), ("llama 3", "llama3")):
            if needle in head:
                return spdx
    return None


def source_fingerprint(src: ModelSource) -> str:
    """sha256 over config.json and every weight file's sha256 (identifies the exact weights)."""
    h = hashlib.sha256(json.dumps(src.config, sort_keys=True).encode())
    for f in src.weight_files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
