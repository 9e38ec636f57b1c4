"""The bad-input battery: every command, fed what a new user gets wrong, as the CLI runs it.

Each case asserts what a user sees and keeps: the exit code (1 for an error, 2 for usage), exactly one
line on stderr that starts with ``error:`` and says what to do after a ``;``, no traceback and no
"report it" line (those are for our own bugs), the earlier output beside the case byte-identical and no
file or hidden folder left next to it. Cases run in-process through the same root group the console
script uses (`serve-pruned` = ``cli.main``); tests/cli/test_cli.py runs the console script itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from serve_pruned.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = ROOT / "k8s" / "example-model"


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too), with the sha256 of each file."""
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@dataclass
class Workspace:
    """One case's folder: an earlier packaged output, the tiny model, text files, a user's own folder."""

    root: Path
    model: Path
    pkg: Path  # an earlier `package` output (ours: every file in its manifest)
    calib: Path
    eval: Path
    mine: Path  # a folder of the user's own files

    def fill(self, text: str) -> str:
        return text.format(**{k: str(v) for k, v in vars(self).items()})


@pytest.fixture
def ws(tmp_path, tiny_models, text_files, earlier_package, monkeypatch) -> Workspace:
    root = tmp_path / "ws"
    model = root / "model"
    shutil.copytree(tiny_models["llama"], model)
    pkg = root / "pkg"
    shutil.copytree(earlier_package, pkg)
    mine = root / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "main.py").write_text("print('mine')\n")
    (mine / "src" / "lib.py").write_text("x = 1\n")
    shutil.copy(text_files["calib"], root / "calib.txt")
    shutil.copy(text_files["eval"], root / "eval.txt")
    monkeypatch.chdir(root)
    return Workspace(root=root, model=model, pkg=pkg, calib=root / "calib.txt", eval=root / "eval.txt", mine=mine)


def invoke(args: list[str]) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def assert_one_line_error(code: int, stderr: str, *, want_code: int, needle: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == want_code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    line = lines[0]
    assert needle in line, line
    assert "; " in line and line.split("; ", 1)[1].strip(), f"no what-to-do in: {line}"
    assert "Traceback" not in stderr and "report it" not in line and "SERVE_PRUNED_DEBUG" not in line, line
    return line


def _config(ws: Workspace, **changes: object) -> None:
    cfg_path = ws.model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))


def _write(rel: str, data: bytes | str) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        p = ws.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


@dataclass
class Case:
    argv: str  # formatted with the workspace's paths, then split on spaces ('' is an empty argument)
    needle: str
    code: int = 1
    setup: Callable[[Workspace], None] | None = None


PKG = "package {model} --out {root}/new --calib {calib} --num-samples 4 --seq-len 32 --multiple-of 32 --no-progress"
PKG_INTO_EARLIER = PKG.replace("{root}/new", "{pkg} --overwrite")
PLAN = "plan {pkg} --gpu L4"
RENDER = "deploy render --model my-org/smollm2-p75-w8a8@v1 --model-dir " + str(EXAMPLE_DIR)

