"""Pruning exactness: removing structures that contribute nothing leaves the logits unchanged,
and every scorer that looks at data ranks such structures last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from serve_pruned.compress.importance import (  # noqa: E402
    Selection,
    collect_stats,
    compute_scores,
    obs_order,
    select,
)
from serve_pruned.compress.model_io import load_model  # noqa: E402
from serve_pruned.compress.prune import prune_model  # noqa: E402
from serve_pruned.model.arch import SUPPORTED  # noqa: E402
from serve_pruned.model.shapes import Shape, count_params  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _load(path: Path):
    model = load_model(path, dtype="float32", trust_remote_code=False)
    return model, json.loads((path / "config.json").read_text())


def _silence(model, *, layer: int | None = None, heads=(), ffn=()):
    """Zero what the chosen structures write into the residual stream (o_proj / down_proj columns)."""
    hd = model.config.head_dim
    with torch.no_grad():
        for i, ly in enumerate(model.model.layers):
            if layer is not None and i != layer:
                continue
            for h in heads:
                ly.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for j in ffn:
                ly.mlp.down_proj.weight[:, j] = 0


def _silence_hidden(model, channels):
    """Make hidden channels silent: nothing writes them (embedding columns, o_proj / down_proj rows are zero), so the
    residual stream is zero there for every token."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for ly in model.model.layers:
            for linear in (ly.self_attn.o_proj, ly.mlp.down_proj):
                linear.weight[channels] = 0
                if linear.bias is not None:
                    linear.bias[channels] = 0


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_silent_heads_and_channels_preserves_logits(arch, tiny_models):
    model, cfg = _load(tiny_models[arch])
    before = Shape.from_config(cfg)  # 4 layers, 6 heads / 2 KV groups (3 per group), FFN 256
    # group 1 (heads 3,4,5) silent entirely; head 1 silent inside group 0; FFN channels 0..63 silent
    _silence(model, heads=(1, 3, 4, 5), ffn=range(64))
    after = Shape(4, 2, 1, before.head_dim, 192, before.hidden_size)
    sel = Selection(layers=[0, 1, 2, 3], kv_groups=[[0]] * 4, heads=[[0, 2]] * 4, ffn=[list(range(64, 256))] * 4)
    pruned, new_cfg = prune_model(model, cfg, before, after, sel)
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert (new_cfg["num_attention_heads"], new_cfg["num_key_value_heads"], new_cfg["head_dim"],
            new_cfg["intermediate_size"]) == (2, 1, before.head_dim, 192)
    n_params = sum(p.numel() for p in pruned.parameters())  # tied embeddings are counted once
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight")
    assert n_params == count_params(shapes, before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropping_an_identity_layer_preserves_logits(arch, tiny_models):
    model, cfg = _load(tiny_models[arch])
    before = Shape.from_config(cfg)
    _silence(model, layer=2, heads=range(before.num_heads), ffn=range(before.intermediate_size))
    after = Shape(**{**before.to_dict(), "num_layers": 3})
    sel = Selection(layers=[0, 1, 3], kv_groups=[[0, 1]] * 3, heads=[list(range(6))] * 3,
                    ffn=[list(range(256))] * 3)
    pruned, new_cfg = prune_model(model, cfg, before, after, sel)
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert new_cfg["num_hidden_layers"] == 3
    if "layer_types" in new_cfg:
        assert len(new_cfg["layer_types"]) == 3


@pytest.mark.parametrize("arch", [a for a in ARCHS if SUPPORTED[a].prune_heads])
def test_pruning_silent_hidden_channels_preserves_logits(arch, tiny_models):
    """The hidden axis end to end: statistics rank silent channels last, the norms are rescaled for the channels
    they lose (an RMS over fewer channels), and the pruned model computes the same logits."""
    model, cfg = _load(tiny_models[arch])
    before = Shape.from_config(cfg)  # hidden 192
    silent = list(range(0, 192, 4))  # 48 channels: 144 kept, which Llama's config needs its 6 heads to divide
    _silence_hidden(model, silent)
    samples = torch.randint(0, cfg["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(3))
    scores = compute_scores(collect_stats(model, samples, batch_size=2), before, "activation")
    after = Shape(4, before.num_heads, before.num_kv_heads, before.head_dim, before.intermediate_size, 144)
    sel = select(scores, before, after)
    assert sel.hidden == [c for c in range(192) if c not in silent]
    assert sel.norm_scales is not None and len(sel.norm_scales) == 4 + 1
    expected_scale = torch.full((2,), (192 / 144) ** 0.5)
    torch.testing.assert_close(torch.tensor(sel.norm_scales[0], dtype=torch.float32), expected_scale)
    pruned, new_cfg = prune_model(model, cfg, before, after, sel)
    assert new_cfg["hidden_size"] == 144 and pruned.model.embed_tokens.weight.shape[1] == 144
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    # not bit-exact: the norms' epsilon is added to a mean over fewer channels
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), rtol=1e-3, atol=5e-4)
    assert count_params({n: tuple(p.shape) for n, p in pruned.named_parameters()}, after) == sum(
        p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("scorer", ["activation", "fluctuation", "obs"])
def test_data_scorers_rank_silent_structures_last(scorer, tiny_models):
    model, cfg = _load(tiny_models["llama"])
    before = Shape.from_config(cfg)
    _silence(model, heads=(3, 4, 5, 1), ffn=range(0, 256, 4))
    _silence(model, layer=1, heads=range(6), ffn=range(256))  # layer 1 is an identity
    samples = torch.randint(0, cfg["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, samples, batch_size=2, ffn_order=scorer == "obs")
    scores = compute_scores(stats, before, scorer)
    after = Shape(3, 2, 1, before.head_dim, 192, before.hidden_size)
    sel = select(scores, before, after)
    assert sel.layers == [0, 2, 3]  # the identity layer has zero block influence
    assert all(g == [0] for g in sel.kv_groups)
    assert all(h == [0, 2] for h in sel.heads)
    assert all(set(f).isdisjoint(range(0, 256, 4)) for f in sel.ffn)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_statistics_follow_the_models_own_forward(arch, tiny_models):
    """Block influence from the layer-by-layer pass equals the cosines of the model's own hidden states."""
    model, _ = _load(tiny_models[arch])
    samples = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(5))
    stats = collect_stats(model, samples, batch_size=2)
    with torch.no_grad():
        hs = model(input_ids=samples, output_hidden_states=True).hidden_states
    n_layers = len(model.model.layers)  # the last entry of hidden_states is after the final norm
    expected = [torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).sum() for i in range(n_layers - 1)]
    torch.testing.assert_close(stats.cos_sum[: n_layers - 1].float(), torch.stack(expected), rtol=1e-4, atol=1e-4)
    assert stats.tokens.item() == samples.numel()


def test_magnitude_scorer_ranks_by_weights_only(tiny_models):
    model, cfg = _load(tiny_models["llama"])
    before = Shape.from_config(cfg)
    with torch.no_grad():
        for ly in model.model.layers:
            ly.mlp.gate_proj.weight[:8] *= 10  # make channels 0..7 the heaviest
    stats = collect_stats(model, torch.zeros(1, 4, dtype=torch.long))
    scores = compute_scores(stats, before, "magnitude")
    after = Shape(4, 6, 2, before.head_dim, 64, before.hidden_size)
    assert all(set(range(8)) <= set(f) for f in select(scores, before, after).ffn)


def test_unknown_scorer_is_rejected(tiny_models):
    model, cfg = _load(tiny_models["llama"])
    stats = collect_stats(model, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown scorer"):
        compute_scores(stats, Shape.from_config(cfg), "random")


def _channels(seed: int, tokens: int = 400, width: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    w = torch.randn(5, width, generator=g, dtype=torch.float64)
    return x, w, g


def _refit_residual(x, w, cols) -> float:
    """Squared error of the best least-squares refit of ``x @ w.T`` from the channels ``cols`` alone."""
    y = x @ w.T
    if not cols:
        return float(y.pow(2).sum())
    sol = torch.linalg.lstsq(x[:, cols], y).solution
    return float((x[:, cols] @ sol - y).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_order_is_greedy_elimination_with_a_least_squares_refit_after_each_drop(seed):
    x, w, g = _channels(seed, width=9)
    x[:, 3] = 0.9 * x[:, 5] + 0.05 * torch.randn(400, generator=g, dtype=torch.float64)  # nearly redundant pair
    order = obs_order(x.T @ x, w, chunk=1, damp=1e-9)
    alive, expected = list(range(9)), []
    while alive:  # brute force: drop whichever channel leaves the smallest refit error
        j = min(alive, key=lambda c: _refit_residual(x, w, [a for a in alive if a != c]) if len(alive) > 1 else 0)
        expected.append(j)
        alive.remove(j)
    assert order.argsort().tolist() == expected


def test_obs_keeps_one_of_two_duplicate_channels_where_activation_keeps_both():
    x, w, g = _channels(3, width=6)
    x[:, 1] = x[:, 0]  # the same signal twice, and loud: activation ranks both on top
    x[:, 0] *= 4
    x[:, 1] *= 4
    w[:, 0] = w[:, 1] = 1.0
    order = obs_order(x.T @ x, w, chunk=1, damp=1e-6)
    kept = set(order.topk(4).indices.tolist())
    activation = (x.pow(2).mean(0).sqrt() * w.norm(dim=0))
    assert {0, 1} <= set(activation.topk(4).indices.tolist())
    assert len(kept & {0, 1}) == 1
    # the four it keeps reproduce the layer's output better than activation's four
    assert _refit_residual(x, w, sorted(kept)) < _refit_residual(x, w, activation.topk(4).indices.tolist())


def test_chunked_obs_matches_one_at_a_time_on_the_channels_kept():
    x, w, _ = _channels(4, width=48)
    one = obs_order(x.T @ x, w, chunk=1)
    chunked = obs_order(x.T @ x, w, chunk=8)
    assert set(chunked.topk(16).indices.tolist()) == set(one.topk(16).indices.tolist())


def _obs_order_shrinking(gram, weight, chunk, damp=0.01):
    """The elimination as first written: H^-1 and W shrunk to the live channels by copies every round."""
    f = gram.shape[0]
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv, w = torch.cholesky_inverse(torch.linalg.cholesky(h)), weight.double().clone()
    alive, rank, done = torch.arange(f), torch.empty(f, dtype=torch.float64), 0
    while alive.numel():
        cost = w.pow(2).sum(0) / hinv.diagonal()
        k = min(chunk, alive.numel())
        drop = torch.topk(cost, k, largest=False, sorted=True).indices
        rank[alive[drop]] = torch.arange(done, done + k, dtype=torch.float64)
        done += k
        keep = torch.ones(alive.numel(), dtype=torch.bool)
        keep[drop] = False
        across = torch.linalg.inv(hinv[drop][:, drop]) @ hinv[drop][:, keep]
        w = w[:, keep] - w[:, drop] @ across
        hinv = hinv[keep][:, keep] - hinv[drop][:, keep].T @ across
        alive = alive[keep]
    return rank


@pytest.mark.parametrize(("width", "chunk"), [(96, 16), (100, 7), (33, 1)])
def test_obs_downdated_in_place_and_compacted_drops_what_the_shrinking_elimination_drops(width, chunk):
    # in place (dropped channels zeroed, compacted when half are gone) it holds two matrices at a time, not five;
    # the channels it drops, and when, are the same
    x, w, _ = _channels(width, width=width)
    assert torch.equal(obs_order(x.T @ x, w, chunk=chunk), _obs_order_shrinking(x.T @ x, w, chunk))


def test_obs_scorer_needs_the_ffn_order(tiny_models):
    model, cfg = _load(tiny_models["llama"])
    stats = collect_stats(model, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ffn_order=True"):
        compute_scores(stats, Shape.from_config(cfg), "obs")
