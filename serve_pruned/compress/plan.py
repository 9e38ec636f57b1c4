"""The packaging plan: everything checked before a weight is loaded (torch-free).

Output folder, source model and its support, the candidate shapes, the quantization plan, the text
sources and the licence: bad input fails here in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_pruned.atomic import check_output
from serve_pruned.compress.data import TextSource, read_sources
from serve_pruned.compress.memory_plan import DTYPE_BYTES, MemoryPlan, plan_memory
from serve_pruned.compress.provenance import source_license
from serve_pruned.compress.quantize import QuantPlan, plan_quantization
from serve_pruned.compress.scorer_choice import ScorerChoice, choose_scorer
from serve_pruned.compress.size_target import Sizer, TargetFit, fit_target
from serve_pruned.errors import CalibrationDataError, InvalidTargetError, UsageError
from serve_pruned.manifest import PACKAGE_OWNER
from serve_pruned.model.arch import ArchSupport, support_for
from serve_pruned.model.config import compute_dtype_for, config_dtype
from serve_pruned.model.shapes import Candidate, Shape, count_params, plan_shapes
from serve_pruned.model.source import ModelSource, resolve_model
from serve_pruned.options import PackageOptions, SizeTarget


@dataclass
class PackagePlan:
    """What one `package` run will do, resolved and checked."""

    opts: PackageOptions
    out: Path
    src: ModelSource
    support: ArchSupport
    before: Shape
    total: int  # parameters of the source
    candidates: list[Candidate]
    calib: list[TextSource]
    eval: list[TextSource]
    ood: list[TextSource]
    license_id: str | None
    # a target in bytes or instances, and the shapes it admits (opts then holds the parameter fraction it implies)
    fit: TargetFit | None = None
    # set once the device is known (:meth:`place`)
    memory: MemoryPlan | None = None
    scorer: ScorerChoice | None = None

    @property
    def prunes(self) -> bool:
        return self.opts.prunes

    def shape_kw(self) -> dict[str, Any]:
        """How the shape search may move, for this architecture and quantization."""
        return dict(multiple_of=self.opts.ffn_multiple, prune_heads=self.support.prune_heads,
                    heads_divide_hidden=self.support.heads_divide_hidden, search_hidden=self.opts.prune_hidden)

    @property
    def save_dtype(self) -> str:
        """What the output's (and each step checkpoint's) weights are stored in: the source's declared dtype,
        else float32 (transformers' default when a config declares none)."""
        return config_dtype(self.src.config) or "float32"

    def place(self, *, on_device: bool) -> MemoryPlan:
        """What depends on where the heavy stages run, on the host or an accelerator: the scorer (``auto``
        weighs obs's cost there) and each stage's predicted peak."""
        self.scorer = choose_scorer(self.opts, self.before, on_device=on_device)
        self.memory = plan_memory(self.opts, before=self.before, config=dict(self.src.config), total_params=self.total,
                                  save_dtype=self.save_dtype, has_eval=bool(self.eval or self.ood),
                                  on_device=on_device, scorer=self.scorer.name)
        return self.memory

    @property
    def chosen_scorer(self) -> ScorerChoice:
        if self.scorer is None:
            raise RuntimeError("the plan is not placed on a device yet (PackagePlan.place)")
        return self.scorer

    def quantization(self, shape: Shape) -> QuantPlan | None:
        return plan_quantization(self.opts.quant, quantized_widths(shape), group_size=self.opts.group_size,
                                 kv_cache=self.opts.kv_cache_dtype)

    def sizer(self) -> Sizer:
        """What an output of a given shape weighs, with this run's quantization and save dtype."""
        return Sizer(self.src.shapes(), self.before, self.src.config, DTYPE_BYTES.get(self.save_dtype, 4),
                     self.quantization)


def quantized_widths(shape: Shape) -> list[int]:
    """Input widths of the linear layers a quantizer sees: hidden (q/k/v/gate/up), o_proj, down_proj."""
    return [shape.hidden_size, shape.num_heads * shape.head_dim, shape.intermediate_size]


def plan_package(opts: PackageOptions) -> PackagePlan:
    """Resolve and check everything ``opts`` asks for; raises before any weight is loaded."""
    out = check_output(opts.out, overwrite=opts.overwrite, owner=PACKAGE_OWNER)
    src = resolve_model(opts.model, revision=opts.revision, trust_remote_code=opts.trust_remote_code)
    if src.path.resolve() == out or out in src.path.resolve().parents:
        raise UsageError(f"--out {out} would replace the source model {src.path}",
                         hint="write the output to a new folder beside it")
    support = support_for(src.config)  # an unsupported architecture says so before its config is read further
    # every stage (and the memory plan, the caches' keys, the report) reads the dtype it resolves to
    opts = opts.model_copy(update={"compute_dtype": compute_dtype_for(
        opts.compute_dtype, (t.dtype for t in src.tensors.values()))})
    before = Shape.from_config(src.config)
    plan = PackagePlan(opts=opts, out=out, src=src, support=support, before=before,
                       total=count_params(src.shapes(), before),
                       candidates=[], calib=[], eval=[], ood=[], license_id=None)
    plan.candidates = _candidates(plan)
    for cand in plan.candidates:  # a group size that cannot work fails now, not after minutes of work
        plan.quantization(cand.shape)
    _check_calibration_needed(plan)
    plan.calib, plan.eval, plan.ood = _text_sources(opts)
    plan.license_id = opts.license or source_license(src.path)
    return plan


def _candidates(plan: PackagePlan) -> list[Candidate]:
    opts = plan.opts
    if opts.size_target is not None:
        return _fit_size_target(plan, opts.size_target)
    if plan.prunes:
        return plan_shapes(plan.src.shapes(), plan.before, target=opts.target_params, keep_heads=opts.keep_heads,
                           keep_kv_heads=opts.keep_kv_heads, keep_ffn=opts.keep_ffn, keep_hidden=opts.keep_hidden,
                           drop_layers=opts.drop_layers, **plan.shape_kw())
    if opts.quant == "none":
        raise InvalidTargetError(
            "nothing to do: no pruning target or counts, and no quantization",
            field="target_params", hint="pass --target-params 0.75 and/or --quant w8a8")
    return [Candidate(plan.before, plan.total, 1.0)]


def _fit_size_target(plan: PackagePlan, target: SizeTarget) -> list[Candidate]:
    """The shapes a bytes or instances target admits. The options then say it as the parameter fraction of the
    largest (what the memory plan and the checkpoints' key read), or as no pruning when quantizing is enough."""
    opts = plan.opts

    def search(fits: Callable[[Shape], bool]) -> list[Candidate]:
        return plan_shapes(plan.src.shapes(), plan.before, keep_heads=opts.keep_heads, keep_kv_heads=opts.keep_kv_heads,
                           keep_ffn=opts.keep_ffn, keep_hidden=opts.keep_hidden, drop_layers=opts.drop_layers,
                           fits=fits, **plan.shape_kw())

    plan.fit = fit_target(target, plan.sizer(), search)
    resolved = {"target_weight_bytes": None, "target_instances": None}
    if not plan.fit.candidates:
        plan.opts = opts.model_copy(update=resolved)
        return [Candidate(plan.before, plan.total, 1.0)]
    plan.opts = opts.model_copy(update={**resolved, "target_params": plan.fit.candidates[0].fraction})
    return plan.fit.candidates


def _check_calibration_needed(plan: PackagePlan) -> None:
    opts = plan.opts
    quant_needs_data = opts.quant in ("w8a8", "w4a16")
    hidden_cut = any(c.shape.hidden_size < plan.before.hidden_size for c in plan.candidates)
    needs_calib = quant_needs_data or (plan.prunes and (opts.scorer != "magnitude" or len(plan.candidates) > 1
                                                        or opts.drop_layers > 0 or opts.iterative or hidden_cut))
    if needs_calib and not opts.calib:
        what = "quantization" if quant_needs_data and not plan.prunes else "this pruning"
        raise CalibrationDataError(f"{what} needs calibration text and none was given", path="",
                                   hint="pass --calib FILE (repeat it to mix sources)")


def _text_sources(opts: PackageOptions) -> tuple[list[TextSource], list[TextSource], list[TextSource]]:
    """Calibration, held-out and out-of-domain text, read and checked."""
    calib = read_sources(list(opts.calib), text_field=opts.text_field) if opts.calib else []
    held_out = read_sources(list(opts.eval_text), text_field=opts.text_field) if opts.eval_text else []
    if any(s.generate for s in held_out):
        raise CalibrationDataError("generated text cannot be evaluation text: it is the original model's own output",
                                   path="generated:", hint="evaluate on held-out text the model did not write")
    ood = read_sources(list(opts.eval_ood_text), text_field=opts.text_field) if opts.eval_ood_text else []
    return calib, held_out, ood