CASES: dict[str, Case] = {
    # --- nothing a user owns is replaced
    "render into a folder of the user's files": Case(RENDER + " -o {mine}", "already exists"),
    "render into the user's files with --overwrite": Case(RENDER + " -o {mine} --overwrite",
                                                          "holds files that are not a folder of rendered manifests"),
    "render into the current folder": Case(RENDER + " -o . --overwrite", "it is the current folder"),
    "render into a parent of the current folder": Case(RENDER + " -o .. --overwrite", "a parent of the current folder"),
    "render over a file": Case(RENDER + " -o {mine}/notes.txt --overwrite", "is a file, not a folder"),
    "render --values-out over the user's file": Case(RENDER + " -o - --values-out {mine}/notes.txt --overwrite",
                                                     "not a file generated by serve-pruned"),
    "package --out empty": Case(PKG.replace("{root}/new", "''") + " --keep-ffn 128", "the path is empty", code=2),
    "package --out . --overwrite": Case(PKG.replace("{root}/new", ".") + " --overwrite --keep-ffn 128",
                                        "it is the current folder"),
    "package --out / --overwrite": Case(PKG.replace("{root}/new", "/") + " --overwrite --keep-ffn 128",
                                        "it is the filesystem root"),
    "package --out the user's folder --overwrite": Case(PKG.replace("{root}/new", "{mine}") + " --overwrite "
                                                        "--keep-ffn 128", "not a packaged model this tool wrote"),
    "package --out a file --overwrite": Case(PKG.replace("{root}/new", "{mine}/notes.txt") + " --overwrite "
                                             "--keep-ffn 128", "is a file, not a folder"),
    "package --out the source model": Case(PKG.replace("{root}/new", "{pkg}").replace("{model}", "{pkg}")
                                           + " --overwrite --keep-ffn 96", "would replace the source model"),
    "package into an earlier output with a file the user added": Case(
        PKG_INTO_EARLIER + " --keep-ffn 128", "(my-notes.txt)", setup=_write("pkg/my-notes.txt", "mine")),
    "package into an earlier output without --overwrite": Case(PKG.replace("{root}/new", "{pkg}") + " --keep-ffn 128",
                                                               "already exists; pass --overwrite"),
    "pull into the user's folder --overwrite": Case("pull alice/x@v1 {mine} --overwrite", "not a packaged model"),
    "pull into the current folder": Case("pull alice/x@v1 . --overwrite", "it is the current folder"),
    "example-model into the user's folder": Case("example-model {mine} --overwrite", "not a copy of the example model"),
    "dashboard over a folder": Case("metrics dashboard -o {mine}", "is a folder, not a file"),
    "dashboard over the user's file": Case("metrics dashboard -o {mine}/notes.txt --overwrite",
                                           "not a Grafana dashboard of serve-pruned"),
    "dashboard over its own file without --overwrite": Case("metrics dashboard -o {root}/d.json", "already exists",
                                                            setup=_write("d.json", '{"uid": "serve-pruned"}')),
    "kustomize over the user's base folder": Case("deploy kustomize {root}/k8s --model-dir " + str(EXAMPLE_DIR)
                                                  + " --chart {root}/nochart", "not a folder of rendered manifests",
                                                  setup=_write("k8s/base/README.md", "mine")),
    # --- user mistakes caught at the boundary (these were internal errors)
    "drop every layer but the first and last, and one more": Case(PKG + " --drop-layers 3", "outside 0..2"),
    "drop a negative number of layers": Case(PKG + " --drop-layers -1", "--drop-layers: Input should be greater"),
    "output under a file": Case(PKG.replace("{root}/new", "{mine}/notes.txt/out") + " --keep-ffn 128",
                                "is a file, not a folder"),
    "output in an unwritable place": Case(PKG.replace("{root}/new", "/proc/serve-pruned-out") + " --keep-ffn 128",
                                          "is not writable"),
    "config.json is a list": Case(PKG + " --keep-ffn 128", "holds a JSON list",
                                  setup=_write("model/config.json", "[1, 2]")),
    "config.json lacks num_attention_heads": Case(PKG + " --keep-ffn 128", "config.json has no num_attention_heads",
                                                  setup=lambda ws: _config(ws, num_attention_heads=None)),
    "config.json says heads are 'four'": Case(PKG + " --keep-ffn 128", "num_attention_heads must be a positive",
                                              setup=lambda ws: _config(ws, num_attention_heads="four")),
    "config.json is not JSON": Case(PKG + " --keep-ffn 128", "is not valid JSON",
                                    setup=_write("model/config.json", "{nope")),
    "plan on a manifest that is not JSON": Case(PLAN, "is not valid JSON", setup=_write("pkg/serve_pruned.json", "{")),
    "plan on a manifest without sizes": Case(PLAN, "lacks the sizes the planner needs",
                                             setup=_write("pkg/serve_pruned.json",
                                                          '{"format_version": 1, "created_by": "serve-pruned"}')),
    "plan on a folder whose config is a list": Case(PLAN, "holds a JSON list",
                                                    setup=_write("pkg/config.json", "[]")),
    "eval --seq-len 0": Case("eval {pkg} --text {eval} --seq-len 0", "'--seq-len': 0 is not in the range", code=2),
    "eval --seq-len -3": Case("eval {pkg} --text {eval} --seq-len -3", "'--seq-len': -3 is not in the range", code=2),
    "eval --max-tokens 0": Case("eval {pkg} --text {eval} --max-tokens 0", "'--max-tokens'", code=2),
    "eval --batch-size 0": Case("eval {pkg} --text {eval} --batch-size 0", "'--batch-size'", code=2),
    "serve --port 99999": Case("serve {pkg} --port 99999", "'--port': 99999 is not in the range", code=2),
    "serve ports past 65535": Case("serve {pkg} --port 65535 --instances 2", "ports 65535..65536 are not all valid"),
    "serve --metrics-port 70000": Case("serve {pkg} --metrics-port 70000", "'--metrics-port'", code=2),
    "serve --metrics-port on an instance's port": Case("serve {pkg} --port 8100 --instances 2 --metrics-port 8101",
                                                       "is one of the instances' ports"),
    "exporter --port 70000": Case("metrics exporter --targets {root}/t.yaml --port 70000", "'--port': 70000",
                                  code=2, setup=_write("t.yaml", "[]\n")),
    "exporter --timeout 0": Case("metrics exporter --targets {root}/t.yaml --timeout 0", "'--timeout'", code=2,
                                 setup=_write("t.yaml", "[]\n")),
    # --- accepted when it should have been refused
    "plan --instances 0": Case(PLAN + " --instances 0", "'--instances': 0 is not in the range", code=2),
    "plan --concurrency 0": Case(PLAN + " --concurrency 0", "'--concurrency': 0 is not in the range", code=2),
    "plan --max-model-len 8": Case(PLAN + " --max-model-len 8", "'--max-model-len': 8 is not in the range", code=2),
    "serve --instances 0": Case("serve {pkg} --instances 0", "'--instances': 0 is not in the range", code=2),
    "serve --instances -2": Case("serve {pkg} --instances -2", "'--instances': -2 is not in the range", code=2),
    "binary garbage as --calib": Case(PKG.replace("{calib}", "{root}/garbage.txt") + " --keep-ffn 128",
                                      "garbage.txt is not UTF-8 text",
                                      setup=_write("garbage.txt", bytes(range(256)) * 200)),
    "UTF-16 text as --calib": Case(PKG.replace("{calib}", "{root}/u16.txt") + " --keep-ffn 128", "is not UTF-8 text",
                                   setup=_write("u16.txt", "some prose in UTF-16 " .encode("utf-16") * 50)),
    # --- wording
    "--group-size 0 with w4a16": Case(PKG + " --keep-ffn 128 --quant w4a16 --group-size 0",
                                      "--group-size: Input should be greater than or equal to 1, got 0; a W4A16 "
                                      "group size such as 128"),
    "--num-samples 0 says what to pass": Case(PKG + " --keep-ffn 128 --num-samples 0",
                                              "got 0; pass a value >= 1 (default 64)"),
    "--seq-len 4 says what to pass": Case(PKG + " --keep-ffn 128 --seq-len 4",
                                          "got 4; pass a value >= 16 (default 512)"),
    "YAML syntax error in the targets file": Case("metrics exporter --targets {root}/t.yaml",
                                                  "t.yaml is not valid YAML at line",
                                                  setup=_write("t.yaml", "- url: a\n  model_dir: [b\n")),
    "targets file that is not a list": Case("metrics exporter --targets {root}/t.yaml", "must be a list of",
                                            setup=_write("t.yaml", "url: a\n")),
    "YAML syntax error in a recipe": Case("package --recipe {root}/r.yaml", "recipe: not valid YAML at line",
                                          setup=_write("r.yaml", "target_params: [0.75\n")),
    # --- what already gave one clear line, kept that way
    "target above 1": Case(PKG + " --target-params 1.5", "must be a fraction in (0, 1)"),
    "target zero": Case(PKG + " --target-params 0", "must be a fraction in (0, 1)"),
    "target already met": Case(PKG + " --target-params 1.0", "is already met"),
    "target below the smallest shape": Case(PKG + " --target-params 0.05 --no-recover",
                                            "below the smallest allowed shape"),
    "instances nothing can fit": Case(PKG + " --target-instances 48 --gpu L4 --max-model-len 131072 --no-recover",
                                      "no shape these options allow fits 48 instance(s) per L4"),
    "instances the source fits unquantized": Case(PKG + " --target-instances 1 --gpu H100-80GB --no-recover",
                                                  "the source already fits 1 instance(s)"),
    "instances without a GPU type": Case(PKG + " --target-instances 2", "--target-instances needs the GPU type"),
    "instances on an unknown GPU": Case(PKG + " --target-instances 2 --gpu T4000 --no-recover",
                                        "unknown GPU type 'T4000'"),
    "guard without held-out text": Case(PKG + " --max-ppl-ratio 1.15", "measures perplexity on held-out text"),
    "guard beside a target": Case(PKG + " --max-ppl-ratio 1.15 --target-params 0.75 --eval-text {eval}",
                                  "chooses the cut itself"),
    "guard below 1": Case(PKG + " --max-ppl-ratio 0.9 --eval-text {eval}", "greater than 1"),
    "two targets at once": Case(PKG + " --target-params 0.5 --target-weight-bytes 1MB", "one target at a time"),
    "weight bytes that are not a size": Case(PKG + " --target-weight-bytes lots", "pass a size such as 2GiB"),
    "heads break GQA": Case(PKG + " --keep-heads 5", "cannot be split evenly over 2 KV groups"),
    "too many KV heads": Case(PKG + " --keep-kv-heads 9", "--keep-kv-heads 9 is outside 1..2"),
    "FFN not a multiple": Case(PKG + " --keep-ffn 100", "is not a multiple of 32"),
    "FFN wider than the model": Case(PKG + " --keep-ffn 4096", "--keep-ffn 4096 is outside"),
    "nothing to do": Case(PKG, "nothing to do"),
    "unknown option": Case(PKG + " --keep-fnn 128", "No such option '--keep-fnn'", code=2),
    "missing model": Case("package --out {root}/o", "Missing argument 'MODEL'", code=2),
    "model folder does not exist": Case(PKG.replace("{model}", "{root}/nope") + " --keep-ffn 128", "does not exist"),
    "unsupported architecture": Case(PKG + " --keep-ffn 128", "'GPT2LMHeadModel' is not supported",
                                     setup=lambda ws: _config(ws, model_type="gpt2",
                                                              architectures=["GPT2LMHeadModel"])),
    "remote code refused": Case(PKG + " --keep-ffn 128", "needs custom code",
                                setup=lambda ws: _config(ws, auto_map={"AutoModel": "x.Y"})),
    "truncated weights": Case(PKG + " --keep-ffn 128", "is truncated",
                              setup=lambda ws: (ws.model / "model.safetensors").write_bytes(
                                  (ws.model / "model.safetensors").read_bytes()[:1000])),
    "no weights": Case(PKG + " --keep-ffn 128", "no *.safetensors",
                       setup=lambda ws: (ws.model / "model.safetensors").unlink()),
    "pickle weights only": Case(PKG + " --keep-ffn 128", "only pickle checkpoints",
                                setup=lambda ws: (ws.model / "model.safetensors").rename(ws.model / "model.bin")),
    "index names a missing shard": Case(PKG + " --keep-ffn 128", "missing 1 shard(s)",
                                        setup=_write("model/model.safetensors.index.json",
                                                     '{"weight_map": {"a": "model-00002.safetensors"}}')),
    "no CUDA device for --device cuda": Case(PKG + " --keep-ffn 128 --device cuda", "torch sees no CUDA device"),
    "--device that is not one": Case(PKG + " --keep-ffn 128 --device tpu", "device"),
    "--max-memory below what a stage needs": Case(PKG + " --keep-ffn 128 --max-memory 64MiB",
                                                  "--max-memory: the score stage needs about"),
    "--max-memory that is not a size": Case(PKG + " --keep-ffn 128 --max-memory lots", "pass a size such as 8GiB"),
    "empty calibration file": Case(PKG.replace("{calib}", "{root}/empty.txt") + " --keep-ffn 128", "holds no text",
                                   setup=_write("empty.txt", "")),
    "calibration file missing": Case(PKG.replace("{calib}", "{root}/none.txt") + " --keep-ffn 128", "does not exist"),
    "jsonl without the text field": Case(PKG.replace("{calib}", "{root}/c.jsonl") + " --keep-ffn 128",
                                         "has no string field 'text'", setup=_write("c.jsonl", '{"body": "x"}\n')),
    "jsonl that is not JSON": Case(PKG.replace("{calib}", "{root}/c.jsonl") + " --keep-ffn 128", "is not valid JSON",
                                   setup=_write("c.jsonl", "{nope\n")),
    "generated: with no count": Case(PKG.replace("{calib}", "generated:x") + " --keep-ffn 128",
                                     "must be a positive integer"),
    "generated text as evaluation text": Case(PKG + " --keep-ffn 128 --eval-text generated:4",
                                              "generated text cannot be evaluation text"),
    "group size without w4a16": Case(PKG + " --keep-ffn 128 --group-size 64", "only applies to quant w4a16"),
    "group size that does not divide": Case(PKG + " --keep-ffn 128 --quant w4a16 --group-size 100", "does not divide"),
    "recipe with an unknown key": Case("package --recipe {root}/r.yaml", "unknown key",
                                       setup=_write("r.yaml", "model: m\nout: o\ntarget_parms: 0.75\n")),
    "recipe that is not a mapping": Case("package --recipe {root}/r.yaml", "must be a mapping",
                                         setup=_write("r.yaml", "- a\n")),
    "push to a bad repo id": Case(PKG + " --keep-ffn 128 --push not-a-repo", "not-a-repo"),
    "pull a bad repo id": Case("pull not-a-repo {root}/p", "not-a-repo"),
    "serve a folder that is not a model": Case("serve {mine}", "is not a model folder"),
    "serve on cuda without a GPU type": Case("serve {pkg} --device cuda", "needs --gpu TYPE"),
    "plan an unknown GPU": Case("plan {pkg} --gpu B300", "unknown GPU type 'B300'"),
    "plan more instances than fit": Case(PLAN + " --instances 500", "at most"),
    "plan a folder with no config": Case("plan {mine} --gpu L4", "has no config.json"),
    "render without a revision": Case("deploy render --model my-org/x --model-dir " + str(EXAMPLE_DIR) + " -o -",
                                      "needs a revision", code=2),
    "render a branch": Case("deploy render --model my-org/x@main --model-dir " + str(EXAMPLE_DIR) + " -o -",
                            "is a branch"),
    "render without a footprint": Case("deploy render --model my-org/x@v1 --model-dir {mine} -o -",
                                       "no footprint for my-org/x@v1"),
    "render too many instances": Case(RENDER + " --gpu L4 --instances-per-gpu 40 -o -", "at most"),
    "render --replicas 0": Case(RENDER + " --replicas 0 -o -", "--replicas: Input should be greater than or equal "
                                "to 1, got 0; pass a value >= 1 (default 1)"),
    "render --max-model-len 8": Case(RENDER + " --max-model-len 8 -o -", "--max-model-len: Input should be greater"),
    "render --cpu-memory lots": Case(RENDER + " --cpu-memory lots -o -", "--cpu-memory 'lots' is not a size"),
    "render --instances-per-gpu 100": Case(RENDER + " --gpu H200-141GB --instances-per-gpu 100 -o -",
                                           "less than or equal to 48"),
    "check a file that is not there": Case("deploy check {root}/none.yaml", "is neither a file"),
    "apply with no kubectl": Case("deploy apply {root}/none.yaml --kubectl {root}/no-kubectl", "kubectl not found"),
    "eval a folder that does not exist": Case("eval {root}/nope --text {eval}", "does not exist"),
    "eval without text": Case("eval {pkg}", "Missing option '--text'", code=2),
    "exporter without a targets file": Case("metrics exporter --targets {root}/none.yaml", "does not exist", code=2),
    "unknown command": Case("packge", "No such command 'packge'", code=2),
}


