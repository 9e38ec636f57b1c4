"""A model written part by part as standard sharded safetensors with an index, so it is never whole in memory.

Each :meth:`ShardWriter.add` writes one shard (a decoder layer, or the embedding and head) as soon as that part
is final; :meth:`ShardWriter.close` names them ``model-0000K-of-0000N.safetensors`` and writes
``model.safetensors.index.json`` and ``config.json``, the layout transformers and vLLM read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from serve_pruned.atomic import atomic_write_text

INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Shards of one model into ``folder`` (created; an earlier model's shards there are replaced)."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.safetensors"):  # our own earlier, unfinished write of this step
            old.unlink()
        (self.folder / INDEX).unlink(missing_ok=True)
        self.config = config
        self._parts: list[list[str]] = []
        self._bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (host copies are made of device tensors) as the next shard."""
        from safetensors.torch import save_file

        host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        save_file(host, str(self.folder / f".part-{len(self._parts):05d}.safetensors"), metadata={"format": "pt"})
        self._parts.append(list(host))
        self._bytes += sum(t.numel() * t.element_size() for t in host.values())

    def close(self) -> Path:
        """Name the shards, write the index and config.json; returns the folder."""
        n = len(self._parts)
        weight_map = {}
        for k, names in enumerate(self._parts):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".part-{k:05d}.safetensors").replace(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        atomic_write_text(self.folder / INDEX, json.dumps(
            {"metadata": {"total_size": self._bytes}, "weight_map": weight_map}, indent=2) + "\n")
        atomic_write_text(self.folder / "config.json", json.dumps(self.config, indent=2) + "\n")
        return self.folder


def write_layers(writer: ShardWriter, model: Any, *, skip_layers: bool = False) -> None:
    """Every tensor of ``model`` (a :class:`Streamed` one) outside its decoder layers as one shard, then (unless
    ``skip_layers``: a pass wrote them) each decoder layer as a shard of its own."""
    from serve_pruned.model.shapes import split_layer_name

    names = model.names()
    writer.add({n: model.get(n) for n in names if split_layer_name(n) is None})
    if skip_layers:
        return
    for i in range(model.num_layers):
        prefix = f"model.layers.{i}."
        writer.add({n: model.get(n) for n in names if n.startswith(prefix)})
