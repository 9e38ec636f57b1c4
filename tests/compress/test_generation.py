"""generated:N calibration text: through vLLM from the serving environment, in this process only where the whole
model may be loaded, cached for reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_pruned.compress.data import generation_prompts
from serve_pruned.compress.generation import GenerationJob, generated_texts
from serve_pruned.errors import ServingEnvironmentError

torch = pytest.importorskip("torch")


def _job(path: Path, count: int = 3, seed: int = 0) -> GenerationJob:
    return GenerationJob(path, json.loads((path / "config.json").read_text()), count, seq_len=12, seed=seed,
                         fingerprint=f"tiny-{path.name}-{seed}")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _whole(path):
    from serve_pruned.compress.model_io import load_model

    return lambda: load_model(path, dtype="float32", trust_remote_code=False)


def test_without_vllm_it_generates_in_process_and_says_why(tiny_models, monkeypatch):
    monkeypatch.setenv("SERVE_PRUNED_SERVE_PYTHON", "/nonexistent/python")
    path, logs = tiny_models["llama"], []
    texts = generated_texts(_job(path), load_whole=_whole(path), tokenizer=_tokenizer(path), progress=False,
                            log=logs.append)
    assert len(texts) == 3
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, generation_prompts(3), strict=True))
    assert any("not through vLLM" in m and "/nonexistent/python" in m for m in logs)
    assert _job(path).cache_path("transformers").is_file()
    # a rerun reuses them: no model is loaded
    again = generated_texts(_job(path), load_whole=lambda: pytest.fail("the model was loaded"),
                            tokenizer=None, progress=False, log=logs.append)
    assert again == texts and "reusing" in logs[-1]


def test_when_the_whole_model_may_not_be_loaded_it_refuses_with_what_to_do(tiny_models, monkeypatch):
    monkeypatch.setenv("SERVE_PRUNED_SERVE_PYTHON", "/nonexistent/python")
    path = tiny_models["mistral"]
    with pytest.raises(ServingEnvironmentError, match="needs vLLM for this model") as e:
        generated_texts(_job(path, seed=7), load_whole=lambda: pytest.fail("the model was loaded"), tokenizer=None,
                        in_process_refused="the whole model takes about 16 GiB, more than --max-memory's 8 GiB",
                        progress=False, log=lambda _m: None)
    assert "16 GiB" in str(e.value) and "make setup-serve" in e.value.hint
    assert not any(_job(path, seed=7).cache_path(b).exists() for b in ("vllm", "transformers"))


@pytest.mark.vllm
def test_through_vllm_the_texts_are_the_models_own_and_cached(tiny_models):
    path, logs = tiny_models["qwen3"], []
    job = _job(path, count=34)
    texts = generated_texts(job, load_whole=lambda: pytest.fail("the model was loaded here"), tokenizer=None,
                            in_process_refused="not here", progress=False, log=logs.append)
    assert len(texts) == 34 and any("through vLLM" in m for m in logs)
    prompts = generation_prompts(34)
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts, strict=True))
    assert prompts[0] == prompts[32] and texts[0] != texts[32]  # a seed per text: repeated prompts differ
    # vLLM seeds each text, but how requests batch can move its floats: a rerun's texts come from the cache
    assert json.loads(job.cache_path("vllm").read_text()) == texts
    assert generated_texts(job, load_whole=lambda: None, tokenizer=None, progress=False, log=logs.append) == texts
