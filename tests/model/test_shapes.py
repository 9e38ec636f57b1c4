"""Shape arithmetic and the target search (torch-free)."""

from __future__ import annotations

import math

import pytest

from serve_pruned.errors import GQAGroupingError, InvalidTargetError, ModelLoadError
from serve_pruned.model.shapes import Shape, count_params, plan_shapes, resized

HIDDEN, VOCAB = 576, 49152
SMOL = Shape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, hidden_size=576)


def llama_tensors(s: Shape, *, hidden: int = HIDDEN, vocab: int = VOCAB, bias: bool = False) -> dict:
    t = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": (s.num_heads * s.head_dim, hidden),
            p + "self_attn.k_proj.weight": (s.num_kv_heads * s.head_dim, hidden),
            p + "self_attn.v_proj.weight": (s.num_kv_heads * s.head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, s.num_heads * s.head_dim),
            p + "mlp.gate_proj.weight": (s.intermediate_size, hidden),
            p + "mlp.up_proj.weight": (s.intermediate_size, hidden),
            p + "mlp.down_proj.weight": (hidden, s.intermediate_size),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if bias:
            t |= {p + "self_attn.q_proj.bias": (s.num_heads * s.head_dim,),
                  p + "self_attn.k_proj.bias": (s.num_kv_heads * s.head_dim,)}
    return t


def test_smollm2_parameter_count_matches_published_size():
    assert count_params(llama_tensors(SMOL), SMOL) == 134_515_008


def test_count_after_pruning_equals_count_of_a_model_built_with_that_shape():
    after = Shape(num_layers=27, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=832, hidden_size=576)
    assert count_params(llama_tensors(SMOL, bias=True), SMOL, after) == count_params(
        llama_tensors(after, bias=True), after)


def test_resized_rejects_tensor_that_disagrees_with_config():
    with pytest.raises(ModelLoadError, match="config.json implies"):
        resized("model.layers.0.mlp.up_proj.weight", (1000, HIDDEN), SMOL, SMOL)
    with pytest.raises(ModelLoadError, match="not part of a Llama-family"):
        resized("model.layers.0.block_sparse_moe.gate.weight", (8, HIDDEN), SMOL, SMOL)


def test_kv_cache_bytes_per_token():
    assert SMOL.kv_cache_bytes_per_token(2) == 30 * 3 * 64 * 2 * 2


def test_target_search_candidates_fit_budget_and_ffn_is_widest_that_fits():
    tensors = llama_tensors(SMOL)
    total = count_params(tensors, SMOL)
    cands = plan_shapes(tensors, SMOL, target=0.75)
    assert len(cands) == 9  # every (kv groups, heads per group) pair has a fitting FFN width
    for c in cands:
        assert c.params <= math.floor(0.75 * total)
        assert c.shape.intermediate_size % 64 == 0
        assert c.shape.num_heads % c.shape.num_kv_heads == 0
        wider = Shape(**{**c.shape.to_dict(), "intermediate_size": c.shape.intermediate_size + 64})
        if wider.intermediate_size <= SMOL.intermediate_size:
            assert count_params(tensors, SMOL, wider) > 0.75 * total
    assert [c.params for c in cands] == sorted((c.params for c in cands), reverse=True)
    ffn_only = [c for c in cands if c.shape.num_heads == 9]
    assert ffn_only[0].shape.intermediate_size == 832
    # the finer step (the default without W4A16) lands nearer the target
    finer = [c for c in plan_shapes(tensors, SMOL, target=0.75, multiple_of=32) if c.shape.num_heads == 9]
    assert finer[0].shape.intermediate_size == 864
    assert ffn_only[0].fraction < 0.73
    assert 0.74 < finer[0].fraction <= 0.75


def test_fixed_counts_restrict_the_search():
    cands = plan_shapes(llama_tensors(SMOL), SMOL, target=0.8, keep_kv_heads=3, keep_heads=9, drop_layers=2)
    assert len(cands) == 1
    assert cands[0].shape.num_layers == 28 and cands[0].shape.num_heads == 9


