"""Importance of every prunable structure, from one pass over calibration data.

One forward pass collects scorer-independent statistics per layer (cached on disk, keyed by the
model's and the data's hashes), so switching scorer or re-slicing to another target is free:

* for each input channel of ``o_proj`` and ``down_proj``: sum and sum of squares over tokens;
* for each query head: the sum over tokens of ``||W_o[:, h] z_h||^2``, the squared norm of what the
  head writes into the residual stream;
* for each layer: the mean cosine similarity of its input and output hidden states.

Scorers (higher means keep):

``activation`` (Minitron-style): the RMS over tokens of each structure's contribution to the residual
stream -- ``||W_o,h z_h||`` per head, ``|a_j| * ||W_down[:, j]||`` per FFN channel. A KV group scores
the sum of its query heads.

``fluctuation`` (FLAP): variance over tokens of each output-projection input channel times the squared
norm of its weight column; a head sums its channels.

``magnitude`` (baseline): the L2 norm of the weights the structure owns.

``obs`` (structured Optimal Brain Surgeon, as in SlimGPT): FFN channels ranked by the order in which a
greedy elimination removes them. With ``H = A^T A`` the Gram matrix of ``down_proj``'s inputs, each round
drops the channels whose removal costs least once the remaining channels are refit by least squares,
``||W_down[:, j]||^2 / [H^-1]_jj``, and updates the remaining weights and ``H^-1`` for that refit. Unlike the
scores above it sees that two channels can carry the same signal, and it ranks for exactly the least-squares
refit that recovery applies next. It needs each layer's Gram matrix (F x F float32, one layer at a time), so
it is collected only when asked for (``collect_stats(..., ffn_order=True)``). Heads score as ``activation``.

Layers are always scored by block influence, ``1 - cos(h_in, h_out)`` (ShortGPT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from serve_pruned.compress.layers import decoder_layers, hooks, layer_inputs, layer_output
from serve_pruned.model.shapes import Shape

SCORERS = ("activation", "fluctuation", "magnitude", "obs")


@dataclass
class LayerStats:
    """Per-layer calibration statistics, stacked over layers (float64)."""

    o_sum: torch.Tensor  # [L, H*hd]
    o_sumsq: torch.Tensor  # [L, H*hd]
    head_contrib_sq: torch.Tensor  # [L, H]
    ffn_sum: torch.Tensor  # [L, F]
    ffn_sumsq: torch.Tensor  # [L, F]
    cos_sum: torch.Tensor  # [L]
    tokens: torch.Tensor  # [1]
    ffn_order: torch.Tensor | None = None  # [L, F] greedy OBS elimination rank (higher = removed later)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> LayerStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@torch.no_grad()
def obs_order(gram: torch.Tensor, weight: torch.Tensor, *, chunk: int = 16, damp: float = 0.01) -> torch.Tensor:
    """Greedy structured-OBS elimination of a linear layer's input channels.

    Args:
        gram: ``A^T A`` of the layer's inputs over calibration tokens, [F, F].
        weight: the layer's weight, [out, F].
        chunk: channels dropped per round (each round's removal and refit is exact for the whole chunk; costs
            are recomputed between rounds).
        damp: ridge, as a fraction of the mean diagonal of ``gram`` (as the refit uses).

    Returns:
        [F] float64: channel ``j``'s position in the elimination (0 = dropped first), so higher = keep.
    """
    f = gram.shape[0]
    h = gram.double()
    h = h + damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(f, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.double().clone()
    alive = torch.arange(f)
    rank = torch.empty(f, dtype=torch.float64)
    done = 0
    while alive.numel():
        cost = w.pow(2).sum(0) / hinv.diagonal()
        k = min(chunk, alive.numel())
        drop = torch.topk(cost, k, largest=False, sorted=True).indices
        rank[alive[drop]] = torch.arange(done, done + k, dtype=torch.float64)
        done += k
        keep = torch.ones(alive.numel(), dtype=torch.bool)
        keep[drop] = False
        # remove the chunk Q and refit the rest: W_K -= W_Q (H^-1_QQ)^-1 H^-1_QK, same downdate for H^-1
        h_qk = hinv[drop][:, keep]  # H^-1 is symmetric: H^-1_KQ is its transpose
        across = torch.linalg.inv(hinv[drop][:, drop]) @ h_qk  # [k, |K|]
        w = w[:, keep] - w[:, drop] @ across
        hinv = hinv[keep][:, keep] - h_qk.T @ across
        alive = alive[keep]
    return rank


@torch.no_grad()
def collect_stats(model: Any, samples: torch.Tensor, *, batch_size: int = 4, progress: Any = None,
                  ffn_order: bool = False) -> LayerStats:
    """Run ``samples`` through ``model`` once, layer by layer, with hooks that accumulate :class:`LayerStats`.

    The hidden states of every sample are carried from one decoder layer to the next (as the refit does), so
    per-layer work is done and freed before the next layer runs. With ``ffn_order`` a layer's ``down_proj``
    input Gram matrix (F x F float32, one at a time) is accumulated too and its FFN channels ranked by
    :func:`obs_order` (``stats.ffn_order``; the ``obs`` scorer). ``progress`` advances once per layer.
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    attn0, mlp0 = layers[0].self_attn, layers[0].mlp
    n_heads = model.config.num_attention_heads
    q_width = attn0.o_proj.in_features
    head_dim = q_width // n_heads
    ffn = mlp0.down_proj.in_features
    f64 = torch.float64
    stats = LayerStats(
        o_sum=torch.zeros(n_layers, q_width, dtype=f64),
        o_sumsq=torch.zeros(n_layers, q_width, dtype=f64),
        head_contrib_sq=torch.zeros(n_layers, n_heads, dtype=f64),
        ffn_sum=torch.zeros(n_layers, ffn, dtype=f64),
        ffn_sumsq=torch.zeros(n_layers, ffn, dtype=f64),
        cos_sum=torch.zeros(n_layers, dtype=f64),
        tokens=torch.full((1,), float(samples.numel()), dtype=f64),
        ffn_order=torch.zeros(n_layers, ffn, dtype=f64) if ffn_order else None,
    )
    gram: list[torch.Tensor] = []  # the current layer's down_proj input Gram matrix (obs only)

    def o_hook(i: int, head_grams: torch.Tensor):
        def hook(_mod, args):
            x = args[0].float().reshape(-1, q_width)
            stats.o_sum[i] += x.sum(0).double()
            stats.o_sumsq[i] += (x * x).sum(0).double()
            z = x.view(-1, n_heads, head_dim)
            y = torch.einsum("nhd,hdf->nhf", z, head_grams)
            stats.head_contrib_sq[i] += (y * z).sum((0, 2)).double()
        return hook

    def down_hook(i: int):
        def hook(_mod, args):
            a = args[0].float().reshape(-1, ffn)
            stats.ffn_sum[i] += a.sum(0).double()
            stats.ffn_sumsq[i] += (a * a).sum(0).double()
            if gram:
                gram[0] += a.T @ a
        return hook

    def layer_hook(i: int):
        def hook(_mod, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = layer_output(output)
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            stats.cos_sum[i] += cos.sum().double()
        return hook

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    hidden, kwargs = layer_inputs(model, batches)
    for i, layer in enumerate(layers):
        w = layer.self_attn.o_proj.weight.float().view(-1, n_heads, head_dim)  # [hidden, H, hd]
        head_grams = torch.einsum("ehd,ehf->hdf", w, w)  # per-head W_h^T W_h
        if ffn_order:
            gram[:] = [torch.zeros(ffn, ffn)]
        with hooks(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i, head_grams)),
                   layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)),
                   layer.register_forward_hook(layer_hook(i), with_kwargs=True)):
            hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        if stats.ffn_order is not None:
            stats.ffn_order[i] = obs_order(gram.pop(), layer.mlp.down_proj.weight.float())
        if progress is not None:
            progress.update(1)
    return stats


