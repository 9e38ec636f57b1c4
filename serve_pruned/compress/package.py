"""`serve-pruned package`: plan -> load -> prune and recover, step by step -> quantize and write, atomically.

The stages, each a module of its own: ``plan`` (everything checked before a weight is loaded),
``steps`` (score -> search -> prune -> refit -> distill per pruning step), ``quality`` (each stage
measured against the original), ``write`` (quantize, save, model card, manifest) and ``provenance``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_pruned.compress.data import calibration_samples, eval_tokens, fingerprint_sources
from serve_pruned.compress.device import resolve_device
from serve_pruned.compress.generation import GenerationJob, generated_texts
from serve_pruned.compress.guard import package_within_guard
from serve_pruned.compress.model_io import load_model, load_tokenizer, quiet_transformers
from serve_pruned.compress.plan import PackagePlan, plan_package
from serve_pruned.compress.provenance import source_fingerprint
from serve_pruned.compress.quality import Quality
from serve_pruned.compress.steps import Loaded, Steps
from serve_pruned.compress.stream import Streamed
from serve_pruned.compress.timer import Timer
from serve_pruned.compress.write import write_package
from serve_pruned.errors import MissingExtraError
from serve_pruned.manifest import Manifest
from serve_pruned.options import PackageOptions

Log = Callable[[str], None]


@dataclass
class PackageResult:
    out: Path
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)


def package(opts: PackageOptions, *, log: Log = lambda _m: None, progress: bool = True,
            repo_id: str | None = None) -> PackageResult:
    """Prune, recover and quantize as ``opts`` says; returns the output folder and its manifest.

    With ``--max-ppl-ratio`` the quality guard runs this once per candidate it tries and keeps the strongest
    within it (serve_pruned/compress/guard.py). ``repo_id`` (where the output will be pushed) only goes into the
    model card's snippets.
    """
    if opts.max_ppl_ratio is not None:
        t = time.perf_counter()
        manifest = package_within_guard(
            opts, lambda one: _package_one(one, log=log, progress=progress, repo_id=repo_id).out, log=log,
            repo_id=repo_id)
        return PackageResult(out=Path(opts.out).expanduser().resolve(), manifest=manifest,
                             timings={"total_s": time.perf_counter() - t})
    return _package_one(opts, log=log, progress=progress, repo_id=repo_id)


def _package_one(opts: PackageOptions, *, log: Log, progress: bool, repo_id: str | None) -> PackageResult:
    """One pass of the pipeline: plan, load, prune and recover, quantize and write."""
    timer = Timer()
    with timer("checks"):
        plan = plan_package(opts)
        _require_torch()
        device = resolve_device(opts.device)
        memory = plan.place(on_device=device.type != "cpu")
        memory.check(opts.memory_limit)  # refuses before a weight is read
        for line in [*(plan.fit.lines() if plan.fit else []), *memory.lines()]:
            log(line)
        if plan.prunes:
            log(f"scorer: {plan.chosen_scorer.name} ({plan.chosen_scorer.reason})")
    quiet_transformers(progress)
    loaded = load(plan, device, timer, progress=progress, log=log)
    quality = _quality(plan, loaded, timer, progress=progress, log=log)
    pruned = Steps(plan, loaded, quality, timer, progress, log).run()
    manifest = write_package(plan, loaded, pruned, quality, timer, log=log, repo_id=repo_id)
    pruned.clear_checkpoints()
    return PackageResult(out=plan.out, manifest=manifest, timings={f"{k}_s": v for k, v in timer.seconds.items()})


def _require_torch() -> None:
    for mod, extra in (("torch", "package"), ("transformers", "package"), ("accelerate", "package")):
        try:
            __import__(mod)
        except ImportError as exc:
            raise MissingExtraError(mod, extra) from exc


def load(plan: PackagePlan, device: Any, timer: Timer, *, progress: bool, log: Log) -> Loaded:
    """The source model (streamed from its files), the tokenizer, generated calibration text (cached) and the
    calibration windows."""
    import torch

    opts, src = plan.opts, plan.src
    torch.manual_seed(opts.seed)
    with timer("load"):
        log(f"reading {src.ref} ({plan.support.architecture}, {plan.total:,} parameters) layer by layer "
            f"on {device}, computing in {opts.compute_dtype}")
        tokenizer = load_tokenizer(src.path, trust_remote_code=opts.trust_remote_code)
        original = Streamed.from_folder(src, device=device, dtype=getattr(torch, opts.compute_dtype),
                                        trust_remote_code=opts.trust_remote_code)
        loaded = Loaded(original=original, tokenizer=tokenizer, device=device, fingerprint=source_fingerprint(src),
                        calib_fp=fingerprint_sources(plan.calib) if plan.calib else "", samples=None,
                        load_whole=lambda: load_model(src.path, dtype=opts.compute_dtype,
                                                      trust_remote_code=opts.trust_remote_code))
    for source in plan.calib:
        if source.generate:
            # texts of one distillation window each: the stream they form is cut into windows anyway
            job = GenerationJob(Path(src.path), dict(src.config), source.generate, seq_len=opts.distill_seq_len,
                                seed=opts.seed, fingerprint=loaded.fingerprint,
                                trust_remote_code=opts.trust_remote_code)
            refused = plan.memory.whole_model_refused(opts.memory_limit) if plan.memory is not None else None
            with timer("generate"):
                source.docs = generated_texts(job, load_whole=loaded.whole, tokenizer=tokenizer,
                                              in_process_refused=refused, progress=progress, log=log)
            if not opts.distills:  # only distillation's teacher needs the whole model again
                loaded.release_whole()
    with timer("load"):
        if plan.calib:
            loaded.samples = calibration_samples(tokenizer, plan.calib, num_samples=opts.num_samples,
                                                 seq_len=opts.seq_len, seed=opts.seed)
    return loaded


def _quality(plan: PackagePlan, loaded: Loaded, timer: Timer, *, progress: bool, log: Log) -> Quality:
    """The report's reference: the original measured on the evaluation text (tokenized with the load)."""
    opts, tokenizer = plan.opts, loaded.tokenizer
    with timer("load"):
        ids = eval_tokens(tokenizer, plan.eval, max_tokens=opts.eval_max_tokens) if plan.eval else []
        ood_ids = eval_tokens(tokenizer, plan.ood, max_tokens=opts.eval_max_tokens) if plan.ood else []
    quality = Quality(opts, tokenizer, ids, ood_ids, timer=timer, device=loaded.device, progress=progress, log=log)
    quality.reference = loaded.original if opts.eval_baseline else None
    if opts.eval_baseline:
        quality.stage("original", loaded.original)
    return quality