def _argv(ws: Workspace, case: Case) -> list[str]:
    return ["" if a == "''" else a for a in ws.fill(case.argv).split()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ws):
    case = CASES[name]
    if case.setup is not None:
        case.setup(ws)
    before_root, before_pkg, before_mine = sorted(p.name for p in ws.root.iterdir()), tree(ws.pkg), tree(ws.mine)
    code, stdout, stderr = invoke(_argv(ws, case))
    assert_one_line_error(code, stderr, want_code=case.code, needle=case.needle)
    assert tree(ws.pkg) == before_pkg and tree(ws.mine) == before_mine
    assert sorted(p.name for p in ws.root.iterdir()) == before_root  # nothing new, hidden or not
    assert not list(Path("/proc").glob(".serve-pruned-out*"))


def test_battery_covers_every_command():
    commands = {c.argv.split(" ")[0] if not c.argv.startswith(("deploy", "metrics")) else " ".join(c.argv.split()[:2])
                for c in CASES.values()}
    assert {"package", "eval", "plan", "serve", "pull", "example-model", "deploy render", "deploy check",
            "deploy apply", "deploy kustomize", "metrics exporter", "metrics dashboard"} <= commands
    assert len(CASES) >= 100


# --- what the rule still lets through: an empty folder, and a command's own earlier output with --overwrite


