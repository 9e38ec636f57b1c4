"""Pruning exactness: removing structures that contribute nothing leaves the logits unchanged,
and every scorer that looks at data ranks such structures last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from serve_pruned.compress.importance import Selection, collect_stats, compute_scores, select  # noqa: E402
from serve_pruned.compress.model_io import load_model  # noqa: E402
from serve_pruned.compress.prune import prune_model  # noqa: E402
from serve_pruned.compress.shapes import Shape, count_params  # noqa: E402

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


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_silent_heads_and_channels_preserves_logits(arch, tiny_models):
    model, cfg = _load(tiny_models[arch])
    before = Shape.from_config(cfg)  # 4 layers, 6 heads / 2 KV groups (3 per group), FFN 256
    # group 1 (heads 3,4,5) silent entirely; head 1 silent inside group 0; FFN channels 0..63 silent
    _silence(model, heads=(1, 3, 4, 5), ffn=range(64))
    after = Shape(4, 2, 1, before.head_dim, 192)
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
    after = Shape(3, before.num_heads, before.num_kv_heads, before.head_dim, before.intermediate_size)
    sel = Selection(layers=[0, 1, 3], kv_groups=[[0, 1]] * 3, heads=[list(range(6))] * 3,
                    ffn=[list(range(256))] * 3)
    pruned, new_cfg = prune_model(model, cfg, before, after, sel)
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert new_cfg["num_hidden_layers"] == 3
    if "layer_types" in new_cfg:
        assert len(new_cfg["layer_types"]) == 3


@pytest.mark.parametrize("scorer", ["activation", "fluctuation"])
def test_data_scorers_rank_silent_structures_last(scorer, tiny_models):
    model, cfg = _load(tiny_models["llama"])
    before = Shape.from_config(cfg)
    _silence(model, heads=(3, 4, 5, 1), ffn=range(0, 256, 4))
    _silence(model, layer=1, heads=range(6), ffn=range(256))  # layer 1 is an identity
    samples = torch.randint(0, cfg["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, samples, batch_size=2)
    scores = compute_scores(stats, model, before, scorer)
    after = Shape(3, 2, 1, before.head_dim, 192)
    sel = select(scores, before, after)
    assert sel.layers == [0, 2, 3]  # the identity layer has zero block influence
    assert all(g == [0] for g in sel.kv_groups)
    assert all(h == [0, 2] for h in sel.heads)
    assert all(set(f).isdisjoint(range(0, 256, 4)) for f in sel.ffn)


def test_magnitude_scorer_ranks_by_weights_only(tiny_models):
    model, cfg = _load(tiny_models["llama"])
    before = Shape.from_config(cfg)
    with torch.no_grad():
        for ly in model.model.layers:
            ly.mlp.gate_proj.weight[:8] *= 10  # make channels 0..7 the heaviest
    stats = collect_stats(model, torch.zeros(1, 4, dtype=torch.long))
    scores = compute_scores(stats, model, before, "magnitude")
    assert all(set(range(8)) <= set(f) for f in select(scores, before, Shape(4, 6, 2, before.head_dim, 64)).ffn)


def test_unknown_scorer_is_rejected(tiny_models):
    model, cfg = _load(tiny_models["llama"])
    stats = collect_stats(model, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown scorer"):
        compute_scores(stats, model, Shape.from_config(cfg), "random")
