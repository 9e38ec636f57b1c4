"""Fixtures that point the real ``huggingface_hub`` client at an in-process :class:`HubServer`.

``tests/conftest.py`` makes the whole session offline (``HF_HUB_OFFLINE=1``). ``huggingface_hub``
also copies most of its environment into ``huggingface_hub.constants`` once, at import time, and
the client reads those module attributes on every call, so setting the environment is not enough:
:func:`hub_env` patches both, for one test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import HubServer  # noqa: E402

GOOD_TOKEN = "hf_good_token"
USER = "alice"


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A fresh Hub with one user, ``alice``, whose write token is ``hf_good_token``."""
    with HubServer(tokens={GOOD_TOKEN: USER}) as server:
        yield server


@pytest.fixture
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """Online client configured for ``hub``: endpoint, no Xet, no telemetry, temp HF_HOME, no ambient token.

    Constants read at import time by ``huggingface_hub.constants`` and patched here:
    ``ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (from ``HF_ENDPOINT``), ``HF_URL_HOSTS``,
    ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET`` (``hf_xet`` is installed; without this, uploads go to
    Xet), ``HF_HUB_DISABLE_TELEMETRY`` (else the user-agent code may fetch ``/api/agent-harnesses``),
    and the paths derived from ``HF_HOME`` (caches, token files).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(constants, name, str(home / "hub"))
    for name in ("HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE"):
        monkeypatch.setattr(constants, name, str(home / "assets"))
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(home / "xet"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))

    _http.close_session()  # no pooled connection from an earlier test
    yield hub
    _http.close_session()
