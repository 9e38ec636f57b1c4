"""`serve-pruned deploy`: render, check and apply Kubernetes manifests for a packaged model.

Thin like the rest of the CLI: options -> DeploySpec (serve_pruned.kube.spec) -> objects.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from serve_pruned.cli.common import OUTPUT, format_option, info, overwrite_option
from serve_pruned.kube.kustomize import EXAMPLE_MODEL, EXAMPLE_MODEL_DIR, OVERLAYS

CHART = "deploy/helm/serve-pruned"
REGENERATE = f"serve-pruned deploy kustomize k8s --model {EXAMPLE_MODEL} --model-dir {EXAMPLE_MODEL_DIR}"


def _bytes(text: str) -> int:
    units = {"gib": 1 << 30, "mib": 1 << 20, "gb": 10**9, "mb": 10**6, "": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: len(t) - len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: len(t) - len(unit)]) * mult)
    raise click.BadParameter(f"{text!r} is not a size (e.g. 16GiB)")


def footprint_for(model: str, model_dir: Path | None) -> Any:
    """The model's footprint from --model-dir, else from a folder `serve-pruned pull`/`serve` left in the cache."""
    from serve_pruned.cache import pulled_dir
    from serve_pruned.errors import ManifestError
    from serve_pruned.hub.transfer import parse_repo_spec
    from serve_pruned.manifest import MANIFEST_NAME
    from serve_pruned.serving.memory import ModelFootprint

    repo_id, revision = parse_repo_spec(model)
    candidates = [model_dir] if model_dir else [pulled_dir(repo_id, revision)]
    for folder in candidates:
        if folder is not None and (folder / MANIFEST_NAME).is_file() and (folder / "config.json").is_file():
            return ModelFootprint.from_folder(folder)
    raise ManifestError(
        f"no footprint for {model}: {candidates[0]} has no {MANIFEST_NAME} and config.json",
        path=str(candidates[0]),
        hint=f"pass --model-dir DIR (the packaged folder), or run `serve-pruned pull {model} DIR` first")


def _dtype(folder: Path | None) -> str:
    """vLLM's --dtype from the packaged folder, as `serve` picks it; without a folder, vLLM's own choice."""
    if folder is None or not (folder / "config.json").is_file():
        return "auto"
    from serve_pruned.model.config import read_config
    from serve_pruned.serving.vllm import serve_dtype

    return serve_dtype(read_config(folder))


