"""The one table from option names to vLLM's command-line flags (local serving and Kubernetes).

``serve`` (``VLLMServer.command``), the planner (``memory.plan``) and the Kubernetes manifests
(``serve_pruned.kube``) all spell vLLM's flags through this table, so a flag renamed by a vLLM
release is changed in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

# Order is the order flags appear on a command line (stable output for diffs and tests).
VLLM_FLAGS: dict[str, str] = {
    "model": "--model",
    "served_model_name": "--served-model-name",
    "host": "--host",
    "port": "--port",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs",
    "kv_cache_dtype": "--kv-cache-dtype",
    "kv_cache_memory_bytes": "--kv-cache-memory-bytes",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "enforce_eager": "--enforce-eager",
}

FLAG_FIELDS: dict[str, str] = {flag: name for name, flag in VLLM_FLAGS.items()}


def vllm_args(values: Mapping[str, str | int | float | bool | None]) -> list[str]:
    """``["--flag", "value", ...]`` for the named options; None and False are left out, True is a bare flag.

    Raises:
        KeyError: a name the table does not know (a typo must not become a silently dropped flag).
    """
    unknown = set(values) - set(VLLM_FLAGS)
    if unknown:
        raise KeyError(f"no vLLM flag for {sorted(unknown)}")
    args: list[str] = []
    for name, flag in VLLM_FLAGS.items():
        value = values.get(name)
        if value is None or value is False:
            continue
        args += [flag] if value is True else [flag, str(value)]
    return args
