"""Targets in bytes and instances per GPU: the shapes they admit, before any weight is loaded."""

from __future__ import annotations

import dataclasses

import pytest

from serve_pruned.compress.plan import quantized_widths
from serve_pruned.compress.quantize import plan_quantization
from serve_pruned.compress.size_target import Sizer, fit_target
from serve_pruned.errors import InvalidTargetError, OptionError, UsageError
from serve_pruned.model.shapes import Shape, count_params, llama_tensor_shapes, plan_shapes
from serve_pruned.options import SizeTarget, build_options

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, vocab_size=128256, num_hidden_layers=32, tie_word_embeddings=False)


TENSORS = llama_tensor_shapes(LLAMA_8B)
BEFORE = Shape.from_config(LLAMA_8B)


def sizer(quant: str = "w8a8") -> Sizer:
    return Sizer(TENSORS, BEFORE, LLAMA_8B, 2, lambda s: plan_quantization(quant, quantized_widths(s)))


def search(fits):
    return plan_shapes(TENSORS, BEFORE, multiple_of=32, fits=fits)


def wider(shape: Shape) -> Shape:
    return dataclasses.replace(shape, intermediate_size=shape.intermediate_size + 32)


def instances(n: int, gpu: str) -> SizeTarget:
    return SizeTarget(instances=n, gpu=gpu, max_model_len=8192, concurrency=16)


def test_the_8b_source_takes_its_real_size():
    assert count_params(TENSORS, BEFORE) == 8_030_261_248
    bf16 = Sizer(TENSORS, BEFORE, LLAMA_8B, 2, lambda _s: None).weight_bytes(BEFORE)
    assert 16.06e9 < bf16 < 16.07e9  # 2 bytes a parameter and the header
    # W8A8: a byte per projection weight, a scale per output channel; embedding and head stay in bf16
    assert 9.0e9 < sizer().weight_bytes(BEFORE) < 9.1e9


@pytest.mark.parametrize("gpu", ["L4", "H100-80GB"])
def test_instances_target_keeps_the_least_pruning_that_fits_n_and_n_plus_one_needs_less(gpu):
    s = sizer()
    n = max(1, s.instances(BEFORE, instances(1, gpu)))  # how many of the source fit already (L4: not one)
    fit = fit_target(instances(n + 1, gpu), s, search)
    more = fit_target(instances(n + 2, gpu), s, search)
    assert fit.candidates and all(s.instances(c.shape, instances(n + 1, gpu)) >= n + 1 for c in fit.candidates)
    for c in fit.candidates:  # the widest FFN for its heads: one step wider no longer fits
        if c.shape.intermediate_size < BEFORE.intermediate_size:
            assert s.instances(wider(c.shape), instances(n + 1, gpu)) < n + 1
    assert fit.instances >= n + 1
    assert more.candidates[0].params < fit.candidates[0].params
    # at 8k tokens x 16 sequences the KV cache weighs as much as the weights: shapes trade KV groups for FFN
    assert len({c.shape.num_kv_heads for c in fit.candidates}) > 1
    # an FP8 KV cache halves that term: the same N instances need less pruning
    fp8 = fit_target(dataclasses.replace(instances(n + 1, gpu), kv_cache_dtype="fp8"), s, search)
    assert not fp8.candidates or fp8.candidates[0].params > fit.candidates[0].params


def test_weight_bytes_target_admits_the_widest_shapes_under_it():
    s = sizer()
    target = SizeTarget(weight_bytes=6 * 10**9)
    fit = fit_target(target, s, search)
    assert fit.weight_bytes <= 6e9 < fit.source_weight_bytes
    for c in fit.candidates:
        assert s.weight_bytes(c.shape) <= 6e9
        assert c.shape.intermediate_size == BEFORE.intermediate_size or s.weight_bytes(wider(c.shape)) > 6e9
    # the stronger the quantization, the less has to be pruned for the same bytes
    assert fit_target(target, sizer("w4a16"), search).candidates == []  # W4A16 alone: about 5 GB


def test_targets_nothing_can_meet_or_already_met_are_refused():
    with pytest.raises(InvalidTargetError, match="no shape these options allow fits 48 instance"):
        fit_target(instances(48, "L4"), sizer(), search)
    with pytest.raises(InvalidTargetError, match="already fits"):
        fit_target(SizeTarget(weight_bytes=20 * 10**9), Sizer(TENSORS, BEFORE, LLAMA_8B, 2, lambda _s: None), search)
    with pytest.raises(UsageError, match="unknown GPU type 'T4000'"):
        fit_target(instances(2, "T4000"), sizer(), search)


def test_size_target_options_are_checked_at_the_boundary():
    base = {"model": "m", "out": "o", "calib": ("c.txt",)}
    with pytest.raises(OptionError, match="one target at a time") as e:
        build_options({**base, "target_params": 0.75, "target_instances": 2, "gpu": "L4"})
    assert "--target-weight-bytes" in e.value.hint
    with pytest.raises(OptionError, match="needs the GPU type"):
        build_options({**base, "target_instances": 2})
    with pytest.raises(OptionError, match="reached in one step"):
        build_options({**base, "target_weight_bytes": "2GiB", "schedule": "iterative"})
    with pytest.raises(OptionError, match="not an accepted value") as e:
        build_options({**base, "target_weight_bytes": "two gigs"})
    assert "2GiB" in e.value.hint
    opts = build_options({**base, "target_instances": 3, "gpu": "H100-80GB", "max_model_len": 8192})
    assert opts.size_target == SizeTarget(instances=3, gpu="H100-80GB", max_model_len=8192, concurrency=16)
    assert opts.prunes
