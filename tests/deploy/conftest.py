"""Fixtures for the Kubernetes tests: the example model's footprint and the test-only .venv-k8s tools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODEL_DIR = ROOT / "k8s" / "example-model"
VENV_K8S = ROOT / ".venv-k8s"


def _missing(msg: str) -> None:
    """Skipped on a developer's machine without the tool; a failure in CI, where `make test` installs it."""
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def k8s_venv() -> Path:
    """.venv-k8s (`make setup-k8s`): kubernetes-validate, checkov, helm-python-sdk."""
    if not (VENV_K8S / "bin" / "python").exists():
        _missing(f"{VENV_K8S} is missing: run `make setup-k8s`")
    return VENV_K8S


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        _missing("kubectl is not installed (https://kubernetes.io/docs/tasks/tools/)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def footprint():
    from serve_pruned.serving.memory import ModelFootprint

    return ModelFootprint.from_folder(EXAMPLE_MODEL_DIR)
