"""The layer-by-layer pass that scoring and the refit share: decoder layers, their inputs, their outputs, hooks.

Both carry every calibration batch's hidden states from one decoder layer to the next instead of running
the whole model per question, so only one layer's statistics are alive at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def decoder_layers(model: Any) -> Any:
    return model.model.layers


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states (some transformers versions return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    """Remove the given hook handles when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has seen what it needs."""


@torch.no_grad()
def layer_inputs(model: Any, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering layer 0 for every batch, and the keyword arguments (mask, rotary
    embeddings) the layers are called with for that batch."""
    captured: list[torch.Tensor] = []
    kwargs_seen: list[dict[str, Any]] = []

    def grab(_mod: Any, args: tuple, kwargs: dict) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        kwargs_seen.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    with hooks(decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)):
        for x in batches:
            try:
                model(input_ids=x, use_cache=False)
            except StopForward:
                pass
    return captured, kwargs_seen
