"""Checks linters miss, run on any rendering (ours, the Helm chart's, a user's edited YAML).

* every GPU-like extended resource has limit == request (and is in limits);
* every vLLM container mounts /dev/shm from a memory-backed emptyDir;
* co-located instances fit their device: instances per device x planned bytes <= the device's memory
  (from the planner's catalog, not from the YAML), the utilisation flags add up to at most 1, each KV
  cache fits its instance, and the resource is a MIG slice of the profile named, or a shared slot when
  several instances share one device (with the device plugin's replicas equal to that count);
* HF_TOKEN is never an inline value; images are pinned (tag other than latest, or digest);
* the model revision is pinned (a commit sha or tag) unless ``allow-unpinned`` is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from serve_pruned.errors import ManifestCheckError, UsageError
from serve_pruned.kube.build import ANNOTATION
from serve_pruned.kube.spec import image_is_pinned, revision_is_pinned
from serve_pruned.serving.flags import VLLM_FLAGS
from serve_pruned.serving.memory import BACKENDS, gpu

Obj = dict[str, Any]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
GPU_PREFIXES = ("nvidia.com/", "amd.com/gpu", "gpu.intel.com/")
TOKEN_VARS = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}


def _pod_templates(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for o in objs:
        if o.get("kind") in WORKLOADS:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]


def _flag(args: list[str], name: str) -> str | None:
    flag = VLLM_FLAGS[name]
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _is_vllm(c: Obj) -> bool:
    return "vllm" in c.get("image", "").split("/")[-1] or any("vllm.entrypoints" in a for a in c.get("command", []))


def _gpu_findings(where: str, c: Obj) -> list[str]:
    out = []
    res = c.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for name in sorted(set(req) | set(lim)):
        if name.startswith(GPU_PREFIXES) and str(req.get(name, lim.get(name))) != str(lim.get(name)):
            out.append(f"{where} container {c['name']}: {name} request {req.get(name)} != limit {lim.get(name)}")
    return out


def _shm_findings(where: str, c: Obj, volumes: dict[str, Obj]) -> list[str]:
    for m in c.get("volumeMounts") or []:
        if m.get("mountPath") == "/dev/shm":
            vol = volumes.get(m["name"], {})
            if (vol.get("emptyDir") or {}).get("medium") == "Memory":
                return []
            return [f"{where} container {c['name']}: /dev/shm is not a memory-backed emptyDir"]
    return [f"{where} container {c['name']}: no /dev/shm volume (NCCL and vLLM's workers need shared memory)"]


def _budget_findings(where: str, template: Obj, vllm: list[Obj], sharing: dict[str, int]) -> list[str]:
    ann = (template.get("metadata") or {}).get("annotations") or {}
    device = ann.get(f"{ANNOTATION}/device")
    if device is None:
        return [f"{where}: no {ANNOTATION}/device annotation: the byte budget cannot be checked"]
    if device == "cpu":
        return []
    try:
        dev = gpu(device)
        per_device = int(ann[f"{ANNOTATION}/instances-per-device"])
        instance = int(ann[f"{ANNOTATION}/instance-bytes"])
    except (KeyError, ValueError, UsageError) as exc:
        return [f"{where}: unreadable budget annotations ({exc})"]
    out = []
    usable = int(dev.memory_bytes * (1 - BACKENDS["cuda"].safety_fraction))
    if per_device * instance > usable:
        out.append(f"{where}: {per_device} instance(s) x {instance} B = {per_device * instance} B exceed "
                   f"{device}'s usable {usable} B")
    profile = device.split("-MIG-", 1)[1] if "-MIG-" in device else None
    want = f"nvidia.com/mig-{profile}" if profile else "nvidia.com/gpu"
    if per_device > 1:
        want += ".shared"
    if len(vllm) > per_device:
        out.append(f"{where}: {len(vllm)} vLLM containers in one pod but {per_device} instance(s) per device")
    for c in vllm:
        limits = (c.get("resources") or {}).get("limits") or {}
        gpus = {k: v for k, v in limits.items() if k.startswith(GPU_PREFIXES)}
        if gpus != {want: 1}:
            out.append(f"{where} container {c['name']}: GPU resources {gpus or 'none'}; {device} with "
                       f"{per_device} instance(s) per device needs exactly {{{want}: 1}}")
        args = [str(a) for a in c.get("args") or []]
        kv, util = _flag(args, "kv_cache_memory_bytes"), _flag(args, "gpu_memory_utilization")
        if kv is None or util is None:
            out.append(f"{where} container {c['name']}: co-located vLLM needs {VLLM_FLAGS['kv_cache_memory_bytes']} "
                       f"and {VLLM_FLAGS['gpu_memory_utilization']} (sizes in bytes)")
            continue
        if int(kv) > instance:
            out.append(f"{where} container {c['name']}: KV cache {kv} B exceeds the instance budget {instance} B")
        if float(util) * per_device > 1.0 + 1e-9:
            out.append(f"{where} container {c['name']}: {per_device} x --gpu-memory-utilization {util} > 1")
        if float(util) * dev.memory_bytes < instance:
            out.append(f"{where} container {c['name']}: --gpu-memory-utilization {util} of {device} is below "
                       f"the instance's {instance} B")
    base = want.removesuffix(".shared")
    if per_device > 1 and base in sharing and sharing[base] != per_device:
        out.append(f"{where}: the device plugin splits {base} into {sharing[base]} slots, not {per_device}")
    return out


def _sharing_replicas(objs: list[Obj]) -> dict[str, int]:
    """Resource name -> replicas from NVIDIA device plugin sharing configs among the objects."""
    found: dict[str, int] = {}
    for o in objs:
        if o.get("kind") != "ConfigMap":
            continue
        for text in (o.get("data") or {}).values():
            try:
                cfg = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            sharing = cfg.get("sharing") if isinstance(cfg, dict) else None
            for how in (sharing or {}).values():
                for r in (how or {}).get("resources") or []:
                    found[r["name"]] = int(r["replicas"])
                    found[r["name"] + ".shared"] = int(r["replicas"])
    return found


def check(objs: list[Obj]) -> list[str]:
    """Findings (empty when every rule holds) for a list of Kubernetes objects."""
    out: list[str] = []
    sharing = _sharing_replicas(objs)
    templates = list(_pod_templates(objs))
    if not templates:
        return ["no workload (Deployment, StatefulSet, ...) among the objects"]
    for where, template in templates:
        pod = template.get("spec") or {}
        ann = (template.get("metadata") or {}).get("annotations") or {}
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
        vllm = [c for c in pod.get("containers") or [] if _is_vllm(c)]
        for c in containers:
            out += _gpu_findings(where, c)
            if not image_is_pinned(c.get("image", "")):
                out.append(f"{where} container {c['name']}: image {c.get('image')!r} is not pinned")
            for e in c.get("env") or []:
                if e.get("name") in TOKEN_VARS and "secretKeyRef" not in (e.get("valueFrom") or {}):
                    out.append(f"{where} container {c['name']}: {e['name']} is set inline; reference a Secret")
        for c in vllm:
            out += _shm_findings(where, c, volumes)
            if "startupProbe" not in c:
                out.append(f"{where} container {c['name']}: no startupProbe (liveness would kill a slow load)")
        out += _budget_findings(where, template, vllm, sharing)
        model = ann.get(f"{ANNOTATION}/model", "")
        revision = model.partition("@")[2]
        if not revision:
            out.append(f"{where}: no pinned model revision ({ANNOTATION}/model is {model!r})")
        elif not revision_is_pinned(revision) and ann.get(f"{ANNOTATION}/allow-unpinned") != "true":
            out.append(f"{where}: model revision {revision!r} is a branch; pin a commit sha or tag")
    for o in objs:
        if o.get("kind") == "Secret" and (o.get("data") or o.get("stringData")):
            out.append(f"Secret/{o['metadata']['name']}: rendered with its data; create Secrets out of band")
    return out


def check_or_raise(objs: list[Obj]) -> None:
    findings = check(objs)
    if findings:
        raise ManifestCheckError(findings)
