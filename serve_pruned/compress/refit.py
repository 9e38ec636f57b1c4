"""Closed-form recovery: refit what each pruned block feeds forward so that the block reproduces the
ORIGINAL block's output.

Layer by layer, on the pruned model's own hidden states (so earlier refits are taken into account),
for every calibration token: ``x`` is what enters the block (the attention or the MLP, after its norm),
``a`` the pruned block's input to its output projection (the kept heads' outputs for ``o_proj``, the
kept intermediate activations ``act(gate(x)) * up(x)`` for ``down_proj``) and ``y`` what the original
layer's block outputs for the same ``x``. The new projection weight solves the ridge problem

    W = argmin ||a W^T - y||^2 + lambda ||W||^2   ->   W^T = (A^T A + lambda I)^-1 A^T Y

with ``lambda`` a small fraction of the mean diagonal of ``A^T A`` (as GPTQ damps its Hessian). No
gradient step. Attention is refit before the MLP of the same layer, so the MLP's fit sees the refit
attention's output. Each layer costs a few forward passes of that layer over the calibration samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from serve_pruned.compress.layers import StopForward, hooks, layer_output
from serve_pruned.compress.stream import streamed


@torch.no_grad()
def _accumulate(into: torch.Tensor, left: torch.Tensor, right: torch.Tensor, *, block: int = 1024) -> None:
    """``into += left @ right`` in float64, a block of columns at a time: the float32 product and its float64 copy
    are then a block's size, not the Gram matrix's (at Llama-8B's FFN width that is 1.4 GB less at the peak)."""
    for j in range(0, right.shape[1], block):
        into[:, j : j + block] += (left @ right[:, j : j + block]).double()


def _fit(layer: Any, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], *, block: Any, linear: Any,
         original_block: Any, damp: float, measure_only: bool, stream: list[torch.Tensor] | None = None,
         residual_at: Any = None, channels: torch.Tensor | None = None) -> tuple[float, float]:
    """Refit ``linear`` (the output projection of ``block``) so ``block`` matches ``original_block``.

    With ``stream`` (per batch, the original model's residual stream right after this block) the target is
    instead what brings the pruned model's residual stream onto the original's: ``stream - residual``, where
    ``residual`` is the pruned stream entering the block (``hidden``, or the input of ``residual_at``).

    Each batch runs the pruned layer only up to ``linear``'s input (the rest is not needed) and the
    original block on the same input. Per-batch products are float32 (a few thousand tokens each),
    summed in float64, and the solve is float64.

    Returns the relative squared error of the block's output before and after.
    """
    width, out_width = linear.in_features, linear.out_features
    on = linear.weight.device
    gram = torch.zeros(width, width, dtype=torch.float64, device=on)
    cross = torch.zeros(width, out_width, dtype=torch.float64, device=on)
    seen: dict[str, Any] = {}

    def grab_block(_m: Any, args: tuple, kw: dict) -> None:
        seen["args"], seen["kwargs"] = args, kw

    def grab_linear(_m: Any, args: tuple) -> None:
        seen["a"] = args[0]
        raise StopForward

    def grab_residual(_m: Any, args: tuple) -> None:
        seen["residual"] = args[0]

    handles = [block.register_forward_pre_hook(grab_block, with_kwargs=True),
               linear.register_forward_pre_hook(grab_linear)]
    if residual_at is not None:
        handles.append(residual_at.register_forward_pre_hook(grab_residual))
    weight = linear.weight.float()
    bias = linear.bias.float() if linear.bias is not None else None
    err_num = err_den = 0.0
    with hooks(*handles):
        for b, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            try:
                layer(h, **kw)
            except StopForward:
                pass
            a = seen["a"].reshape(-1, width).float()
            if stream is None:
                y = layer_output(original_block(*seen["args"], **seen["kwargs"])).reshape(-1, out_width).float()
            else:
                residual = seen["residual"] if residual_at is not None else h
                target = stream[b] if channels is None else stream[b].index_select(-1, channels)
                y = (target.float() - residual.float()).reshape(-1, out_width)
            if bias is not None:  # the bias stays; the weight fits what is left
                y = y - bias
            _accumulate(gram, a.T, a)
            _accumulate(cross, a.T, y)
            err_num += (a @ weight.T - y).double().pow(2).sum().item()
            err_den += y.double().pow(2).sum().item()
    before = err_num / max(err_den, 1e-12)
    if measure_only:
        return before, before
    lam = damp * gram.diagonal().mean().clamp_min(1e-12)
    # the damping goes onto the diagonal in place (the Gram matrix is not needed after): an identity and a damped
    # copy of a float64 Gram matrix would be two more of its size (0.9 GB each at Llama-8B's pruned FFN width)
    gram.diagonal().add_(lam)
    solution = torch.linalg.solve(gram, cross)  # [in, out]
    linear.weight.copy_(solution.T.to(linear.weight.dtype))
    # residual from the same statistics: ||aW - y||^2 = tr(W'GW) - 2 tr(W'C) + ||y||^2, where GW = C - lam W
    # (W solves (G + lam I) W = C), so no product with G: that would cost as much as the solve
    w_c = (solution * cross).sum()
    resid = (-w_c - lam * solution.pow(2).sum()).item() + err_den
    return before, max(resid, 0.0) / max(err_den, 1e-12)


