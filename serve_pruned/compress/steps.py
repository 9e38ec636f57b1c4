"""One pruning step after another: score -> search -> prune -> refit -> distill, each a function of its own.

An iterative schedule reaches the target in steps of at most ``prune_step`` of the original parameters,
recovering after each; every step but the last is checkpointed, so a rerun resumes after the last one done.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_pruned.cache import cache_root
from serve_pruned.compress.caches import cached_stats, run_key, stats_key
from serve_pruned.compress.data import calibration_samples
from serve_pruned.compress.plan import PackagePlan
from serve_pruned.compress.progress import progress_bar
from serve_pruned.compress.quality import Quality
from serve_pruned.compress.timer import Timer
from serve_pruned.model.shapes import Candidate, Shape, count_params, plan_shapes
from serve_pruned.options import PackageOptions

if TYPE_CHECKING:
    from serve_pruned.compress.distill import DistillSettings
    from serve_pruned.compress.importance import Scores, Selection

Log = Callable[[str], None]


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

    hidden = prev.hidden if sel.hidden is None else (
        sel.hidden if prev.hidden is None else [prev.hidden[c] for c in sel.hidden])
    return Selection(
        layers=[prev.layers[i] for i in sel.layers],
        kv_groups=[[prev.kv_groups[i][g] for g in sel.kv_groups[j]] for j, i in enumerate(sel.layers)],
        heads=[[prev.heads[i][h] for h in sel.heads[j]] for j, i in enumerate(sel.layers)],
        ffn=[[prev.ffn[i][c] for c in sel.ffn[j]] for j, i in enumerate(sel.layers)],
        hidden=hidden,  # the norm scales are already in the weights each step wrote
    )


@dataclass
class Current:
    """The model being pruned, between steps."""

    model: Any
    config: dict
    shape: Shape
    kept: Selection  # in the original model's indices
    params: int


def _shapes_of(model: Any) -> dict[str, tuple[int, ...]]:
    # named_parameters lists a tied embedding once, as the safetensors file does; a streamed model's skeleton
    # has every shape on meta
    module = getattr(model, "skeleton", model)
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def _save_step(folder: Path, cur: Current, report: dict[str, Any], *, written: bool, dtype: Any) -> None:
    """Mark step ``folder`` done: its model's shards in ``dtype`` (unless ``written``: the step streams its model
    from them) and done.json."""
    from serve_pruned.atomic import atomic_write_text
    from serve_pruned.compress.shards import ShardWriter, write_layers
    from serve_pruned.compress.stream import Streamed

    if not written:
        writer = ShardWriter(folder / "model", cur.config, dtype=dtype)
        write_layers(writer, Streamed.resident(cur.model))
        writer.close()
    atomic_write_text(folder / "done.json", json.dumps({
        "config": cur.config, "shape": cur.shape.to_dict(), "params": cur.params,
        "kept": {"layers": cur.kept.layers, "kv_groups": cur.kept.kv_groups, "heads": cur.kept.heads,
                 "ffn": cur.kept.ffn, "hidden": cur.kept.hidden},
        "report": report}) + "\n")


def _load_step(folder: Path, *, device: Any, dtype: Any) -> tuple[Current, dict[str, Any]] | None:
    from serve_pruned.compress.importance import Selection

    done = folder / "done.json"
    if not done.is_file() or not (folder / "model").is_dir():  # not done, or an older layout: recompute it
        return None
    d = json.loads(done.read_text())
    model = _step_model(folder, device=device, dtype=dtype)
    return Current(model, d["config"], Shape(**d["shape"]), Selection(**d["kept"]), d["params"]), d["report"]


def _distills(steps: int, samples: Any) -> bool:
    """Whether a step distills (then its model is whole in memory, not the one its folder holds)."""
    return steps > 0 and samples is not None


def _step_model(folder: Path, *, device: Any, dtype: Any) -> Any:
    """The model a step wrote to ``folder/model``, streamed from there."""
    from serve_pruned.compress.stream import Streamed
    from serve_pruned.model.source import inspect_folder

    return Streamed.from_folder(inspect_folder(folder / "model"), device=device, dtype=dtype)


def _search(
    model: Any, config: dict, before: Shape, candidates: list[Candidate], scores: Any, samples: Any, *,
    opts: PackageOptions, device: Any, progress: bool, log: Log,
) -> tuple[Candidate, list[dict[str, Any]]]:
    """Prune to every candidate shape and keep the one with the lowest calibration loss.

    A candidate is a streamed view of ``model``: each layer is sliced as the loss pass reaches it, so no
    candidate is ever built whole."""
    from serve_pruned.compress.evaluate import mean_loss
    from serve_pruned.compress.importance import select
    from serve_pruned.compress.prune import pruned_view

    if len(candidates) == 1:
        return candidates[0], []
    # Too many shapes to try: keep those closest to the target (largest first).
    tried = candidates[: opts.max_candidates]
    held_out = samples[: opts.search_samples]
    results = []
    from tqdm.auto import tqdm

    for cand in tqdm(tried, desc="searching shapes", disable=not progress, leave=False):
        view = pruned_view(model, config, before, cand.shape, select(scores, before, cand.shape), device=device,
                           slice_on_device=True)
        loss = mean_loss(view, held_out, batch_size=opts.batch_size)
        results.append({**cand.shape.to_dict(), "params": cand.params, "fraction": round(cand.fraction, 5),
                        "calib_loss": round(loss, 5)})
    best = min(range(len(tried)), key=lambda i: (results[i]["calib_loss"], -tried[i].params))
    log(f"shape search: {len(tried)} shapes tried, best calibration loss {results[best]['calib_loss']:.4f}")
    return tried[best], results


@dataclass
class Loaded:
    """The source model and what was read with it: the inputs of every pruning step."""

    original: Any  # a Streamed model: read layer by layer from the source's files, never whole
    tokenizer: Any
    device: Any  # the torch.device every heavy stage runs on
    fingerprint: str
    calib_fp: str
    samples: Any  # calibration windows (n, seq_len), or None without calibration text
    load_whole: Callable[[], Any] = field(repr=False, default=lambda: None)
    _whole: Any = field(default=None, repr=False)

    def whole(self) -> Any:
        """The source model whole in memory (loaded once): only generation and distillation's teacher need it."""
        if self._whole is None:
            self._whole = self.load_whole()
        return self._whole

    def release_whole(self) -> None:
        self._whole = None


