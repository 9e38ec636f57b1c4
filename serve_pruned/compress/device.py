"""The one device every heavy stage of a run uses: ``--device auto|cpu|cuda|cuda:N``."""

from __future__ import annotations

from typing import Any

from serve_pruned.errors import UsageError


def resolve_device(spec: str) -> Any:
    """``spec`` as a ``torch.device``; ``auto`` is the first accelerator when torch sees one, else the CPU.

    Asking for an accelerator that is not there fails here, before any weight is loaded.
    """
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {spec}: torch sees no CUDA device on this machine",
                             hint="pass --device cpu, or auto to use an accelerator only when there is one")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: torch sees {count} CUDA device(s), numbered from 0",
                             hint=f"pass --device cuda:0 … cuda:{count - 1}")
    return device