def test_counts_without_target_give_exactly_that_shape():
    (c,) = plan_shapes(llama_tensors(SMOL), SMOL, keep_heads=6, keep_ffn=1024)
    assert c.shape == Shape(30, 6, 3, 64, 1024, 576)


def test_heads_only_search_when_architecture_cannot_prune_heads():
    cands = plan_shapes(llama_tensors(SMOL), SMOL, target=0.8, prune_heads=False)
    assert [c.shape.num_heads for c in cands] == [9]


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, float("nan")])
def test_target_outside_unit_interval_is_rejected(target):
    with pytest.raises(InvalidTargetError, match="in \\(0, 1\\)") as e:
        plan_shapes(llama_tensors(SMOL), SMOL, target=target)
    assert e.value.field == "target_params"


def test_target_already_met_and_nothing_to_prune():
    with pytest.raises(InvalidTargetError, match="already met"):
        plan_shapes(llama_tensors(SMOL), SMOL, target=1.0)
    with pytest.raises(InvalidTargetError, match="nothing to prune"):
        plan_shapes(llama_tensors(SMOL), SMOL)


def test_target_below_smallest_shape():
    with pytest.raises(InvalidTargetError, match="below the smallest allowed shape"):
        plan_shapes(llama_tensors(SMOL), SMOL, target=0.1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"keep_heads": 7}, "cannot be split evenly over 3 KV groups"),
        ({"keep_heads": 4, "keep_kv_heads": 2}, None),
        ({"keep_heads": 8, "keep_kv_heads": 2}, "at most 3 query heads"),
        ({"keep_kv_heads": 4}, "outside 1..3"),
        ({"keep_kv_heads": 0}, "outside 1..3"),
        ({"keep_heads": 12}, "outside 1..9"),
    ],
)
def test_gqa_grouping(kw, match):
    if match is None:
        (c,) = plan_shapes(llama_tensors(SMOL), SMOL, **kw)
        assert (c.shape.num_heads, c.shape.num_kv_heads) == (4, 2)
        return
    with pytest.raises(GQAGroupingError, match=match):
        plan_shapes(llama_tensors(SMOL), SMOL, **kw)


def test_ffn_count_must_respect_multiple_and_layers_must_remain():
    with pytest.raises(InvalidTargetError, match="not a multiple of 64") as e:
        plan_shapes(llama_tensors(SMOL), SMOL, keep_ffn=1000)
    assert e.value.field == "keep_ffn"
    assert plan_shapes(llama_tensors(SMOL), SMOL, keep_ffn=1000, multiple_of=8)[0].shape.intermediate_size == 1000
    with pytest.raises(InvalidTargetError, match="drop-layers 30"):
        plan_shapes(llama_tensors(SMOL), SMOL, drop_layers=30)


def test_shape_from_config_rejects_uneven_groups():
    with pytest.raises(GQAGroupingError):
        Shape.from_config({"num_attention_heads": 9, "num_key_value_heads": 2, "hidden_size": 576,
                           "num_hidden_layers": 2, "intermediate_size": 64})
    s = Shape.from_config({"num_attention_heads": 8, "hidden_size": 512, "num_hidden_layers": 2,
                           "intermediate_size": 64})
    assert (s.num_kv_heads, s.head_dim) == (8, 64)


def test_head_counts_must_divide_hidden_when_the_config_class_demands_it():
    s = Shape(num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=1024, hidden_size=4096)
    tensors = llama_tensors(s, hidden=4096, vocab=1000)
    with pytest.raises(GQAGroupingError, match="does not divide hidden_size 4096"):
        plan_shapes(tensors, s, keep_heads=24, keep_kv_heads=8, heads_divide_hidden=True)
    cands = plan_shapes(tensors, s, target=0.7, heads_divide_hidden=True)
    assert cands and all(4096 % c.shape.num_heads == 0 for c in cands)
    assert {c.shape.num_heads for c in plan_shapes(tensors, s, target=0.7)} > {c.shape.num_heads for c in cands}


