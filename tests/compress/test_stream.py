"""Streaming: a model read part by part from its folder gives what the whole model in memory gives,
and holds no more than one decoder layer's weights at a time."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from serve_pruned.compress.evaluate import evaluate, greedy_continuations, mean_loss  # noqa: E402
from serve_pruned.compress.importance import collect_stats  # noqa: E402
from serve_pruned.compress.model_io import load_model, load_tokenizer  # noqa: E402
from serve_pruned.compress.stream import Streamed  # noqa: E402
from serve_pruned.model.source import inspect_folder  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # tied (llama, qwen2) and untied heads, q/k norms (qwen3)


def _both(path, dtype=torch.float32):
    whole = load_model(path, dtype=str(dtype).removeprefix("torch."), trust_remote_code=False)
    return whole, Streamed.from_folder(inspect_folder(path), device="cpu", dtype=dtype)


def _samples(vocab: int, n: int = 6, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_statistics_equal_the_whole_models(tiny_models, arch):
    whole, lazy = _both(tiny_models[arch])
    samples = _samples(whole.config.vocab_size)
    a = collect_stats(whole, samples, batch_size=4, ffn_order=True).to_dict()
    b = collect_stats(lazy, samples, batch_size=4, ffn_order=True).to_dict()
    assert a.keys() == b.keys() and "norm.down_cols" in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-9, msg=key)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_perplexity_loss_and_greedy_tokens_equal_the_whole_models(tiny_models, tokenizer_dir, arch):
    whole, lazy = _both(tiny_models[arch])
    ids = _samples(whole.config.vocab_size, n=1, seq=300)[0].tolist()
    keep: list = []
    a = evaluate(whole, ids, seq_len=64, batch_size=2, keep_top1=keep)
    b = evaluate(lazy, ids, seq_len=64, batch_size=2, reference_top1=keep)
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)
    assert b.tokens == a.tokens == 299 - 4  # 5 windows of 64 (the last of 44): one token fewer each
    assert b.top1_agreement == 1.0
    samples = _samples(whole.config.vocab_size)
    assert mean_loss(lazy, samples) == pytest.approx(mean_loss(whole, samples), rel=1e-5)
    tok = load_tokenizer(tokenizer_dir, trust_remote_code=False)
    prompts = ["the model", "a small dense layer is"]
    assert greedy_continuations(lazy, tok, prompts) == greedy_continuations(whole, tok, prompts)


def test_a_streamed_pass_holds_one_layer_at_a_time(tiny_models):
    _, lazy = _both(tiny_models["mistral"])
    held: list[list[str]] = []

    def on_layer(_i, _layer):
        held.append(sorted({n.split(".")[2] for n, p in lazy.skeleton.named_parameters()
                            if p.device.type != "meta" and n.startswith("model.layers.")}))

    hidden, kwargs = lazy.embed([_samples(lazy.config.vocab_size)])
    lazy.through(hidden, kwargs, on_layer=on_layer)
    assert held == [[str(i)] for i in range(lazy.num_layers)]
    assert all(p.device.type == "meta" for p in lazy.skeleton.parameters())  # and all are released after


def test_bfloat16_onload_of_float32_weights(tiny_models):
    """The compute dtype is the stage's, whatever the files store."""
    whole, lazy = _both(tiny_models["llama"], dtype=torch.bfloat16)
    with lazy.part("model.layers.0") as layer:
        assert layer.mlp.up_proj.weight.dtype == torch.bfloat16
    ids = _samples(whole.config.vocab_size, n=1, seq=130)[0].tolist()
    assert evaluate(lazy, ids, seq_len=64).perplexity == pytest.approx(evaluate(whole, ids, seq_len=64).perplexity,
                                                                        rel=0.02)


def test_a_tied_head_stays_tied_after_a_pass(tiny_models):
    _, lazy = _both(tiny_models["llama"])  # tie_word_embeddings=True
    with lazy.head() as head:
        head(torch.zeros(1, 2, lazy.config.hidden_size))
    assert lazy.skeleton.lm_head.weight is lazy.skeleton.model.embed_tokens.weight


