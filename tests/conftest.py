"""Hermetic test settings and shared fixtures (tiny models, text files, the bundled model)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_model, make_tokenizer, synthetic_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _hermetic(tmp_path_factory: pytest.TempPathFactory):
    """Offline, blank token, temp HF_HOME and serve_pruned cache, for the whole session (subprocesses too).

    Session-scoped so it is in force before any module- or session-scoped fixture runs.
    """
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(base / "hf_home"))
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("SERVE_PRUNED_CACHE", str(base / "sp_cache"))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="session")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text")
    calib, evalt = d / "calib.txt", d / "eval.txt"
    calib.write_text(synthetic_text(30000, 1))
    evalt.write_text(synthetic_text(6000, 2))
    return {"calib": calib, "eval": evalt}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tokenizers")
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """One tiny random model per supported architecture (float32)."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, tokenizer_dir, seed=i)
            for i, arch in enumerate(("llama", "mistral", "qwen2", "qwen3"))}


@pytest.fixture(scope="session")
def earlier_package(tiny_models: dict[str, Path], text_files: dict[str, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `package` output of the tiny Llama (FFN 128, no recovery): what --overwrite may replace."""
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = tmp_path_factory.mktemp("earlier") / "pkg"
    opts = PackageOptions(model=str(tiny_models["llama"]), out=out, keep_ffn=128, multiple_of=32,
                          calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False)
    return package(opts, progress=False).out


def python_docs() -> Path | None:
    for d in sorted(Path("/usr/share/doc").glob("python3*/html/_sources")):
        if (d / "tutorial").is_dir():
            return d
    return None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled real model as a bf16 safetensors folder (converted once per machine, then cached)."""
    pytest.importorskip("gguf")
    from serve_pruned.compress.example_model import materialize

    # kept across runs in the checkout (ignored by git): the conversion takes ~30 s
    cache = Path(os.environ.get("SERVE_PRUNED_TEST_MODEL_CACHE", REPO / ".cache"))
    return materialize(cache / "models" / "SmolLM2-135M-Instruct-bf16", cache_dir=cache)


@pytest.fixture(scope="session")
def docs_text() -> dict[str, Path]:
    """Python's docs from Debian python3-doc: howto+faq to calibrate, tutorial to evaluate (kept apart)."""
    d = python_docs()
    if d is None:
        pytest.fail("python3-doc is not installed; run `make setup` (packaging/setup-system.sh)")
    return {"howto": d / "howto", "faq": d / "faq", "tutorial": d / "tutorial"}
