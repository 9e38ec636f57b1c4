"""serve_pruned.json as a typed Manifest: format 2 written, format 1 (the previous release) read as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serve_pruned.errors import ManifestError
from serve_pruned.manifest import FORMAT_VERSION, Manifest, read_manifest, verify_files
from serve_pruned.serving.memory import ModelFootprint, plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "k8s" / "example-model"  # written by the previous release: format_version 1


def as_format_1(folder: Path) -> None:
    """Rewrite a package's manifest as the previous release wrote it (no recovery, peak RSS, base model, licence)."""
    path = folder / "serve_pruned.json"
    m = json.loads(path.read_text())
    m["format_version"] = 1
    for key in ("recovery", "peak_rss_bytes"):
        m.pop(key, None)
    for key in ("base_model", "license"):
        m["source"].pop(key, None)
    path.write_text(json.dumps(m, indent=2) + "\n")


def test_a_format_1_manifest_reads_unchanged_and_plans():
    m = read_manifest(EXAMPLE)
    assert m.format_version == 1 and FORMAT_VERSION == 2
    assert m.to_dict() == json.loads((EXAMPLE / "serve_pruned.json").read_text())  # nothing added or lost
    assert m.scheme == "w8a8" and m.shape_after["intermediate_size"] == 832 and m.source.fingerprint
    p = plan(ModelFootprint.from_folder(EXAMPLE), device="L4", max_model_len=4096, concurrency=16)
    assert p.instances >= 1 and p.original_instances is not None  # the original read from the v1 sizes too


def test_what_package_writes_is_format_2_and_reads_back_whole(tiny_models, text_files, tmp_path):
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = package(PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "p", keep_ffn=128, multiple_of=32,
                                 calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False),
                  progress=False).out
    on_disk = json.loads((out / "serve_pruned.json").read_text())
    m = read_manifest(out)
    assert on_disk["format_version"] == 2 and m.to_dict() == on_disk
    assert list(on_disk)[:4] == ["format_version", "kind", "created_by", "source"]  # the previous key order
    assert verify_files(out, m) == [] and m.files["model.safetensors"].bytes == m.weight_bytes
    copy = tmp_path / "v1"
    shutil.copytree(out, copy)
    as_format_1(copy)
    old = read_manifest(copy)
    assert old.format_version == 1 and old.recovery == {} and old.source.license is None
    assert verify_files(copy, old) == []


def test_keys_this_version_does_not_know_are_kept():
    data = json.loads((EXAMPLE / "serve_pruned.json").read_text())
    data["added_by_a_later_release"] = {"x": 1}
    data["source"]["mirror"] = "somewhere"
    assert Manifest.parse(data, where="m").to_dict() == data


@pytest.mark.parametrize(("change", "message"), [
    ({"format_version": 3}, "unknown format_version"),
    ({"weight_bytes": None}, "lacks the sizes the planner needs (weight_bytes"),
    ({"shape_after": "wide"}, "lacks the sizes the planner needs (shape_after"),
    ({"shape_after": {"num_layers": 30}}, "lacks the sizes the planner needs (shape_after: Value error, missing"),
])
def test_manifests_that_cannot_be_read_say_why(change, message):
    data = {**json.loads((EXAMPLE / "serve_pruned.json").read_text()), **change}
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        Manifest.parse(data, where="m")
