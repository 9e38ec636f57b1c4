"""`deploy apply`: server-side apply through kubectl, then the rollout status of every Deployment.

kubectl is run through a runner passed in (tests check the exact argv); its failures become one-line
KubectlErrors that say whether kubectl is missing, no cluster answered, or the API server refused.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from serve_pruned.errors import KubectlError
from serve_pruned.kube.build import Obj, dump

FIELD_MANAGER = "serve-pruned"
_UNREACHABLE = re.compile(r"(unable to connect to the server|connection refused|no such host|i/o timeout|"
                          r"dial tcp|connect: network is unreachable|no configuration has been provided|"
                          r"tls: |x509: |context deadline exceeded)", re.I)


class Runner(Protocol):
    def __call__(self, argv: list[str], *, input: str | None = None,
                 timeout: float | None = None) -> subprocess.CompletedProcess[str]: ...


def subprocess_runner(argv: list[str], *, input: str | None = None,
                      timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class ApplyResult:
    applied: list[str] = field(default_factory=list)
    rollouts: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False


def find_kubectl(explicit: str | None = None) -> str:
    path = explicit or shutil.which("kubectl")
    if not path or not shutil.which(path):
        raise KubectlError(f"kubectl not found ({explicit or 'not on PATH'})", argv=["kubectl"],
                           hint="install kubectl (https://kubernetes.io/docs/tasks/tools/) or pass --kubectl PATH")
    return path


def _last_line(text: str) -> str:
    """kubectl's verdict: the last non-empty line (its errors and rollout status come last)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def run_kubectl(runner: Runner, argv: list[str], *, input: str | None = None, timeout: float | None = None,
         what: str) -> str:
    try:
        proc = runner(argv, input=input, timeout=timeout)
    except FileNotFoundError as exc:
        raise KubectlError(f"kubectl could not be started: {exc}", argv=argv,
                           hint="install kubectl or pass --kubectl PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise KubectlError(f"{what} did not finish within {timeout:.0f} s", argv=argv,
                           hint="check the cluster (kubectl get events -n NAMESPACE) or raise --timeout") from exc
    if proc.returncode != 0:
        err = proc.stderr or proc.stdout
        if _UNREACHABLE.search(err):
            raise KubectlError(f"no Kubernetes cluster reachable: {_last_line(err)}", argv=argv,
                               returncode=proc.returncode,
                               hint="check `kubectl config current-context` and KUBECONFIG, or create a cluster "
                                    "(docs/deploy-kind.md)")
        raise KubectlError(f"{what} failed: {_last_line(err)}", argv=argv, returncode=proc.returncode,
                           hint="fix the objects or your permissions; rerun with --dry-run server to check first")
    return proc.stdout


def apply(objs: list[Obj], *, kubectl: str = "kubectl", runner: Runner = subprocess_runner,
          dry_run: bool = False, context: str | None = None, timeout_s: float = 900.0,
          log: Callable[[str], None] = lambda _m: None) -> ApplyResult:
    """``kubectl apply --server-side`` the objects; unless a dry run, wait for each Deployment's rollout."""
    base = [kubectl] + ([f"--context={context}"] if context else [])
    argv = [*base, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-"]
    if dry_run:
        argv.append("--dry-run=server")
    out = run_kubectl(runner, argv, input=dump(objs), timeout=120, what="kubectl apply")
    result = ApplyResult(applied=[ln.strip() for ln in out.splitlines() if ln.strip()], dry_run=dry_run)
    for line in result.applied:
        log(line)
    if dry_run:
        return result
    for o in objs:
        if o["kind"] != "Deployment":
            continue
        ref = f"deployment/{o['metadata']['name']}"
        ns = o["metadata"].get("namespace", "default")
        log(f"waiting for {ref} in {ns} (model pull and load can take minutes)")
        status = run_kubectl(runner, [*base, "rollout", "status", ref, "-n", ns, f"--timeout={int(timeout_s)}s"],
                      timeout=timeout_s + 30, what=f"rollout of {ref}")
        result.rollouts[f"{ns}/{ref}"] = _last_line(status)
    return result
