"""Quantization: scheme and group-size checks up front, llmcompressor output in compressed-tensors."""

from __future__ import annotations

import json

import pytest

from serve_pruned.compress.quantize import plan_quantization
from serve_pruned.errors import InvalidTargetError, UsageError


def test_w4a16_group_size_is_derived_from_the_pruned_shapes():
    assert plan_quantization("w4a16", [576, 576, 832]).group_size == 64  # 128 does not divide 576
    assert plan_quantization("w4a16", [4096, 4096, 11008]).group_size == 128
    assert plan_quantization("w4a16", [192, 64, 96]).group_size == 32


def test_bad_group_sizes_and_schemes_are_rejected():
    with pytest.raises(UsageError, match="group size 128 does not divide layer input width\\(s\\) \\[576\\]"):
        plan_quantization("w4a16", [576, 1536], group_size=128)
    with pytest.raises(UsageError, match="no W4A16 group size"):
        plan_quantization("w4a16", [100])
    with pytest.raises(UsageError, match="--group-size only applies to w4a16"):
        plan_quantization("w8a8", [576], group_size=64)
    with pytest.raises(UsageError, match="unknown quantization"):
        plan_quantization("int3", [576])
    assert plan_quantization("none", [576]) is None
    assert plan_quantization("fp8", [576]).needs_data is False


def test_group_size_fails_before_any_weight_is_loaded(tiny_models, text_files, tmp_path, monkeypatch):
    from serve_pruned.compress import package as pkg
    from serve_pruned.options import PackageOptions

    def no_loading(*_a, **_k):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(pkg, "load_model", no_loading)
    opts = PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "o", keep_ffn=128, multiple_of=32,
                          quant="w4a16", group_size=128, calib=(str(text_files["calib"]),), recover=False)
    with pytest.raises(UsageError, match="does not divide"):
        pkg.package(opts, progress=False)
    with pytest.raises(InvalidTargetError, match="nothing to do"):
        pkg.package(PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("scheme", "hidden"), [("w8a8", None), ("w4a16", None), ("fp8", None), ("w8a8", 96)])
def test_quantized_package_is_compressed_tensors(scheme, hidden, tiny_models, text_files, tmp_path):
    from serve_pruned.compress.package import package
    from serve_pruned.compress.plan import plan_package
    from serve_pruned.model.shapes import Shape
    from serve_pruned.options import PackageOptions

    opts = PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / scheme, keep_ffn=128, multiple_of=32,
                          quant=scheme, calib=(str(text_files["calib"]),), num_samples=8, seq_len=64,
                          eval_text=(str(text_files["eval"]),), eval_max_tokens=512, recover=False,
                          keep_hidden=hidden)
    sizer = plan_package(opts).sizer()  # what a bytes or instances target predicts for this output
    m = package(opts, progress=False).manifest.to_dict()
    cfg = json.loads((tmp_path / scheme / "config.json").read_text())
    assert sizer.weight_bytes(Shape.from_config(cfg)) == pytest.approx(m["weight_bytes"], rel=0.01)
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["intermediate_size"] == 128 and cfg["head_dim"] == 32 and cfg["hidden_size"] == (hidden or 192)
    assert (tmp_path / scheme / "recipe.yaml").is_file()
    assert m["kind"] == "pruned-quantized" and m["quantization"]["scheme"] == scheme
    assert set(m["quality"]) >= {"original", "pruned", "quantized"}
    q, p = m["quality"]["quantized"], m["quality"]["pruned"]
    assert q["tokens"] == p["tokens"] and q["perplexity"] > 1
    # float32 tiny model: 8-bit stays close to the unquantized pruned model, 4-bit may drift more
    assert q["perplexity"] == pytest.approx(p["perplexity"], rel=0.05 if scheme != "w4a16" else 0.25)
    bits = {"w8a8": 1, "w4a16": 0.5, "fp8": 1}[scheme]
    assert m["weight_bytes"] < 0.5 * (m["params_after"] * 4) * bits + 2 * 384 * 192 * 4 + 200_000


