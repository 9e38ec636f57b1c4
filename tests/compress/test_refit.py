"""The closed-form refit: each pruned MLP reproduces the original MLP better, on calibration tokens and on
held-out ones. (Language-model quality on a real model: tests/compress/test_smollm2.py.)"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tiny import prune_tiny  # noqa: E402

from serve_pruned.compress.refit import refit_down_proj  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_refit_lowers_mlp_error_and_held_out_loss(arch, tiny_models, tokenizer_dir, text_files):
    from serve_pruned.compress.data import calibration_samples, read_sources

    model, pruned, sel, _, tok = prune_tiny(tiny_models[arch], tokenizer_dir, text_files["calib"], ffn=96)
    samples = calibration_samples(tok, read_sources([str(text_files["calib"])]), num_samples=24, seq_len=64, seed=0)
    held_out = calibration_samples(tok, read_sources([str(text_files["eval"])]), num_samples=8, seq_len=64, seed=1)
    held_before = refit_down_proj(pruned, model, sel.layers, held_out, measure_only=True)["mlp_rel_error_before"]
    weights = pruned.model.layers[0].mlp.down_proj.weight.clone()
    assert pruned.model.layers[0].mlp.down_proj.weight.equal(weights)  # measuring changes nothing
    report = refit_down_proj(pruned, model, sel.layers, samples, batch_size=5)  # 24 % 5: a short last batch
    held_after = refit_down_proj(pruned, model, sel.layers, held_out, measure_only=True)["mlp_rel_error_before"]
    assert report["mlp_rel_error_after"] < report["mlp_rel_error_before"]
    assert held_after < held_before  # the fit carries over to tokens it never saw
    assert not pruned.model.layers[0].mlp.down_proj.weight.equal(weights)


def test_refit_of_o_proj_after_head_pruning(tiny_models, tokenizer_dir, text_files):
    """Query heads and a KV group pruned: the refit fits each attention's o_proj to the original attention."""
    from serve_pruned.compress.data import calibration_samples, read_sources
    from serve_pruned.compress.refit import refit

    # 6 -> 4 query heads over the same 2 KV groups, FFN 256 -> 192
    model, pruned, sel, samples, tok = prune_tiny(tiny_models["llama"], tokenizer_dir, text_files["calib"], heads=4,
                                                  ffn=192)
    held_out = calibration_samples(tok, read_sources([str(text_files["eval"])]), num_samples=8, seq_len=64, seed=1)
    held_before = refit(pruned, model, sel.layers, held_out, measure_only=True)
    original_o = model.model.layers[0].self_attn.o_proj.weight.clone()
    report = refit(pruned, model, sel.layers, samples)
    held_after = refit(pruned, model, sel.layers, held_out, measure_only=True)
    assert report["attn_rel_error_after"] < report["attn_rel_error_before"]
    assert report["mlp_rel_error_after"] < report["mlp_rel_error_before"]
    assert held_after["attn_rel_error_before"] < held_before["attn_rel_error_before"]
    assert held_after["mlp_rel_error_before"] < held_before["mlp_rel_error_before"]
    assert model.model.layers[0].self_attn.o_proj.weight.equal(original_o)  # the original is never touched


