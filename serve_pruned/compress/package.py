"""`serve-pruned package`: resolve, score, search, prune, evaluate, write -- atomically.

Everything that can be checked without weights (options, target, counts, calibration text, output
folder) is checked before the model is loaded, so bad input fails in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_pruned import __version__
from serve_pruned.atomic import atomic_dir, check_output
from serve_pruned.cache import cache_root
from serve_pruned.compress.arch import support_for
from serve_pruned.compress.data import (
    FACT_PROMPTS,
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
from serve_pruned.compress.shapes import Candidate, Shape, config_int, count_params, plan_shapes
from serve_pruned.errors import CalibrationDataError, InvalidTargetError, MissingExtraError, UsageError
from serve_pruned.manifest import PACKAGE_OWNER, sha256_file, write_manifest
from serve_pruned.options import PackageOptions

if TYPE_CHECKING:
    from serve_pruned.compress.distill import DistillSettings
    from serve_pruned.compress.importance import Selection

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


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hub_id_of(src: ModelSource) -> str | None:
    """The Hub id the source model is known by: its Hub id, or the ``_name_or_path`` it was saved with."""
    if src.revision is not None:
        return src.ref
    name = str(src.config.get("_name_or_path") or "")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def source_license(folder: Path) -> str | None:
    """The licence id from the source's model card metadata, or recognized in its LICENSE file."""
    import yaml

    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            try:
                meta = yaml.safe_load(text[3:end]) if end > 0 else None
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    for f in sorted(folder.glob("LICENSE*")):
        head = f.read_text(encoding="utf-8", errors="replace")[:2000].lower()
        for needle, spdx in (("apache license", "apache-2.0"), ("mit license", "mit"),
                             ("gnu general public license", "gpl-3.0"), ("llama 3", "llama3")):
            if needle in head:
                return spdx
    return None


def source_fingerprint(src: ModelSource) -> str:
    """sha256 over config.json and every weight file's sha256 (identifies the exact weights)."""
    h = hashlib.sha256(json.dumps(src.config, sort_keys=True).encode())
    for f in src.weight_files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool, *, unit: str = "seq") -> Any:
    """A progress bar on stderr; use it as a context manager so it is closed on failure too."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def _stats(model: Any, samples: Any, key: str, *, batch_size: int, ffn_order: bool, progress: bool, log: Log) -> Any:
    from safetensors.torch import load_file, save_file

    from serve_pruned.compress.importance import LayerStats, collect_stats, decoder_layers

    path = cache_root() / "stats" / f"{key}.safetensors"
    if path.is_file():
        log(f"importance statistics: reusing {path}")
        return LayerStats.from_dict(load_file(path))
    with _progress(len(decoder_layers(model)), "scoring (calibration pass)", progress, unit="layer") as bar:
        stats = collect_stats(model, samples, batch_size=batch_size, progress=bar, ffn_order=ffn_order)
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


def step_targets(target: float, step: float) -> list[float]:
    """Fractions of the original parameters after each pruning step: equal steps of at most ``step``."""
    n = max(1, math.ceil((1.0 - target) / step - 1e-9))
    return [1.0 - (1.0 - target) * k / n for k in range(1, n + 1)]


def _split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as integers allow (the later parts get the remainder)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


def distill_settings(opts: PackageOptions, steps: int) -> DistillSettings:
    """The distillation settings of one pruning step of ``steps`` optimizer steps under ``opts``."""
    from serve_pruned.compress.distill import DistillSettings

    return DistillSettings(
        steps=steps, lr=opts.distill_lr, batch_size=opts.distill_batch_size, temperature=opts.distill_temperature,
        hidden_weight=opts.distill_hidden_weight, warmup_steps=max(1, min(10, steps // 10)), dtype=opts.distill_dtype,
        seed=opts.seed, train_embeddings=opts.distill_train_embeddings)


def _identity(shape: Shape) -> Selection:
    from serve_pruned.compress.importance import Selection

    n = shape.num_layers
    return Selection(layers=list(range(n)), kv_groups=[list(range(shape.num_kv_heads))] * n,
                     heads=[list(range(shape.num_heads))] * n, ffn=[list(range(shape.intermediate_size))] * n)


def _compose(prev: Selection, sel: Selection) -> Selection:
    """``sel`` (indices into the current model) expressed in the ORIGINAL model's indices."""
    from serve_pruned.compress.importance import Selection

    return Selection(
        layers=[prev.layers[i] for i in sel.layers],
        kv_groups=[[prev.kv_groups[i][g] for g in sel.kv_groups[j]] for j, i in enumerate(sel.layers)],
        heads=[[prev.heads[i][h] for h in sel.heads[j]] for j, i in enumerate(sel.layers)],
        ffn=[[prev.ffn[i][c] for c in sel.ffn[j]] for j, i in enumerate(sel.layers)],
    )


