"""The layer-by-layer pass the forward-only stages share, one part of the model on the device at a time.

A :class:`Streamed` model is a transformers skeleton and where its weights are. Built from a folder, the
skeleton's parameters live on the meta device and :meth:`Streamed.part` onloads one module's tensors
(memory-mapped from the safetensors files) to the stage's device in the compute dtype, then lets them go.
Built from a model in memory (:meth:`Streamed.resident`), a part moves to the device and back, so the same
passes run a whole model on an accelerator that could not hold it.

The passes carry every batch's hidden states from one decoder layer to the next (``embed`` -> ``through``
-> ``head``), as llm-compressor's sequential pipeline carries its calibration activations: a stage holds one
layer's weights and its samples' hidden states, never the whole model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from serve_pruned.compress.layers import decoder_layers, layer_inputs, layer_output
from serve_pruned.compress.weights import FolderTensors, Tensors
from serve_pruned.model.source import ModelSource

EMBED, NORM, HEAD = "model.embed_tokens", "model.norm", "lm_head"
TIED_HEAD = "model.embed_tokens.weight"  # what a tied lm_head reads: safetensors files list it once


@dataclass
class Streamed:
    """A model run part by part on ``device``: from ``tensors`` onto a meta skeleton, or resident (``tensors`` None)."""

    skeleton: Any
    tensors: Tensors | None
    device: torch.device
    dtype: torch.dtype | None = None  # floating tensors are onloaded in this dtype (None: as stored)

    @classmethod
    def resident(cls, model: Any, device: torch.device | str | None = None) -> Streamed:
        """A model already in memory, run on ``device`` (default: where its weights are)."""
        home = next(model.parameters()).device
        return cls(model, None, torch.device(device) if device is not None else home)

    @classmethod
    def skeleton_of(cls, config: Any, model_class: Any, tensors: Tensors, *, device: torch.device | str,
                    dtype: torch.dtype | None) -> Streamed:
        """A ``model_class`` of ``config`` whose parameters stay on meta until a part is onloaded from ``tensors``."""
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) stay real
            skeleton = model_class(config)
        skeleton.tie_weights()  # from_pretrained ties a tied head; a bare constructor does not
        skeleton.eval()
        device = torch.device(device)
        for module in skeleton.modules():  # buffers are small: they live on the device for the whole pass
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.to(device)
        return cls(skeleton, tensors, device, dtype)

    @classmethod
    def from_folder(cls, src: ModelSource, *, device: torch.device | str, dtype: torch.dtype | None,
                    trust_remote_code: bool = False) -> Streamed:
        """The model of a resolved folder, never read whole."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        return cls.skeleton_of(config, model_class, FolderTensors(src), device=device, dtype=dtype)

    @property
    def config(self) -> Any:
        return self.skeleton.config

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.skeleton))

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[Any]:
        """The submodule ``name`` with its weights on the device, for the length of the block."""
        module = self.skeleton.get_submodule(name)
        if self.tensors is None:
            home = next(module.parameters()).device
            if home == self.device:
                yield module
                return
            module.to(self.device)
            try:
                yield module
            finally:
                module.to(home)
            return
        # the skeleton's own meta parameters go back when the block ends, so ties (a tied head) survive
        saved = [(sub, key, p) for sub in module.modules() for key, p in sub._parameters.items() if p is not None]
        state = {local: self.get(f"{name}.{local}").to(self.device) for local, _ in module.named_parameters()}
        module.load_state_dict(state, strict=True, assign=True)
        try:
            yield module
        finally:
            for sub, key, p in saved:
                sub._parameters[key] = p

    def names(self) -> list[str]:
        """The checkpoint's tensor names (a tied head is not one of them)."""
        if self.tensors is None:
            return [n for n, _ in self.skeleton.named_parameters()]
        return self.tensors.names()

    def get(self, name: str) -> torch.Tensor:
        """One tensor by its checkpoint name, on the host, in the compute dtype (a tied head reads the embedding)."""
        return cast_floating(self.stored(name), self.dtype)

    def stored(self, name: str) -> torch.Tensor:
        """One tensor as its source holds it, not cast to the compute dtype: what a pruned view slices and a writer
        reads (an 8B model's head is 1 GB in bf16, 2 GB in float32)."""
        if self.tensors is None:
            return self.skeleton.get_parameter(name).detach()
        return self.tensors.get(TIED_HEAD if name == f"{HEAD}.weight" and name not in self._names else name)

    def as_stored(self) -> Tensors:
        """This model's tensors as they are stored: a source for a view that casts after it slices."""
        return _Stored(self)

    @functools.cached_property
    def _names(self) -> set[str]:
        return set(self.tensors.names()) if self.tensors is not None else set()

    def layers(self) -> Iterator[tuple[int, Any]]:
        """Each decoder layer in turn, onloaded."""
        for i in range(self.num_layers):
            with self.part(f"model.layers.{i}") as layer:
                yield i, layer

    def embed(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """Hidden states entering layer 0 for each batch of token ids, and the layers' keyword arguments."""
        with self.part(EMBED):
            return layer_inputs(self.skeleton, [b.to(self.device) for b in batches])

    def through(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], *,
                on_layer: Callable[[int, Any], None] | None = None, progress: Any = None) -> list[torch.Tensor]:
        """``hidden`` carried through every decoder layer; ``on_layer(i, layer)`` runs while layer ``i`` is onloaded."""
        for i, layer in self.layers():
            hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
            if on_layer is not None:
                on_layer(i, layer)
            if progress is not None:
                progress.update(1)
        return hidden

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """The final norm and the LM head, onloaded: last hidden states -> logits."""
        with self.part(NORM) as norm, self.part(HEAD) as lm_head:
            yield lambda h: lm_head(norm(h))

    def hidden_states(self, batches: list[torch.Tensor], *, progress: Any = None) -> list[torch.Tensor]:
        """The last decoder layer's output for each batch."""
        hidden, kwargs = self.embed(batches)
        return self.through(hidden, kwargs, progress=progress)


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` when it is floating (integer buffers keep theirs; None: as it is)."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@dataclass(frozen=True)
class _Stored:
    model: Streamed

    def names(self) -> list[str]:
        return self.model.names()

    def get(self, name: str) -> torch.Tensor:
        return self.model.stored(name)


def streamed(model: Any, device: torch.device | str | None = None) -> Streamed:
    """``model`` as a :class:`Streamed` (a model in memory becomes a resident one)."""
    return model if isinstance(model, Streamed) else Streamed.resident(model, device)