def test_render_replaces_its_own_output_only_with_overwrite(ws):
    out = ws.root / "k8s-out"
    code, _, stderr = invoke([*RENDER.split(), "-o", str(out)])
    assert code == 0, stderr
    first = tree(out)
    code, _, stderr = invoke([*RENDER.split(), "--replicas", "2", "-o", str(out)])
    assert_one_line_error(code, stderr, want_code=1, needle="already exists; pass --overwrite")
    assert tree(out) == first
    code, _, stderr = invoke([*RENDER.split(), "--replicas", "2", "-o", str(out), "--overwrite"])
    assert code == 0, stderr
    assert tree(out) != first and sorted(p.name for p in ws.root.iterdir() if p.name.startswith(".")) == []


def test_an_empty_folder_is_written_without_overwrite(ws):
    out = ws.root / "empty"
    out.mkdir()
    code, _, stderr = invoke([*RENDER.split(), "-o", str(out)])
    assert code == 0, stderr
    assert (out / "kustomization.yaml").is_file()


def test_dashboard_into_a_missing_folder_and_over_its_own_file(ws):
    target = ws.root / "grafana" / "new" / "dash.json"
    code, _, stderr = invoke(["metrics", "dashboard", "-o", str(target)])
    assert code == 0, stderr
    assert json.loads(target.read_text())["uid"] == "serve-pruned"
    code, _, stderr = invoke(["metrics", "dashboard", "-o", str(target), "--overwrite"])
    assert code == 0, stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["dash.json"]


def test_package_replaces_its_own_earlier_output_with_overwrite(ws):
    before = tree(ws.pkg)
    argv = ws.fill(PKG_INTO_EARLIER + " --keep-ffn 96 --no-recover").split()
    code, _, stderr = invoke(argv)
    assert code == 0, stderr
    assert tree(ws.pkg) != before
    assert json.loads((ws.pkg / "serve_pruned.json").read_text())["shape_after"]["intermediate_size"] == 96
    assert sorted(p.name for p in ws.root.iterdir() if p.name.startswith(".")) == []


def test_exporter_port_already_taken_names_the_port(ws):
    (ws.root / "t.yaml").write_text("[]\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, stderr = invoke(["metrics", "exporter", "--targets", str(ws.root / "t.yaml"), "--port", str(port)])
    assert_one_line_error(code, stderr, want_code=1, needle=f"cannot listen on 127.0.0.1:{port}")
