"""deploy/helm/serve-pruned through helm-python-sdk (Helm's Go SDK, no helm binary): it lints, its
values schema is the spec's, and for every example it renders the same objects as `deploy render`,
which pass the same validation and our own checks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from serve_pruned.cli.main import cli
from serve_pruned.kube import build
from serve_pruned.kube.checks import check
from serve_pruned.kube.kustomize import OVERLAYS
from serve_pruned.kube.spec import DeploySpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "serve-pruned"
EXAMPLE = ["--model", "my-org/smollm2-p75-w8a8@v1", "--model-dir", str(ROOT / "k8s" / "example-model")]
HELM = """
import json, sys, helm_python as h
chart_dir, cmd, values = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read() or "null")
if cmd == "lint":
    print(json.dumps(h.lint(chart_dir, values, strict=True, kube_version="v1.29.0")))
elif cmd == "render":
    try:
        out = h.Chart.load(chart_dir).render(values, name="smollm2", namespace="serve-pruned")
        print(json.dumps({"ok": out}))
    except h.HelmError as exc:
        print(json.dumps({"error": str(exc)}))
"""


def helm(k8s_venv: Path, cmd: str, values: dict | None = None) -> dict:
    proc = subprocess.run([str(k8s_venv / "bin" / "python"), "-c", HELM, str(CHART), cmd],
                          input=json.dumps(values), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def helm_objects(k8s_venv: Path, values: dict) -> list[dict]:
    result = helm(k8s_venv, "render", values)
    assert "ok" in result, result
    return [d for text in result["ok"].values() for d in yaml.safe_load_all(text) if d]


def _normal(o: dict) -> dict:
    """Helm adds its own labels (managed-by: Helm, helm.sh/chart); everything else must be equal."""
    o = json.loads(json.dumps(o))
    for meta in [o["metadata"], o.get("spec", {}).get("template", {}).get("metadata", {})]:
        labels = meta.get("labels", {})
        labels.pop("helm.sh/chart", None)
        labels.pop("app.kubernetes.io/managed-by", None)
    for cm in [o] if o["kind"] == "ConfigMap" else []:
        cm["data"] = {k: yaml.safe_load(v) for k, v in cm["data"].items()}
    return o


def _key(o):
    return (o["kind"], o["metadata"]["name"])


def values_for(args: list[str], tmp_path: Path) -> dict:
    r = CliRunner().invoke(cli, ["deploy", "render", *args, *EXAMPLE, "-o", "-", "--values-out",
                                 str(tmp_path / "values.yaml"), "--overwrite"])
    assert r.exit_code == 0, r.output
    return yaml.safe_load((tmp_path / "values.yaml").read_text())


def test_chart_files_are_generated_from_the_spec():
    assert json.loads((CHART / "values.schema.json").read_text()) == DeploySpec.model_json_schema(by_alias=True), \
        "run: make k8s"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert DeploySpec.model_validate(values).mode == "colocated"
    assert (CHART / "files" / "rules.yml").read_text() == (ROOT / "deploy/prometheus/rules.yml").read_text()


@pytest.mark.integration
def test_chart_lints(k8s_venv):
    report = helm(k8s_venv, "lint")
    assert report["errors"] == [] and report["total_charts_linted"] == 1
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


SHARED = ["--mode", "shared", "--gpu", "L40S", "--instances-per-gpu", "4", "--replicas", "8", "--sharing", "mps",
          "--service-monitor", "--prometheus-rule", "--autoscaling", "hpa", "--min-replicas", "4",
          "--kv-cache-dtype", "fp8"]


@pytest.mark.integration
@pytest.mark.parametrize("args", [*OVERLAYS.values(), SHARED], ids=[*OVERLAYS, "shared"])
def test_chart_renders_what_deploy_render_renders(k8s_venv, tmp_path, args):
    values = values_for(args, tmp_path)
    objs = helm_objects(k8s_venv, values)
    assert check(objs) == []
    ours = {_key(o): _normal(o) for o in build(DeploySpec.model_validate(values))}
    theirs = {_key(o): _normal(o) for o in objs}
    assert theirs.keys() == ours.keys()
    for key, obj in ours.items():
        assert theirs[key] == obj, key


@pytest.mark.integration
def test_chart_output_passes_validation_and_checkov(k8s_venv, tmp_path):
    for name, args in OVERLAYS.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(helm_objects(k8s_venv, values_for(args, tmp_path))))
    (tmp_path / "values.yaml").unlink()
    files = sorted(str(p) for p in tmp_path.glob("*.yaml"))
    for version in ("1.29.0", "1.33.0"):
        proc = subprocess.run([str(k8s_venv / "bin" / "kubernetes-validate"), "--strict", "-k", version, *files],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([str(k8s_venv / "bin" / "checkov"), "-d", str(tmp_path), "--framework", "kubernetes",
                           "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["failed"] == 0, report["results"]["failed_checks"]
    assert report["summary"]["passed"] > 200


@pytest.mark.integration
def test_chart_schema_refuses_what_the_spec_refuses(k8s_venv):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "ok" in helm(k8s_venv, "render", values)
    for bad in ({**values, "replicaz": 2}, {**values, "replicas": 0},
                {**values, "images": {**values["images"], "pullPolicy": "Sometimes"}}):
        result = helm(k8s_venv, "render", bad)
        assert "error" in result and "schema" in result["error"].lower(), result