def _own_weights(model: Any, other: Any) -> None:
    """Give ``model`` its own copy of every tensor it shares with ``other`` (pruning slices without
    copying what it keeps whole), so training one never changes the other. Tied weights stay tied."""
    theirs = {p.data_ptr() for p in other.parameters()}
    for p in model.parameters():
        if p.data_ptr() in theirs:
            p.data = p.data.clone()


@dataclass
class _Current:
    """The model being pruned, between steps."""

    model: Any
    config: dict
    shape: Shape
    kept: Selection  # in the original model's indices
    params: int


def _shapes_of(model: Any) -> dict[str, tuple[int, ...]]:
    # named_parameters lists a tied embedding once, as the safetensors file does
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _save_step(folder: Path, cur: _Current, report: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from serve_pruned.atomic import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_file({n: p.detach().contiguous() for n, p in cur.model.named_parameters()}, str(tmp))
    tmp.replace(folder / "model.safetensors")
    atomic_write_text(folder / "done.json", json.dumps({
        "config": cur.config, "shape": cur.shape.to_dict(), "params": cur.params,
        "kept": {"layers": cur.kept.layers, "kv_groups": cur.kept.kv_groups, "heads": cur.kept.heads,
                 "ffn": cur.kept.ffn},
        "report": report}) + "\n")


def _load_step(folder: Path, like: Any) -> tuple[_Current, dict[str, Any]] | None:
    from safetensors.torch import load_file

    from serve_pruned.compress.importance import Selection
    from serve_pruned.compress.prune import build_model

    done = folder / "done.json"
    if not done.is_file():
        return None
    d = json.loads(done.read_text())
    model = build_model(like, d["config"], load_file(str(folder / "model.safetensors")))
    return _Current(model, d["config"], Shape(**d["shape"]), Selection(**d["kept"]), d["params"]), d["report"]


def _generated(model: Any, tokenizer: Any, count: int, *, fingerprint: str, seq_len: int, seed: int,
               progress: bool, log: Log) -> list[str]:
    """The ``generated:N`` calibration source: the original model's own continuations, cached on disk."""
    from serve_pruned.atomic import atomic_write_text
    from serve_pruned.compress.data import generate_texts

    path = cache_root() / "generated" / f"{fingerprint[:24]}-{count}x{seq_len}-s{seed}.json"
    if path.is_file():
        log(f"generated calibration text: reusing {path}")
        return list(json.loads(path.read_text()))
    with _progress(count, f"generating {count} calibration texts with the original model", progress) as bar:
        texts = generate_texts(model, tokenizer, count, max_new_tokens=seq_len, seed=seed, progress=bar)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(texts))
    return texts


def _run_key(opts: PackageOptions, fingerprint: str, calib_fp: str) -> str:
    """Identifies the pruning + recovery a run does (not its output, evaluation or quantization)."""
    skip = {"out", "overwrite", "eval_text", "eval_ood_text", "eval_max_tokens", "eval_seq_len", "eval_baseline",
            "eval_prompts", "quant", "group_size", "checkpoint_dir", "distill_time_budget_s", "base_model",
            "license"}
    body = {k: v for k, v in opts.public().items() if k not in skip}
    return hashlib.sha256(f"{fingerprint}|{calib_fp}|{json.dumps(body, sort_keys=True)}|v1".encode()).hexdigest()[:24]


