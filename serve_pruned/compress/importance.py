"""Importance of every prunable structure, from one pass over calibration data.

One forward pass collects scorer-independent statistics per layer (cached on disk, keyed by the
model's and the data's hashes), so switching scorer or re-slicing to another target is free:

* for each input channel of ``o_proj`` and ``down_proj``: sum and sum of squares over tokens;
* for each query head: the sum over tokens of ``||W_o[:, h] z_h||^2``, the squared norm of what the
  head writes into the residual stream;
* for each layer: the mean cosine similarity of its input and output hidden states;
* for each hidden channel, at each norm of the residual stream (two per layer, then the final one): the sum of
  squares over tokens of the norm's input and, per layer, of its output.

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

Layers are always scored by block influence, ``1 - cos(h_in, h_out)`` (ShortGPT), and hidden channels as
Minitron scores its embedding channels: the RMS over tokens of each channel at the norms' outputs, summed over
every norm of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from serve_pruned.compress.layers import hooks, layer_output
from serve_pruned.compress.stream import streamed
from serve_pruned.model.shapes import LAYER_NORMS, Shape

SCORERS = ("activation", "fluctuation", "magnitude", "obs")


@dataclass
class LayerStats:
    """Per-layer calibration statistics and weight norms, stacked over layers (float64).

    The weight norms are taken in the same pass, while each layer is onloaded, so scoring never needs the
    whole model again.
    """

    o_sum: torch.Tensor  # [L, H*hd]
    o_sumsq: torch.Tensor  # [L, H*hd]
    head_contrib_sq: torch.Tensor  # [L, H]
    ffn_sum: torch.Tensor  # [L, F]
    ffn_sumsq: torch.Tensor  # [L, F]
    cos_sum: torch.Tensor  # [L]
    tokens: torch.Tensor  # [1]
    norm_in_sumsq: torch.Tensor  # [2L + 1, hidden]: each norm's input (the residual stream), the final norm's last
    norm_out_sumsq: torch.Tensor  # [L, 2, hidden]: each layer's norms' outputs
    norms: dict[str, torch.Tensor]  # squared L2 norm per output row / input column of each projection: NORMS
    ffn_order: torch.Tensor | None = None  # [L, F] greedy OBS elimination rank (higher = removed later)

    @classmethod
    def empty(cls, cfg: Any, n_layers: int, head_dim: int, *, tokens: int, ffn_order: bool) -> LayerStats:
        """Zeros for a model of config ``cfg``, to be summed into over ``tokens`` calibration tokens."""
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        ffn, hidden = cfg.intermediate_size, cfg.hidden_size
        q_width = n_heads * head_dim

        def zeros(*size: int) -> torch.Tensor:
            return torch.zeros(*size, dtype=torch.float64)

        widths = {"q_rows": q_width, "k_rows": n_kv * head_dim, "v_rows": n_kv * head_dim, "o_cols": q_width,
                  "gate_rows": ffn, "up_rows": ffn, "down_cols": ffn}
        return cls(
            o_sum=zeros(n_layers, q_width), o_sumsq=zeros(n_layers, q_width), head_contrib_sq=zeros(n_layers, n_heads),
            ffn_sum=zeros(n_layers, ffn), ffn_sumsq=zeros(n_layers, ffn), cos_sum=zeros(n_layers),
            tokens=torch.full((1,), float(tokens), dtype=torch.float64),
            norm_in_sumsq=zeros(2 * n_layers + 1, hidden), norm_out_sumsq=zeros(n_layers, 2, hidden),
            norms={k: zeros(n_layers, w) for k, w in widths.items()},
            ffn_order=zeros(n_layers, ffn) if ffn_order else None,
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        flat = {k: v.contiguous() for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        return flat | {f"norm.{k}": v.contiguous() for k, v in self.norms.items()}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> LayerStats:
        norms = {k.removeprefix("norm."): v for k, v in d.items() if k.startswith("norm.")}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d}, norms=norms)


# name -> (module path in a decoder layer, axis summed over): rows of q/k/v/gate/up, columns of o/down
NORMS = {"q_rows": ("self_attn.q_proj", 1), "k_rows": ("self_attn.k_proj", 1), "v_rows": ("self_attn.v_proj", 1),
         "o_cols": ("self_attn.o_proj", 0), "gate_rows": ("mlp.gate_proj", 1), "up_rows": ("mlp.up_proj", 1),
         "down_cols": ("mlp.down_proj", 0)}


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
    f, dev, f64 = gram.shape[0], gram.device, torch.float64
    hinv = gram.to(f64, copy=True)  # runs where the Gram matrix is: on an accelerator, it stays there
    hinv.diagonal().add_(damp * hinv.diagonal().mean().clamp_min(1e-12))
    hinv = torch.linalg.cholesky(hinv)  # one step at a time: two [F, F] matrices at once, not three
    hinv = torch.cholesky_inverse(hinv)
    w = weight.to(dev, f64, copy=True)
    alive = torch.arange(f, device=dev)  # the channel each column of ``w`` and ``hinv`` holds
    dead = torch.zeros(f, dtype=torch.bool, device=dev)  # dropped, its column not compacted away yet
    rank = torch.empty(f, dtype=f64, device=dev)
    done = 0
    while done < f:
        cost = w.pow(2).sum(0) / hinv.diagonal()
        cost[dead] = torch.inf
        k = min(chunk, f - done)
        drop = torch.topk(cost, k, largest=False, sorted=True).indices
        rank[alive[drop]] = torch.arange(done, done + k, dtype=f64, device=dev)
        done += k
        dead[drop] = True
        # remove the chunk Q and refit the rest: W -= W_Q (H^-1_QQ)^-1 H^-1_Q., the same downdate for H^-1 (it
        # zeroes Q's own rows and columns). In place: the matrix is never copied whole in a round
        h_q = hinv[drop]  # [k, N]; H^-1 is symmetric, so h_q.T is its columns Q
        across = torch.linalg.inv(h_q[:, drop]) @ h_q
        w.addmm_(w[:, drop], across, alpha=-1.0)
        hinv.addmm_(h_q.T, across, alpha=-1.0)
        if 2 * int(dead.sum()) >= dead.numel() and done < f:
            # half of it dead: compact, so later rounds work on the live part (peak 1.75x the matrix, once)
            keep = (~dead).nonzero().squeeze(1)
            hinv = hinv.index_select(0, keep).index_select(1, keep)
            w, alive = w.index_select(1, keep), alive[keep]
            dead = torch.zeros(keep.numel(), dtype=torch.bool, device=dev)
    return rank.cpu()


@torch.no_grad()
def collect_stats(model: Any, samples: torch.Tensor, *, batch_size: int = 4, progress: Any = None,
                  ffn_order: bool = False) -> LayerStats:
    """Run ``samples`` through ``model`` (in memory, or :class:`Streamed`) once, layer by layer, with hooks
    that accumulate :class:`LayerStats`.

    The hidden states of every sample are carried from one decoder layer to the next (as the refit does), so
    per-layer work is done and freed before the next layer runs. With ``ffn_order`` a layer's ``down_proj``
    input Gram matrix (F x F float32, one at a time) is accumulated too and its FFN channels ranked by
    :func:`obs_order` (``stats.ffn_order``; the ``obs`` scorer). ``progress`` advances once per layer.
    """
    model = streamed(model)
    cfg = model.config
    n_layers, n_heads = model.num_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    q_width, ffn = n_heads * head_dim, cfg.intermediate_size
    stats = LayerStats.empty(cfg, n_layers, head_dim, tokens=samples.numel(), ffn_order=ffn_order)
    acc: dict[str, torch.Tensor] = {}  # the current layer's sums, on the device; moved into ``stats`` per layer

    def add(name: str, value: torch.Tensor) -> None:
        value = value.double() if value.device.type == "cpu" else value.float()  # float64 is slow on GPUs
        acc[name] = acc[name] + value if name in acc else value

    def o_hook(head_grams: torch.Tensor):
        def hook(_mod, args):
            x = args[0].float().reshape(-1, q_width)
            add("o_sum", x.sum(0))
            add("o_sumsq", (x * x).sum(0))
            z = x.view(-1, n_heads, head_dim)
            add("head_contrib_sq", (torch.einsum("nhd,hdf->nhf", z, head_grams) * z).sum((0, 2)))
        return hook

    def down_hook(_mod, args):
        a = args[0].float().reshape(-1, ffn)
        add("ffn_sum", a.sum(0))
        add("ffn_sumsq", (a * a).sum(0))
        if ffn_order:
            acc["gram"] = acc["gram"] + a.T @ a if "gram" in acc else a.T @ a

    def norm_hook(k: int):
        def hook(_mod, args, output):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            add(f"norm_in.{k}", (x * x).sum(0))
            y = output.float().reshape(-1, output.shape[-1])
            add(f"norm_out.{k}", (y * y).sum(0))
        return hook

    def layer_hook(_mod, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        add("cos_sum", torch.nn.functional.cosine_similarity(h_in.float(), layer_output(output).float(), dim=-1).sum())

    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    hidden, kwargs = model.embed(batches)
    for i, layer in model.layers():
        _weight_norms(stats, layer, i)
        w = layer.self_attn.o_proj.weight.float().view(-1, n_heads, head_dim)  # [hidden, H, hd]
        head_grams = torch.einsum("ehd,ehf->hdf", w, w)  # per-head W_h^T W_h
        with hooks(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(head_grams)),
                   layer.mlp.down_proj.register_forward_pre_hook(down_hook),
                   layer.register_forward_hook(layer_hook, with_kwargs=True),
                   *(layer.get_submodule(n).register_forward_hook(norm_hook(k)) for k, n in enumerate(LAYER_NORMS))):
            hidden = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs, strict=True)]
        gram = acc.pop("gram", None)
        _store_layer(stats, acc, i)
        if stats.ffn_order is not None and gram is not None:
            stats.ffn_order[i] = obs_order(gram, layer.mlp.down_proj.weight.float())
        if progress is not None:
            progress.update(1)
    for h in hidden:  # what the final norm reads
        x = h.float().reshape(-1, h.shape[-1])
        stats.norm_in_sumsq[-1] += (x * x).sum(0).double().cpu()
    return stats


def _weight_norms(stats: LayerStats, layer: Any, i: int) -> None:
    for name, (path, axis) in NORMS.items():
        stats.norms[name][i] = layer.get_submodule(path).weight.float().pow(2).sum(axis).double().cpu()


def _store_layer(stats: LayerStats, acc: dict[str, torch.Tensor], i: int) -> None:
    """Move layer ``i``'s sums from the device into ``stats`` (``acc`` is left empty)."""
    for k in range(len(LAYER_NORMS)):
        if f"norm_in.{k}" in acc:  # absent without tokens (magnitude scores)
            stats.norm_in_sumsq[2 * i + k] += acc.pop(f"norm_in.{k}").double().cpu()
            stats.norm_out_sumsq[i, k] += acc.pop(f"norm_out.{k}").double().cpu()
    for name, value in acc.items():
        getattr(stats, name)[i] += value.double().cpu()
    acc.clear()


