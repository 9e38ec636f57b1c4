"""Closed-form recovery: refit each pruned ``down_proj`` so its MLP reproduces the original MLP.

Layer by layer, on the pruned model's own hidden states (so earlier refits are taken into account):
for every calibration token, ``x`` is the input of the pruned layer's MLP (after its norm), ``a`` the
pruned intermediate activation (``act(gate(x)) * up(x)``, width F') and ``y`` what the ORIGINAL layer's
MLP (full width F) outputs for the same ``x``. The new ``down_proj`` weight solves the ridge problem

    W = argmin ||a W^T - y||^2 + lambda ||W||^2   ->   W^T = (A^T A + lambda I)^-1 A^T Y

with ``lambda`` a small fraction of the mean diagonal of ``A^T A`` (as GPTQ damps its Hessian). No
gradient step; each layer costs two forward passes of that layer over the calibration samples.
"""

from __future__ import annotations

from typing import Any

import torch

from serve_pruned.compress.importance import decoder_layers


class _Stop(Exception):
    pass


@torch.no_grad()
def _layer_inputs(model: Any, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering layer 0 for every batch, and the keyword arguments (mask, rotary
    embeddings) the layers are called with for that batch."""
    captured: list[torch.Tensor] = []
    kwargs_seen: list[dict[str, Any]] = []

    def grab(_mod: Any, args: tuple, kwargs: dict) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        kwargs_seen.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(input_ids=x, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured, kwargs_seen


@torch.no_grad()
def refit_down_proj(pruned: Any, original: Any, kept_layers: list[int], samples: torch.Tensor, *,
                    batch_size: int = 4, damp: float = 0.01, progress: Any = None,
                    measure_only: bool = False) -> dict[str, float]:
    """Refit every pruned layer's ``down_proj`` in place; returns the mean relative MLP error before/after.

    With ``measure_only`` nothing changes and only ``mlp_rel_error_before`` is meaningful: the
    reconstruction error of the current weights on ``samples`` (e.g. held-out text).

    Args:
        pruned: the pruned model (modified in place).
        original: the unpruned model.
        kept_layers: for each pruned layer, the index of the original layer it came from.
        samples: calibration token ids (n, seq_len).
    """
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    hidden, kwargs = _layer_inputs(pruned, batches)
    p_layers, o_layers = decoder_layers(pruned), decoder_layers(original)
    errors_before, errors_after = [], []
    for li, layer in enumerate(p_layers):
        orig_mlp = o_layers[kept_layers[li]].mlp
        mlp = layer.mlp
        width = mlp.down_proj.in_features
        gram = torch.zeros(width, width, dtype=torch.float64)
        cross = torch.zeros(width, mlp.down_proj.out_features, dtype=torch.float64)
        seen: dict[str, torch.Tensor] = {}
        handles = [mlp.register_forward_pre_hook(_store(seen, "x")),
                   mlp.down_proj.register_forward_pre_hook(_store(seen, "a"))]
        err_num = err_den = 0.0
        try:
            for h, kw in zip(hidden, kwargs, strict=True):
                layer(h, **kw)
                a = seen["a"].reshape(-1, width).double()
                y = orig_mlp(seen["x"]).reshape(-1, cross.shape[1]).double()
                gram += a.T @ a
                cross += a.T @ y
                err_num += (a @ mlp.down_proj.weight.double().T - y).pow(2).sum().item()
                err_den += y.pow(2).sum().item()
        finally:
            for hd in handles:
                hd.remove()
        if measure_only:
            errors_before.append(err_num / max(err_den, 1e-12))
            errors_after.append(errors_before[-1])
            hidden = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
            continue
        lam = damp * gram.diagonal().mean().clamp_min(1e-12)
        solution = torch.linalg.solve(gram + lam * torch.eye(width, dtype=torch.float64), cross)  # [F', hidden]
        mlp.down_proj.weight.copy_(solution.T.to(mlp.down_proj.weight.dtype))
        # residual after the refit from the same statistics: ||aW - y||^2 = tr(W'GW) - 2 tr(W'C) + ||y||^2
        w = solution
        resid = ((w.T @ gram @ w).trace() - 2 * (w.T @ cross).trace()).item() + err_den
        errors_before.append(err_num / max(err_den, 1e-12))
        errors_after.append(max(resid, 0.0) / max(err_den, 1e-12))
        hidden = [_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        if progress is not None:
            progress.update(1)
    return {"mlp_rel_error_before": sum(errors_before) / len(errors_before),
            "mlp_rel_error_after": sum(errors_after) / len(errors_after)}


def _store(into: dict[str, torch.Tensor], key: str) -> Any:
    def hook(_m: Any, args: tuple) -> None:
        into[key] = args[0]
    return hook


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