@torch.no_grad()
def refit(pruned: Any, original: Any, kept_layers: list[int], samples: torch.Tensor, *,
          attention: bool = True, mlp: bool = True, batch_size: int = 4, damp: float = 0.01,
          target: str = "block", channels: list[int] | None = None, device: Any = None, progress: Any = None,
          on_layer: Callable[[int, Any], None] | None = None, measure_only: bool = False) -> dict[str, float]:
    """Refit every pruned layer's ``o_proj`` (when ``attention``) and ``down_proj`` (when ``mlp``) in place.

    Both models run layer by layer on ``device`` (default: where their weights are), one pruned layer and the
    original layers it is fitted to onloaded at a time. ``on_layer(i, layer)`` sees each pruned layer once it is
    final, while it is still onloaded (a streamed model's refit weights live only that long: write them there).

    With ``measure_only`` nothing changes: the result is the reconstruction error of the current
    weights on ``samples`` (e.g. held-out text).

    Args:
        pruned: the pruned model (modified in place).
        original: the unpruned model.
        kept_layers: for each pruned layer, the index of the original layer it came from.
        samples: calibration token ids (n, seq_len).
        target: ``"block"`` fits each block to the original block on the same input; ``"stream"`` fits it to
            bring the pruned model's residual stream after the block onto the original model's (run on its own
            stream), so each refit also corrects the drift that earlier pruned layers left.

    Returns:
        Mean relative squared error of the refit blocks' outputs, before and after
        (``attn_rel_error_*`` and/or ``mlp_rel_error_*``).
    """
    if target not in ("block", "stream"):
        raise ValueError(f"refit target must be 'block' or 'stream', not {target!r}")
    if channels is not None and target != "stream":
        raise ValueError("a pruned hidden size is refit to the original's residual stream: pass target='stream'")
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    p, o = streamed(pruned, device), streamed(original, device)
    hidden, kwargs = p.embed(batches)
    t_hidden = t_kwargs = None
    if target == "stream":
        t_hidden, t_kwargs = o.embed(batches)
    next_original = 0
    errors: dict[str, list[float]] = {}
    index = torch.tensor(channels, dtype=torch.long, device=p.device) if channels is not None else None
    for li, layer in p.layers():
        with o.part(f"model.layers.{kept_layers[li]}") as orig:
            streams: dict[str, list[torch.Tensor] | None] = {"attn": None, "mlp": None}
            if t_hidden is not None and t_kwargs is not None:
                for oi in range(next_original, kept_layers[li]):  # layers dropped before this one
                    with o.part(f"model.layers.{oi}") as dropped:
                        t_hidden = [layer_output(dropped(t, **kw)) for t, kw in zip(t_hidden, t_kwargs, strict=True)]
                streams["attn"], t_hidden = _original_streams(orig, t_hidden, t_kwargs)
                streams["mlp"] = t_hidden
                next_original = kept_layers[li] + 1
            _refit_layer(layer, orig, hidden, kwargs, streams, errors, attention=attention, mlp=mlp, damp=damp,
                         measure_only=measure_only, channels=index)
        hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        if on_layer is not None:
            on_layer(li, layer)
        if progress is not None:
            progress.update(1)
    return {k: sum(v) / len(v) for k, v in errors.items()}


def _refit_layer(layer: Any, orig: Any, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
                 streams: dict[str, list[torch.Tensor] | None], errors: dict[str, list[float]], *, attention: bool,
                 mlp: bool, damp: float, measure_only: bool, channels: torch.Tensor | None) -> None:
    """One pruned layer's attention, then its MLP, fitted to the original layer ``orig``; errors appended."""
    jobs = []
    if attention:
        jobs.append(("attn", layer.self_attn, layer.self_attn.o_proj, orig.self_attn, None))
    if mlp:
        jobs.append(("mlp", layer.mlp, layer.mlp.down_proj, orig.mlp, layer.post_attention_layernorm))
    for name, block, linear, original_block, residual_at in jobs:
        before, after = _fit(layer, hidden, kwargs, block=block, linear=linear, original_block=original_block,
                             damp=damp, measure_only=measure_only, stream=streams[name], residual_at=residual_at,
                             channels=channels)
        errors.setdefault(f"{name}_rel_error_before", []).append(before)
        errors.setdefault(f"{name}_rel_error_after", []).append(after)


@torch.no_grad()
def _original_streams(layer: Any, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The original ``layer``'s residual stream after its attention and after its MLP, per batch."""
    mid: list[torch.Tensor] = []
    with hooks(layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, args: mid.append(args[0]))):
        out = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
    return mid, out


def refit_down_proj(pruned: Any, original: Any, kept_layers: list[int], samples: torch.Tensor, *,
                    batch_size: int = 4, damp: float = 0.01, progress: Any = None,
                    measure_only: bool = False) -> dict[str, float]:
    """:func:`refit` of the MLPs only (FFN-only pruning)."""
    return refit(pruned, original, kept_layers, samples, attention=False, mlp=True, batch_size=batch_size,
                 damp=damp, progress=progress, measure_only=measure_only)