def test_package_without_distillation_holds_no_model_whole_before_writing(tiny_models, text_files, tmp_path,
                                                                          monkeypatch):
    """Scoring, the search, the refit, every quality stage and the writer stream the source and the pruned model
    (the refit writes it as shards); only distillation's teacher and student hold a model whole."""
    from safetensors.torch import load_file

    from serve_pruned.compress import model_io
    from serve_pruned.compress import package as package_mod
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    def opts(out, **kw):
        return PackageOptions(model=str(tiny_models["qwen3"]), out=out, calib=(str(text_files["calib"]),),
                              eval_text=(str(text_files["eval"]),), num_samples=8, seq_len=32, multiple_of=32,
                              target_params=0.8, distill_steps=0, eval_max_tokens=512, eval_seq_len=64, **kw)

    from serve_pruned.compress import prune

    loads: list[str] = []
    real = model_io.load_model
    for module in (model_io, package_mod):
        monkeypatch.setattr(module, "load_model", lambda path, **kw: loads.append(str(path)) or real(path, **kw))
    built: list[int] = []  # whole models built from tensors: none
    real_build = prune.build_model
    monkeypatch.setattr(prune, "build_model", lambda *a, **kw: built.append(1) or real_build(*a, **kw))
    result = package(opts(tmp_path / "streamed"), progress=False)
    assert loads == [] and built == []
    report = result.manifest.to_dict()["quality"]
    assert report["recovered"]["perplexity"] < report["pruned"]["perplexity"]
    assert report["original"]["top1_agreement"] is None and report["recovered"]["top1_agreement"] is not None
    assert load_file(str(tmp_path / "streamed" / "model.safetensors")).keys()
    peaks = result.manifest.peak_memory["host_gib"]  # each stage's own peak, in the manifest
    assert {"load", "score", "prune", "refit", "eval", "write"} <= set(peaks) and all(v > 0.1 for v in peaks.values())


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_pruning_a_streamed_model_gives_the_whole_models_pruned_weights(tiny_models, arch):
    from serve_pruned.compress.importance import Selection
    from serve_pruned.compress.prune import prune_model
    from serve_pruned.model.shapes import Shape

    whole, lazy = _both(tiny_models[arch])
    config = whole.config.to_dict()
    before = Shape.from_config(config)
    after = Shape(**{**before.to_dict(), "num_layers": before.num_layers - 1, "intermediate_size": 128})
    layers = [0, 2, 3]
    sel = Selection(layers=layers, kv_groups=[list(range(before.num_kv_heads))] * 3,
                    heads=[list(range(before.num_heads))] * 3, ffn=[list(range(1, 256, 2))] * 3)
    a, _ = prune_model(whole, config, before, after, sel)
    b, _ = prune_model(lazy, config, before, after, sel)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_shards_are_a_folder_transformers_loads(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from serve_pruned.compress.shards import ShardWriter, write_layers

    whole, lazy = _both(tiny_models["llama"])
    writer = ShardWriter(tmp_path / "m", whole.config.to_dict())  # a shard per part
    write_layers(writer, lazy)
    folder = writer.close()
    # the embedding and the final norm (the head is tied) one tensor at a time, then the 4 layers
    assert len(list(folder.glob("model-*-of-00006.safetensors"))) == 6
    assert not list(folder.glob(".part-*"))
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = _samples(whole.config.vocab_size, n=1, seq=70)[0].tolist()
    assert evaluate(again, ids, seq_len=64).perplexity == pytest.approx(evaluate(whole, ids, seq_len=64).perplexity)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied


def test_a_pruned_view_slices_as_stored_and_the_writer_reads_it_so(tiny_models, tmp_path):
    """A view casts to the compute dtype only what it kept, and a writer never reads the compute dtype (an 8B
    model's head in float32 is a 2 GB copy of what is stored as 1 GB of bf16)."""
    from safetensors.torch import load_file

    from serve_pruned.compress.importance import Selection
    from serve_pruned.compress.prune import pruned_view
    from serve_pruned.compress.shards import ShardWriter, write_layers
    from serve_pruned.model.shapes import Shape

    whole, lazy = _both(tiny_models["llama"], dtype=torch.float64)  # stored in float32
    config = whole.config.to_dict()
    before = Shape.from_config(config)
    after = Shape(before.num_layers, before.num_heads, before.num_kv_heads, before.head_dim, 128, before.hidden_size)
    n = before.num_layers
    sel = Selection(layers=list(range(n)), kv_groups=[list(range(before.num_kv_heads))] * n,
                    heads=[list(range(before.num_heads))] * n, ffn=[list(range(0, 256, 2))] * n)
    view = pruned_view(lazy, config, before, after, sel)
    name = "model.layers.1.mlp.down_proj.weight"
    assert view.stored(name).dtype == torch.float32 and view.get(name).dtype == torch.float64
    assert view.get(name).equal(whole.get_parameter(name)[:, ::2].double())
    writer = ShardWriter(tmp_path / "m", view.config.to_dict())  # no dtype of its own: keeps what it is given
    write_layers(writer, view)
    written = {k: v for f in writer.close().glob("*.safetensors") for k, v in load_file(f).items()}
    assert {t.dtype for t in written.values()} == {torch.float32}
    assert written[name].equal(whole.get_parameter(name)[:, ::2])


def test_a_search_view_on_an_accelerator_moves_each_tensor_there_before_it_slices(tiny_models):
    """The shape search's views slice on the device (the host's bf16 index_select was the 8B search's bottleneck on
    an H200). "meta" stands in for the accelerator: every tensor comes back there, sliced to the host's shape, its
    indices moved with it (a host index does not slice a device tensor)."""
    from serve_pruned.compress.importance import Selection
    from serve_pruned.compress.prune import PrunedTensors, pruned_view, tensors_of
    from serve_pruned.model.shapes import Shape

    whole, lazy = _both(tiny_models["qwen3"])
    config = whole.config.to_dict()
    before = Shape.from_config(config)
    n = before.num_layers
    sel = Selection(layers=list(range(n)), kv_groups=[[0]] * n, heads=[list(range(before.heads_per_group))] * n,
                    ffn=[list(range(0, 256, 2))] * n, hidden=list(range(0, before.hidden_size, 2)))
    on_host = PrunedTensors(tensors_of(lazy), before, sel)
    on_meta = PrunedTensors(tensors_of(lazy), before, sel, slice_on=torch.device("meta"))
    for name in on_host.names():
        host, meta = on_host.get(name), on_meta.get(name)
        assert meta.device.type == "meta" and meta.shape == host.shape, name
    after = Shape(n, before.heads_per_group, 1, before.head_dim, 128, before.hidden_size // 2)
    # on the host a search view slices where it reads, as every other view does
    assert pruned_view(lazy, config, before, after, sel, slice_on_device=True).tensors._slice_on is None


def test_one_shard_is_named_as_transformers_names_it(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from serve_pruned.compress.shards import ShardWriter, write_layers

    whole, lazy = _both(tiny_models["qwen3"])
    writer = ShardWriter(tmp_path / "m", whole.config.to_dict(), max_shard_bytes=2**30)
    write_layers(writer, lazy)
    folder = writer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert load_file(folder / "model.safetensors").keys() == dict(whole.named_parameters()).keys()


def test_folder_tensors_read_exactly_what_safetensors_reads(tokenizer_dir, tmp_path):
    from safetensors.torch import load_file
    from tiny import make_tiny_model

    from serve_pruned.compress.weights import FolderTensors

    folder = make_tiny_model("mistral", tmp_path / "bf16", tokenizer_dir, dtype="bfloat16")
    tensors = FolderTensors(inspect_folder(folder))
    reference = load_file(folder / "model.safetensors")
    assert sorted(tensors.names()) == sorted(reference)
    for name, want in reference.items():
        got = tensors.get(name)
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), name


def test_a_bfloat16_source_computes_in_bfloat16_as_well_as_in_float32(tokenizer_dir, text_files, tmp_path):
    """auto computes a bf16 checkpoint in bf16 (a float32 one in float32: the packaged fixtures); the package
    and its quality stay where float32 puts them."""
    from tiny import make_tiny_model

    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    folder = make_tiny_model("llama", tmp_path / "bf16", tokenizer_dir, dtype="bfloat16", seed=5)
    quality = {}
    for dtype in ("auto", "float32"):
        opts = PackageOptions(model=str(folder), out=tmp_path / dtype, calib=(str(text_files["calib"]),),
                              eval_text=(str(text_files["eval"]),), num_samples=8, seq_len=32, multiple_of=32,
                              target_params=0.8, distill_steps=0, eval_max_tokens=512, eval_seq_len=64,
                              compute_dtype=dtype)
        quality[dtype] = package(opts, progress=False).manifest.to_dict()["quality"]
    assert quality["auto"]["compute_dtype"] == "bfloat16" and quality["float32"]["compute_dtype"] == "float32"
    for stage in ("original", "pruned", "recovered"):
        assert quality["auto"][stage]["perplexity"] == pytest.approx(quality["float32"][stage]["perplexity"], rel=0.01)
