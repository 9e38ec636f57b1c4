"""The write stage: quantize, save, carry the source's files over, model card and manifest, atomically."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_pruned import __version__
from serve_pruned.atomic import atomic_dir
from serve_pruned.compress.plan import PackagePlan
from serve_pruned.compress.provenance import hub_id_of, peak_rss_bytes, tool_versions
from serve_pruned.compress.quality import Quality
from serve_pruned.compress.quantize import QuantPlan
from serve_pruned.compress.shards import OUTPUT_SHARD_BYTES, ShardWriter, write_layers
from serve_pruned.compress.steps import Loaded, Pruned
from serve_pruned.compress.timer import Timer
from serve_pruned.manifest import PACKAGE_OWNER, Manifest, write_manifest

Log = Callable[[str], None]

# Files carried over from the source folder besides weights and config.json.
CARRY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "generation_config.json",
    "LICENSE*",
    "NOTICE*",
)


def write_package(plan: PackagePlan, loaded: Loaded, pruned: Pruned, quality: Quality, timer: Timer, *,
                  log: Log, repo_id: str | None) -> Manifest:
    """Write the output folder (replacing an earlier one only once it is complete); returns its manifest."""
    import torch

    save_dtype = getattr(torch, plan.save_dtype)
    qplan = plan.quantization(pruned.chosen.shape)
    with atomic_dir(plan.out, overwrite=plan.opts.overwrite, owner=PACKAGE_OWNER) as tmp:
        config = {**pruned.current.config, "dtype": str(save_dtype).removeprefix("torch.")}
        if qplan is not None:
            _quantize_and_save(plan, loaded, pruned, qplan, quality, timer, tmp, config, save_dtype, log=log)
        else:
            with timer("write"):
                _write_weights(pruned, tmp, config, save_dtype, max_shard_bytes=OUTPUT_SHARD_BYTES)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for pattern in CARRY_PATTERNS:
            for f in plan.src.path.glob(pattern):
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        weight_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        timer.add("total", timer.elapsed())
        body = manifest_body(plan, loaded, pruned, quality, timer, qplan=qplan, weight_bytes=weight_bytes,
                             dtype_bytes=torch.tensor([], dtype=save_dtype).element_size(),
                             dtype=str(save_dtype).removeprefix("torch."))
        from serve_pruned.hub.card import render_card

        (tmp / "README.md").write_text(render_card(body, name=plan.out.name, repo_id=repo_id))
        return write_manifest(tmp, body)


def stored_as(model: Any, dtype: Any) -> Path | None:
    """The folder ``model`` streams from, when it is exactly that folder's weights stored in ``dtype``."""
    from serve_pruned.compress.stream import Streamed
    from serve_pruned.compress.weights import FolderTensors

    if not (isinstance(model, Streamed) and isinstance(model.tensors, FolderTensors)):
        return None
    return model.tensors.folder if model.tensors.dtypes() == {dtype} else None


def _write_weights(pruned: Pruned, folder: Path, config: dict[str, Any], dtype: Any, *, max_shard_bytes: int) -> None:
    """The pruned model's weights in ``dtype`` as safetensors shards, part by part: it is never whole here."""
    from serve_pruned.compress.stream import streamed

    writer = ShardWriter(folder, config, max_shard_bytes=max_shard_bytes, dtype=dtype)
    write_layers(writer, streamed(pruned.current.model))
    writer.close()


def _quantize_and_save(plan: PackagePlan, loaded: Loaded, pruned: Pruned, qplan: QuantPlan, quality: Quality,
                       timer: Timer, tmp: Path, config: dict[str, Any], save_dtype: Any, *, log: Log) -> None:
    """llmcompressor into compressed-tensors, from the pruned weights written unquantized beside the output.

    llmcompressor onloads one layer at a time from what :func:`load_offloaded` leaves on disk, so the model is
    held whole only when the host budget allows it.
    """
    from serve_pruned.compress.quantize import apply_quantization, load_offloaded, save_quantized

    offload = tmp / ".offload"
    unquantized = stored_as(pruned.current.model, save_dtype)  # the last step's checkpoint, when it is the model
    if unquantized is None:
        unquantized = tmp / ".unquantized"
        with timer("write"):
            _write_weights(pruned, unquantized, config, save_dtype, max_shard_bytes=0)
    log(f"quantizing ({qplan.scheme}{f', group size {qplan.group_size}' if qplan.group_size else ''}) "
        "with llmcompressor")
    with timer("quantize"):
        host_bytes = plan.memory.quantize_host_bytes if plan.memory else None
        model = load_offloaded(unquantized, dtype=save_dtype, host_bytes=host_bytes, offload_dir=offload,
                               trust_remote_code=plan.opts.trust_remote_code)
        # llmcompressor reads config.json back from name_or_path (and writes it on save): the output's
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.config._name_or_path = str(tmp)
        recipe = apply_quantization(model, loaded.tokenizer, qplan, loaded.samples)
    quality.stage("quantized", model)
    with timer("write"):
        save_quantized(model, loaded.tokenizer, recipe, tmp, max_shard_bytes=OUTPUT_SHARD_BYTES)
    del model
    for scratch in (tmp / ".unquantized", offload):  # ours, inside the output's temporary folder
        shutil.rmtree(scratch, ignore_errors=True)
    config["quantization_config"] = json.loads((tmp / "config.json").read_text())["quantization_config"]


def manifest_body(plan: PackagePlan, loaded: Loaded, pruned: Pruned, quality: Quality, timer: Timer, *,
                  qplan: QuantPlan | None, weight_bytes: int, dtype_bytes: int, dtype: str) -> dict[str, Any]:
    """Everything serve_pruned.json says about the package but its file table."""
    opts, src, support, before, chosen = plan.opts, plan.src, plan.support, plan.before, pruned.chosen
    kept = pruned.current.kept if plan.prunes else None
    return {
        "kind": "-".join(k for k, on in (("pruned", plan.prunes), ("quantized", qplan is not None)) if on),
        "created_by": f"serve-pruned {__version__}",
        "source": {"model": src.ref, "revision": src.revision, "fingerprint": loaded.fingerprint,
                   "architecture": support.architecture, "model_type": support.model_type,
                   "base_model": opts.base_model or hub_id_of(src), "license": plan.license_id},
        "architecture": support.architecture,
        "shape_before": before.to_dict(),
        "shape_after": chosen.shape.to_dict(),
        "params_before": plan.total,
        "params_after": chosen.params,
        "params_fraction": round(chosen.params / plan.total, 6),
        "dtype": dtype,
        "quantization": qplan.to_dict() if qplan else None,
        "weight_bytes": weight_bytes,
        "weight_bytes_before": sum(t.nbytes for t in src.tensors.values()),
        "kv_cache_bytes_per_token": chosen.shape.kv_cache_bytes_per_token(dtype_bytes),
        "kv_cache_bytes_per_token_before": before.kv_cache_bytes_per_token(dtype_bytes),
        "pruning": ({**plan.chosen_scorer.as_manifest(), **kept.summary(),
                     "shape_search": pruned.steps[-1]["shape_search"]} if kept is not None else None),
        **({"target": plan.fit.as_manifest(weight_bytes=weight_bytes, shape=chosen.shape, sizer=plan.sizer())}
           if plan.fit else {}),
        "recovery": pruned.recovery,
        "options": opts.public(),
        "quality": quality.manifest_section(eval_sources=plan.eval, ood_sources=plan.ood),
        "timings_s": timer.as_manifest(),
        "peak_memory": timer.memory_manifest(),
        "memory_plan": plan.memory.to_dict() if plan.memory else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "tool_versions": tool_versions(),
    }
