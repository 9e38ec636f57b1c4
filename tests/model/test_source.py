"""Refusing bad model folders before anything heavy is loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from serve_pruned.errors import (
    CorruptWeightsError,
    MissingWeightsError,
    ModelLoadError,
    RemoteCodeRefusedError,
    UnsupportedArchitectureError,
)
from serve_pruned.model.arch import support_for
from serve_pruned.model.source import inspect_folder, read_safetensors_header, resolve_model


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], dest)
    return dest


def test_reads_shapes_from_headers(model_copy):
    src = inspect_folder(model_copy)
    assert src.shapes()["model.layers.0.mlp.up_proj.weight"] == (256, 192)
    assert src.weight_files == [model_copy / "model.safetensors"]


def test_truncated_safetensors_is_named(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError, match="model.safetensors is truncated"):
        inspect_folder(model_copy)


def test_garbage_header(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(CorruptWeightsError, match="unreadable safetensors header"):
        read_safetensors_header(f)


def test_pickle_only_checkpoint_is_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match="only pickle checkpoints"):
        inspect_folder(model_copy)


def test_missing_weights_and_missing_shard(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="no \\*.safetensors"):
        inspect_folder(model_copy)
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(MissingWeightsError, match="missing 1 shard"):
        inspect_folder(model_copy)


def test_remote_code_refused_unless_trusted(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeRefusedError, match="needs custom code") as e:
        inspect_folder(model_copy)
    assert "--trust-remote-code" in e.value.hint
    assert inspect_folder(model_copy, trust_remote_code=True).config["auto_map"]


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as e:
        support_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForSequenceClassification"):
        support_for({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    # HF_HUB_OFFLINE=1 (conftest) and an empty cache: a clear message, not a network stack trace
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model("someone/some-model")