def render_options(fn: Any) -> Any:
    opts = [
        click.option("--model", required=True, metavar="REPO@REVISION",
                     help="Hub repo and pinned revision (commit sha or tag) the pods pull, verified."),
        click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="Packaged folder (or just its config.json + serve_pruned.json) to size instances from "
                     "[default: the folder `serve-pruned pull` left in the cache]."),
        click.option("--mode", type=click.Choice(["cpu", "colocated", "shared", "mig"]),
                     help="[default: cpu without --gpu, mig for a MIG profile, else colocated]"),
        click.option("--gpu", "gpu_type", help="Planner GPU type or MIG profile (L4, H100-80GB, "
                     "H100-80GB-MIG-1g.10gb, ...)."),
        click.option("--instances-per-gpu", type=int,
                     help="vLLM instances sharing one GPU / MIG slice [default: as many as fit]."),
        click.option("--replicas", type=int, default=1, show_default=True,
                     help="Pods (mode shared: pods in all)."),
        click.option("--namespace", default="serve-pruned", show_default=True),
        click.option("--name", default="serve-pruned", show_default=True),
        click.option("--max-model-len", type=int, default=2048, show_default=True),
        click.option("--concurrency", type=int, default=16, show_default=True, help="--max-num-seqs per instance."),
        click.option("--cpu-memory", default="16GiB", show_default=True, help="Mode cpu: memory one pod may use."),
        click.option("--sharing", type=click.Choice(["time-slicing", "mps"]), default="time-slicing",
                     show_default=True, help="How the device plugin splits a GPU among instances."),
        click.option("--cache", "cache_kind", type=click.Choice(["pvc", "emptyDir"]), default="pvc",
                     show_default=True, help="Where the init container puts the pulled model."),
        click.option("--cache-size", default="20Gi", show_default=True),
        click.option("--storage-class", help="StorageClass of the cache PVC."),
        click.option("--hf-token-secret", default="hf-token", show_default=True,
                     help="Secret (key `token`) holding HF_TOKEN for private repos; mounted as a file."),
        click.option("--no-hf-token", is_flag=True, help="Public repo: mount no token Secret."),
        click.option("--hf-endpoint", help="Hub mirror for the pull (HF_ENDPOINT)."),
        click.option("--vllm-image", help="vLLM image [default: vllm/vllm-openai:v0.32.0]."),
        click.option("--vllm-cpu-image", help="vLLM CPU image [default: serve-pruned-vllm-cpu:0.1.0]."),
        click.option("--serve-pruned-image", help="Image with serve-pruned [default: serve-pruned:0.1.0]."),
        click.option("--pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]), default="Always",
                     show_default=True),
        click.option("--service-monitor", is_flag=True, help="ServiceMonitor (prometheus-operator)."),
        click.option("--pod-monitor", is_flag=True, help="PodMonitor (prometheus-operator)."),
        click.option("--prometheus-rule", is_flag=True, help="PrometheusRule with deploy/prometheus/rules.yml."),
        click.option("--prometheus-release", default="kube-prometheus-stack", show_default=True,
                     help="`release` label your Prometheus selects monitors and rules by."),
        click.option("--autoscaling", type=click.Choice(["none", "hpa", "keda"]), default="none", show_default=True,
                     help="Scale on vllm:num_requests_waiting (hpa needs prometheus-adapter)."),
        click.option("--min-replicas", type=int, default=1, show_default=True),
        click.option("--max-replicas", type=int, default=4, show_default=True),
        click.option("--target-waiting", type=int, default=4, show_default=True,
                     help="Queued requests per pod that trigger a scale-up."),
        click.option("--no-network-policy", is_flag=True),
        click.option("--allow-unpinned", is_flag=True, help="Accept a branch name as revision."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def spec_from_options(**o: Any) -> Any:
    """A DeploySpec from `deploy render`'s options (the planner sizes every instance)."""
    from serve_pruned.hub.transfer import parse_repo_spec
    from serve_pruned.kube.spec import (
        Autoscaling,
        Cache,
        Images,
        Mode,
        Monitoring,
        NetworkPolicySpec,
        TokenSecret,
        from_plan,
    )

    repo, revision = parse_repo_spec(o["model"])
    if revision is None:
        raise click.UsageError("--model needs a revision: REPO@REVISION (a commit sha or tag)")
    fp = footprint_for(o["model"], o["model_dir"])
    mode: Mode = o["mode"] or ("cpu" if not o["gpu_type"] else "mig" if "-MIG-" in o["gpu_type"] else "colocated")
    images = Images(pull_policy=o["pull_policy"], **{k: v for k, v in (
        ("vllm", o["vllm_image"]), ("vllm_cpu", o["vllm_cpu_image"]), ("serve_pruned", o["serve_pruned_image"]))
        if v})
    autoscaling = Autoscaling(kind=o["autoscaling"], min_replicas=o["min_replicas"], max_replicas=o["max_replicas"],
                              target_waiting=o["target_waiting"])
    pods = o["replicas"] if o["autoscaling"] == "none" else o["min_replicas"]
    cache = Cache(kind=o["cache_kind"], size=o["cache_size"], storage_class_name=o["storage_class"],
                  access_mode="ReadWriteMany" if pods > 1 or o["autoscaling"] != "none" else "ReadWriteOnce")
    spec = from_plan(
        fp, repo=repo, revision=revision, mode=mode, gpu_type=o["gpu_type"] if mode != "cpu" else None,
        instances_per_gpu=o["instances_per_gpu"], replicas=pods, max_model_len=o["max_model_len"],
        concurrency=o["concurrency"], dtype=_dtype(o["model_dir"]), cpu_memory_bytes=_bytes(o["cpu_memory"]),
        allow_unpinned=o["allow_unpinned"], name=o["name"], namespace=o["namespace"], images=images, cache=cache,
        hf_token=None if o["no_hf_token"] else TokenSecret(name=o["hf_token_secret"]),
        hf_endpoint=o["hf_endpoint"], autoscaling=autoscaling,
        monitoring=Monitoring(service_monitor=o["service_monitor"], pod_monitor=o["pod_monitor"],
                              prometheus_rule=o["prometheus_rule"], release=o["prometheus_release"]),
        network_policy=NetworkPolicySpec(enabled=not o["no_network_policy"]))
    if spec.gpu is not None and o["sharing"] != spec.gpu.sharing:
        spec.gpu = spec.gpu.model_copy(update={"sharing": o["sharing"]})
    return spec


def _load_objects(source: str) -> list[dict[str, Any]]:
    """Objects from '-' (stdin), a YAML file, a folder with kustomization.yaml (kubectl kustomize) or of YAML files."""
    from serve_pruned.errors import UsageError

    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if (path / "kustomization.yaml").is_file():
            from serve_pruned.kube.apply import find_kubectl, run_kubectl, subprocess_runner

            kubectl = find_kubectl()
            text = run_kubectl(subprocess_runner, [kubectl, "kustomize", str(path)], timeout=60,
                               what="kubectl kustomize")
        elif path.is_dir():
            text = "\n---\n".join(p.read_text() for p in sorted(path.glob("*.yaml")))
        elif path.is_file():
            text = path.read_text()
        else:
            raise UsageError(f"{source} is neither a file, a folder nor '-'",
                             hint="pass rendered manifests: a YAML file, a folder of them, or '-' for stdin")
    return [d for d in yaml.safe_load_all(text) if d]


deploy_group: click.Group = click.Group(
    "deploy", help="Kubernetes: render, check and apply manifests for a packaged model (vLLM, sized in bytes).")


@deploy_group.command("render")
@render_options
@click.option("-o", "--output", type=OUTPUT, required=True,
              help="Folder (one file per object + kustomization.yaml) or '-'.")
@click.option("--values-out", type=OUTPUT, help="Also write the spec as Helm values for deploy/helm/serve-pruned.")
@overwrite_option("--output and --values-out")
def render_cmd(output: Path, values_out: Path | None, overwrite: bool, **o: Any) -> None:
    """Render the Deployment, Service, PDB, NetworkPolicy, ... of --model, sized by the planner."""
    from serve_pruned.atomic import check_output, write_output_file
    from serve_pruned.kube import build, dump
    from serve_pruned.kube.checks import check_or_raise
    from serve_pruned.kube.kustomize import GENERATED_FILE, RENDERED, values_yaml, write_dir

    to_stdout = str(output) == "-"
    if not to_stdout:  # a folder that may not be written fails before the planner runs
        check_output(output, overwrite=overwrite, owner=RENDERED)
    if values_out is not None:
        check_output(values_out, overwrite=overwrite, owner=GENERATED_FILE, folder=False)
    spec = spec_from_options(**o)
    objs = build(spec)
    check_or_raise(objs)
    command = "serve-pruned deploy render " + shlex.join(sys.argv[3:])
    if values_out is not None:
        write_output_file(values_out, values_yaml(spec, command=command), overwrite=overwrite, owner=GENERATED_FILE)
        info(f"wrote Helm values {values_out}")
    if to_stdout:
        click.echo(dump(objs), nl=False)
        return
    write_dir(output, objs, command=command, overwrite=overwrite)
    info(f"wrote {len(objs)} objects to {output} ({spec.instances_per_gpu} instance(s) per "
         f"{spec.gpu.type if spec.gpu else 'pod'}, {spec.budget.instance_bytes / (1 << 30):.2f} GiB each)")


@deploy_group.command("kustomize")
@click.argument("root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--model", default=EXAMPLE_MODEL, show_default=True, metavar="REPO@REVISION")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=EXAMPLE_MODEL_DIR,
              show_default=True)