@dataclass
class Pruned:
    """Where the pruning steps ended."""

    current: Current
    chosen: Candidate
    steps: list[dict[str, Any]] = field(default_factory=list)
    recovery: dict[str, Any] = field(default_factory=dict)
    checkpoints: Path | None = None

    def clear_checkpoints(self) -> None:
        """The output is complete: the checkpoints are spent."""
        if self.checkpoints is not None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)


@dataclass
class Steps:
    """The pruning steps of one run, sharing the plan, the original model and the clocks."""

    plan: PackagePlan
    loaded: Loaded
    quality: Quality
    timer: Timer
    progress: bool
    log: Log

    @property
    def _save_dtype(self) -> Any:
        import torch

        return getattr(torch, self.plan.save_dtype)

    @property
    def opts(self) -> PackageOptions:
        return self.plan.opts

    def run(self) -> Pruned:
        plan, opts, original = self.plan, self.opts, self.loaded.original
        if not plan.prunes:  # quantization only: the writer quantizes the source as it is stored
            return Pruned(Current(original, dict(plan.src.config), plan.before, _identity(plan.before),
                                  plan.total), plan.candidates[0])
        cur = Current(original, dict(plan.src.config), plan.before, _identity(plan.before), plan.total)
        targets: list[float | None] = [None]
        if opts.iterative and opts.target_params is not None:
            targets = list(step_targets(opts.target_params, opts.prune_step))
        budget = _split(opts.distill_steps, len(targets)) if opts.distills else [0] * len(targets)
        dsamples = None
        if opts.distills:
            dsamples = calibration_samples(self.loaded.tokenizer, plan.calib, num_samples=opts.distill_samples,
                                           seq_len=opts.distill_seq_len, seed=opts.seed + 1)
        root = (Path(opts.checkpoint_dir) if opts.checkpoint_dir
                else cache_root() / "recover" / run_key(opts, self.loaded.fingerprint, self.loaded.calib_fp))
        done = Pruned(cur, plan.candidates[0], checkpoints=root)
        done.recovery = {"schedule": "iterative" if opts.iterative else "one-shot", "steps": done.steps,
                         "refit": opts.recover and opts.refit,
                         "distill_steps": opts.distill_steps if opts.distills else 0}
        self.log(f"pruning in {len(targets)} step(s)" + (
            f" to {', '.join(f'{x:.3f}' for x in targets if x)} of the parameters" if opts.iterative else ""))
        for k, target in enumerate(targets):
            where = f"step {k + 1}/{len(targets)}"
            last = k == len(targets) - 1
            resumed = _load_step(root / f"step-{k + 1}", device=self.loaded.device, dtype=original.dtype)
            if resumed is not None and not last:
                done.current, report = resumed
                done.steps.append({**report, "resumed": True})
                self.log(f"{where}: done in an earlier run, resumed from {root / f'step-{k + 1}'}")
                continue
            done.current, done.chosen, report = self.step(k, done.current, target, where=where, last=last,
                                                          distill_steps=budget[k], dsamples=dsamples,
                                                          step_dir=root / f"step-{k + 1}")
            done.steps.append(report)
            if not last:
                _save_step(root / f"step-{k + 1}", done.current, report, written=not _distills(budget[k], dsamples),
                           dtype=self._save_dtype)
        if opts.recover and (done.recovery["refit"] or opts.distills):
            self.quality.stage("recovered", done.current.model)
        return done

    def step(self, k: int, cur: Current, target: float | None, *, where: str, last: bool, distill_steps: int,
             dsamples: Any, step_dir: Path) -> tuple[Current, Candidate, dict[str, Any]]:
        """Score, search, prune, refit and distill once; returns the new state, its shape and the step report.

        The pruned model is a streamed view of the current one until the refit writes it, layer by layer, to
        ``step_dir/model`` (sharded safetensors); the next stages stream it from there. Only distillation
        holds it whole."""
        import torch

        from serve_pruned.compress.importance import select
        from serve_pruned.compress.prune import pruned_config, pruned_view, whole_model
        from serve_pruned.compress.shards import ShardWriter, write_layers

        plan, opts = self.plan, self.opts
        report: dict[str, Any] = {"step": k + 1}
        with self.timer("score"):
            scores = self.score(k, cur, where=where)
        with self.timer("prune"):
            candidates = plan.candidates
            if target is not None:
                relative = min(target * plan.total / cur.params, 1.0 - 1e-9)
                candidates = plan_shapes(_shapes_of(cur.model), cur.shape, target=relative, **plan.shape_kw())
            chosen, search = _search(cur.model, cur.config, cur.shape, candidates, scores, self.loaded.samples,
                                     opts=opts, device=self.loaded.device, progress=self.progress, log=self.log)
            sel = select(scores, cur.shape, chosen.shape)
            view = pruned_view(cur.model, cur.config, cur.shape, chosen.shape, sel, device=self.loaded.device)
            new_cfg = pruned_config(cur.config, chosen.shape, sel)
            params = count_params(_shapes_of(view), chosen.shape)
        report.update(target=round(target, 5) if target is not None else None, shape=chosen.shape.to_dict(),
                      params=params, fraction=round(params / plan.total, 5), shape_search=search)
        self.log(f"{where}: pruned to {chosen.shape.to_dict()} = {params / plan.total:.3f} of the parameters")
        if last:
            self.quality.stage("pruned", view)
        kept = _compose(cur.kept, sel)
        # stored as the output will be (the refit and distillation compute in float32): an 8B step is 12 GB, not 24
        writer = ShardWriter(step_dir / "model", new_cfg, dtype=self._save_dtype)
        layers_written = False
        if opts.recover and opts.refit and self.loaded.samples is not None:
            dropped = sel.layers != list(range(cur.shape.num_layers))
            layers_written = self.refit(view, cur, chosen.shape, kept, dropped=dropped, where=where, report=report,
                                        writer=writer)
        with self.timer("prune"):
            write_layers(writer, view, skip_layers=layers_written)
            writer.close()
        new_model: Any = _step_model(step_dir, device=self.loaded.device, dtype=self.loaded.original.dtype)
        if _distills(distill_steps, dsamples):
            # AdamW's updates (1e-4 of a weight) vanish in bfloat16's 8 significant bits: it trains float32 weights
            new_model = whole_model(new_model, torch.float32)
            self.distill(new_model, dsamples, distill_steps, where=where, step_dir=step_dir, report=report,
                         hidden_channels=kept.hidden)
            new_model.to(self.loaded.original.dtype)  # trained: the next stages compute as every other one
        return (Current(new_model, new_cfg, chosen.shape, kept, params), Candidate(chosen.shape, params,
                params / plan.total), report)

    def score(self, k: int, cur: Current, *, where: str) -> Scores:
        """Importance of every structure of the current model (the first step's statistics are cached)."""
        import torch

        from serve_pruned.compress.importance import collect_stats, compute_scores
        from serve_pruned.compress.stream import streamed

        opts, samples, device = self.opts, self.loaded.samples, self.loaded.device
        scorer = self.plan.chosen_scorer.name
        obs = scorer == "obs"  # its FFN order needs Gram matrices, collected only for it
        if k == 0 and samples is not None:
            key = stats_key(opts, self.loaded.fingerprint, self.loaded.calib_fp, obs=obs)
            stats = cached_stats(self.loaded.original, samples, key, batch_size=opts.batch_size,
                                 ffn_order=obs, progress=self.progress, log=self.log)
        elif samples is not None:
            with progress_bar(cur.shape.num_layers, f"{where}: scoring", self.progress, unit="layer") as bar:
                stats = collect_stats(streamed(cur.model, device), samples, batch_size=opts.batch_size, progress=bar,
                                      ffn_order=obs)
        else:  # magnitude scores need no data, only the weight norms; block influence is then unused
            stats = collect_stats(streamed(cur.model, device), torch.zeros((0, 1), dtype=torch.long))
        return compute_scores(stats, cur.shape, scorer)

    def refit(self, new_model: Any, cur: Current, shape: Shape, kept: Selection, *, dropped: bool, where: str,
              report: dict[str, Any], writer: Any) -> bool:
        """Least-squares refit of the pruned blocks' output projections (closed form), each finished layer
        written to ``writer``; False when nothing needed a refit (and nothing was written)."""
        opts = self.opts
        # the stream target corrects drift wherever it is, so every layer's o_proj and down_proj is refit
        # a narrower hidden size leaves no original-width input to fit a block to: the residual stream is the target
        stream = opts.refit_target == "stream" or shape.hidden_size < self.plan.before.hidden_size
        attn = shape.num_heads < cur.shape.num_heads or dropped or stream
        mlp = shape.intermediate_size < cur.shape.intermediate_size or dropped or stream
        if not (attn or mlp):
            return False
        from serve_pruned.compress.refit import refit

        def write(i: int, layer: Any) -> None:
            writer.add({f"model.layers.{i}.{n}": p for n, p in layer.named_parameters()})


        which = " + ".join(n for n, on in (("o_proj", attn), ("down_proj", mlp)) if on)
        with self.timer("refit"), progress_bar(shape.num_layers, f"{where}: refitting {which}", self.progress) as bar:
            report["refit"] = refit(new_model, self.loaded.original, kept.layers, self.loaded.samples, attention=attn,
                                    mlp=mlp, batch_size=opts.batch_size, target="stream" if stream else "block",
                                    channels=kept.hidden, device=self.loaded.device, progress=bar, on_layer=write)
        self.log(f"{where}: refit {which}: block error " + ", ".join(
            f"{n} {report['refit'][f'{n}_rel_error_before']:.3f} -> {report['refit'][f'{n}_rel_error_after']:.3f}"
            for n in ("attn", "mlp") if f"{n}_rel_error_before" in report["refit"]))
        return True

    def distill(self, new_model: Any, dsamples: Any, steps: int, *, where: str, step_dir: Path,
                report: dict[str, Any], hidden_channels: list[int] | None) -> None:
        """Logit distillation from the original, this step's share of the budget."""
        from serve_pruned.compress.distill import distill

        opts = self.opts
        settings = distill_settings(opts, steps)
        budget = opts.distill_time_budget_s * steps / opts.distill_steps if opts.distill_time_budget_s else None
        with self.timer("distill"), progress_bar(settings.steps, f"{where}: distilling", self.progress,
                                                 unit="step") as bar:
            report["distill"] = distill(new_model, self.loaded.whole(), dsamples, settings=settings,
                                        checkpoint_dir=step_dir / "distill", device=str(self.loaded.device),
                                        hidden_channels=hidden_channels,
                                        progress=bar, time_budget_s=budget)
        d = report["distill"]
        self.log(f"{where}: distilled {d['steps']} steps ({d['tokens']:,} tokens, {d['seconds']:.0f} s): "
                 f"KL {d['loss_first']:.3f} -> {d['loss_last']:.3f}"
                 + (f", resumed at step {d['resumed_from_step']}" if d["resumed_from_step"] else ""))
