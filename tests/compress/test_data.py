"""Calibration text: formats, clear errors, deterministic mixed samples."""

from __future__ import annotations

import json

import pytest

from serve_pruned.compress.data import calibration_samples, read_source, read_sources
from serve_pruned.errors import CalibrationDataError, DatasetUnavailableError


def test_jsonl_folder_and_txt(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha text")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}))
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    src = read_source(str(tmp_path / "d"))
    assert src.docs == ["alpha text", "beta", "gamma"]


@pytest.mark.parametrize(
    ("content", "match"),
    [("", "holds no text"), ("   \n\n", "holds no text"), ('{"txt": "x"}', "no string field 'text'"),
     ("not json", "not valid JSON")],
)
def test_bad_files(tmp_path, content, match):
    f = tmp_path / ("c.jsonl" if "{" in content or "json" in content else "c.txt")
    f.write_text(content)
    with pytest.raises(CalibrationDataError, match=match):
        read_source(str(f))


def test_missing_file_and_no_sources(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        read_source(str(tmp_path / "missing.txt"))
    with pytest.raises(CalibrationDataError, match="no calibration text"):
        read_sources([])


def test_dataset_name_fails_clearly_offline():
    with pytest.raises(DatasetUnavailableError, match="could not be loaded") as e:
        read_source("hf:someone/some-dataset")
    assert "--calib" in e.value.hint


def test_samples_are_deterministic_and_mix_sources(tokenizer_dir, text_files, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    other = tmp_path / "other.txt"
    other.write_text("river mountain city " * 400)
    sources = read_sources([str(text_files["calib"]), str(other)])
    a = calibration_samples(tok, sources, num_samples=6, seq_len=32, seed=3)
    b = calibration_samples(tok, sources, num_samples=6, seq_len=32, seed=3)
    c = calibration_samples(tok, sources, num_samples=6, seq_len=32, seed=4)
    assert a.shape == (6, 32) and a.equal(b) and not a.equal(c)
    other_ids = set(tok("river mountain city " * 40)["input_ids"])
    from_other = [set(row.tolist()) <= other_ids for row in a]
    assert from_other.count(True) == 3  # round-robin: half the samples from each source


def test_text_shorter_than_one_sample(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    f = tmp_path / "short.txt"
    f.write_text("a tiny text")
    with pytest.raises(CalibrationDataError, match="too short"):
        calibration_samples(AutoTokenizer.from_pretrained(tokenizer_dir), read_sources([str(f)]), num_samples=2,
                            seq_len=64, seed=0)


def test_generated_source_is_the_models_own_text_and_reproducible(tiny_models, tokenizer_dir):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    from serve_pruned.compress.data import GENERATION_PROMPTS, generate_texts, read_source
    from serve_pruned.compress.model_io import load_model

    assert read_source("generated:3").generate == 3
    with pytest.raises(CalibrationDataError, match="positive integer"):
        read_source("generated:zero")
    model = load_model(tiny_models["llama"], dtype="float32", trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    side, pad = tok.padding_side, tok.pad_token
    texts = generate_texts(model, tok, 3, max_new_tokens=12, seed=0, batch_size=2)
    assert len(texts) == 3
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, GENERATION_PROMPTS[:3], strict=True))
    assert generate_texts(model, tok, 3, max_new_tokens=12, seed=0, batch_size=2) == texts
    assert (tok.padding_side, tok.pad_token) == (side, pad)  # the tokenizer's settings are restored