@click.option("--chart", type=click.Path(path_type=Path, file_okay=False), default=CHART, show_default=True,
              help="Also write this Helm chart's values.yaml (the gpu-colocated example) and values.schema.json.")
def kustomize_cmd(root: Path, model: str, model_dir: Path, chart: Path) -> None:
    """Regenerate ROOT/base and ROOT/overlays/{cpu-dev,gpu-colocated,mig} (the committed k8s/ tree)."""
    from serve_pruned.kube import build
    from serve_pruned.kube.kustomize import write_chart_values, write_tree

    specs = {}
    for name, args in OVERLAYS.items():
        ctx = render_cmd.make_context("render", [*args, "--model", model, "--model-dir", str(model_dir), "-o", "-"])
        params = {k: v for k, v in ctx.params.items() if k not in ("output", "values_out", "overwrite")}
        specs[name] = spec_from_options(**params)
    summary = write_tree(root, specs, build=build, command=REGENERATE)
    if chart.is_dir():
        write_chart_values(chart, specs["gpu-colocated"], command=REGENERATE)
    info(f"wrote {root}/base ({len(summary['base'])} objects) and overlays "
         + ", ".join(f"{n} ({len(k)})" for n, k in summary["overlays"].items()))


@deploy_group.command("check")
@click.argument("source", default="-")
@format_option
def check_cmd(source: str, fmt: str) -> None:
    """Check rendered manifests (file, folder, kustomize folder or '-') for what linters miss."""
    from serve_pruned.errors import ManifestCheckError
    from serve_pruned.kube.checks import check

    objs = _load_objects(source)
    findings = check(objs)
    if fmt == "json":
        click.echo(json.dumps({"objects": len(objs), "findings": findings}, indent=2))
    if findings:
        raise ManifestCheckError(findings)
    if fmt == "text":
        click.echo(f"ok: {len(objs)} objects, GPU limits = requests, /dev/shm present, byte budgets fit, "
                   "token from a Secret, images and revision pinned")


