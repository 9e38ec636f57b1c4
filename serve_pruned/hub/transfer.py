"""`serve-pruned push` / `pull` on top of the real huggingface_hub client.

The endpoint comes from ``HF_ENDPOINT`` (mirrors included), the token from ``HF_TOKEN`` or ``--token``;
tokens are never printed or logged, and are scrubbed from any error text we pass on.

Push policy: a folder goes to ``main`` when main is empty or already holds the same compression
variant (same source weights, shape and dtype); a different variant goes to its own branch, named
from the manifest, unless a revision is given. main never silently changes model.

Pull: the snapshot (from the Hub, a mirror, or the local cache when offline) is copied into a temp
folder beside the destination, every file is checked against the manifest's sha256, and only then is
the folder renamed into place. On a mismatch nothing is kept.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_pruned.atomic import atomic_dir, check_output
from serve_pruned.errors import (
    ChecksumMismatchError,
    HubAuthError,
    HubError,
    HubRepoNotFoundError,
    ManifestError,
    ModelLoadError,
)
from serve_pruned.manifest import MANIFEST_NAME, PACKAGE_OWNER, Manifest, read_manifest, verify_files

Log = Callable[[str], None]


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    tag: str | None
    branch_created: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit_sha: str
    path: str
    files: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, ``revision``); no ``@`` -> revision None."""
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubRepoNotFoundError(f"{spec!r} is not a Hub repo id (owner/name[@revision])", repo_id=spec,
                                   hint="e.g. my-org/smollm2-pruned@v1")
    return repo_id, revision or None


