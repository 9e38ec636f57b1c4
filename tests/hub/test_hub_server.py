"""The real ``huggingface_hub`` client (HfApi, hf_hub_download, snapshot_download) against :class:`HubServer`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest
from hub_server import HubServer
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

GOOD_TOKEN, USER = "hf_good_token", "alice"  # the `hub` fixture's user (conftest.py)
REPO = f"{USER}/model"
WEIGHTS = os.urandom(2 * 1024 * 1024)  # 2 MiB, binary => LFS
CONFIG = json.dumps({"hidden_size": 8, "num_layers": 2}).encode()  # small text => regular


def _api(hub: HubServer, token: str | bool | None = GOOD_TOKEN) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def _publish(hub: HubServer, tmp_path: Path) -> str:
    """Create the repo and upload weights + config to main; return the commit sha."""
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "config.json").write_bytes(CONFIG)
    api = _api(hub)
    api.create_repo(REPO, private=False, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=folder, revision="main", commit_message="weights").oid


def _read_tree(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _puts(hub: HubServer) -> list[int]:
    return [r.status for r in hub.request_log if r.method == "PUT"]


def test_create_repo_conflict_and_visibility(hub_env: HubServer) -> None:
    api = _api(hub_env)
    url = api.create_repo(REPO, private=True)
    assert url.repo_id == REPO
    assert api.repo_exists(REPO)
    info = api.model_info(REPO)
    assert info.private is True and info.sha is not None
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]  # the Hub's initial commit

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO, exist_ok=False)
    assert conflict.value.response.status_code == 409
    api.create_repo(REPO, exist_ok=True)

    assert api.whoami()["name"] == USER
    anonymous = _api(hub_env, token=False)
    assert not anonymous.repo_exists(REPO)  # private => invisible without a token
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)


def test_upload_branch_tag_and_download_by_every_kind_of_revision(hub_env: HubServer, tmp_path: Path) -> None:
    api = _api(hub_env)
    main_sha = _publish(hub_env, tmp_path)

    info = api.model_info(REPO, revision="main", files_metadata=True)
    assert info.sha == main_sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert weights.size == len(WEIGHTS)
    assert siblings["config.json"].lfs is None  # small text file: regular git blob
    assert _puts(hub_env) == [200]  # exactly one LFS PUT, for the weights

    api.create_branch(REPO, branch="dev")
    dev_sha = api.upload_file(
        path_or_fileobj=b'{"dev": true}', path_in_repo="dev.json", repo_id=REPO, revision="dev"
    ).oid
    api.create_tag(REPO, tag="v1", revision=main_sha)

    assert hub_env.refs(REPO) == {"branches": {"main": main_sha, "dev": dev_sha}, "tags": {"v1": main_sha}}
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_sha, "dev": dev_sha}
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="dev")][:2] == [dev_sha, main_sha]
    assert api.revision_exists(REPO, "v1") and not api.revision_exists(REPO, "nope")
    assert api.file_exists(REPO, "dev.json", revision="dev")
    assert not api.file_exists(REPO, "dev.json", revision="main")
    assert sorted(api.list_repo_files(REPO, revision="dev")) == [
        ".gitattributes",
        "config.json",
        "dev.json",
        "model.safetensors",
    ]

    expected_main = {"model.safetensors": WEIGHTS, "config.json": CONFIG}
    for revision in ("main", "v1", main_sha):
        got = _read_tree(snapshot_download(REPO, revision=revision, cache_dir=tmp_path / f"cache-{revision}"))
        assert {k: v for k, v in got.items() if k != ".gitattributes"} == expected_main
    dev = _read_tree(snapshot_download(REPO, revision="dev", cache_dir=tmp_path / "cache-dev"))
    assert dev["dev.json"] == b'{"dev": true}' and dev["model.safetensors"] == WEIGHTS

    path = hf_hub_download(REPO, "model.safetensors", revision="v1", cache_dir=tmp_path / "single")
    assert Path(path).read_bytes() == WEIGHTS
    assert Path(path).parent.name == main_sha  # cached under the resolved commit


def test_auth_errors_and_not_found(hub_env: HubServer, tmp_path: Path) -> None:
    _publish(hub_env, tmp_path)

    bad = _api(hub_env, token="hf_wrong_token")
    with pytest.raises(HfHubHTTPError) as wrong_token:
        bad.model_info(REPO)
    assert wrong_token.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(wrong_token.value)
    with pytest.raises(HfHubHTTPError) as download_401:
        hf_hub_download(REPO, "config.json", token="hf_wrong_token", cache_dir=tmp_path / "c1")
    assert download_401.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as anonymous_write:
        _api(hub_env, token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert anonymous_write.value.response.status_code == 401

    api = _api(hub_env)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER}/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{USER}/missing", cache_dir=tmp_path / "c2")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=tmp_path / "c3")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", cache_dir=tmp_path / "c4")


def test_dropped_lfs_upload_is_retried(hub_env: HubServer, tmp_path: Path) -> None:
    """huggingface_hub 1.33 retries a dropped LFS PUT.

    ``lfs._upload_single_part`` sends the object with ``http_backoff("PUT", upload_url, data=fileobj)``
    (``utils/_http.py``), which retries ``httpx.NetworkError`` / ``RemoteProtocolError`` /
    ``TimeoutException`` up to 5 times (1 s, 2 s, 4 s... apart) and rewinds the file object first.
    The commit is only sent after the upload succeeded, so ``main`` never shows a partial state.
    """
    api = _api(hub_env)
    api.create_repo(REPO)
    before = hub_env.refs(REPO)
    hub_env.fail_next_lfs_uploads(1)

    sha = api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="model.safetensors", repo_id=REPO).oid

    assert _puts(hub_env) == [0, 200]  # one dropped connection (status 0), then the retry
    assert hub_env.refs(REPO)["branches"]["main"] == sha != before["branches"]["main"]
    assert hub_env.commit_ids(REPO)[1] == before["branches"]["main"]  # exactly one new commit
    path = hf_hub_download(REPO, "model.safetensors", revision=sha, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == WEIGHTS


def test_commit_with_unuploaded_lfs_object_is_rejected_atomically(hub_env: HubServer, tmp_path: Path) -> None:
    _publish(hub_env, tmp_path)
    before = hub_env.refs(REPO)
    missing = b"never uploaded"
    lines = [
        {"key": "header", "value": {"summary": "half a commit", "description": ""}},
        {"key": "file", "value": {"path": "new.txt", "content": "aGVsbG8=", "encoding": "base64"}},
        {"key": "deletedFile", "value": {"path": "config.json"}},
        {
            "key": "lfsFile",
            "value": {"path": "big.bin", "algo": "sha256", "oid": hashlib.sha256(missing).hexdigest(), "size": 14},
        },
    ]
    response = httpx.post(
        f"{hub_env.url}/api/models/{REPO}/commit/main",
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        headers={"Authorization": f"Bearer {GOOD_TOKEN}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400
    assert "LFS pointer pointed to a file that does not exist" in response.json()["error"]
    assert hub_env.refs(REPO) == before  # nothing of the rejected commit is visible
    assert set(hub_env.files(REPO)) == {".gitattributes", "config.json", "model.safetensors"}


def test_tampered_file_downloads_different_bytes(hub_env: HubServer, tmp_path: Path) -> None:
    sha = _publish(hub_env, tmp_path)
    corrupted = bytes(b ^ 0xFF for b in WEIGHTS[:16]) + WEIGHTS[16:]  # same size, different bytes
    hub_env.tamper(REPO, "main", "model.safetensors", corrupted)

    info = _api(hub_env).model_info(REPO, files_metadata=True)
    lfs = {s.rfilename: s.lfs for s in info.siblings or []}["model.safetensors"]
    assert lfs is not None and lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()  # manifest unchanged

    path = hf_hub_download(REPO, "model.safetensors", revision=sha, cache_dir=tmp_path / "cache")
    data = Path(path).read_bytes()
    assert data == corrupted != WEIGHTS  # the client does not verify sha256 of plain HTTP downloads
    assert hashlib.sha256(data).hexdigest() != lfs.sha256