@deploy_group.command("apply")
@click.argument("source", default="-")
@click.option("--dry-run", type=click.Choice(["none", "server"]), default="none", show_default=True,
              help="server: the API server validates and admits the objects but stores nothing.")
@click.option("--context", help="kubeconfig context [default: the current one].")
@click.option("--timeout", "timeout_s", type=float, default=900, show_default=True,
              help="Seconds to wait for each Deployment's rollout (pull + load).")
@click.option("--kubectl", "kubectl_path", help="kubectl binary [default: from PATH].")
@format_option
def apply_cmd(source: str, dry_run: str, context: str | None, timeout_s: float, kubectl_path: str | None,
              fmt: str) -> None:
    """`kubectl apply --server-side` SOURCE (file, folder, kustomize folder or '-'), then rollout status."""
    from dataclasses import asdict

    from serve_pruned.kube.apply import apply, find_kubectl
    from serve_pruned.kube.checks import check_or_raise

    kubectl = find_kubectl(kubectl_path)
    objs = _load_objects(source)
    check_or_raise(objs)
    result = apply(objs, kubectl=kubectl, dry_run=dry_run == "server", context=context, timeout_s=timeout_s,
                   log=info)
    if fmt == "json":
        click.echo(json.dumps(asdict(result), indent=2))
    else:
        click.echo("\n".join([*result.applied, *(f"{k}: {v}" for k, v in result.rollouts.items())]))
