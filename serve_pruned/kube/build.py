"""DeploySpec -> Kubernetes objects as plain dicts (dumped with ``yaml.safe_dump_all``; no templating).

The Helm chart in deploy/helm/serve-pruned renders the same objects from the same values; a test
compares the two outputs object by object.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from serve_pruned.errors import ManifestError
from serve_pruned.kube.spec import MODELS_MOUNT, DeploySpec
from serve_pruned.serving.flags import vllm_args

Obj = dict[str, Any]
ANNOTATION = "serve-pruned.io"
RULES_FILE = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"
UID = 10001  # a high UID no host account uses (checkov CKV_K8S_40)
TOKEN_DIR = "/var/run/secrets/hf"
TARGETS_DIR = "/etc/serve-pruned"

# Deliberate checkov skips, each with its reason; rendered as `checkov.io/skipN` annotations.
CHECKOV_SKIPS: dict[str, str] = {
    "CKV_K8S_43": "images are pinned by version tag (vLLM's tag is the release we test); pass a name@sha256 "
                  "image to pin a digest for your registry",
}
KIND_SKIPS: dict[str, str] = {
    "CKV_K8S_15": "kind loads locally built images into the node; pulling them (Always) would fail",
}


def labels(spec: DeploySpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "serve-pruned", "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/managed-by": "serve-pruned"}


def selector(spec: DeploySpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "serve-pruned", "app.kubernetes.io/instance": spec.name}


def _meta(spec: DeploySpec, name: str, *, extra_labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None, namespace: str | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace or spec.namespace, "labels": {**labels(spec),
                                                                                   **(extra_labels or {})}}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _skips(spec: DeploySpec) -> dict[str, str]:
    skips = dict(CHECKOV_SKIPS)
    if spec.images.pull_policy != "Always":
        skips.update(KIND_SKIPS)
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(sorted(skips.items()), 1)}


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(cpu: str, memory: str, extra: dict[str, Any] | None = None) -> Obj:
    req = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"requests": dict(req), "limits": dict(req)}


def _mib(n_bytes: int) -> str:
    return f"{math.ceil(n_bytes / (1 << 20))}Mi"


def vllm_port(spec: DeploySpec, i: int) -> int:
    return spec.vllm.port + i


def _health_gate(port: int, seconds: int) -> list[str]:
    """postStart hook: the kubelet starts the pod's next container only when this returns, so co-located
    instances start one at a time and each start-up check sees the previous one's real footprint. It
    always exits 0: the startup probe, not the hook, decides whether a slow instance is failing."""
    code = ("import time,urllib.request as u\n"
            f"end=time.time()+{seconds}\n"
            "while time.time()<end:\n"
            " try:\n"
            f"  u.urlopen('http://127.0.0.1:{port}/health',timeout=2);break\n"
            " except Exception:\n"
            "  time.sleep(2)\n")
    return ["python3", "-c", code]


def _vllm_container(spec: DeploySpec, i: int) -> Obj:
    port = vllm_port(spec, i)
    v = spec.vllm
    args = vllm_args({"model": spec.model.path, "served_model_name": spec.model.repo, "host": "0.0.0.0",
                      "port": port, "dtype": v.dtype, "max_model_len": v.max_model_len,
                      "max_num_seqs": v.max_num_seqs,
                      "kv_cache_dtype": v.kv_cache_dtype if v.kv_cache_dtype != "auto" else None,
                      "kv_cache_memory_bytes": v.kv_cache_memory_bytes,
                      "gpu_memory_utilization": v.gpu_memory_utilization, "enforce_eager": v.enforce_eager})
    env = {"HF_HUB_OFFLINE": "1", "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_DO_NOT_TRACK": "1", **v.env}
    gpu = {spec.gpu_resource: 1} if spec.gpu_resource else None
    health = {"httpGet": {"path": "/health", "port": f"http-{i}"}}
    c: Obj = {
        "name": f"vllm-{i}",
        "image": spec.images.vllm if spec.gpu else spec.images.vllm_cpu,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": args,
        "env": [{"name": k, "value": val} for k, val in env.items()],
        "ports": [{"name": f"http-{i}", "containerPort": port, "protocol": "TCP"}],
        "resources": _resources(spec.budget.cpu, _mib(spec.budget.host_memory_bytes), gpu),
        "startupProbe": {**health, "periodSeconds": spec.probes.period_seconds,
                         "failureThreshold": math.ceil(spec.probes.load_seconds / spec.probes.period_seconds)},
        "readinessProbe": {**health, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**health, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3},
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "tmp", "mountPath": "/tmp", "subPath": f"vllm-{i}"}],
        "securityContext": _container_security(),
    }
    if i < spec.containers_per_pod - 1:
        c["lifecycle"] = {"postStart": {"exec": {"command": _health_gate(port, spec.probes.load_seconds)}}}
    return c


def _pull_container(spec: DeploySpec) -> Obj:
    env = {"HF_HOME": f"{MODELS_MOUNT}/.hf", "HOME": "/tmp", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if spec.hf_endpoint:
        env["HF_ENDPOINT"] = spec.hf_endpoint
    mounts: list[Obj] = [{"name": "models", "mountPath": MODELS_MOUNT}, {"name": "tmp", "mountPath": "/tmp",
                                                                         "subPath": "pull"}]
    if spec.hf_token is not None:
        # A file, not an env var: huggingface_hub reads HF_TOKEN_PATH, and env vars leak into crash dumps.
        env["HF_TOKEN_PATH"] = f"{TOKEN_DIR}/{spec.hf_token.key}"
        mounts.append({"name": "hf-token", "mountPath": TOKEN_DIR, "readOnly": True})
    return {
        "name": "pull",
        "image": spec.images.serve_pruned,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["serve-pruned"],
        # --overwrite: the Hub cache on the volume makes a re-pull a local copy, and every start re-verifies
        # every file's sha256 against the manifest before vLLM may read the folder.
        "args": ["pull", spec.model.spec, spec.model.path, "--overwrite"],
        "env": [{"name": k, "value": val} for k, val in env.items()],
        "resources": _resources("1", "1Gi"),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }


def _exporter_container(spec: DeploySpec) -> Obj:
    probe = {"tcpSocket": {"port": "metrics"}, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3}
    return {
        "name": "exporter",
        "image": spec.images.serve_pruned,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["serve-pruned"],
        "args": ["metrics", "exporter", "--targets", f"{TARGETS_DIR}/targets.yaml", "--host", "0.0.0.0",
                 "--port", str(spec.exporter.port), "--max-model-len", str(spec.vllm.max_model_len),
                 "--concurrency", str(spec.vllm.max_num_seqs)],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "metrics", "containerPort": spec.exporter.port, "protocol": "TCP"}],
        "resources": _resources("200m", "256Mi"),
        "readinessProbe": dict(probe),
        "livenessProbe": dict(probe),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
                         {"name": "exporter-targets", "mountPath": TARGETS_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp", "subPath": "exporter"}],
        "securityContext": _container_security(),
    }


def exporter_targets(spec: DeploySpec) -> list[dict[str, str]]:
    return [{"url": f"http://127.0.0.1:{vllm_port(spec, i)}", "model_dir": spec.model.path, "name": f"vllm-{i}",
             "gpu": "cpu" if spec.gpu is None else str(i if spec.instances_per_gpu == 1 else 0)}
            for i in range(spec.containers_per_pod)]


def pod_annotations(spec: DeploySpec) -> dict[str, str]:
    """What our own checks read back from any rendering (ours or Helm's): model, device, byte budget."""
    a = {f"{ANNOTATION}/model": spec.model.spec,
         f"{ANNOTATION}/device": spec.gpu.type if spec.gpu else "cpu",
         f"{ANNOTATION}/instances-per-device": str(spec.instances_per_gpu),
         f"{ANNOTATION}/instance-bytes": str(spec.budget.instance_bytes)}
    if spec.model.allow_unpinned:
        a[f"{ANNOTATION}/allow-unpinned"] = "true"
    return a


def _volumes(spec: DeploySpec) -> list[Obj]:
    models: Obj = ({"name": "models", "persistentVolumeClaim": {"claimName": f"{spec.name}-models"}}
                   if spec.cache.kind == "pvc" else {"name": "models", "emptyDir": {"sizeLimit": spec.cache.size}})
    vols = [models, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}]
    if spec.hf_token is not None:
        vols.append({"name": "hf-token", "secret": {"secretName": spec.hf_token.name, "optional": True,
                                                    "defaultMode": 0o440}})
    if spec.exporter.enabled:
        vols.append({"name": "exporter-targets", "configMap": {"name": f"{spec.name}-exporter-targets"}})
    return vols