def _final_hidden_error(pruned, model, ids) -> float:
    with torch.no_grad():
        a = pruned(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        b = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_stream_refit_brings_the_residual_stream_back_to_the_original(tiny_models, tokenizer_dir, text_files):
    """target="stream": after the refit the pruned model's last hidden state on the calibration tokens is closer
    to the original's than after the block-wise refit (each layer also corrects what earlier layers drifted).
    On 1,536 tokens of a tiny random model that does not carry over to held-out text; on SmolLM2 it does
    (bench/refit.py)."""
    import copy

    from serve_pruned.compress.data import calibration_samples, read_sources
    from serve_pruned.compress.refit import refit

    model, pruned, sel, _, tok = prune_tiny(tiny_models["llama"], tokenizer_dir, text_files["calib"], heads=4, ffn=128)
    samples = calibration_samples(tok, read_sources([str(text_files["calib"])]), num_samples=24, seq_len=64, seed=0)
    block, stream = copy.deepcopy(pruned), copy.deepcopy(pruned)
    refit(block, model, sel.layers, samples, target="block")
    report = refit(stream, model, sel.layers, samples, target="stream")
    assert report["mlp_rel_error_after"] < report["mlp_rel_error_before"]
    assert report["attn_rel_error_after"] < report["attn_rel_error_before"]
    errors = [_final_hidden_error(m, model, samples) for m in (pruned, block, stream)]
    assert errors[2] < errors[1] < errors[0], errors
    with pytest.raises(ValueError, match="refit target"):
        refit(pruned, model, sel.layers, samples, target="logits")


@pytest.mark.parametrize("target", ["block", "stream"])
def test_package_refits_with_the_chosen_target(target, tiny_models, text_files, tmp_path):
    """`--refit-target` reaches the refit: with "stream", o_proj is refit too (drift is corrected wherever it is),
    with "block" only what was pruned (here only FFN channels are)."""
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    opts = PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "out", calib=(str(text_files["calib"]),),
                          num_samples=8, seq_len=32, keep_ffn=128, distill_steps=0, refit_target=target)
    m = package(opts, progress=False).manifest.to_dict()
    refit_report = m["recovery"]["steps"][-1]["refit"]
    assert m["options"]["refit_target"] == target
    assert refit_report["mlp_rel_error_after"] < refit_report["mlp_rel_error_before"]
    assert ("attn_rel_error_after" in refit_report) == (target == "stream")


def test_stream_refit_runs_the_original_layers_that_were_dropped(tiny_models, tokenizer_dir, text_files, tmp_path):
    """With a layer dropped, the original side of a stream refit still runs that layer, so each kept layer is fit
    to the original stream at the same depth and the last hidden state comes out closer to the original's."""
    from transformers import AutoTokenizer

    from serve_pruned.compress.data import calibration_samples, read_sources
    from serve_pruned.compress.model_io import load_model
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    outs = {}
    for name, refit_on in (("plain", False), ("stream", True)):
        opts = PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / name, calib=(str(text_files["calib"]),),
                              num_samples=8, seq_len=32, drop_layers=1, keep_ffn=192, distill_steps=0,
                              refit=refit_on, refit_target="stream")
        outs[name] = package(opts, progress=False).manifest.to_dict()
    kept = outs["stream"]["pruning"]["kept_layers"]
    assert len(kept) == outs["stream"]["shape_before"]["num_layers"] - 1 and kept != list(range(len(kept)))
    original = load_model(tiny_models["llama"], dtype="float32", trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = calibration_samples(tok, read_sources([str(text_files["calib"])]), num_samples=8, seq_len=32, seed=0)
    errors = {name: _final_hidden_error(load_model(tmp_path / name, dtype="float32", trust_remote_code=False),
                                        original, samples) for name in outs}
    # fit at the right depth the stream lands close (0.02 vs 0.60 here); one step out of depth it barely moves
    assert errors["stream"] < errors["plain"] / 4, errors


def test_a_pruned_hidden_size_is_refit_to_the_original_stream_and_distilled(tiny_models, text_files, tmp_path):
    """The hidden axis through the pipeline: the refit fits the kept channels of the original's residual stream
    (no block input of the original's width exists), distillation's hidden-state term compares the same channels,
    and the output is a model of the narrower width that transformers loads."""
    from serve_pruned.compress.model_io import load_model
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    opts = PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "out", calib=(str(text_files["calib"]),),
                          num_samples=8, seq_len=32, keep_hidden=144, keep_ffn=192, multiple_of=16, distill_steps=3,
                          distill_samples=8, distill_seq_len=32, distill_hidden_weight=0.5)
    m = package(opts, progress=False).manifest.to_dict()
    assert m["shape_after"]["hidden_size"] == 144 and m["shape_before"]["hidden_size"] == 192
    assert len(m["pruning"]["kept_hidden"]) == 144
    step = m["recovery"]["steps"][-1]
    for block in ("attn", "mlp"):  # both blocks write the residual stream: both are refit
        assert step["refit"][f"{block}_rel_error_after"] < step["refit"][f"{block}_rel_error_before"]
    assert step["distill"]["steps"] == 3
    model = load_model(tmp_path / "out", dtype="float32", trust_remote_code=False)
    assert model.config.hidden_size == 144 and model.model.norm.weight.shape == (144,)
