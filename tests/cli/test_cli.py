"""The `serve-pruned` console script as a user runs it: data on stdout, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve_pruned.manifest import read_manifest, verify_files

EXE = str(Path(sys.executable).parent / "serve-pruned")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def test_help_and_version_need_no_torch():
    code = ("import sys; from serve_pruned.cli.main import cli; "
            "import click.testing as t; r = t.CliRunner().invoke(cli, ['--help']); "
            "assert r.exit_code == 0, r.output; assert 'package' in r.output; "
            "bad = [m for m in ('torch', 'transformers', 'vllm', 'llmcompressor') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert run("--version").stdout.startswith("serve-pruned, version")


def test_usage_error_exits_2():
    proc = run("package")
    assert proc.returncode == 2 and "Missing argument" in proc.stderr


@pytest.fixture(scope="module")
def packaged(tiny_models, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pruned"
    proc = run("package", str(tiny_models["llama"]), "--out", str(out), "--calib", str(text_files["calib"]),
               "--num-samples", "8", "--seq-len", "64", "--target-params", "0.8", "--multiple-of", "32",
               "--eval-text", str(text_files["eval"]), "--eval-max-tokens", "1024", "--format", "json",
               "--schedule", "iterative", "--distill-steps", "4", "--distill-samples", "8", "--distill-seq-len", "32",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_package_json_report_and_manifest(packaged):
    out, report = packaged
    manifest = read_manifest(out).to_dict()
    assert report["out"] == str(out.resolve())
    assert manifest["params_after"] <= 0.8 * manifest["params_before"]
    assert manifest["params_after"] == report["params_after"]
    assert len(manifest["pruning"]["shape_search"]) > 1  # a real search over several shapes happened
    after = manifest["shape_after"]
    kv = after["num_layers"] * after["num_kv_heads"] * after["head_dim"] * 2 * 4  # K and V, float32
    assert manifest["kv_cache_bytes_per_token"] == kv
    q = manifest["quality"]
    assert {"original", "pruned", "recovered"} <= set(q)  # a quality report for every stage
    assert q["pruned"]["perplexity"] > 1 and q["original"]["perplexity"] > 1 and 0 <= q["pruned"]["top1_agreement"] <= 1
    assert q["recovered"]["prompts"]["completions"] and 0 <= q["recovered"]["prompts"]["prefix_agreement"] <= 1
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(manifest["files"])
    rec = manifest["recovery"]
    assert rec["schedule"] == "iterative" and len(rec["steps"]) == 2  # 0.8 in steps of at most 0.125
    assert [s["distill"]["steps"] for s in rec["steps"]] == [2, 2]
    fractions = [s["fraction"] for s in rec["steps"]]
    assert fractions[0] > fractions[1] and fractions[1] <= 0.8
    assert verify_files(out, read_manifest(out)) == []
    assert manifest["weight_bytes"] == (out / "model.safetensors").stat().st_size
    assert manifest["tool_versions"]["torch"] and manifest["source"]["fingerprint"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == after["intermediate_size"] and cfg["head_dim"] == after["head_dim"]


def test_eval_matches_packaging_report(packaged, tiny_models, text_files):
    out, report = packaged
    proc = run("eval", str(out), "--text", str(text_files["eval"]), "--base", str(tiny_models["llama"]),
               "--max-tokens", "1024", "--format", "json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["perplexity"] == pytest.approx(report["quality"]["recovered"]["perplexity"], rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(report["quality"]["recovered"]["top1_agreement"], abs=1e-6)
    assert result["base"]["perplexity"] == pytest.approx(report["quality"]["original"]["perplexity"], rel=1e-4)


def test_scores_are_cached_between_runs(packaged, tiny_models, text_files, tmp_path):
    proc = run("package", str(tiny_models["llama"]), "--out", str(tmp_path / "o"), "--calib",
               str(text_files["calib"]), "--num-samples", "8", "--seq-len", "64", "--keep-ffn", "128",
               "--multiple-of", "32", "--no-recover", "--scorer", "obs", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stderr


def test_activation_and_obs_statistics_are_cached_apart(packaged, tiny_models, text_files, tmp_path):
    """`packaged` scored with obs (auto, as it refits); its statistics carry Gram-matrix work activation does
    not need, so activation (auto without recovery) makes and caches its own."""
    args = ["package", str(tiny_models["llama"]), "--calib", str(text_files["calib"]), "--num-samples", "8",
            "--seq-len", "64", "--keep-ffn", "128", "--multiple-of", "32", "--no-recover", "--no-progress"]
    assert read_manifest(packaged[0]).pruning["scorer"] == "obs"
    cache = {"SERVE_PRUNED_CACHE": str(tmp_path / "cache")}  # its own: no other test's statistics in it
    obs = run(*args, "--scorer", "obs", "--out", str(tmp_path / "o"), env=cache)
    assert obs.returncode == 0, obs.stderr
    first = run(*args, "--out", str(tmp_path / "a"), env=cache)
    assert first.returncode == 0, first.stderr
    assert "importance statistics: reusing" not in first.stderr
    assert read_manifest(tmp_path / "a").pruning["scorer"] == "activation"
    second = run(*args, "--out", str(tmp_path / "b"), env=cache)
    assert second.returncode == 0, second.stderr
    assert "importance statistics: reusing" in second.stderr


def _bad_model(tiny_models, tmp_path, mutate):
    d = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], d)
    mutate(d)
    return d


def _set_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


BAD_INPUTS = {
    "unsupported architecture": (lambda d: _set_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                                 ["--target-params", "0.8"], "GPT2LMHeadModel' is not supported; supported:"),
    "target above 1": (None, ["--target-params", "1.5"], "--target-params: must be a fraction in (0, 1)"),
    "target zero": (None, ["--target-params", "0"], "--target-params: must be a fraction in (0, 1)"),
    "heads break GQA": (None, ["--keep-heads", "5"], "cannot be split evenly over 2 KV groups"),
    "truncated weights": (_truncate, ["--target-params", "0.8"], "is truncated"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), ["--target-params", "0.8"], "no *.safetensors"),
    "empty calibration": ("empty-calib", ["--target-params", "0.8"], "holds no text"),
}


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error_and_old_output_intact(case, packaged, tiny_models, text_files, tmp_path):
    """Through the console script, over an earlier output of ours that --overwrite would replace."""
    mutate, args, message = BAD_INPUTS[case]
    model = tiny_models["llama"]
    calib = text_files["calib"]
    if mutate == "empty-calib":
        calib = tmp_path / "empty.txt"
        calib.write_text("")
    elif mutate is not None:
        model = _bad_model(tiny_models, tmp_path, mutate)
    out = tmp_path / "out"
    shutil.copytree(packaged[0], out)
    before = _tree(out)
    proc = run("package", str(model), "--out", str(out), "--overwrite", "--calib", str(calib), "--num-samples", "4",
               "--seq-len", "32", "--multiple-of", "32", "--no-progress", *args)
    assert proc.returncode == 1
    errors = error_lines(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_existing_output_without_overwrite(tiny_models, text_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = run("package", str(tiny_models["llama"]), "--out", str(out), "--keep-ffn", "128", "--multiple-of", "32",
               "--calib", str(text_files["calib"]), "--no-recover")
    assert proc.returncode == 1
    assert error_lines(proc) == [f"error: output folder {out} already exists; pass --overwrite to replace it "
                                 "(it is only replaced after the new output is complete)"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_old_output(packaged, tiny_models, text_files, tmp_path, monkeypatch):
    """A failure inside the write (disk full while writing the manifest) keeps the earlier output whole."""
    from serve_pruned.compress import package as pkg
    from serve_pruned.compress import write
    from serve_pruned.options import PackageOptions

    out = tmp_path / "out"
    shutil.copytree(packaged[0], out)
    before = _tree(out)

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "write_manifest", disk_full)
    opts = PackageOptions(model=str(tiny_models["llama"]), out=out, overwrite=True, keep_ffn=128, multiple_of=32,
                          calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False)
    with pytest.raises(OSError, match="No space left"):
        pkg.package(opts, progress=False)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