def deployment(spec: DeploySpec) -> Obj:
    containers = [_vllm_container(spec, i) for i in range(spec.containers_per_pod)]
    if spec.exporter.enabled:
        containers.append(_exporter_container(spec))
    pod: Obj = {
        "serviceAccountName": spec.name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [_pull_container(spec)],
        "containers": containers,
        "volumes": _volumes(spec),
    }
    if spec.gpu is not None:
        if spec.gpu.node_selector:
            pod["nodeSelector"] = dict(spec.gpu.node_selector)
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    template_annotations = pod_annotations(spec)
    if spec.exporter.enabled:
        template_annotations |= {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.exporter.port)}
    dep_spec: Obj = {
        "selector": {"matchLabels": selector(spec)},
        # No surge: a rollout must not need a spare GPU; one pod at a time is replaced.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "template": {"metadata": {"labels": {**labels(spec), "app.kubernetes.io/component": "vllm"},
                                  "annotations": template_annotations},
                     "spec": pod},
    }
    if spec.autoscaling.kind == "none":
        # Left out under an autoscaler: every apply would otherwise reset the replicas it chose.
        dep_spec = {"replicas": spec.replicas, **dep_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(spec, spec.name, extra_labels={"app.kubernetes.io/component": "vllm"},
                              annotations=_skips(spec)),
            "spec": dep_spec}


