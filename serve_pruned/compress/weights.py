"""Where a model's tensors come from, read one at a time: a folder's safetensors files or a model in memory.

A stage that streams asks a :class:`Tensors` for the tensors of one part of the model (the embedding, one
decoder layer, the head) and lets them go when done, so it never needs the whole model in memory.
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


# safetensors dtype names torch can view bytes as; any other dtype is read through safetensors itself
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class FolderTensors:
    """The tensors of a resolved model folder, read one at a time from its safetensors shards.

    A tensor is read into memory of its own (the header gave its offset) rather than memory-mapped: mapped
    pages a pass has touched stay in the process's resident set until the file is closed, so a layer-by-layer
    pass over a mapped model would end up holding (and being billed for) the whole model. Read, a tensor costs
    memory only while it is held; the kernel's page cache still keeps what the disk gave it.
    """

    def __init__(self, src: ModelSource) -> None:
        self.folder = Path(src.path)
        self._info = dict(src.tensors)
        self._open: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self._info)

    def dtypes(self) -> set[torch.dtype | str]:
        """The dtypes its tensors are stored in (a safetensors name where torch has no match here)."""
        return {_DTYPES.get(i.dtype, i.dtype) for i in self._info.values()}

    def get(self, name: str) -> torch.Tensor:
        info = self._info[name]
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            return self._safetensors(info.file).get_tensor(name)
        handle = self._open.get(info.file)
        if handle is None:
            handle = self._open[info.file] = (self.folder / info.file).open("rb")
        buf = bytearray(info.nbytes)
        handle.seek(info.offset)
        if handle.readinto(buf) != info.nbytes:
            raise CorruptWeightsError(f"{info.file} ended inside tensor {name}", path=str(self.folder / info.file))
        if not info.nbytes:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def _safetensors(self, file: str) -> Any:
        from safetensors import safe_open

        key = f"safe_open:{file}"
        if key not in self._open:
            try:
                self._open[key] = safe_open(str(self.folder / file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for unreadable files
                raise CorruptWeightsError(f"{file} cannot be read: {exc}", path=str(self.folder / file)) from exc
        return self._open[key]


class ModuleTensors:
    """The tensors of a model already in memory (a tied head is listed once, as the safetensors file has it)."""

    def __init__(self, model: Any) -> None:
        self._params = dict(model.named_parameters())

    def names(self) -> list[str]:
        return list(self._params)

    def get(self, name: str) -> torch.Tensor:
        return self._params[name].detach()