def variant_id(manifest: Manifest) -> str:
    """Identifies a compression variant: same source weights, kind, shape and dtype -> same id."""
    quant = manifest.quantization
    key = {
        "source": manifest.source.fingerprint,
        "kind": manifest.kind,
        "shape": manifest.shape_after,
        "dtype": manifest.dtype,
        "quantization": quant.model_dump(mode="json", exclude_unset=True) if quant is not None else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def variant_branch(manifest: Manifest) -> str:
    """A readable branch name for a variant, e.g. ``pruned-p73-1a2b3c4d5e``."""
    pct = round(100 * manifest.params_fraction)
    return f"{manifest.kind or 'variant'}-p{pct}-{variant_id(manifest)}"


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


@contextmanager
def hub_errors(repo_id: str, token: str | None, *, what: str) -> Iterator[None]:
    """Translate huggingface_hub's exceptions into ours, one line each, never showing the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except HfHubHTTPError as exc:  # RepositoryNotFoundError and RevisionNotFoundError are subclasses
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"the Hub refused the token ({status}) while trying to {what} {repo_id}",
                               repo_id=repo_id) from exc
        if isinstance(exc, RevisionNotFoundError):
            raise HubRepoNotFoundError(f"{repo_id}: revision not found while trying to {what}", repo_id=repo_id,
                                       hint="list the repo's branches and tags on the Hub, or omit @REVISION") from exc
        if isinstance(exc, RepositoryNotFoundError):
            raise HubRepoNotFoundError(f"Hub repo {repo_id} not found (or private) while trying to {what}",
                                       repo_id=repo_id,
                                       hint="check the repo id, or set HF_TOKEN for a private repo") from exc
        first = _scrub(str(exc), token).splitlines()[0][:300]
        raise HubError(f"could not {what} {repo_id}: {first}", repo_id=repo_id,
                       hint="retry; check HF_ENDPOINT if you use a mirror") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise HubError(f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached",
                       repo_id=repo_id, hint="run once online (or through a mirror, HF_ENDPOINT), or unset "
                       "HF_HUB_OFFLINE") from exc
    except RuntimeError as exc:  # e.g. "Error while uploading 'x' to the Hub." once retries are spent
        cause = exc.__cause__ or exc.__context__
        detail = _scrub(f"{exc}" + (f" ({type(cause).__name__}: {cause})" if cause else ""), token)
        raise HubError(f"could not {what} {repo_id}: {detail[:300]}", repo_id=repo_id,
                       hint="nothing was committed; retry (the Hub keeps uploads that finished)") from exc
    except OSError as exc:
        if isinstance(exc, HubError | ModelLoadError | ManifestError):
            raise
        raise HubError(f"could not {what} {repo_id}: {_scrub(str(exc), token)[:300]}", repo_id=repo_id,
                       hint="check the network, HF_ENDPOINT and HF_HUB_OFFLINE") from exc


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token or None)


def _remote_variant(api: Any, repo_id: str, revision: str) -> str | None:
    """The variant id of what ``revision`` holds: None when it holds no manifest, ``"unreadable"`` when its
    manifest cannot be read (never equal to a real id, so a push goes to a branch of its own)."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        local = api.hf_hub_download(repo_id, MANIFEST_NAME, revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    try:
        return variant_id(Manifest.parse(json.loads(Path(local).read_text()), where=f"{repo_id}@{revision}"))
    except (json.JSONDecodeError, UnicodeDecodeError, ManifestError):
        return "unreadable"


def push(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: Any = None,
    log: Log = lambda _m: None,
) -> PushResult:
    """Upload a packaged folder as one commit; see the module docstring for where it goes."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    bad = verify_files(folder, manifest)
    if bad:
        raise ManifestError(f"{folder}: {', '.join(bad[:3])} differ(s) from serve_pruned.json; refusing to push",
                            path=str(folder), hint="re-package the model; the folder was changed after packaging")
    parse_repo_spec(repo_id)
    api = api or _api(token)
    with hub_errors(repo_id, token, what="push to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        target = revision
        if target is None:
            on_main = _remote_variant(api, repo_id, "main")
            if on_main is None or on_main == variant_id(manifest):
                target = "main"
            else:
                target = variant_branch(manifest)
                log(f"main of {repo_id} holds a different model; pushing to branch {target} "
                    "(pass --revision main to replace it)")
        created = False
        if target != "main" and not api.revision_exists(repo_id, target):
            api.create_branch(repo_id, branch=target, exist_ok=True)
            created = True
        summary = commit_message or (
            f"serve-pruned: {manifest.kind or 'package'} of {manifest.source.model} "
            f"({manifest.params_fraction:.3f} of the parameters)")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=target,
                                 commit_message=summary, delete_patterns="*")
        if tag:
            api.create_tag(repo_id, tag=tag, revision=info.oid)
    return PushResult(repo_id=repo_id, revision=target, commit_sha=info.oid, commit_url=str(info.commit_url),
                      tag=tag, branch_created=created)


def pull(
    spec: str,
    dest: str | Path,
    *,
    token: str | None = None,
    overwrite: bool = False,
    log: Log = lambda _m: None,
) -> PullResult:
    """Download ``owner/name[@revision]`` into ``dest``, verified file by file against the manifest."""
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_repo_spec(spec)
    dest = check_output(dest, overwrite=overwrite, owner=PACKAGE_OWNER)
    with hub_errors(repo_id, token, what="pull"):
        snapshot = Path(snapshot_download(repo_id, revision=revision, token=token or None))
    manifest = read_manifest(snapshot)
    commit = snapshot.name
    names = [*manifest.files, MANIFEST_NAME]
    with atomic_dir(dest, overwrite=overwrite, owner=PACKAGE_OWNER) as tmp:
        for rel in names:
            src = snapshot / rel
            if not src.is_file():
                raise ChecksumMismatchError([rel], repo_id=repo_id, revision=revision or "main")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)  # follows the cache's symlinks to the blobs
        bad = verify_files(tmp, manifest)
        if bad:
            raise ChecksumMismatchError(bad, repo_id=repo_id, revision=revision or "main")
    log(f"verified {len(names)} files of {repo_id}@{commit[:12]} against serve_pruned.json")
    return PullResult(repo_id=repo_id, revision=revision or "main", commit_sha=commit, path=str(dest.resolve()),
                      files=len(names))