def _http_ports(spec: DeploySpec) -> list[int]:
    return [vllm_port(spec, i) for i in range(spec.containers_per_pod)]


def service(spec: DeploySpec) -> Obj:
    ports = [{"name": f"http-{i}", "port": p, "targetPort": f"http-{i}", "protocol": "TCP"}
             for i, p in enumerate(_http_ports(spec))]
    if spec.exporter.enabled:
        ports.append({"name": "metrics", "port": spec.exporter.port, "targetPort": "metrics", "protocol": "TCP"})
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, spec.name),
            "spec": {"type": "ClusterIP", "selector": selector(spec), "ports": ports}}


def network_policy(spec: DeploySpec) -> Obj:
    http = [{"protocol": "TCP", "port": p} for p in _http_ports(spec)]
    clients: list[Obj] = [{"podSelector": {}}] + [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
        for ns in spec.network_policy.client_namespaces]
    scrape = http + ([{"protocol": "TCP", "port": spec.exporter.port}] if spec.exporter.enabled else [])
    monitoring = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": spec.network_policy.monitoring_namespace}}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(spec, spec.name),
            "spec": {"podSelector": {"matchLabels": selector(spec)}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": clients, "ports": http}, {"from": [monitoring], "ports": scrape}],
                     # DNS, and HTTPS for the init container's pull from the Hub (or a mirror).
                     "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                                {"ports": [{"protocol": "TCP", "port": 443}]}]}}


def _monitor_endpoints(spec: DeploySpec) -> list[Obj]:
    eps = [{"port": "metrics", "path": "/metrics", "interval": spec.monitoring.interval}] if spec.exporter.enabled \
        else []
    return eps + [{"port": f"http-{i}", "path": "/metrics", "interval": spec.monitoring.interval}
                  for i in range(spec.containers_per_pod)]


def prometheus_rules() -> list[Obj]:
    if not RULES_FILE.is_file():
        raise ManifestError(f"{RULES_FILE} is missing", path=str(RULES_FILE),
                            hint="render from a serve_pruned checkout, or leave the PrometheusRule out")
    groups: list[Obj] = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return groups


def device_plugin_config(spec: DeploySpec) -> Obj:
    """The NVIDIA device plugin's sharing config: instancesPerGpu slots per GPU (or MIG slice)."""
    assert spec.gpu is not None and spec.gpu_resource is not None  # only called for shared devices
    base = spec.gpu_resource.removesuffix(".shared")
    key = "timeSlicing" if spec.gpu.sharing == "time-slicing" else "mps"
    config = {"version": "v1", "sharing": {key: {"renameByDefault": True, "resources": [
        {"name": base, "replicas": spec.instances_per_gpu}]}}}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(spec, f"{spec.name}-gpu-sharing", namespace=spec.gpu.device_plugin_namespace,
                              extra_labels={"app.kubernetes.io/component": "gpu-sharing"}),
            "data": {spec.name: yaml.safe_dump(config, sort_keys=False)}}