@dataclass
class Scores:
    """Importance per structure (higher = keep)."""

    heads: torch.Tensor  # [L, H]
    kv_groups: torch.Tensor  # [L, KV]
    ffn: torch.Tensor  # [L, F]
    layers: torch.Tensor  # [L]
    hidden: torch.Tensor  # [hidden]
    residual_sq: torch.Tensor  # [2L + 1, hidden]: mean square of each hidden channel entering each norm


def _group_sum(heads: torch.Tensor, n_kv: int) -> torch.Tensor:
    return heads.view(heads.shape[0], n_kv, -1).sum(-1)


def compute_scores(stats: LayerStats, shape: Shape, scorer: str) -> Scores:
    """Turn statistics (and the weight norms collected with them) into :class:`Scores`."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    n = max(stats.tokens.item(), 1.0)  # no tokens: magnitude scores, which use none
    norms = stats.norms
    hd, H, KV = shape.head_dim, shape.num_heads, shape.num_kv_heads
    block_influence = 1.0 - stats.cos_sum / n
    o_cols, down_cols = norms["o_cols"], norms["down_cols"]
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
        heads = (norms["q_rows"].view(-1, H, hd).sum(-1) + o_cols.view(-1, H, hd).sum(-1)).sqrt()
        kv_own = (norms["k_rows"].view(-1, KV, hd).sum(-1) + norms["v_rows"].view(-1, KV, hd).sum(-1)).sqrt()
        kv = _group_sum(heads, KV) + kv_own
        ffn = (norms["gate_rows"] + norms["up_rows"] + down_cols).sqrt()
    hidden = (stats.norm_out_sumsq / n).sqrt().sum((0, 1))
    return Scores(heads=heads, kv_groups=kv, ffn=ffn, layers=block_influence, hidden=hidden,
                  residual_sq=stats.norm_in_sumsq / n)


@dataclass
class Selection:
    """Which original structures survive. Per kept layer, indices are ascending.

    With the hidden size pruned, ``norm_scales`` rescale each kept norm's weight (per kept layer: its two norms;
    then the final norm): an RMS norm over fewer channels divides by the RMS of the kept ones, larger than the
    whole stream's when the kept channels carry more than their share of its energy, so each weight is
    multiplied by the ratio of the two (from the calibration tokens' mean squares) to keep its outputs' scale.
    """

    layers: list[int]
    kv_groups: list[list[int]]
    heads: list[list[int]]  # original query-head indices, grouped by kept KV group
    ffn: list[list[int]]
    hidden: list[int] | None = None  # kept hidden channels (None: all)
    norm_scales: list[list[float]] | None = None  # per kept layer [input, post-attention], then [[final]]

    def summary(self) -> dict[str, Any]:
        return {"kept_layers": self.layers, "kept_kv_groups": self.kv_groups, "kept_heads": self.heads,
                **({"kept_hidden": self.hidden} if self.hidden is not None else {})}


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
    if after.hidden_size < before.hidden_size:
        sel.hidden = _top(scores.hidden, after.hidden_size)
        sel.norm_scales = _norm_scales(scores.residual_sq, kept_layers, sel.hidden)
    return sel


def _norm_scales(residual_sq: torch.Tensor, kept_layers: list[int], hidden: list[int]) -> list[list[float]]:
    """sqrt(mean square of the kept channels / mean square of all) at each kept norm (see :class:`Selection`)."""
    kept = torch.tensor(hidden, dtype=torch.long)
    ratio = (residual_sq[:, kept].mean(1) / residual_sq.mean(1).clamp_min(1e-30)).sqrt()
    ratio = torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, torch.ones_like(ratio))  # no tokens: unscaled
    n = len(LAYER_NORMS)
    return [[float(ratio[n * i + k]) for k in range(n)] for i in kept_layers] + [[float(ratio[-1])]]
