"""`serve-pruned deploy`: render, check and apply Kubernetes manifests for a packaged model.

Thin like the rest of the CLI: options -> DeploySpec (serve_pruned.kube.spec) -> objects.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from serve_pruned.cli.common import OUTPUT, field_option, flag_origins, format_option, info, overwrite_option
from serve_pruned.kube.kustomize import EXAMPLE_MODEL, EXAMPLE_MODEL_DIR, OVERLAYS
from serve_pruned.kube.options import RenderOptions

CHART = "deploy/helm/serve-pruned"
render_option = functools.partial(field_option, RenderOptions)
REGENERATE = f"serve-pruned deploy kustomize k8s --model {EXAMPLE_MODEL} --model-dir {EXAMPLE_MODEL_DIR}"


def render_options(fn: Any) -> Any:
    """`deploy render`'s flags, each from its RenderOptions field (default, help and choices written there)."""
    flags = [
        render_option("model", required=True, metavar="REPO@REVISION"),
        render_option("model_dir", type=click.Path(path_type=Path, file_okay=False)),
        render_option("mode"),
        render_option("gpu_type", "--gpu", "gpu_type"),
        *(render_option(name) for name in (
            "instances_per_gpu", "replicas", "namespace", "name", "max_model_len", "concurrency", "kv_cache_dtype",
            "cpu_memory",
            "sharing")),
        render_option("cache_kind", "--cache", "cache_kind"),
        *(render_option(name) for name in (
            "cache_size", "storage_class", "hf_token_secret", "no_hf_token", "hf_endpoint", "vllm_image",
            "vllm_cpu_image", "serve_pruned_image", "pull_policy", "service_monitor", "pod_monitor",
            "prometheus_rule", "prometheus_release", "autoscaling", "min_replicas", "max_replicas",
            "target_waiting", "no_network_policy", "allow_unpinned")),
    ]
    for flag in reversed(flags):
        fn = flag(fn)
    return fn


def render_spec(ctx: click.Context, values: dict[str, Any]) -> Any:
    """The DeploySpec of `deploy render`'s flag values, each refusal naming its flag."""
    from serve_pruned.hub.transfer import parse_repo_spec
    from serve_pruned.kube.options import RenderOptions, spec_from_options
    from serve_pruned.options import validated

    opts = validated(RenderOptions, values, origins=flag_origins(ctx, values))
    if parse_repo_spec(opts.model)[1] is None:
        raise click.UsageError("--model needs a revision: REPO@REVISION (a commit sha or tag)")
    return spec_from_options(opts)


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
    spec = render_spec(click.get_current_context(), o)
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
        specs[name] = render_spec(ctx, params)
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
