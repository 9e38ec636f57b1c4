"""`serve-pruned package`: resolve, score, search, prune, evaluate, write -- atomically.

Everything that can be checked without weights (options, target, counts, calibration text, output
folder) is checked before the model is loaded, so bad input fails in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_pruned import __version__
from serve_pruned.atomic import atomic_dir, check_output
from serve_pruned.cache import cache_root
from serve_pruned.compress.arch import support_for
from serve_pruned.compress.data import (
    calibration_samples,
    eval_tokens,
    fingerprint_sources,
    read_sources,
)
from serve_pruned.compress.model_io import (
    ModelSource,
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
)
from serve_pruned.compress.shapes import Candidate, Shape, count_params, plan_shapes
from serve_pruned.errors import CalibrationDataError, InvalidTargetError, MissingExtraError
from serve_pruned.manifest import sha256_file, write_manifest
from serve_pruned.options import PackageOptions

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


@dataclass
class PackageResult:
    out: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _require_torch() -> None:
    for mod, extra in (("torch", "package"), ("transformers", "package"), ("accelerate", "package")):
        try:
            __import__(mod)
        except ImportError as exc:
            raise MissingExtraError(mod, extra) from exc


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"serve_pruned": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "accelerate", "safetensors", "llmcompressor", "compressed-tensors"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def source_fingerprint(src: ModelSource) -> str:
    """sha256 over config.json and every weight file's sha256 (identifies the exact weights)."""
    h = hashlib.sha256(json.dumps(src.config, sort_keys=True).encode())
    for f in src.weight_files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled, leave=False)


def _stats(model: Any, samples: Any, key: str, *, batch_size: int, progress: bool, log: Log) -> Any:
    from safetensors.torch import load_file, save_file

    from serve_pruned.compress.importance import LayerStats, collect_stats

    path = cache_root() / "stats" / f"{key}.safetensors"
    if path.is_file():
        log(f"importance statistics: reusing {path}")
        return LayerStats.from_dict(load_file(path))
    bar = _progress(len(samples), "scoring (calibration pass)", progress)
    try:
        stats = collect_stats(model, samples, batch_size=batch_size, progress=bar)
    finally:
        bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(stats.to_dict(), str(tmp))
    tmp.replace(path)
    return stats


def _search(
    model: Any, config: dict, before: Shape, candidates: list[Candidate], scores: Any, samples: Any, *,
    opts: PackageOptions, progress: bool, log: Log,
) -> tuple[Candidate, list[dict[str, Any]]]:
    """Prune to every candidate shape and keep the one with the lowest calibration loss."""
    from serve_pruned.compress.evaluate import mean_loss
    from serve_pruned.compress.importance import select
    from serve_pruned.compress.prune import prune_model

    if len(candidates) == 1:
        return candidates[0], []
    # Too many shapes to try: keep those closest to the target (largest first).
    tried = candidates[: opts.max_candidates]
    held_out = samples[: opts.search_samples]
    results = []
    from tqdm.auto import tqdm

    for cand in tqdm(tried, desc="searching shapes", disable=not progress, leave=False):
        pruned, _ = prune_model(model, config, before, cand.shape, select(scores, before, cand.shape))
        loss = mean_loss(pruned, held_out, batch_size=opts.batch_size)
        results.append({**cand.shape.to_dict(), "params": cand.params, "fraction": round(cand.fraction, 5),
                        "calib_loss": round(loss, 5)})
        del pruned
    best = min(range(len(tried)), key=lambda i: (results[i]["calib_loss"], -tried[i].params))
    log(f"shape search: {len(tried)} shapes tried, best calibration loss {results[best]['calib_loss']:.4f}")
    return tried[best], results


def _widths(shape: Shape, hidden: int) -> list[int]:
    """Input widths of the linear layers a quantizer sees: hidden (q/k/v/gate/up), o_proj, down_proj."""
    return [hidden, shape.num_heads * shape.head_dim, shape.intermediate_size]


