"""A model written part by part as standard sharded safetensors with an index, so it is never whole in memory.

:meth:`ShardWriter.add` takes one part (a decoder layer, or the embedding and head) as soon as it is final and
writes a shard whenever enough is gathered; :meth:`ShardWriter.close` names them
``model-0000K-of-0000N.safetensors`` and writes ``model.safetensors.index.json`` and ``config.json``, the layout
transformers and vLLM read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_pruned.atomic import atomic_write_text

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
# An output's shards: what a writer holds at once (ours, and transformers' when it saves the quantized model), so
# small enough to be a constant of the write stage rather than grow with the model up to its cap: at 2 GiB the
# write stage of a 22-layer TinyLlama-width package still grew with each layer. 512 MiB is less than one decoder
# layer of an 8B model in float32; a 70B model then has some 280 files, which the Hub and vLLM take as they come.
OUTPUT_SHARD_BYTES = 512 * 2**20


class ShardWriter:
    """Shards of one model into ``folder`` (created; an earlier model's shards there are replaced).

    Parts are gathered until they pass ``max_shard_bytes`` (0, the default: each part is a shard of its own, and
    nothing is held; transformers saves 5 GB shards), so what is held at once is one shard. One shard alone is
    named ``model.safetensors`` with no index, as transformers saves it. Floating tensors are cast to ``dtype``
    (None: kept as given) as they are taken.
    """

    def __init__(self, folder: Path, config: dict[str, Any], *, max_shard_bytes: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in [*self.folder.glob("*.safetensors"), *self.folder.glob(".part-*.safetensors")]:
            old.unlink()  # our own earlier, unfinished write of this model
        (self.folder / INDEX).unlink(missing_ok=True)
        self.config, self.max_shard_bytes, self.dtype = config, max_shard_bytes, dtype
        self._parts: list[list[str]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take ``tensors`` (host copies are made of device tensors); a shard is written once enough is held."""
        for name, t in tensors.items():
            cast = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
            self._pending[name] = t.detach().to("cpu", cast).contiguous()
        if sum(t.numel() * t.element_size() for t in self._pending.values()) >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        save_file(self._pending, str(self.folder / f".part-{len(self._parts):05d}.safetensors"),
                  metadata={"format": "pt"})
        self._parts.append(list(self._pending))
        self._bytes += sum(t.numel() * t.element_size() for t in self._pending.values())
        self._pending = {}

    def close(self) -> Path:
        """Write what is pending, name the shards, write the index (several shards) and config.json."""
        self._flush()
        n = len(self._parts)
        weight_map = {}
        for k, names in enumerate(self._parts):
            final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".part-{k:05d}.safetensors").replace(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            atomic_write_text(self.folder / INDEX, json.dumps(
                {"metadata": {"total_size": self._bytes}, "weight_map": weight_map}, indent=2) + "\n")
        atomic_write_text(self.folder / "config.json", json.dumps(self.config, indent=2) + "\n")
        return self.folder


def write_layers(writer: ShardWriter, model: Any, *, skip_layers: bool = False) -> None:
    """Every tensor of ``model`` (a :class:`Streamed` one) outside its decoder layers, one at a time (an 8B model's
    embedding and head are 1 GB each), then (unless ``skip_layers``: a pass wrote them) each decoder layer.

    Each is read as stored, not in the compute dtype: the writer casts it to the save dtype itself."""
    from serve_pruned.model.shapes import split_layer_name

    names = model.names()
    for n in names:
        if split_layer_name(n) is None:
            writer.add({n: model.stored(n)})
    if skip_layers:
        return
    for i in range(model.num_layers):
        prefix = f"model.layers.{i}."
        writer.add({n: model.stored(n) for n in names if n.startswith(prefix)})
