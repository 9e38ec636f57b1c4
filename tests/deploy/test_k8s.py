"""k8s/ and rendered manifests through the real tools: kubectl kustomize, kubernetes-validate --strict
(Kubernetes 1.29 to 1.33), checkov (zero failures, every skip with a reason), kubectl against no cluster,
and every command of the deploy guides up to where a cluster is needed."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from serve_pruned.cli.main import cli
from serve_pruned.kube.checks import check
from serve_pruned.kube.kustomize import OVERLAYS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
EXAMPLE = ["--model", "my-org/smollm2-p75-w8a8@v1", "--model-dir", str(K8S / "example-model")]
VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
# prometheus-operator and KEDA kinds: not in kubernetes-validate's schemas (they are CRDs)
CRDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}


def render(args: list[str]) -> str:
    r = CliRunner().invoke(cli, ["deploy", "render", *args, *EXAMPLE, "-o", "-"])
    assert r.exit_code == 0, r.output
    return r.stdout


def _key(o):
    return (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, kubectl) -> dict[str, Path]:
    """Every overlay through `kubectl kustomize`, plus mode shared (not an overlay), as YAML files."""
    d = tmp_path_factory.mktemp("rendered")
    out = {}
    for name in OVERLAYS:
        proc = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out[name] = d / f"{name}.yaml"
        out[name].write_text(proc.stdout)
    out["shared"] = d / "shared.yaml"
    out["shared"].write_text(render(["--mode", "shared", "--gpu", "L40S", "--instances-per-gpu", "4",
                                     "--replicas", "8", "--sharing", "mps", "--service-monitor",
                                     "--prometheus-rule", "--autoscaling", "hpa", "--min-replicas", "4"]))
    return out


def test_kustomize_overlays_equal_deploy_render(rendered):
    for name, args in OVERLAYS.items():
        via_kustomize = {_key(o): o for o in yaml.safe_load_all(rendered[name].read_text())}
        direct = {_key(o): o for o in yaml.safe_load_all(render(args))}
        assert via_kustomize == direct, name
        assert check(list(direct.values())) == []


def _crd_structure(o: dict) -> list[str]:
    """What we can check of a CRD object without its cluster schema: the fields the operators require."""
    s, problems = o["spec"], []
    if o["kind"] in ("ServiceMonitor", "PodMonitor"):
        eps = s.get("endpoints" if o["kind"] == "ServiceMonitor" else "podMetricsEndpoints") or []
        if not s["selector"]["matchLabels"] or not eps or not all(re.fullmatch(r"[a-z0-9-]+", e["port"])
                                                                   for e in eps):
            problems.append(f"{o['kind']}: selector and named endpoints required")
    elif o["kind"] == "PrometheusRule":
        rules = [r for g in s["groups"] for r in g["rules"]]
        if not rules or not all({"alert", "expr"} <= set(r) for r in rules):
            problems.append("PrometheusRule: every rule needs alert and expr")
    elif o["kind"] == "ScaledObject":
        trig = s["triggers"][0]
        if trig["type"] != "prometheus" or not {"serverAddress", "query", "threshold"} <= set(trig["metadata"]):
            problems.append("ScaledObject: prometheus trigger needs serverAddress, query, threshold")
    if "release" not in o["metadata"]["labels"] and o["kind"] != "ScaledObject":
        problems.append(f"{o['kind']}: no `release` label: kube-prometheus-stack's Prometheus would ignore it")
    return problems


@pytest.mark.integration
@pytest.mark.parametrize("version", VERSIONS)
def test_kubernetes_validate_strict(rendered, k8s_venv, version):
    files = [str(p) for p in rendered.values()]
    proc = subprocess.run([str(k8s_venv / "bin" / "kubernetes-validate"), "--strict", "-k", version, *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = re.findall(r"passed for resource (\S+)/", proc.stdout)
    unschema = set(re.findall(r"Couldn't find schema for kind (\w+)", proc.stdout + proc.stderr))
    objs = [o for p in rendered.values() for o in yaml.safe_load_all(p.read_text())]
    core = [o for o in objs if o["kind"] not in CRDS]
    assert len(passed) == len(core)  # every core object validated strictly, none merely skipped
    assert unschema == CRDS  # only the CRDs lack a schema; they get the structural check instead
    assert [p for o in objs if o["kind"] in CRDS for p in _crd_structure(o)] == []


@pytest.mark.integration
def test_kubernetes_validate_rejects_an_unknown_field(rendered, k8s_venv, tmp_path):
    objs = list(yaml.safe_load_all(rendered["cpu-dev"].read_text()))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = dep["spec"]["template"]["spec"][
        "containers"][0].pop("startupProbe")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(objs))
    proc = subprocess.run([str(k8s_venv / "bin" / "kubernetes-validate"), "--strict", "-k", "1.33.0", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "startupProbes" in proc.stdout + proc.stderr


def run_checkov(k8s_venv: Path, folder: Path) -> dict:
    """checkov on rendered YAML (--framework kubernetes: `--framework helm` passes silently without a helm
    binary); --skip-download keeps it offline."""
    proc = subprocess.run([str(k8s_venv / "bin" / "checkov"), "-d", str(folder), "--framework", "kubernetes",
                           "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300,
                          cwd=folder)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    return report


@pytest.mark.integration
def test_checkov_zero_failures_every_skip_explained(rendered, k8s_venv, tmp_path):
    for name, path in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(path.read_text())
    report = run_checkov(k8s_venv, tmp_path)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0, failed
    assert summary["passed"] > 250 and summary["parsing_errors"] == 0
    skips = {(c["check_id"], c["check_result"]["suppress_comment"]) for c in report["results"]["skipped_checks"]}
    assert {c for c, _ in skips} == {"CKV_K8S_43", "CKV_K8S_15"}
    assert all(len(reason) > 40 for _, reason in skips)  # a written reason, not a bare id


@pytest.mark.integration
def test_checkov_does_fail_an_insecure_pod(k8s_venv, tmp_path):
    objs = list(yaml.safe_load_all(render(OVERLAYS["cpu-dev"])))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    (tmp_path / "insecure.yaml").write_text(yaml.safe_dump_all(objs))
    report = run_checkov(k8s_venv, tmp_path)
    assert "CKV_K8S_20" in {c["check_id"] for c in report["results"]["failed_checks"]}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_apply_without_a_cluster_is_one_clear_line(kubectl, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": f"https://127.0.0.1:{_closed_port()}"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}],
        "users": [{"name": "nobody", "user": {"token": "not-a-real-token"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    r = CliRunner().invoke(cli, ["deploy", "apply", str(K8S / "overlays" / "cpu-dev"), "--dry-run", "server"])
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert "\n" not in line
    assert line.startswith("error: no Kubernetes cluster reachable: ") and "127.0.0.1" in line
    assert "kubectl config current-context" in line
    r = CliRunner().invoke(cli, ["deploy", "apply", str(K8S / "overlays" / "cpu-dev"), "--kubectl",
                                 str(tmp_path / "no-kubectl")])
    assert r.exit_code == 1 and r.output.startswith("error: kubectl not found")


def guide_commands() -> list[str]:
    """Every command line of the ```bash blocks in docs/deploy-*.md (continuations joined)."""
    lines = []
    for guide in sorted((ROOT / "docs").glob("deploy-*.md")):
        for block in re.findall(r"```bash\n(.*?)```", guide.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    lines.append(line)
    return lines


# Commands that need a cluster, Docker or the Hub: the guides may show them; the test only parses them.
NEEDS_CLUSTER = ("kind ", "docker ", "helm ", "kubectl create", "kubectl port-forward", "kubectl get",
                 "kubectl rollout", "kubectl -n", "curl ", "serve-pruned pull", "serve-pruned push")


def test_guides_commands_run_up_to_the_cluster(tmp_path, kubectl):
    commands = guide_commands()
    assert len(commands) >= 10
    ran = 0
    for line in commands:
        argv = shlex.split(line)
        if line.startswith(NEEDS_CLUSTER):
            continue
        if argv[0] == "serve-pruned":
            if argv[1:3] == ["deploy", "apply"]:
                continue  # needs a cluster: test_apply_without_a_cluster_is_one_clear_line covers the path
            # the packaged folder of the guides -> the example's footprint; outputs -> a temp folder
            argv = [a.replace("out/smollm2-p75-w8a8", str(K8S / "example-model")).replace("out/", f"{tmp_path}/")
                    for a in argv]
            r = CliRunner().invoke(cli, argv[1:], catch_exceptions=False)
            assert r.exit_code == 0, f"{line}\n{r.output}"
            ran += 1
        elif argv[0] == "kubectl" and argv[1] == "kustomize":
            proc = subprocess.run([kubectl, *argv[1:]], capture_output=True, text=True, cwd=ROOT)
            assert proc.returncode == 0, f"{line}\n{proc.stderr}"
            ran += 1
        elif argv[0] == "make" and argv[1] == "k8s":
            ran += 1  # test_committed_k8s_tree_is_the_generated_one runs the same command
        else:
            pytest.fail(f"guide command not covered by a test: {line}")
    assert ran >= 5
