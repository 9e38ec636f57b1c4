"""Finding and checking a model before anything heavy is loaded (torch-free).

Safetensors only: ``*.bin``/``*.pt`` checkpoints are pickles and are never loaded. Each safetensors
file's header is parsed and its length checked against the data it announces, so a truncated
download fails here with the file's name instead of deep inside transformers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from serve_pruned.errors import (
    CorruptWeightsError,
    MissingWeightsError,
    ModelLoadError,
    RemoteCodeRefusedError,
)
from serve_pruned.model.config import read_config

_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors spec caps the JSON header at 100 MB


@dataclass
class TensorInfo:
    dtype: str  # the safetensors dtype name: F32, BF16, ...
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int = 0  # where its bytes start in the file


@dataclass
class ModelSource:
    """A resolved model: a local folder with config.json and safetensors weights.

    Attributes:
        path: the folder on disk (a Hub snapshot for Hub ids).
        ref: what the user named (folder or Hub id).
        revision: the Hub commit sha, or None for a local folder.
        config: config.json as a dict.
        tensors: every tensor's dtype, shape and byte size, from the headers.
    """

    path: Path
    ref: str
    revision: str | None
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def weight_files(self) -> list[Path]:
        return sorted({self.path / t.file for t in self.tensors.values()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors header and check the file holds all the data it announces."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CorruptWeightsError(f"{path.name} is truncated ({size} bytes)", path=str(path))
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _HEADER_LIMIT or 8 + header_len > size:
                raise CorruptWeightsError(
                    f"{path.name} is truncated or not a safetensors file (header of {header_len} bytes, "
                    f"file of {size})",
                    path=str(path),
                )
            header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptWeightsError(f"{path.name} has an unreadable safetensors header: {exc}", path=str(path)) from exc
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}", path=str(path)) from exc
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        begin, stop = meta["data_offsets"]
        end = max(end, stop)
        tensors[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]), stop - begin, path.name, 8 + header_len + begin)
    if 8 + header_len + end > size:
        raise CorruptWeightsError(
            f"{path.name} is truncated: its header announces {8 + header_len + end} bytes, the file has {size}",
            path=str(path),
        )
    return tensors


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CorruptWeightsError(f"{index.name} is not a valid index: {exc}", path=str(index)) from exc
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MissingWeightsError(
                f"{folder} is missing {len(missing)} shard(s) named in {index.name}: {', '.join(missing[:3])}",
                path=str(folder),
                hint="the download is incomplete; fetch the model again",
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    if pickles:
        raise MissingWeightsError(
            f"{folder} has only pickle checkpoints ({', '.join(pickles[:3])}); serve_pruned loads safetensors only",
            path=str(folder),
        )
    raise MissingWeightsError(f"{folder} has no *.safetensors weights", path=str(folder))


def inspect_folder(folder: Path, *, ref: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> ModelSource:
    """Check a local Hugging Face model folder and read its config and tensor headers."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(
            f"model folder {folder} does not exist",
            path=str(folder),
            hint="pass a local Hugging Face folder or a Hub id (owner/name); "
                 "`serve-pruned example-model DIR` makes one",
        )
    config = read_config(folder)
    if config.get("auto_map") and not trust_remote_code:
        raise RemoteCodeRefusedError(ref or str(folder))
    tensors: dict[str, TensorInfo] = {}
    for f in _weight_files(folder):
        tensors.update(read_safetensors_header(f))
    return ModelSource(path=folder, ref=ref or str(folder), revision=revision, config=config, tensors=tensors)


def resolve_model(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    """A local folder, or a Hub id downloaded (safetensors and metadata only) into the HF cache."""
    local = Path(ref).expanduser()
    if local.exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        return inspect_folder(local, ref=ref, trust_remote_code=trust_remote_code)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is in the package extra
        raise ModelLoadError(f"{ref} looks like a Hub id but huggingface_hub is not installed", path=ref) from exc
    try:
        path = snapshot_download(
            ref,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt", "README.md"],
        )
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"Hub repo {ref} not found (or private)", path=ref,
                             hint="check the id, or set HF_TOKEN for a private repo") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(f"{ref} is not in the local Hugging Face cache and the Hub cannot be reached", path=ref,
                             hint="run once online, or unset HF_HUB_OFFLINE") from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"could not download {ref}: {exc}", path=ref) from exc
    snapshot = Path(path)
    return inspect_folder(snapshot, ref=ref, revision=snapshot.name, trust_remote_code=trust_remote_code)
