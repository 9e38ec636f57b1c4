"""serve_pruned.kube: the typed spec, the objects built from it, our own checks, and `deploy` (fast)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from serve_pruned.cli.main import cli
from serve_pruned.errors import KubectlError
from serve_pruned.kube import build, check, from_plan
from serve_pruned.kube.apply import apply
from serve_pruned.kube.spec import DeploySpec, Images, ModelRef
from serve_pruned.serving.flags import VLLM_FLAGS, vllm_args
from serve_pruned.serving.memory import gpu, plan

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MODEL_DIR = ROOT / "k8s" / "example-model"
MODEL = ["--model", "my-org/smollm2-p75-w8a8@v1", "--model-dir", str(EXAMPLE_MODEL_DIR)]


def spec_for(footprint, mode: str, gpu_type: str | None = None, n: int = 2, **kw) -> DeploySpec:
    kw.setdefault("replicas", 1)
    return from_plan(footprint, repo="my-org/smollm2", revision="v1", mode=mode, gpu_type=gpu_type,
                     instances_per_gpu=n, max_model_len=4096, concurrency=16, **kw)


def deployment(objs):
    return next(o for o in objs if o["kind"] == "Deployment")


def vllm_containers(objs):
    return [c for c in deployment(objs)["spec"]["template"]["spec"]["containers"] if c["name"].startswith("vllm-")]


def test_flag_table_is_the_one_spelling():
    assert vllm_args({"port": 8001, "model": "/m", "enforce_eager": True, "kv_cache_memory_bytes": None}) == [
        "--model", "/m", "--port", "8001", "--enforce-eager"]
    with pytest.raises(KeyError):
        vllm_args({"max_model_length": 1})  # a typo must not become a silently dropped flag
    from serve_pruned.serving.vllm import VLLMServer

    cmd = VLLMServer("/m", 8000, serve_python=Path("/py"), max_model_len=512).command()
    assert cmd[3:] == ["--model", "/m", "--host", "127.0.0.1", "--port", "8000", "--dtype", "bfloat16",
                       "--max-model-len", "512", "--enforce-eager"]


@pytest.mark.parametrize(("mode", "gpu_type", "n", "resource"), [
    ("colocated", "L4", 3, "nvidia.com/gpu.shared"),
    ("colocated", "H100-80GB", 1, "nvidia.com/gpu"),
    ("shared", "L4", 2, "nvidia.com/gpu.shared"),
    ("mig", "H100-80GB-MIG-1g.10gb", 2, "nvidia.com/mig-1g.10gb.shared"),
])
def test_gpu_modes_are_sized_by_the_planner(footprint, mode, gpu_type, n, resource):
    spec = spec_for(footprint, mode, gpu_type, n, replicas=2)
    objs = build(spec)
    assert check(objs) == []
    p = plan(footprint, device=gpu(gpu_type).name, max_model_len=4096, concurrency=16, instances=n)
    containers = vllm_containers(objs)
    assert len(containers) == (1 if mode == "shared" else n)
    for i, c in enumerate(containers):
        res = c["resources"]
        assert res["limits"][resource] == res["requests"][resource] == 1
        args = c["args"]
        assert args[args.index("--port") + 1] == str(8000 + i)
        for flag, value in p.instance.flags.items():  # the planner's flags, spelled by the one table
            assert args[args.index(flag) + 1] == value
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
        # the kubelet starts the next co-located container only after this one answers /health
        assert ("lifecycle" in c) == (i < len(containers) - 1)
    assert n * p.instance.total <= gpu(gpu_type).memory_bytes
    sharing = [o for o in objs if o["metadata"]["name"].endswith("-gpu-sharing")]
    if n > 1:
        cfg = yaml.safe_load(next(iter(sharing[0]["data"].values())))
        assert cfg["sharing"]["timeSlicing"]["resources"] == [{"name": resource.removesuffix(".shared"),
                                                               "replicas": n}]
    else:
        assert sharing == []


def test_an_fp8_kv_cache_reaches_vllm_and_the_planner_fits_more(footprint):
    """`--kv-cache-dtype fp8`: one byte per K/V element, so the planner fills the GPU with more instances, and
    every container is told so (vLLM sizes its KV cache in the same dtype)."""
    auto = from_plan(footprint, repo="my-org/smollm2", revision="v1", mode="colocated", gpu_type="L4",
                     max_model_len=4096, concurrency=16)
    fp8 = from_plan(footprint, repo="my-org/smollm2", revision="v1", mode="colocated", gpu_type="L4",
                    max_model_len=4096, concurrency=16, kv_cache_dtype="fp8")
    assert fp8.instances_per_gpu > auto.instances_per_gpu
    assert fp8.budget.kv_cache_bytes * 2 == auto.budget.kv_cache_bytes
    objs = build(fp8)
    assert check(objs) == []
    for c in vllm_containers(objs):
        assert c["args"][c["args"].index("--kv-cache-dtype") + 1] == "fp8"
    assert all("--kv-cache-dtype" not in c["args"] for c in vllm_containers(build(auto)))


def test_cpu_mode_uses_vllm_cpu_and_host_memory(footprint):
    spec = spec_for(footprint, "cpu", n=2, cpu_memory_bytes=12 << 30)
    objs = build(spec)
    assert check(objs) == []
    for c in vllm_containers(objs):
        assert c["image"] == spec.images.vllm_cpu
        assert not any(k.startswith("nvidia.com") for k in c["resources"]["limits"])
        assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": spec.vllm.env["VLLM_CPU_KVCACHE_SPACE"]} in c["env"]
        assert int(c["resources"]["limits"]["memory"].removesuffix("Mi")) << 20 >= spec.budget.instance_bytes


def test_pod_security_token_and_shm(footprint):
    objs = build(spec_for(footprint, "colocated", "L4", 3))
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["resources"]["limits"] == c["resources"]["requests"]
        assert all(e["name"] not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") for e in c.get("env", []))
    pull = pod["initContainers"][0]
    assert pull["args"] == ["pull", "my-org/smollm2@v1", "/models/my-org--smollm2--v1", "--overwrite"]
    assert {"name": "HF_TOKEN_PATH", "value": "/var/run/secrets/hf/token"} in pull["env"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["hf-token"]["secret"] == {"secretName": "hf-token", "optional": True, "defaultMode": 0o440}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert not any(o["kind"] == "Secret" for o in objs)


def test_spec_refuses_what_an_admin_would(footprint):
    with pytest.raises(ValidationError, match="branch"):
        ModelRef(repo="a/b", revision="main")
    assert ModelRef(repo="a/b", revision="main", allow_unpinned=True).revision == "main"
    assert ModelRef(repo="a/b", revision="0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(ValidationError, match="not pinned"):
        Images(vllm="vllm/vllm-openai:latest")
    with pytest.raises(ValidationError, match="not pinned"):
        Images(vllm="vllm/vllm-openai")
    good = spec_for(footprint, "colocated", "L4", 2).model_dump()
    with pytest.raises(ValidationError, match="Extra inputs"):
        DeploySpec.model_validate({**good, "replicaz": 2})
    with pytest.raises(ValidationError, match="MIG"):
        DeploySpec.model_validate({**good, "mode": "mig"})
    with pytest.raises(ValidationError, match="ReadWriteOnce"):
        DeploySpec.model_validate({**good, "replicas": 3})
    # the same spec through its Helm spelling (camelCase) round-trips
    assert DeploySpec.model_validate(spec_for(footprint, "cpu").model_dump(by_alias=True)) == spec_for(footprint,
                                                                                                         "cpu")


def _mutated(objs, fn):
    objs = copy.deepcopy(objs)
    fn(deployment(objs)["spec"]["template"])
    return check(objs)


def test_checks_catch_what_linters_miss(footprint):
    objs = build(spec_for(footprint, "colocated", "L4", 3))
    assert check(objs) == []

    def limit(t):
        t["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu.shared"] = 2
    assert "request 2 != limit 1" in _mutated(objs, limit)[0]

    def no_shm(t):
        t["spec"]["containers"][1]["volumeMounts"] = [m for m in t["spec"]["containers"][1]["volumeMounts"]
                                                      if m["mountPath"] != "/dev/shm"]
    assert "vllm-1: no /dev/shm" in _mutated(objs, no_shm)[0]

    def disk_shm(t):
        next(v for v in t["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"] = {}
    assert "not a memory-backed" in _mutated(objs, disk_shm)[0]

    def too_big(t):
        t["metadata"]["annotations"]["serve-pruned.io/instance-bytes"] = str(8 << 30)
    assert any("exceed L4's usable" in f for f in _mutated(objs, too_big))

    def more_per_gpu(t):
        t["metadata"]["annotations"]["serve-pruned.io/instances-per-device"] = "4"
    assert _mutated(objs, more_per_gpu) == [
        "Deployment/serve-pruned: the device plugin splits nvidia.com/gpu into 3 slots, not 4"]

    def greedy(t):  # each instance may take 40% of the L4: three of them cannot all start
        args = t["spec"]["containers"][0]["args"]
        args[args.index("--gpu-memory-utilization") + 1] = "0.40"
    assert "3 x --gpu-memory-utilization 0.40 > 1" in _mutated(objs, greedy)[0]

    def whole_gpu(t):
        for c in t["spec"]["containers"][:3]:
            c["resources"] = {"limits": {"nvidia.com/gpu": 1}, "requests": {"nvidia.com/gpu": 1}}
    assert any("needs exactly {nvidia.com/gpu.shared: 1}" in f for f in _mutated(objs, whole_gpu))

    def inline_token(t):
        t["spec"]["initContainers"][0]["env"].append({"name": "HF_TOKEN", "value": "hf_x"})
    assert "HF_TOKEN is set inline" in _mutated(objs, inline_token)[0]

    def secret_ref(t):
        t["spec"]["initContainers"][0]["env"].append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}})
    assert _mutated(objs, secret_ref) == []

    def latest(t):
        t["spec"]["containers"][0]["image"] = "vllm/vllm-openai:latest"
    assert "is not pinned" in _mutated(objs, latest)[0]

    def branch(t):
        t["metadata"]["annotations"]["serve-pruned.io/model"] = "my-org/smollm2@main"
    assert "is a branch" in _mutated(objs, branch)[0]

    def no_bytes_flag(t):
        args = t["spec"]["containers"][2]["args"]
        i = args.index(VLLM_FLAGS["kv_cache_memory_bytes"])
        del args[i:i + 2]
    assert "needs --kv-cache-memory-bytes" in _mutated(objs, no_bytes_flag)[0]


def test_mig_budget_is_the_slice_not_the_gpu(footprint):
    objs = build(spec_for(footprint, "mig", "H100-80GB-MIG-1g.10gb", 2))
    assert check(objs) == []

    def three(t):  # 3 instances of ~3.1 GiB do not fit a 9.6 GiB slice (95% usable)
        t["metadata"]["annotations"]["serve-pruned.io/instances-per-device"] = "3"
    assert any("exceed H100-80GB-MIG-1g.10gb's usable" in f for f in _mutated(objs, three))
    with pytest.raises(Exception, match="at most 2 fit"):
        spec_for(footprint, "mig", "H100-80GB-MIG-1g.10gb", 3)


def test_render_cli_writes_a_kustomize_folder(tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["deploy", "render", *MODEL, "--gpu", "L4", "--instances-per-gpu", "2",
                                 "--service-monitor", "-o", str(out), "--values-out", str(tmp_path / "v.yaml")])
    assert r.exit_code == 0, r.output
    kust = yaml.safe_load((out / "kustomization.yaml").read_text())
    kinds = [yaml.safe_load((out / f).read_text())["kind"] for f in kust["resources"]]
    assert kinds[0] == "Namespace" and "Deployment" in kinds and "ServiceMonitor" in kinds
    values = yaml.safe_load((tmp_path / "v.yaml").read_text())
    assert values["instancesPerGpu"] == 2 and values["gpu"]["type"] == "L4"
    assert DeploySpec.model_validate(values).instances_per_gpu == 2


def test_render_cli_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["deploy", "render", "--model", "my-org/x@v1", "--model-dir", str(tmp_path),
                                 "-o", "-"])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0
    assert "no footprint for my-org/x@v1" in r.output and "--model-dir" in r.output
    r = CliRunner().invoke(cli, ["deploy", "render", "--model", "my-org/x", "-o", "-"])
    assert r.exit_code == 2 and "needs a revision" in r.output
    r = CliRunner().invoke(cli, ["deploy", "render", *MODEL[:1], "my-org/x@main", *MODEL[2:], "-o", "-"])
    assert r.exit_code == 1 and "is a branch" in r.output
    r = CliRunner().invoke(cli, ["deploy", "render", *MODEL, "--gpu", "L4", "--instances-per-gpu", "40", "-o", "-"])
    assert r.exit_code == 1 and "at most" in r.output


def test_render_needs_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom serve_pruned.cli.main import cli\n"
            f"r = CliRunner().invoke(cli, ['deploy', 'render', *{MODEL!r}, '--gpu', 'L4', '-o', '-'])\n"
            "assert r.exit_code == 0, r.output\nassert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


class FakeKubectl:
    def __init__(self, *results: tuple[int, str, str]) -> None:
        self.results = list(results)
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv, *, input=None, timeout=None):
        self.calls.append((argv, input))
        rc, out, err = self.results.pop(0)
        return subprocess.CompletedProcess(argv, rc, out, err)


def test_apply_is_server_side_then_waits_for_rollout(footprint):
    objs = build(spec_for(footprint, "cpu"))
    k = FakeKubectl((0, "deployment.apps/serve-pruned serverside-applied\n", ""),
                    (0, 'deployment "serve-pruned" successfully rolled out\n', ""))
    result = apply(objs, kubectl="kubectl", runner=k, context="kind-kind", timeout_s=300)
    assert k.calls[0][0] == ["kubectl", "--context=kind-kind", "apply", "--server-side",
                             "--field-manager=serve-pruned", "-f", "-"]
    assert [o["kind"] for o in yaml.safe_load_all(k.calls[0][1])] == [o["kind"] for o in objs]
    assert k.calls[1][0] == ["kubectl", "--context=kind-kind", "rollout", "status", "deployment/serve-pruned",
                             "-n", "serve-pruned", "--timeout=300s"]
    assert result.rollouts == {"serve-pruned/deployment/serve-pruned":
                               'deployment "serve-pruned" successfully rolled out'}

    dry = FakeKubectl((0, "namespace/serve-pruned serverside-applied (server dry run)\n", ""))
    assert apply(objs, runner=dry, dry_run=True).rollouts == {}
    assert dry.calls[0][0][-1] == "--dry-run=server" and len(dry.calls) == 1

    down = FakeKubectl((1, "", "E1 memcache.go: couldn't get current server API group list: Get "
                              "\"https://127.0.0.1:1/api\": dial tcp 127.0.0.1:1: connect: connection refused\n"
                              "The connection to the server 127.0.0.1:1 was refused - did you specify the right "
                              "host or port?\n"))
    with pytest.raises(KubectlError, match="no Kubernetes cluster reachable: The connection to the server"):
        apply(objs, runner=down)
    refused = FakeKubectl((1, "", 'Error from server (Forbidden): namespaces "serve-pruned" is forbidden\n'))
    with pytest.raises(KubectlError, match=r"kubectl apply failed: Error from server \(Forbidden\)"):
        apply(objs, runner=refused)


def test_committed_k8s_tree_is_the_generated_one(tmp_path):
    import shutil

    shutil.copytree(EXAMPLE_MODEL_DIR, tmp_path / "k8s" / "example-model")
    chart = tmp_path / "chart"
    chart.mkdir()
    r = CliRunner().invoke(cli, ["deploy", "kustomize", str(tmp_path / "k8s"), "--model-dir",
                                 str(tmp_path / "k8s" / "example-model"), "--chart", str(chart)])
    assert r.exit_code == 0, r.output
    fresh = {p.relative_to(tmp_path / "k8s"): p.read_text() for p in (tmp_path / "k8s").rglob("*.yaml")}
    committed = {p.relative_to(ROOT / "k8s"): p.read_text() for p in (ROOT / "k8s").rglob("*.yaml")}
    assert fresh.keys() == committed.keys(), "run: make k8s"
    for path, text in fresh.items():
        assert committed[path] == text, f"k8s/{path} is stale; run: make k8s"
    helm = ROOT / "deploy" / "helm" / "serve-pruned"
    for name in ("values.yaml", "values.schema.json"):
        assert (chart / name).read_text() == (helm / name).read_text(), f"{name} is stale; run: make k8s"


# Footprints from a 135M to an 8B model (weights, KV bytes per token, hidden, FFN, vocab), bf16 or quantized.
FOOTPRINTS = {
    "smollm2-p75-w8a8": (126_646_608, 23_040, 576, 832, 49_152),
    "smollm2": (269_030_016, 23_040, 576, 1536, 49_152),
    "tinyllama-1.1b": (2_200_119_296, 45_056, 2048, 5632, 32_000),
    "llama-3.1-8b": (16_060_522_496, 131_072, 4096, 14336, 128_256),
    "llama-3.1-8b-w4a16": (5_700_000_000, 131_072, 4096, 14336, 128_256),
}


@pytest.mark.parametrize("gpu_type", sorted(__import__("serve_pruned.serving.memory", fromlist=["GPUS"]).GPUS))
def test_planned_count_flags_and_checks_agree_by_construction(gpu_type):
    """For every GPU, model and context length the planner's default count renders manifests that pass their own
    checks, every instance's share covers its bytes, the shares add up to at most the GPU, and one more
    instance does not fit."""
    from serve_pruned.errors import UsageError
    from serve_pruned.serving.memory import ModelFootprint

    mode = "mig" if "-MIG-" in gpu_type else "colocated"
    rendered = 0
    for name, (weights, kv, hidden, ffn, vocab) in FOOTPRINTS.items():
        fp = ModelFootprint(name=name, weight_bytes=weights, kv_bytes_per_token=kv, hidden_size=hidden,
                            intermediate_size=ffn, vocab_size=vocab)
        for max_model_len in (512, 2048, 4096, 8192, 32768):
            for concurrency in (1, 16, 64):
                try:
                    p = plan(fp, device=gpu_type, max_model_len=max_model_len, concurrency=concurrency)
                except UsageError:
                    continue  # not even one fits
                n, total = p.instances, gpu(gpu_type).memory_bytes
                util = float(p.instance.flags["--gpu-memory-utilization"])
                assert n * util <= 1.0 + 1e-12 and util * total >= p.instance.total
                with pytest.raises(UsageError, match="at most"):
                    plan(fp, device=gpu_type, max_model_len=max_model_len, concurrency=concurrency, instances=n + 1)
                spec = from_plan(fp, repo="my-org/m", revision="v1", mode=mode, gpu_type=gpu_type,
                                 instances_per_gpu=None, max_model_len=max_model_len, concurrency=concurrency)
                assert spec.instances_per_gpu == n
                assert check(build(spec)) == [], (name, max_model_len, concurrency)
                rendered += 1
    assert rendered > 0


def test_render_with_no_instance_count_fills_an_h100_and_passes_its_checks(tmp_path):
    """The example a user hit: 31 SmolLM2 instances fit an H100 by bytes; the render must not then fail its own
    check by rounding each share up to 0.04."""
    r = CliRunner().invoke(cli, ["deploy", "render", *MODEL, "--gpu", "h100-80gb", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "instance(s) per H100-80GB" in r.stderr
    n = int(r.stderr.split("(")[1].split(" instance")[0])
    assert n == plan(__import__("serve_pruned.serving.memory", fromlist=["ModelFootprint"]).ModelFootprint
                     .from_folder(EXAMPLE_MODEL_DIR), device="H100-80GB", max_model_len=2048,
                     concurrency=16).max_instances