def test_hidden_size_cut_resizes_every_tensor_on_the_residual_stream():
    after = Shape(**{**SMOL.to_dict(), "hidden_size": 384})
    assert resized("model.embed_tokens.weight", (VOCAB, HIDDEN), SMOL, after) == (VOCAB, 384)
    assert resized("lm_head.weight", (VOCAB, HIDDEN), SMOL, after) == (VOCAB, 384)
    assert resized("model.norm.weight", (HIDDEN,), SMOL, after) == (384,)
    assert resized("model.layers.3.self_attn.q_proj.weight", (576, HIDDEN), SMOL, after) == (576, 384)
    assert resized("model.layers.3.self_attn.o_proj.weight", (HIDDEN, 576), SMOL, after) == (384, 576)
    assert resized("model.layers.3.mlp.down_proj.weight", (HIDDEN, 1536), SMOL, after) == (384, 1536)
    assert resized("model.layers.3.post_attention_layernorm.weight", (HIDDEN,), SMOL, after) == (384,)
    # SmolLM2 ties its head: one (vocab x hidden) matrix, each layer: q and o, k and v, gate, up and down, two norms
    per_layer = 576 * 384 * 2 + 192 * 384 * 2 + 1536 * 384 * 3 + 384 * 2
    assert count_params(llama_tensors(SMOL), SMOL, after) == VOCAB * 384 + 384 + 30 * per_layer


def test_the_search_can_cut_the_hidden_size_and_keeps_the_head_counts_the_config_accepts():
    from serve_pruned.model.shapes import hidden_options

    assert hidden_options(SMOL, 32) == [576, 512, 448, 384, 320]  # coarsened to steps of 64, down to half
    tensors = llama_tensors(SMOL)
    without = plan_shapes(tensors, SMOL, target=0.75, multiple_of=32, heads_divide_hidden=True)
    with_hidden = plan_shapes(tensors, SMOL, target=0.75, multiple_of=32, heads_divide_hidden=True, search_hidden=True)
    assert {c.shape for c in without} < {c.shape for c in with_hidden}
    cut = [c.shape for c in with_hidden if c.shape.hidden_size < HIDDEN]
    assert cut and all(s.hidden_size % s.num_heads == 0 for s in cut)
    assert {s.hidden_size for s in cut} <= {512, 448, 384, 320}
    budget = math.floor(0.75 * count_params(tensors, SMOL))
    assert all(c.params <= budget for c in with_hidden)
    # each is the widest FFN that fits with its hidden size: 32 more channels would break the target
    for s in cut:
        assert count_params(tensors, SMOL, Shape(**{**s.to_dict(), "intermediate_size": s.intermediate_size + 32})) \
            > budget or s.intermediate_size == SMOL.intermediate_size


def test_hidden_counts_are_checked():
    tensors = llama_tensors(SMOL)
    with pytest.raises(InvalidTargetError, match="--keep-hidden 500 is not a multiple of 32"):
        plan_shapes(tensors, SMOL, keep_hidden=500, multiple_of=32)
    with pytest.raises(GQAGroupingError, match="does not divide hidden_size 448"):
        plan_shapes(tensors, SMOL, keep_hidden=448, keep_heads=6, multiple_of=32, heads_divide_hidden=True)
    with pytest.raises(GQAGroupingError, match="nor the hidden size"):
        plan_shapes(tensors, SMOL, keep_hidden=512, multiple_of=32, prune_heads=False)
    (only,) = plan_shapes(tensors, SMOL, keep_hidden=384, multiple_of=32)
    assert only.shape == Shape(**{**SMOL.to_dict(), "hidden_size": 384})