def test_cli_stdout_stays_json_while_quantizing(tiny_models, text_files, tmp_path):
    """llmcompressor logs to stdout by default; the CLI's stdout must stay pure data."""
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "serve-pruned")
    proc = subprocess.run([exe, "package", str(tiny_models["llama"]), "--out", str(tmp_path / "q"), "--quant", "w8a8",
                           "--calib", str(text_files["calib"]), "--num-samples", "4", "--seq-len", "32",
                           "--format", "json", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kind"] == "quantized" and report["params_fraction"] == 1.0


def test_weights_left_on_disk_quantize_as_in_memory_and_the_source_is_untouched(tiny_models, text_files, tmp_path,
                                                                                 monkeypatch):
    """Past the host budget, llmcompressor reads each layer from the files (here the source's own, quantized as
    stored): the output is the in-memory run's, byte for byte, and the files it read are not changed."""
    import hashlib
    from dataclasses import replace

    from safetensors.torch import load_file

    from serve_pruned.compress import plan, quantize, write
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    def opts(out):
        return PackageOptions(model=str(tiny_models["llama"]), out=out, quant="w8a8",
                              calib=(str(text_files["calib"]),), num_samples=8, seq_len=64)

    source = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_models["llama"].iterdir()}
    package(opts(tmp_path / "memory"), progress=False)
    caches: list[str] = []
    real = quantize.load_offloaded

    def spy(*a, **kw):
        model = real(*a, **kw)
        caches.append(type(model.model.layers[0].mlp.down_proj._parameters).__name__)
        return model

    monkeypatch.setattr(quantize, "load_offloaded", spy)
    copies: list[object] = []
    real_write = write._write_weights
    monkeypatch.setattr(write, "_write_weights", lambda *a, **kw: copies.append(a[1]) or real_write(*a, **kw))
    real_plan = plan.plan_memory  # a host limit that leaves quantization nothing to hold: every layer on disk
    monkeypatch.setattr(plan, "plan_memory", lambda *a, **kw: replace(real_plan(*a, **kw), quantize_host_bytes=0))
    package(opts(tmp_path / "disk"), progress=False)
    assert caches == ["DiskCache"]
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("memory", "disk"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_models["llama"].iterdir()} == source
    assert not [p for p in (tmp_path / "disk").iterdir() if p.name.startswith(".")]  # no scratch left behind
    assert copies == []  # quantization only reads the source as stored: no copy of it was written


def test_a_weight_bytes_target_packages_the_widest_shape_under_it(tiny_models, text_files, tmp_path):
    """--target-weight-bytes with W8A8: the written weights are under the target, as predicted, and the shape is
    the least pruning the search found under it (one FFN step wider would not be)."""
    import dataclasses

    from serve_pruned.compress.package import package
    from serve_pruned.compress.plan import plan_package
    from serve_pruned.options import PackageOptions

    opts = PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "b", target_weight_bytes="1MB",
                          quant="w8a8", calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False)
    plan = plan_package(opts)
    sizer = plan.sizer()
    m = package(opts, progress=False).manifest
    target = m.target
    assert target is not None and target["weight_bytes"] == 1_000_000
    assert m.weight_bytes <= 1_000_000 < m.weight_bytes_before
    assert target["weight_bytes_written"] == m.weight_bytes
    assert target["predicted_weight_bytes"] == pytest.approx(m.weight_bytes, rel=0.01)
    chosen = plan.before.__class__(**m.shape_after)
    if chosen.intermediate_size < plan.before.intermediate_size:
        wider = dataclasses.replace(chosen, intermediate_size=chosen.intermediate_size + opts.ffn_multiple)
        assert sizer.weight_bytes(wider) > 1_000_000
    assert m.options["target_weight_bytes"] is None and 0 < m.options["target_params"] < 1  # as the search used it


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_fp8_kv_cache_scales_are_calibrated_into_the_checkpoint(scheme, tiny_models, text_files, tmp_path):
    from safetensors import safe_open

    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = tmp_path / scheme
    opts = PackageOptions(model=str(tiny_models["llama"]), out=out, keep_ffn=128, multiple_of=32, quant=scheme,
                          kv_cache_dtype="fp8", calib=(str(text_files["calib"]),), num_samples=8, seq_len=64,
                          recover=False)
    m = package(opts, progress=False).manifest.to_dict()
    assert m["quantization"]["kv_cache"] == "fp8"
    kv = json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["strategy"], kv["dynamic"]) == (8, "float", "tensor", False)
    scales = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            scales.update({k: st.get_tensor(k) for k in st.keys() if k.endswith(("k_scale", "v_scale"))})
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert len(scales) == 2 * layers
    # calibrated on the data: finite, positive and not vLLM's uncalibrated 1.0
    assert all(t.numel() == 1 and 0 < float(t) < 1e3 and float(t) != 1.0 for t in scales.values())


def test_without_fp8_kv_the_checkpoint_has_no_kv_scales():
    from serve_pruned.compress.quantize import plan_quantization

    assert "kv_cache" not in plan_quantization("w8a8", [192, 128]).to_dict()
    assert plan_quantization("fp8", [192]).needs_data is False
    assert plan_quantization("fp8", [192], kv_cache="fp8").needs_data is True  # the scales need calibration text
