"""`serve-pruned push` / `pull` as users run them, against the Hub-protocol test server (real client, HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GOOD_TOKEN

from serve_pruned.manifest import MANIFEST_NAME, read_manifest
from serve_pruned.serving.vllm import free_port

EXE = str(Path(sys.executable).parent / "serve-pruned")
ROOT = Path(__file__).resolve().parents[2]
REPO = "alice/smol-pruned"


def sha_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(hub, home: Path, *args: str, token: str | None = GOOD_TOKEN, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    e |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
          "HF_HOME": str(home), **env}
    if token:
        e["HF_TOKEN"] = token
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=e, timeout=300)


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def variants(tiny_models, text_files, tmp_path_factory):
    """Two packaged variants of the same tiny model (different FFN widths)."""
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, ffn in (("a", 128), ("b", 192)):
        opts = PackageOptions(model=str(tiny_models["llama"]), out=root / name, keep_ffn=ffn, multiple_of=32,
                              calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False)
        out[name] = package(opts, progress=False).out
    return out


def test_round_trip_identical_bytes_and_perplexity(hub, variants, text_files, tmp_path):
    from serve_pruned.compress.evaluate import evaluate_folder

    push = cli(hub, tmp_path / "home", "push", str(variants["a"]), REPO, "--format", "json")
    assert push.returncode == 0, push.stderr
    pushed = json.loads(push.stdout)
    assert pushed["revision"] == "main" and hub.refs(REPO)["branches"]["main"] == pushed["commit_sha"]
    pull = cli(hub, tmp_path / "home", "pull", f"{REPO}@{pushed['commit_sha']}", str(tmp_path / "got"))
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.strip() == str((tmp_path / "got").resolve())
    assert sha_tree(tmp_path / "got") == sha_tree(variants["a"])
    ppl = [evaluate_folder(str(p), [str(text_files["eval"])], max_tokens=512, progress=False)["perplexity"]
           for p in (variants["a"], tmp_path / "got")]
    assert ppl[0] == ppl[1]


def test_a_different_variant_never_replaces_main_silently(hub, variants, tmp_path):
    home = tmp_path / "home"
    first = json.loads(cli(hub, home, "push", str(variants["a"]), REPO, "--format", "json").stdout)
    second = cli(hub, home, "push", str(variants["b"]), REPO, "--format", "json")
    assert second.returncode == 0, second.stderr
    b = json.loads(second.stdout)
    assert b["revision"].startswith("pruned-p") and b["branch_created"]
    assert "holds a different model" in second.stderr
    refs = hub.refs(REPO)["branches"]
    assert refs["main"] == first["commit_sha"] and refs[b["revision"]] == b["commit_sha"]
    assert json.loads(hub.files(REPO, "main")[MANIFEST_NAME]) == read_manifest(variants["a"]).to_dict()
    assert json.loads(hub.files(REPO, b["revision"])[MANIFEST_NAME]) == read_manifest(variants["b"]).to_dict()
    again = json.loads(cli(hub, home, "push", str(variants["a"]), REPO, "--format", "json").stdout)
    assert again["revision"] == "main"  # the same variant updates main
    forced = json.loads(cli(hub, home, "push", str(variants["b"]), REPO, "--revision", "main", "--format",
                            "json").stdout)
    assert forced["revision"] == "main"
    assert json.loads(hub.files(REPO, "main")[MANIFEST_NAME]) == read_manifest(variants["b"]).to_dict()
    assert set(hub.files(REPO, "main")) - {".gitattributes"} == set(sha_tree(variants["b"]))


def test_tag_then_pull_by_tag(hub, variants, tmp_path):
    home = tmp_path / "home"
    push = cli(hub, home, "push", str(variants["a"]), REPO, "--tag", "v1", "--private")
    assert push.returncode == 0, push.stderr
    sha = push.stdout.strip()
    assert hub.refs(REPO)["tags"] == {"v1": sha}
    pull = cli(hub, home, "pull", f"{REPO}@v1", str(tmp_path / "v1"), "--format", "json")
    assert pull.returncode == 0, pull.stderr
    assert json.loads(pull.stdout)["commit_sha"] == sha
    anonymous = cli(hub, tmp_path / "anon", "pull", f"{REPO}@v1", str(tmp_path / "x"), token=None)
    assert anonymous.returncode == 1 and "not found (or private)" in errors(anonymous)[0]


def test_dropped_connection_mid_upload_is_retried(hub, variants, tmp_path):
    hub.fail_next_lfs_uploads(1)
    push = cli(hub, tmp_path / "home", "push", str(variants["a"]), REPO, "--format", "json")
    assert push.returncode == 0, push.stderr
    puts = [r.status for r in hub.request_log if r.method == "PUT"]
    assert puts[0] == 0 and puts[-1] == 200  # dropped, then retried
    assert hub.refs(REPO)["branches"]["main"] == json.loads(push.stdout)["commit_sha"]


def test_upload_that_keeps_failing_leaves_no_half_written_revision(hub, variants, tmp_path):
    """Every retry dropped: the push fails with one line, and main still points where it did."""
    home = tmp_path / "home"
    first = cli(hub, home, "push", str(variants["a"]), REPO, "--format", "json")
    before = hub.refs(REPO)["branches"]["main"]
    hub.fail_next_lfs_uploads(10)
    push = cli(hub, home, "push", str(variants["b"]), REPO, "--revision", "main")
    assert first.returncode == 0 and push.returncode == 1
    assert len(errors(push)) == 1 and "could not push to" in errors(push)[0]
    assert hub.refs(REPO)["branches"]["main"] == before
    assert json.loads(hub.files(REPO, "main")[MANIFEST_NAME]) == read_manifest(variants["a"]).to_dict()


def test_wrong_token_names_hf_token_and_is_never_printed(hub, variants, tmp_path):
    secret = "hf_this_is_a_wrong_secret_token"
    push = cli(hub, tmp_path / "home", "push", str(variants["a"]), REPO, token=secret)
    assert push.returncode == 1
    (line,) = errors(push)
    assert "refused the token (401)" in line and "HF_TOKEN" in line
    assert secret not in push.stdout + push.stderr
    pull = cli(hub, tmp_path / "home", "pull", REPO, str(tmp_path / "x"), token=secret)
    assert pull.returncode == 1 and secret not in pull.stdout + pull.stderr


def test_missing_repo_is_one_line(hub, tmp_path):
    pull = cli(hub, tmp_path / "home", "pull", "alice/does-not-exist", str(tmp_path / "x"))
    assert pull.returncode == 1
    assert errors(pull) == ["error: Hub repo alice/does-not-exist not found (or private) while trying to pull; "
                            "check the repo id, or set HF_TOKEN for a private repo"]
    assert not (tmp_path / "x").exists()


def test_tampered_file_is_refused_and_nothing_kept(hub, variants, tmp_path):
    home = tmp_path / "home"
    assert cli(hub, home, "push", str(variants["a"]), REPO).returncode == 0
    weights = (variants["a"] / "model.safetensors").read_bytes()
    flipped = weights[:-1] + bytes([weights[-1] ^ 0xFF])  # same size: the client alone does not notice
    hub.tamper(REPO, "main", "model.safetensors", flipped)
    dest = tmp_path / "dest"
    shutil.copytree(variants["b"], dest)  # an earlier pull, which --overwrite may replace
    before = sha_tree(dest)
    pull = cli(hub, home, "pull", REPO, str(dest), "--overwrite")
    assert pull.returncode == 1
    (line,) = errors(pull)
    assert "model.safetensors" in line and "nothing was kept" in line
    assert sha_tree(dest) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_offline_pull_from_cache(hub, variants, tmp_path):
    home = tmp_path / "home"
    assert cli(hub, home, "push", str(variants["a"]), REPO).returncode == 0
    assert cli(hub, home, "pull", REPO, str(tmp_path / "online")).returncode == 0
    hub.stop()
    offline = cli(hub, home, "pull", REPO, str(tmp_path / "offline"), HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert sha_tree(tmp_path / "offline") == sha_tree(variants["a"])
    cold = cli(hub, tmp_path / "cold", "pull", REPO, str(tmp_path / "cold-dest"), HF_HUB_OFFLINE="1")
    assert cold.returncode == 1 and "not in the local Hugging Face cache" in errors(cold)[0]


def test_push_refuses_a_folder_that_is_not_a_verified_package(hub, variants, tiny_models, tmp_path):
    import shutil

    plain = cli(hub, tmp_path / "home", "push", str(tiny_models["llama"]), REPO)
    assert plain.returncode == 1 and "has no serve_pruned.json" in errors(plain)[0]
    changed = tmp_path / "changed"
    shutil.copytree(variants["a"], changed)
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    proc = cli(hub, tmp_path / "home", "push", str(changed), REPO)
    assert proc.returncode == 1 and "config.json differ(s) from serve_pruned.json" in errors(proc)[0]
    assert REPO not in {r.path.split("/api/models/")[-1] for r in hub.request_log}


def test_package_push(hub, tiny_models, text_files, tmp_path):
    proc = cli(hub, tmp_path / "home", "package", str(tiny_models["llama"]), "--out", str(tmp_path / "p"),
               "--keep-ffn", "128", "--multiple-of", "32", "--calib", str(text_files["calib"]), "--num-samples",
               "4", "--seq-len", "32", "--no-recover", "--push", REPO, "--push-tag", "v1", "--format", "json",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert hub.refs(REPO)["tags"]["v1"] == report["push"]["commit_sha"]


def test_pull_through_an_olah_mirror(hub, variants, tmp_path):
    """olah (a real Hugging Face mirror server) in front of the Hub: HF_ENDPOINT points at the mirror."""
    python = ROOT / ".venv-mirror/bin/python"
    if not python.exists():
        pytest.fail("olah is not installed: run `make setup-mirror`")
    assert cli(hub, tmp_path / "home", "push", str(variants["a"]), REPO).returncode == 0
    port = free_port()
    hub_netloc = hub.url.removeprefix("http://")
    mirror = subprocess.Popen(
        [str(python), "-m", "olah.server", "--host", "127.0.0.1", "--port", str(port), "--hf-scheme", "http",
         "--hf-netloc", hub_netloc, "--hf-lfs-netloc", hub_netloc, "--mirror-netloc", f"127.0.0.1:{port}",
         "--mirror-lfs-netloc", f"127.0.0.1:{port}", "--repos-path", str(tmp_path / "olah-repos"),
         "--log-path", str(tmp_path / "olah-logs")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "olah.err", "w"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert mirror.poll() is None, (tmp_path / "olah.err").read_text()[-2000:]
            time.sleep(0.3)
        n_before = len(hub.request_log)
        pull = cli(hub, tmp_path / "home2", "pull", REPO, str(tmp_path / "via-mirror"),
                   HF_ENDPOINT=f"http://127.0.0.1:{port}")
        assert pull.returncode == 0, pull.stderr + (tmp_path / "olah.err").read_text()[-3000:]
        assert sha_tree(tmp_path / "via-mirror") == sha_tree(variants["a"])
        assert len(hub.request_log) > n_before  # the mirror fetched from its upstream
    finally:
        mirror.terminate()
        mirror.wait(timeout=10)


def test_serve_resolves_repo_at_revision_by_a_verified_pull(hub_env, variants, tmp_path, monkeypatch):
    """`serve-pruned serve owner/name@rev` pulls (verified) into the cache once, then reuses it."""
    from serve_pruned.hub.transfer import push
    from serve_pruned.serving.launch import resolve_model_dir

    monkeypatch.setenv("SERVE_PRUNED_CACHE", str(tmp_path / "cache"))
    pushed = push(variants["a"], REPO, tag="v1", token=GOOD_TOKEN)
    path = resolve_model_dir(f"{REPO}@v1", token=GOOD_TOKEN)
    assert path == tmp_path / "cache" / "pulled" / "alice--smol-pruned@v1"
    assert sha_tree(path) == sha_tree(variants["a"])
    n = len(hub_env.request_log)
    assert resolve_model_dir(f"{REPO}@v1", token=GOOD_TOKEN) == path
    assert len(hub_env.request_log) == n  # served from the verified copy, no new download
    assert pushed.tag == "v1"


@pytest.mark.parametrize("stage", ["download", "verify"])
def test_sigterm_during_pull_keeps_the_earlier_copy(stage, hub_env, variants, tmp_path, monkeypatch):
    """SIGTERM (what Kubernetes sends) while `pull --overwrite` downloads or verifies: exit 143, one line, the
    earlier verified copy byte-identical, no hidden folder beside it."""
    import signal

    import huggingface_hub
    from click.testing import CliRunner

    from serve_pruned.cli.main import cli as root
    from serve_pruned.hub import transfer

    transfer.push(variants["a"], REPO, tag="v1", token=GOOD_TOKEN)
    transfer.push(variants["b"], REPO, revision="b", tag="v2", token=GOOD_TOKEN)
    dest = tmp_path / "dest"
    transfer.pull(f"{REPO}@v1", dest, token=GOOD_TOKEN)
    before = sha_tree(dest)
    module, name = (huggingface_hub, "snapshot_download") if stage == "download" else (transfer, "verify_files")
    real = getattr(module, name)

    def terminated_during(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here
        return result

    monkeypatch.setattr(module, name, terminated_during)
    t = time.monotonic()
    r = CliRunner().invoke(root, ["pull", f"{REPO}@v2", str(dest), "--overwrite", "--token", GOOD_TOKEN])
    assert time.monotonic() - t < 20
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "interrupted (SIGTERM); earlier output is untouched and nothing half-written is left"]
    assert sha_tree(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf_home") == ["dest"]


def test_a_format_1_package_pushes_pulls_and_plans(hub, variants, tmp_path):
    """A package written by the previous release (serve_pruned.json format 1) still pushes, pulls (verified)
    and plans."""
    from test_manifest import as_format_1

    old = tmp_path / "old"
    shutil.copytree(variants["a"], old)
    as_format_1(old)
    home = tmp_path / "home"
    assert cli(hub, home, "push", str(old), "alice/old-format", "--tag", "v1").returncode == 0
    pull = cli(hub, home, "pull", "alice/old-format@v1", str(tmp_path / "pulled"))
    assert pull.returncode == 0, pull.stderr
    assert sha_tree(tmp_path / "pulled") == sha_tree(old)
    assert read_manifest(tmp_path / "pulled").format_version == 1
    plan = cli(hub, home, "plan", str(tmp_path / "pulled"), "--gpu", "L4", "--format", "json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["max_instances"] >= 1
