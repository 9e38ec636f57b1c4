"""The memory model and planner: byte arithmetic, flags, fits, density (torch-free)."""

from __future__ import annotations

import json
import math

import pytest

from serve_pruned.errors import UsageError
from serve_pruned.serving.memory import BACKENDS, GIB, GPUS, ModelFootprint, gpu, instance_bytes, plan

SMOL = dict(hidden_size=576, intermediate_size=1536, vocab_size=49152)


def footprint(weights=269_030_016, kv=23_040, original=None, **kw):
    return ModelFootprint(name="m", weight_bytes=weights, kv_bytes_per_token=kv, original=original,
                          **{**SMOL, **kw})


def test_instance_bytes_terms():
    inst = instance_bytes(footprint(), max_model_len=4096, concurrency=8, backend=BACKENDS["cuda"])
    assert inst.kv_cache == 23_040 * 4096 * 8
    assert inst.activations == 4096 * (4 * 576 + 2 * 1536) * 2 + 8 * 49152 * 4
    assert inst.total == 269_030_016 + inst.kv_cache + inst.activations + BACKENDS["cuda"].overhead_bytes


def test_gpu_plan_fills_the_gpu_and_flags_are_bytes():
    p = plan(footprint(), device="H100-80GB", max_model_len=4096, concurrency=8)
    usable = int(GPUS["H100-80GB"].memory_bytes * 0.95)
    assert p.instances == p.max_instances == usable // p.instance.total
    assert (p.instances + 1) * p.instance.total > usable >= p.instances * p.instance.total
    f = p.instance.flags
    assert f["--kv-cache-memory-bytes"] == str(23_040 * 4096 * 8)
    util = float(f["--gpu-memory-utilization"])
    assert util * GPUS["H100-80GB"].memory_bytes >= p.instance.total
    assert util - 0.01 < p.instance.total / GPUS["H100-80GB"].memory_bytes <= util
    assert p.to_dict()["headroom_bytes"] == usable - p.instances * p.instance.total


def test_mig_profiles_and_unknown_gpu():
    small = plan(footprint(), device="H100-80GB-MIG-1g.10gb", max_model_len=2048, concurrency=4)
    big = plan(footprint(), device="h100-80gb", max_model_len=2048, concurrency=4)  # case-insensitive
    assert 1 <= small.instances < big.instances
    with pytest.raises(UsageError, match="unknown GPU type 'B300'") as e:
        gpu("B300")
    assert "H200-141GB" in e.value.hint


def test_too_many_instances_and_too_big_a_model():
    with pytest.raises(UsageError, match="at most"):
        plan(footprint(), device="L4", max_model_len=2048, concurrency=4, instances=1000)
    with pytest.raises(UsageError, match="one instance of m needs"):
        plan(footprint(weights=100 * GIB), device="L4", max_model_len=2048, concurrency=4)


def test_density_gain_counts_kv_heads_and_weights():
    original = footprint()
    pruned = footprint(weights=100_000_000, kv=23_040 // 3, intermediate_size=832, original=original)
    p = plan(pruned, device="L4", max_model_len=8192, concurrency=16)
    o = plan(original, device="L4", max_model_len=8192, concurrency=16)
    assert p.original_instances == o.max_instances
    assert p.density_gain == pytest.approx(p.max_instances / o.max_instances)
    assert p.density_gain > 1.5


def test_an_fp8_kv_cache_halves_the_kv_bytes_and_is_passed_to_vllm():
    auto = plan(footprint(), device="H100-80GB", max_model_len=8192, concurrency=16)
    fp8 = plan(footprint(), device="H100-80GB", max_model_len=8192, concurrency=16, kv_cache_dtype="fp8")
    assert fp8.instance.kv_cache * 2 == auto.instance.kv_cache
    assert fp8.instance.flags["--kv-cache-dtype"] == "fp8" and "--kv-cache-dtype" not in auto.instance.flags
    assert fp8.instance.flags["--kv-cache-memory-bytes"] == str(fp8.instance.kv_cache)
    assert fp8.max_instances > auto.max_instances  # at 8k x 16 SmolLM2's KV cache is most of an instance
    # the original is counted with the same KV cache: the gain is what the weights' pruning bought
    pruned = footprint(weights=100_000_000, kv=23_040 // 3, original=footprint())
    gain = plan(pruned, device="L4", max_model_len=8192, concurrency=16, kv_cache_dtype="fp8")
    assert gain.original_instances == plan(footprint(), device="L4", max_model_len=8192, concurrency=16,
                                           kv_cache_dtype="fp8").max_instances
    with pytest.raises(UsageError, match="unknown KV cache dtype 'int4'"):
        plan(footprint(), device="L4", max_model_len=2048, concurrency=4, kv_cache_dtype="int4")


def test_cpu_kv_is_whole_gib_through_the_env_var():
    p = plan(footprint(), device="cpu", max_model_len=2048, concurrency=16, memory_bytes=24 * GIB)
    need = 23_040 * 2048 * 16
    assert p.instance.env == {"VLLM_CPU_KVCACHE_SPACE": str(math.ceil(need / GIB))}
    assert p.instance.kv_cache == math.ceil(need / GIB) * GIB
    assert "--kv-cache-memory-bytes" not in p.instance.flags  # the env var would override it anyway


def test_footprint_from_a_packaged_folder(tiny_models, text_files, tmp_path):
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = package(PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "p", keep_kv_heads=1,
                                 keep_heads=3, keep_ffn=128, multiple_of=32, calib=(str(text_files["calib"]),),
                                 num_samples=4, seq_len=32, recover=False), progress=False).out
    m = json.loads((out / "serve_pruned.json").read_text())
    fp = ModelFootprint.from_folder(out)
    assert (fp.weight_bytes, fp.kv_bytes_per_token) == (m["weight_bytes"], m["kv_cache_bytes_per_token"])
    assert fp.original.kv_bytes_per_token == 2 * fp.kv_bytes_per_token  # 2 KV groups -> 1
    plain = ModelFootprint.from_folder(tiny_models["llama"])
    assert plain.original is None and plain.weight_bytes == fp.original.weight_bytes