def _evaluate_into(quality: dict[str, Any], name: str, model: Any, ids: list[int], *, opts: PackageOptions,
                   reference: Any, progress: bool, log: Log) -> None:
    from serve_pruned.compress.evaluate import evaluate

    n_win = -(-len(ids) // opts.eval_seq_len)
    bar = _progress(n_win * (2 if reference is not None else 1), f"evaluating {name}", progress)
    try:
        report = evaluate(model, ids, seq_len=opts.eval_seq_len, batch_size=opts.batch_size, reference=reference,
                          progress=bar)
    finally:
        bar.close()
    quality[name] = report.to_dict()
    msg = f"{name}: perplexity {report.perplexity:.2f} on {report.tokens} tokens"
    if report.top1_agreement is not None:
        msg += f", top-1 agreement with the original {report.top1_agreement:.3f}"
    log(msg)


def package(opts: PackageOptions, *, log: Log = lambda _m: None, progress: bool = True) -> PackageResult:
    """Prune and/or quantize as ``opts`` says; returns the output folder and its manifest.

    Stages: checks (no weights loaded) -> load -> importance -> shape search -> prune -> evaluate ->
    quantize -> evaluate -> atomic write with manifest.
    """
    from serve_pruned.compress.quantize import plan_quantization

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(opts.out).resolve()
    check_output(out, overwrite=opts.overwrite)

    src = resolve_model(opts.model, revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    support = support_for(src.config)
    before = Shape.from_config(src.config)
    hidden = int(src.config["hidden_size"])
    total = count_params(src.shapes(), before)
    prune = (opts.target_params is not None or opts.drop_layers > 0
             or any(v is not None for v in (opts.keep_heads, opts.keep_kv_heads, opts.keep_ffn)))
    if prune:
        candidates = plan_shapes(
            src.shapes(), before, target=opts.target_params, keep_heads=opts.keep_heads,
            keep_kv_heads=opts.keep_kv_heads, keep_ffn=opts.keep_ffn, drop_layers=opts.drop_layers,
            multiple_of=opts.multiple_of, prune_heads=support.prune_heads,
            heads_divide=hidden if support.heads_divide_hidden else None,
        )
    elif opts.quant == "none":
        raise InvalidTargetError(
            "nothing to do: no pruning target or counts, and no quantization",
            field="target_params", hint="pass --target-params 0.75 and/or --quant w8a8")
    else:
        candidates = [Candidate(before, total, 1.0)]
    for cand in candidates:  # a group size that cannot work fails now, not after minutes of work
        plan_quantization(opts.quant, _widths(cand.shape, hidden), group_size=opts.group_size)
    quant_needs_data = opts.quant in ("w8a8", "w4a16")
    needs_calib = quant_needs_data or (prune and (opts.scorer != "magnitude" or len(candidates) > 1
                                                  or opts.drop_layers > 0))
    if needs_calib and not opts.calib:
        what = "quantization" if quant_needs_data and not prune else "this pruning"
        raise CalibrationDataError(f"{what} needs calibration text and none was given", path="",
                                   hint="pass --calib FILE (repeat it to mix sources)")
    calib_sources = read_sources(list(opts.calib), text_field=opts.text_field) if opts.calib else []
    eval_sources = read_sources(list(opts.eval_text), text_field=opts.text_field) if opts.eval_text else []
    _require_torch()
    timings["checks_s"] = time.perf_counter() - t0
    quiet_transformers(progress)

    import torch

    from serve_pruned.compress.importance import LayerStats, Scores, compute_scores, select
    from serve_pruned.compress.prune import prune_model

    torch.manual_seed(opts.seed)
    t = time.perf_counter()
    log(f"loading {src.ref} ({support.architecture}, {total:,} parameters)")
    tokenizer = load_tokenizer(src.path, trust_remote_code=opts.trust_remote_code)
    model = load_model(src.path, dtype=opts.compute_dtype, trust_remote_code=opts.trust_remote_code)
    fingerprint = source_fingerprint(src)
    samples = None
    if calib_sources:
        samples = calibration_samples(tokenizer, calib_sources, num_samples=opts.num_samples,
                                      seq_len=opts.seq_len, seed=opts.seed)
    timings["load_s"] = time.perf_counter() - t

    chosen, sel = candidates[0], None
    search: list[dict[str, Any]] = []
    recovery: dict[str, Any] = {}
    pruned, new_cfg = model, dict(src.config)
    if prune:
        t = time.perf_counter()
        if samples is not None:
            key = hashlib.sha256(
                f"{fingerprint}|{fingerprint_sources(calib_sources)}|{opts.num_samples}|{opts.seq_len}|{opts.seed}|"
                f"{opts.compute_dtype}|v1".encode()).hexdigest()[:32]
            stats = _stats(model, samples, key, batch_size=opts.batch_size, progress=progress, log=log)
        else:  # magnitude scores need no data; block influence is then unused (no layers dropped)
            n, zeros = before.num_layers, torch.zeros
            stats = LayerStats(zeros(n, before.size("q")), zeros(n, before.size("q")), zeros(n, before.num_heads),
                               zeros(n, before.intermediate_size), zeros(n, before.intermediate_size),
                               zeros(n), torch.ones(1))
        scores: Scores = compute_scores(stats, model, before, opts.scorer)
        timings["score_s"] = time.perf_counter() - t
        t = time.perf_counter()
        chosen, search = _search(model, src.config, before, candidates, scores, samples, opts=opts,
                                 progress=progress, log=log)
        sel = select(scores, before, chosen.shape)
        pruned, new_cfg = prune_model(model, src.config, before, chosen.shape, sel)
        timings["prune_s"] = time.perf_counter() - t
        log(f"pruned to {chosen.shape.to_dict()} = {chosen.fraction:.3f} of the parameters")
        if opts.refit and samples is not None and chosen.shape.intermediate_size < before.intermediate_size:
            from serve_pruned.compress.refit import refit_down_proj

            t = time.perf_counter()
            bar = _progress(chosen.shape.num_layers, "refitting down_proj (least squares)", progress)
            try:
                recovery["refit"] = refit_down_proj(pruned, model, sel.layers, samples, batch_size=opts.batch_size,
                                                    progress=bar)
            finally:
                bar.close()
            timings["refit_s"] = time.perf_counter() - t
            log(f"refit down_proj: MLP reconstruction error {recovery['refit']['mlp_rel_error_before']:.3f} -> "
                f"{recovery['refit']['mlp_rel_error_after']:.3f}")

    quality: dict[str, Any] = {}
    ids: list[int] = []
    if eval_sources:
        t = time.perf_counter()
        ids = eval_tokens(tokenizer, eval_sources, max_tokens=opts.eval_max_tokens)
        quality.update(eval_text=[s.name for s in eval_sources], eval_text_sha256=fingerprint_sources(eval_sources),
                       compute_dtype=opts.compute_dtype)
        if opts.eval_baseline:
            _evaluate_into(quality, "original", model, ids, opts=opts, reference=None, progress=progress, log=log)
        if prune:
            _evaluate_into(quality, "pruned", pruned, ids, opts=opts,
                           reference=model if opts.eval_baseline else None, progress=progress, log=log)
        timings["eval_s"] = time.perf_counter() - t

    save_dtype = getattr(torch, str(src.config.get("dtype") or src.config.get("torch_dtype") or "float32"))
    qplan = plan_quantization(opts.quant, _widths(chosen.shape, hidden), group_size=opts.group_size)
    with atomic_dir(out, overwrite=opts.overwrite) as tmp:
        pruned = pruned.to(save_dtype)
        final_cfg = {**new_cfg, "dtype": str(save_dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(final_cfg, indent=2) + "\n")
        if qplan is not None:
            from serve_pruned.compress.quantize import apply_quantization, save_quantized

            t = time.perf_counter()
            log(f"quantizing ({qplan.scheme}{f', group size {qplan.group_size}' if qplan.group_size else ''}) "
                "with llmcompressor")
            # llmcompressor reads config.json back from name_or_path (and writes it on save): make that
            # the pruned config, not the source's
            pruned.config._name_or_path = str(tmp)
            recipe = apply_quantization(pruned, tokenizer, qplan, samples)
            timings["quantize_s"] = time.perf_counter() - t
            if ids:
                t = time.perf_counter()
                _evaluate_into(quality, "quantized", pruned, ids, opts=opts,
                               reference=model if opts.eval_baseline else None, progress=progress, log=log)
                timings["eval_s"] = timings.get("eval_s", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            save_quantized(pruned, tokenizer, recipe, tmp)
            saved = json.loads((tmp / "config.json").read_text())
            final_cfg["quantization_config"] = saved["quantization_config"]
        else:
            t = time.perf_counter()
            pruned.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(final_cfg, indent=2) + "\n")
        for pattern in CARRY_PATTERNS:
            for f in src.path.glob(pattern):
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        weight_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        dtype_bytes = torch.tensor([], dtype=save_dtype).element_size()
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        kind = "-".join(k for k, on in (("pruned", prune), ("quantized", qplan is not None)) if on)
        manifest = write_manifest(tmp, {
            "kind": kind,
            "created_by": f"serve-pruned {__version__}",
            "source": {"model": src.ref, "revision": src.revision, "fingerprint": fingerprint,
                       "architecture": support.architecture, "model_type": support.model_type},
            "architecture": support.architecture,
            "shape_before": before.to_dict(),
            "shape_after": chosen.shape.to_dict(),
            "params_before": total,
            "params_after": chosen.params,
            "params_fraction": round(chosen.params / total, 6),
            "dtype": str(save_dtype).removeprefix("torch."),
            "quantization": qplan.to_dict() if qplan else None,
            "weight_bytes": weight_bytes,
            "weight_bytes_before": sum(t.nbytes for t in src.tensors.values()),
            "kv_cache_bytes_per_token": chosen.shape.kv_cache_bytes_per_token(dtype_bytes),
            "kv_cache_bytes_per_token_before": before.kv_cache_bytes_per_token(dtype_bytes),
            "pruning": {"scorer": opts.scorer, **sel.summary(), "shape_search": search} if sel else None,
            "recovery": recovery,
            "options": opts.public(),
            "quality": quality,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "tool_versions": tool_versions(),
        })
    return PackageResult(out=out, manifest=manifest, timings=timings)
