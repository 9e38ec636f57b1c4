"""Where a model's tensors come from, read one at a time: a folder's safetensors files or a model in memory.

A stage that streams asks a :class:`Tensors` for the tensors of one part of the model (the embedding, one
decoder layer, the head) and lets them go when done, so it never needs the whole model in memory. The
folder source memory-maps its files (safetensors' ``safe_open``): a tensor costs memory only while it is
held, and the page cache, not the process, keeps what the disk already holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from serve_pruned.errors import CorruptWeightsError
from serve_pruned.model.source import ModelSource


class Tensors(Protocol):
    """A model's tensors by name (as in its safetensors files), each read when asked for."""

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class FolderTensors:
    """The tensors of a resolved model folder, read lazily from its safetensors shards."""

    def __init__(self, src: ModelSource) -> None:
        self.folder = src.path
        self._file = {name: info.file for name, info in src.tensors.items()}
        self._open: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self._file)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._file[name]
        handle = self._open.get(file)
        if handle is None:
            try:
                handle = self._open[file] = safe_open(str(Path(self.folder) / file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for unreadable files
                raise CorruptWeightsError(f"{file} cannot be read: {exc}", path=str(Path(self.folder) / file)) from exc
        return handle.get_tensor(name)


class ModuleTensors:
    """The tensors of a model already in memory (a tied head is listed once, as the safetensors file has it)."""

    def __init__(self, model: Any) -> None:
        self._params = dict(model.named_parameters())

    def names(self) -> list[str]:
        return list(self._params)

    def get(self, name: str) -> torch.Tensor:
        return self._params[name].detach()