class _Quality:
    """Quality of each stage on held-out text (and out-of-domain text, and fact prompts), vs the original."""

    def __init__(self, opts: PackageOptions, tokenizer: Any, ids: list[int], ood_ids: list[int], *,
                 progress: bool, log: Log) -> None:
        self.opts, self.tokenizer, self.ids, self.ood_ids = opts, tokenizer, ids, ood_ids
        self.progress, self.log = progress, log
        self.prompts = list(opts.eval_prompts if opts.eval_prompts is not None else FACT_PROMPTS)
        self.report: dict[str, Any] = {}
        self.reference: Any = None
        self.reference_top1: dict[str, list[Any]] = {}
        self.reference_continuations: list[list[int]] = []
        self.seconds = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.ids)

    def stage(self, name: str, model: Any) -> None:
        if not self.enabled:
            return
        from serve_pruned.compress.evaluate import evaluate, greedy_continuations, prompt_agreement

        t = time.perf_counter()
        is_original = name == "original"
        entry: dict[str, Any] = {}
        for key, ids in (("held_out", self.ids), ("out_of_domain", self.ood_ids)):
            if not ids:
                continue
            cached = self.reference_top1.get(key)
            reference = None if is_original or cached is not None else self.reference
            n_win = -(-len(ids) // self.opts.eval_seq_len)
            passes = n_win * (2 if reference is not None else 1)
            with _progress(passes, f"evaluating {name} ({key})", self.progress) as bar:
                keep: list[Any] | None = self.reference_top1.setdefault(key, []) if is_original else None
                r = evaluate(model, ids, seq_len=self.opts.eval_seq_len, batch_size=self.opts.batch_size,
                             reference=reference, reference_top1=None if is_original else cached,
                             keep_top1=keep, progress=bar).to_dict()
            if key == "held_out":
                entry.update(r)
            else:
                entry["out_of_domain"] = r
        if self.prompts:
            conts = greedy_continuations(model, self.tokenizer, self.prompts)
            if is_original:
                self.reference_continuations = conts
            entry["prompts"] = {**prompt_agreement(conts, self.reference_continuations),
                                "completions": {p: self.tokenizer.decode(c) for p, c in zip(self.prompts, conts,
                                                                                             strict=True)}}
        base = self.report.get("original")
        if base is not None:
            entry["perplexity_ratio"] = entry["perplexity"] / base["perplexity"]
            if "out_of_domain" in entry and "out_of_domain" in base:
                entry["out_of_domain"]["perplexity_ratio"] = (entry["out_of_domain"]["perplexity"]
                                                              / base["out_of_domain"]["perplexity"])
        self.report[name] = entry
        msg = f"{name}: perplexity {entry['perplexity']:.2f}"
        if "perplexity_ratio" in entry:
            msg += f" ({entry['perplexity_ratio']:.2f}x the original)"
        if "out_of_domain" in entry:
            msg += f", out of domain {entry['out_of_domain']['perplexity']:.2f}"
        if entry.get("top1_agreement") is not None:
            msg += f", top-1 agreement {entry['top1_agreement']:.3f}"
        if "prompts" in entry and not is_original:
            msg += f", fact prompts {entry['prompts']['prefix_agreement']:.2f}"
        self.log(msg)
        self.seconds += time.perf_counter() - t


def package(opts: PackageOptions, *, log: Log = lambda _m: None, progress: bool = True,
            repo_id: str | None = None) -> PackageResult:
    """Prune, recover and quantize as ``opts`` says; returns the output folder and its manifest.

    Stages: checks (no weights loaded) -> load -> [score -> search -> prune -> refit -> distill] per
    pruning step -> quantize -> evaluate each stage -> model card + manifest -> atomic write.
    ``repo_id`` (where the output will be pushed) only goes into the model card's snippets.
    """
    from serve_pruned.compress.quantize import plan_quantization

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = check_output(opts.out, overwrite=opts.overwrite, owner=PACKAGE_OWNER)

    src = resolve_model(opts.model, revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    if src.path.resolve() == out or out in src.path.resolve().parents:
        raise UsageError(f"--out {out} would replace the source model {src.path}",
                         hint="write the output to a new folder beside it")
    support = support_for(src.config)
    before = Shape.from_config(src.config)
    hidden = config_int(src.config, "hidden_size")
    total = count_params(src.shapes(), before)
    prune = opts.prunes
    plan_kw: dict[str, Any] = dict(multiple_of=opts.ffn_multiple, prune_heads=support.prune_heads,
                                   heads_divide=hidden if support.heads_divide_hidden else None)
    if prune:
        candidates = plan_shapes(
            src.shapes(), before, target=opts.target_params, keep_heads=opts.keep_heads,
            keep_kv_heads=opts.keep_kv_heads, keep_ffn=opts.keep_ffn, drop_layers=opts.drop_layers, **plan_kw)
    elif opts.quant == "none":
        raise InvalidTargetError(
            "nothing to do: no pruning target or counts, and no quantization",
            field="target_params", hint="pass --target-params 0.75 and/or --quant w8a8")
    else:
        candidates = [Candidate(before, total, 1.0)]
    for cand in candidates:  # a group size that cannot work fails now, not after minutes of work
        plan_quantization(opts.quant, _widths(cand.shape, hidden), group_size=opts.group_size)
    quant_needs_data = opts.quant in ("w8a8", "w4a16")
    needs_calib = quant_needs_data or (prune and (opts.scorer_used != "magnitude" or len(candidates) > 1
                                                  or opts.drop_layers > 0 or opts.iterative))
    if needs_calib and not opts.calib:
        what = "quantization" if quant_needs_data and not prune else "this pruning"
        raise CalibrationDataError(f"{what} needs calibration text and none was given", path="",
                                   hint="pass --calib FILE (repeat it to mix sources)")
    calib_sources = read_sources(list(opts.calib), text_field=opts.text_field) if opts.calib else []
    eval_sources = read_sources(list(opts.eval_text), text_field=opts.text_field) if opts.eval_text else []
    if any(s.generate for s in eval_sources):
        raise CalibrationDataError("generated text cannot be evaluation text: it is the original model's own output",
                                   path="generated:", hint="evaluate on held-out text the model did not write")
    ood_sources = read_sources(list(opts.eval_ood_text), text_field=opts.text_field) if opts.eval_ood_text else []
    license_id = opts.license or source_license(src.path)
    _require_torch()
    timings["checks_s"] = time.perf_counter() - t0
    quiet_transformers(progress)

    import torch

    from serve_pruned.compress.importance import LayerStats, Scores, collect_stats, compute_scores, select
    from serve_pruned.compress.prune import prune_model

    torch.manual_seed(opts.seed)
    t = time.perf_counter()
    log(f"loading {src.ref} ({support.architecture}, {total:,} parameters)")
    tokenizer = load_tokenizer(src.path, trust_remote_code=opts.trust_remote_code)
    model = load_model(src.path, dtype=opts.compute_dtype, trust_remote_code=opts.trust_remote_code)
    fingerprint = source_fingerprint(src)
    timings["load_s"] = time.perf_counter() - t
    for source in calib_sources:
        if source.generate:
            t = time.perf_counter()
            # texts of one distillation window each: the stream they form is cut into windows anyway
            source.docs = _generated(model, tokenizer, source.generate, fingerprint=fingerprint,
                                     seq_len=opts.distill_seq_len, seed=opts.seed, progress=progress, log=log)
            timings["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    samples = None
    calib_fp = fingerprint_sources(calib_sources) if calib_sources else ""
    if calib_sources:
        samples = calibration_samples(tokenizer, calib_sources, num_samples=opts.num_samples,
                                      seq_len=opts.seq_len, seed=opts.seed)
    ids = eval_tokens(tokenizer, eval_sources, max_tokens=opts.eval_max_tokens) if eval_sources else []
    ood_ids = eval_tokens(tokenizer, ood_sources, max_tokens=opts.eval_max_tokens) if ood_sources else []
    timings["load_s"] += time.perf_counter() - t
    quality = _Quality(opts, tokenizer, ids, ood_ids, progress=progress, log=log)
    quality.reference = model if opts.eval_baseline else None
    if opts.eval_baseline:
        quality.stage("original", model)

    cur = _Current(model, dict(src.config), before, _identity(before), total)
    chosen = candidates[0]
    steps_report: list[dict[str, Any]] = []
    recovery: dict[str, Any] = {}
    if prune:
        targets: list[float | None] = [None]
        if opts.iterative and opts.target_params is not None:
            targets = list(step_targets(opts.target_params, opts.prune_step))
        n_steps = len(targets)
        distill_budget = _split(opts.distill_steps, n_steps) if opts.distills else [0] * n_steps
        dsamples = None
        if opts.distills:
            dsamples = calibration_samples(tokenizer, calib_sources, num_samples=opts.distill_samples,
                                           seq_len=opts.distill_seq_len, seed=opts.seed + 1)
        run_key = _run_key(opts, fingerprint, calib_fp)
        ckpt_root = Path(opts.checkpoint_dir) if opts.checkpoint_dir else cache_root() / "recover" / run_key
        recovery = {"schedule": "iterative" if opts.iterative else "one-shot", "steps": steps_report,
                    "refit": opts.recover and opts.refit, "distill_steps": opts.distill_steps if opts.distills else 0}
        log(f"pruning in {n_steps} step(s)" + (f" to {', '.join(f'{x:.3f}' for x in targets if x)} of the parameters"
                                              if opts.iterative else ""))
        obs = opts.scorer_used == "obs"  # its FFN order needs Gram matrices, collected only for it
        for k, step_target in enumerate(targets):
            step_dir = ckpt_root / f"step-{k + 1}"
            last = k == n_steps - 1
            resumed = _load_step(step_dir, model)
            if resumed is not None and not last:
                cur, report = resumed
                steps_report.append({**report, "resumed": True})
                log(f"step {k + 1}/{n_steps}: done in an earlier run, resumed from {step_dir}")
                continue
            report = {"step": k + 1}
            t = time.perf_counter()
            if k == 0 and samples is not None:
                key = hashlib.sha256(
                    f"{fingerprint}|{calib_fp}|{opts.num_samples}|{opts.seq_len}|{opts.seed}|"
                    f"{opts.compute_dtype}|v1{'|obs' if obs else ''}".encode()).hexdigest()[:32]
                stats = _stats(model, samples, key, batch_size=opts.batch_size, ffn_order=obs, progress=progress,
                               log=log)
            elif samples is not None:
                with _progress(cur.shape.num_layers, f"step {k + 1}/{n_steps}: scoring", progress,
                               unit="layer") as bar:
                    stats = collect_stats(cur.model, samples, batch_size=opts.batch_size, progress=bar,
                                          ffn_order=obs)
            else:  # magnitude scores need no data; block influence is then unused (no layers dropped)
                n, zeros = before.num_layers, torch.zeros
                stats = LayerStats(zeros(n, before.size("q")), zeros(n, before.size("q")), zeros(n, before.num_heads),
                                   zeros(n, before.intermediate_size), zeros(n, before.intermediate_size),
                                   zeros(n), torch.ones(1))
            scores: Scores = compute_scores(stats, cur.model, cur.shape, opts.scorer_used)
            timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            if step_target is None:
                step_candidates = candidates
            else:
                relative = min(step_target * total / cur.params, 1.0 - 1e-9)
                step_candidates = plan_shapes(_shapes_of(cur.model), cur.shape, target=relative, **plan_kw)
            chosen_step, search = _search(cur.model, cur.config, cur.shape, step_candidates, scores, samples,
                                          opts=opts, progress=progress, log=log)
            sel = select(scores, cur.shape, chosen_step.shape)
            new_model, new_cfg = prune_model(cur.model, cur.config, cur.shape, chosen_step.shape, sel)
            _own_weights(new_model, model)
            new_params = count_params(_shapes_of(new_model), chosen_step.shape)
            timings["prune_s"] = timings.get("prune_s", 0.0) + time.perf_counter() - t
            kept = _compose(cur.kept, sel)
            report.update(target=round(step_target, 5) if step_target is not None else None,
                          shape=chosen_step.shape.to_dict(), params=new_params,
                          fraction=round(new_params / total, 5), shape_search=search)
            log(f"step {k + 1}/{n_steps}: pruned to {chosen_step.shape.to_dict()} = {new_params / total:.3f} "
                "of the parameters")
            if last:
                quality.stage("pruned", new_model)
            if opts.recover and opts.refit and samples is not None:
                t = time.perf_counter()
                dropped = sel.layers != list(range(cur.shape.num_layers))
                # the stream target corrects drift wherever it is, so every layer's o_proj and down_proj is refit
                stream = opts.refit_target == "stream"
                attn = chosen_step.shape.num_heads < cur.shape.num_heads or dropped or stream
                mlp = chosen_step.shape.intermediate_size < cur.shape.intermediate_size or dropped or stream
                if attn or mlp:
                    from serve_pruned.compress.refit import refit

                    which = " + ".join(n for n, on in (("o_proj", attn), ("down_proj", mlp)) if on)
                    with _progress(chosen_step.shape.num_layers, f"step {k + 1}/{n_steps}: refitting {which}",
                                    progress) as bar:
                        report["refit"] = refit(new_model, model, kept.layers, samples, attention=attn, mlp=mlp,
                                                batch_size=opts.batch_size, target=opts.refit_target,
                                                progress=bar)
                    timings["refit_s"] = timings.get("refit_s", 0.0) + time.perf_counter() - t
                    log(f"step {k + 1}/{n_steps}: refit {which}: block error " + ", ".join(
                        f"{n} {report['refit'][f'{n}_rel_error_before']:.3f} -> "
                        f"{report['refit'][f'{n}_rel_error_after']:.3f}"
                        for n in ("attn", "mlp") if f"{n}_rel_error_before" in report["refit"]))
            if distill_budget[k] > 0 and dsamples is not None:
                from serve_pruned.compress.distill import distill

                t = time.perf_counter()
                settings = distill_settings(opts, distill_budget[k])
                budget = (opts.distill_time_budget_s * distill_budget[k] / opts.distill_steps
                          if opts.distill_time_budget_s else None)
                with _progress(settings.steps, f"step {k + 1}/{n_steps}: distilling", progress, unit="step") as bar:
                    report["distill"] = distill(new_model, model, dsamples, settings=settings,
                                                checkpoint_dir=step_dir / "distill", progress=bar,
                                                time_budget_s=budget)
                timings["distill_s"] = timings.get("distill_s", 0.0) + time.perf_counter() - t
                d = report["distill"]
                log(f"step {k + 1}/{n_steps}: distilled {d['steps']} steps ({d['tokens']:,} tokens, "
                    f"{d['seconds']:.0f} s): KL {d['loss_first']:.3f} -> {d['loss_last']:.3f}"
                    + (f", resumed at step {d['resumed_from_step']}" if d["resumed_from_step"] else ""))
            cur = _Current(new_model, new_cfg, chosen_step.shape, kept, new_params)
            chosen = Candidate(chosen_step.shape, new_params, new_params / total)
            steps_report.append(report)
            if not last:
                _save_step(step_dir, cur, report)
        if opts.recover and (recovery["refit"] or opts.distills):
            quality.stage("recovered", cur.model)
    pruned, new_cfg = cur.model, cur.config
    final_sel: Selection | None = cur.kept if prune else None

    save_dtype = getattr(torch, str(src.config.get("dtype") or src.config.get("torch_dtype") or "float32"))
    qplan = plan_quantization(opts.quant, _widths(chosen.shape, hidden), group_size=opts.group_size)
    with atomic_dir(out, overwrite=opts.overwrite, owner=PACKAGE_OWNER) as tmp:
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
            quality.stage("quantized", pruned)
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
        timings["eval_s"] = quality.seconds
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        kind = "-".join(k for k, on in (("pruned", prune), ("quantized", qplan is not None)) if on)
        qual: dict[str, Any] = {}
        if quality.enabled:
            qual = {"eval_text": [s.name for s in eval_sources], "eval_text_sha256": fingerprint_sources(eval_sources),
                    "ood_text": [s.name for s in ood_sources], "compute_dtype": opts.compute_dtype,
                    "prompts": quality.prompts, **quality.report}
        body = {
            "kind": kind,
            "created_by": f"serve-pruned {__version__}",
            "source": {"model": src.ref, "revision": src.revision, "fingerprint": fingerprint,
                       "architecture": support.architecture, "model_type": support.model_type,
                       "base_model": opts.base_model or hub_id_of(src), "license": license_id},
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
            "pruning": ({"scorer": opts.scorer_used, **final_sel.summary(),
                         "shape_search": steps_report[-1]["shape_search"]} if final_sel is not None else None),
            "recovery": recovery,
            "options": opts.public(),
            "quality": qual,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_bytes": peak_rss_bytes(),
            "tool_versions": tool_versions(),
        }
        from serve_pruned.hub.card import render_card

        (tmp / "README.md").write_text(render_card(body, name=out.name, repo_id=repo_id))
        manifest = write_manifest(tmp, body)
    if prune:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the output is complete: the checkpoints are spent
    return PackageResult(out=out, manifest=manifest, timings=timings)