def build(spec: DeploySpec) -> list[Obj]:
    """Every object of the deployment, in the order `kubectl apply` should see them."""
    pss = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}
    objs: list[Obj] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": spec.namespace, "labels": {**labels(spec), **pss}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, spec.name),
         "automountServiceAccountToken": False},
    ]
    if spec.gpu is not None and spec.instances_per_gpu > 1:
        objs.append(device_plugin_config(spec))
    if spec.exporter.enabled:
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{spec.name}-exporter-targets"),
                     "data": {"targets.yaml": yaml.safe_dump(exporter_targets(spec), sort_keys=False)}})
    if spec.cache.kind == "pvc":
        pvc: Obj = {"accessModes": [spec.cache.access_mode], "resources": {"requests": {"storage": spec.cache.size}}}
        if spec.cache.storage_class_name:
            pvc["storageClassName"] = spec.cache.storage_class_name
        objs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": _meta(spec, f"{spec.name}-models"), "spec": pvc})
    objs += [deployment(spec), service(spec),
             {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(spec, spec.name),
              "spec": {"maxUnavailable": spec.pdb_max_unavailable, "selector": {"matchLabels": selector(spec)}}}]
    if spec.network_policy.enabled:
        objs.append(network_policy(spec))
    mon, release = spec.monitoring, {"release": spec.monitoring.release}
    # ServiceMonitor and PodMonitor differ only in kind and in the name of their endpoint list
    for on, kind, endpoints in ((mon.service_monitor, "ServiceMonitor", "endpoints"),
                                (mon.pod_monitor, "PodMonitor", "podMetricsEndpoints")):
        if on:
            objs.append({"apiVersion": "monitoring.coreos.com/v1", "kind": kind,
                         "metadata": _meta(spec, spec.name, extra_labels=release),
                         "spec": {"selector": {"matchLabels": selector(spec)},
                                  "namespaceSelector": {"matchNames": [spec.namespace]},
                                  endpoints: _monitor_endpoints(spec)}})
    if mon.prometheus_rule:
        objs.append({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                     "metadata": _meta(spec, spec.name, extra_labels=release),
                     "spec": {"groups": prometheus_rules()}})
    a = spec.autoscaling
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name}
    if a.kind == "hpa":
        # prometheus-adapter exposes vllm:num_requests_waiting as vllm_num_requests_waiting (':' is not
        # allowed in custom-metric names); its rule is in docs/deploy-cluster.md.
        objs.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                     "metadata": _meta(spec, spec.name),
                     "spec": {"scaleTargetRef": target, "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas,
                              "metrics": [{"type": "Pods", "pods": {
                                  "metric": {"name": "vllm_num_requests_waiting"},
                                  "target": {"type": "AverageValue", "averageValue": str(a.target_waiting)}}}],
                              "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}})
    elif a.kind == "keda":
        query = f'sum(vllm:num_requests_waiting{{namespace="{spec.namespace}",pod=~"{spec.name}-.*"}})'
        objs.append({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(spec, spec.name),
                     "spec": {"scaleTargetRef": {"name": spec.name}, "minReplicaCount": a.min_replicas,
                              "maxReplicaCount": a.max_replicas, "cooldownPeriod": 600,
                              "triggers": [{"type": "prometheus", "metadata": {
                                  "serverAddress": a.prometheus_address, "query": query,
                                  "threshold": str(a.target_waiting)}}]}})
    return objs


class _Dumper(yaml.SafeDumper):
    """SafeDumper without YAML anchors: objects that share a sub-dict must still read as plain manifests."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(objs: list[Obj]) -> str:
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, width=1000)


def file_name(i: int, obj: Obj) -> str:
    return f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
