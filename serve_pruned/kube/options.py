"""`deploy render`'s options as one typed model (defaults and help written once, here), and the DeploySpec
the planner sizes from them. Torch-free: `deploy render` needs no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_pruned.errors import ManifestError, UsageError
from serve_pruned.kube.spec import (
    Autoscaling,
    Cache,
    DeploySpec,
    Images,
    Mode,
    Monitoring,
    NetworkPolicySpec,
    TokenSecret,
    from_plan,
)
from serve_pruned.serving.memory import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MODEL_LEN,
    KV_CACHE_DTYPE_HELP,
    MAX_INSTANCES_PER_DEVICE,
    ModelFootprint,
)


class RenderOptions(BaseModel):
    """Everything `deploy render` (and `deploy kustomize`, per overlay) takes; the descriptions are its --help."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hub repo and pinned revision (commit sha or tag) the pods pull, verified.")
    model_dir: Path | None = Field(None, description="Packaged folder (or just its config.json + serve_pruned.json) "
                                   "to size instances from [default: the folder `serve-pruned pull` left in the "
                                   "cache].")
    mode: Mode | None = Field(None, description="[default: cpu without --gpu, mig for a MIG profile, else colocated]")
    gpu_type: str | None = Field(None, description="Planner GPU type or MIG profile (L4, H100-80GB, "
                                 "H100-80GB-MIG-1g.10gb, ...).")
    instances_per_gpu: int | None = Field(None, ge=1, le=MAX_INSTANCES_PER_DEVICE, description="vLLM instances "
                                          "sharing one GPU / MIG slice [default: as many as fit].")
    replicas: int = Field(1, ge=1, description="Pods (mode shared: pods in all).")
    namespace: str = "serve-pruned"
    name: str = "serve-pruned"
    max_model_len: int = Field(DEFAULT_MAX_MODEL_LEN, ge=16)
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="--max-num-seqs per instance.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description=KV_CACHE_DTYPE_HELP)
    cpu_memory: str = Field("16GiB", description="Mode cpu: memory one pod may use.")
    sharing: Literal["time-slicing", "mps"] = Field("time-slicing", description="How the device plugin splits a "
                                                    "GPU among instances.")
    cache_kind: Literal["pvc", "emptyDir"] = Field("pvc", description="Where the init container puts the pulled "
                                                   "model.")
    cache_size: str = "20Gi"
    storage_class: str | None = Field(None, description="StorageClass of the cache PVC.")
    hf_token_secret: str = Field("hf-token", description="Secret (key `token`) holding HF_TOKEN for private repos; "
                                 "mounted as a file.")
    no_hf_token: bool = Field(False, description="Public repo: mount no token Secret.")
    hf_endpoint: str | None = Field(None, description="Hub mirror for the pull (HF_ENDPOINT).")
    vllm_image: str | None = Field(None, description="vLLM image [default: vllm/vllm-openai:v0.32.0].")
    vllm_cpu_image: str | None = Field(None, description="vLLM CPU image [default: serve-pruned-vllm-cpu:0.1.0].")
    serve_pruned_image: str | None = Field(None, description="Image with serve-pruned [default: "
                                           "serve-pruned:0.1.0].")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "Always"
    service_monitor: bool = Field(False, description="ServiceMonitor (prometheus-operator).")
    pod_monitor: bool = Field(False, description="PodMonitor (prometheus-operator).")
    prometheus_rule: bool = Field(False, description="PrometheusRule with deploy/prometheus/rules.yml.")
    prometheus_release: str = Field("kube-prometheus-stack", description="`release` label your Prometheus selects "
                                    "monitors and rules by.")
    autoscaling: Literal["none", "hpa", "keda"] = Field("none", description="Scale on vllm:num_requests_waiting "
                                                        "(hpa needs prometheus-adapter).")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    target_waiting: int = Field(4, ge=1, description="Queued requests per pod that trigger a scale-up.")
    no_network_policy: bool = False
    allow_unpinned: bool = Field(False, description="Accept a branch name as revision.")


def spec_from_options(o: RenderOptions) -> DeploySpec:
    """A DeploySpec from `deploy render`'s options (the planner sizes every instance)."""
    from serve_pruned.hub.transfer import parse_repo_spec

    repo, revision = parse_repo_spec(o.model)
    if revision is None:
        raise UsageError("--model needs a revision: REPO@REVISION (a commit sha or tag)",
                         hint="pin what the pods pull, e.g. --model my-org/smollm2-pruned@v1")
    fp = footprint_for(o.model, o.model_dir)
    mode: Mode = o.mode or ("cpu" if not o.gpu_type else "mig" if "-MIG-" in o.gpu_type else "colocated")
    images = Images(pull_policy=o.pull_policy, **{k: v for k, v in (
        ("vllm", o.vllm_image), ("vllm_cpu", o.vllm_cpu_image), ("serve_pruned", o.serve_pruned_image)) if v})
    autoscaling = Autoscaling(kind=o.autoscaling, min_replicas=o.min_replicas, max_replicas=o.max_replicas,
                              target_waiting=o.target_waiting)
    pods = o.replicas if o.autoscaling == "none" else o.min_replicas
    cache = Cache(kind=o.cache_kind, size=o.cache_size, storage_class_name=o.storage_class,
                  access_mode="ReadWriteMany" if pods > 1 or o.autoscaling != "none" else "ReadWriteOnce")
    spec = from_plan(
        fp, repo=repo, revision=revision, mode=mode, gpu_type=o.gpu_type if mode != "cpu" else None,
        instances_per_gpu=o.instances_per_gpu, replicas=pods, max_model_len=o.max_model_len,
        concurrency=o.concurrency, kv_cache_dtype=o.kv_cache_dtype, dtype=_dtype(o.model_dir),
        cpu_memory_bytes=_bytes(o.cpu_memory),
        allow_unpinned=o.allow_unpinned, name=o.name, namespace=o.namespace, images=images, cache=cache,
        hf_token=None if o.no_hf_token else TokenSecret(name=o.hf_token_secret),
        hf_endpoint=o.hf_endpoint, autoscaling=autoscaling,
        monitoring=Monitoring(service_monitor=o.service_monitor, pod_monitor=o.pod_monitor,
                              prometheus_rule=o.prometheus_rule, release=o.prometheus_release),
        network_policy=NetworkPolicySpec(enabled=not o.no_network_policy))
    if spec.gpu is not None and o.sharing != spec.gpu.sharing:
        spec.gpu = spec.gpu.model_copy(update={"sharing": o.sharing})
    return spec


def _bytes(text: str) -> int:
    units = {"gib": 1 << 30, "mib": 1 << 20, "gb": 10**9, "mb": 10**6, "": 1}
    t = text.strip().lower()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: len(t) - len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: len(t) - len(unit)]) * mult)
    raise UsageError(f"--cpu-memory {text!r} is not a size", hint="pass a size such as 16GiB or 12000MB")


def footprint_for(model: str, model_dir: Path | None) -> ModelFootprint:
    """The model's footprint from --model-dir, else from a folder `serve-pruned pull`/`serve` left in the cache."""
    from serve_pruned.cache import pulled_dir
    from serve_pruned.hub.transfer import parse_repo_spec
    from serve_pruned.manifest import MANIFEST_NAME

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