@dataclass
class Scores:
    """Importance per structure (higher = keep)."""

    heads: torch.Tensor  # [L, H]
    kv_groups: torch.Tensor  # [L, KV]
    ffn: torch.Tensor  # [L, F]
    layers: torch.Tensor  # [L]


def _group_sum(heads: torch.Tensor, n_kv: int) -> torch.Tensor:
    return heads.view(heads.shape[0], n_kv, -1).sum(-1)


def compute_scores(stats: LayerStats, model: Any, shape: Shape, scorer: str) -> Scores:
    """Turn statistics (and, for some scorers, weights) into :class:`Scores`."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    n = stats.tokens.item()
    layers = decoder_layers(model)
    hd, H, KV = shape.head_dim, shape.num_heads, shape.num_kv_heads
    block_influence = 1.0 - stats.cos_sum / n
    o_cols = torch.stack([ly.self_attn.o_proj.weight.float().pow(2).sum(0).double() for ly in layers])
    down_cols = torch.stack([ly.mlp.down_proj.weight.float().pow(2).sum(0).double() for ly in layers])
    if scorer in ("activation", "obs"):
        heads = (stats.head_contrib_sq / n).sqrt()
        if scorer == "activation":
            ffn = (stats.ffn_sumsq / n).sqrt() * down_cols.sqrt()
        elif stats.ffn_order is not None:
            ffn = stats.ffn_order
        else:
            raise ValueError("the obs scorer needs statistics collected with collect_stats(..., ffn_order=True)")
        kv = _group_sum(heads, KV)
    elif scorer == "fluctuation":
        o_var = (stats.o_sumsq / n - (stats.o_sum / n) ** 2).clamp_min(0)
        heads = (o_var * o_cols).view(-1, H, hd).sum(-1)
        ffn_var = (stats.ffn_sumsq / n - (stats.ffn_sum / n) ** 2).clamp_min(0)
        ffn = ffn_var * down_cols
        kv = _group_sum(heads, KV)
    else:
        q_rows = torch.stack([ly.self_attn.q_proj.weight.float().pow(2).sum(1).double() for ly in layers])
        heads = (q_rows.view(-1, H, hd).sum(-1) + o_cols.view(-1, H, hd).sum(-1)).sqrt()
        k_rows = torch.stack([ly.self_attn.k_proj.weight.float().pow(2).sum(1).double() for ly in layers])
        v_rows = torch.stack([ly.self_attn.v_proj.weight.float().pow(2).sum(1).double() for ly in layers])
        kv_own = (k_rows.view(-1, KV, hd).sum(-1) + v_rows.view(-1, KV, hd).sum(-1)).sqrt()
        kv = _group_sum(heads, KV) + kv_own
        gate = torch.stack([ly.mlp.gate_proj.weight.float().pow(2).sum(1).double() for ly in layers])
        up = torch.stack([ly.mlp.up_proj.weight.float().pow(2).sum(1).double() for ly in layers])
        ffn = (gate + up + down_cols).sqrt()
    return Scores(heads=heads, kv_groups=kv, ffn=ffn, layers=block_influence)


@dataclass
class Selection:
    """Which original structures survive. Per kept layer, indices are ascending."""

    layers: list[int]
    kv_groups: list[list[int]]
    heads: list[list[int]]  # original query-head indices, grouped by kept KV group
    ffn: list[list[int]]

    def summary(self) -> dict[str, Any]:
        return {"kept_layers": self.layers, "kept_kv_groups": self.kv_groups, "kept_heads": self.heads}


def _top(values: torch.Tensor, k: int) -> list[int]:
    # stable tie-break by index keeps selection deterministic
    vals = values.tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return sorted(order[:k])


def select(scores: Scores, before: Shape, after: Shape) -> Selection:
    """Pick, per layer, the best structures for the uniform shape ``after``.

    Layers are dropped lowest block influence first; the first and last layers are never dropped.
    """
    n_drop = before.num_layers - after.num_layers
    droppable = list(range(1, before.num_layers - 1))
    by_influence = sorted(droppable, key=lambda i: (float(scores.layers[i]), i))
    dropped = set(by_influence[:n_drop])
    kept_layers = [i for i in range(before.num_layers) if i not in dropped]
    g, q_new = before.heads_per_group, after.heads_per_group
    sel = Selection(layers=kept_layers, kv_groups=[], heads=[], ffn=[])
    for i in kept_layers:
        groups = _top(scores.kv_groups[i], after.num_kv_heads)
        heads: list[int] = []
        for grp in groups:
            in_group = scores.heads[i, grp * g : (grp + 1) * g]
            heads.extend(grp * g + j for j in _top(in_group, q_new))
        sel.kv_groups.append(groups)
        sel.heads.append(heads)
        sel.ffn.append(_top(scores.ffn[i], after.intermediate_size))
    return sel
