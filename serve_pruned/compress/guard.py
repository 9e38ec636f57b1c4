"""The quality guard: the strongest compression whose packaged model stays within a perplexity ratio.

``--max-ppl-ratio R`` (on the held-out ``--eval-text``; optionally ``--min-fact-agreement F`` on the fact
prompts) makes `package` choose among a ladder of candidates instead of taking one target: each kept-parameter
fraction of ``--guard-fractions`` with ``--quant``, and quantization alone when there is one, ordered strongest
first by their predicted weight bytes. A stronger cut is never better than a weaker one of the same scheme, so the
ladder is searched by bisection: each candidate tried is a whole `package` run (pruning, recovery, quantization,
evaluation) into a scratch folder of ours beside the output, its final model measured, and the strongest that
passes becomes the output, with every try, the guard and the measured ratio in its manifest and model card. When
none passes, nothing is written and the refusal lists the frontier it measured. Tries reuse what the cache holds
(statistics; recovery checkpoints of the same cut when only the quantization differs).

The single run is passed in (``run``), so this module knows nothing of the pipeline's stages.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_pruned.atomic import atomic_dir, check_output
from serve_pruned.errors import InvalidTargetError, QualityGuardError
from serve_pruned.manifest import MANIFEST_NAME, PACKAGE_OWNER, Manifest, read_manifest, write_manifest
from serve_pruned.options import PackageOptions

Log = Callable[[str], None]
# A whole `package` run into the given options' output folder; returns that folder.
Run = Callable[[PackageOptions], Path]
STAGES = ("pruned", "recovered", "quantized")  # the last one a run measured is its output


@dataclass(frozen=True)
class Rung:
    """One candidate: a kept-parameter fraction (None: not pruned) with a quantization scheme."""

    fraction: float | None
    quant: str

    def describe(self) -> str:
        cut = f"{self.fraction:g} of the parameters" if self.fraction is not None else "unpruned"
        return f"{cut} + {self.quant}" if self.quant != "none" else cut


@dataclass
class Tried:
    """What one candidate measured."""

    rung: Rung
    weight_bytes: int
    ppl_ratio: float
    ood_ratio: float | None
    facts: float | None
    passed: bool
    seconds: float

    def line(self) -> str:
        extra = (f", out of domain {self.ood_ratio:.3f}x" if self.ood_ratio is not None else "") + (
            f", fact prompts {self.facts:.2f}" if self.facts is not None else "")
        return (f"{self.rung.describe()}: {self.weight_bytes / 2**20:.1f} MiB, perplexity {self.ppl_ratio:.3f}x"
                f"{extra} -> {'within' if self.passed else 'outside'} the guard")


def ladder(opts: PackageOptions) -> list[Rung]:
    """The candidates this model allows, strongest (fewest predicted weight bytes) first: each fraction of
    ``guard_fractions`` with ``quant``, then ``quant`` alone. A fraction below the smallest shape the options allow
    is left out."""
    from serve_pruned.compress.plan import plan_package

    rungs: list[tuple[int, Rung]] = []
    wanted = [Rung(f, opts.quant) for f in sorted(set(opts.guard_fractions))]
    for rung in wanted + ([Rung(None, opts.quant)] if opts.quant != "none" else []):
        try:
            plan = plan_package(_one(opts, rung, opts.out))
        except InvalidTargetError:
            continue
        rungs.append((plan.sizer().weight_bytes(plan.candidates[0].shape), rung))
    return [r for _, r in sorted(rungs, key=lambda br: br[0])]


def _one(opts: PackageOptions, rung: Rung, out: Path) -> PackageOptions:
    """The options of one candidate's run: its cut and scheme, into ``out``, with no guard of its own."""
    return opts.model_copy(update={"target_params": rung.fraction, "quant": rung.quant, "out": out,
                                   "max_ppl_ratio": None, "min_fact_agreement": None})


def measure(folder: Path, rung: Rung, opts: PackageOptions, seconds: float) -> Tried:
    m = read_manifest(folder)
    entry = next(m.quality[s] for s in reversed(STAGES) if s in m.quality)
    ratio = float(entry["perplexity_ratio"])
    ood = entry.get("out_of_domain", {}).get("perplexity_ratio")
    facts = entry.get("prompts", {}).get("prefix_agreement")
    passed = ratio <= float(opts.max_ppl_ratio or 0) and (
        opts.min_fact_agreement is None or (facts is not None and facts >= opts.min_fact_agreement))
    return Tried(rung, m.weight_bytes, ratio, ood, facts, passed, seconds)


def package_within_guard(opts: PackageOptions, run: Run, *, log: Log = lambda _m: None,
                         repo_id: str | None = None) -> Manifest:
    """Package the strongest rung of :func:`ladder` that keeps within the guard into ``opts.out``.

    Raises:
        QualityGuardError: no rung keeps within it (nothing is written; the error lists what was measured).
    """
    out = check_output(opts.out, overwrite=opts.overwrite, owner=PACKAGE_OWNER)
    rungs = ladder(opts)
    if not rungs:
        raise QualityGuardError(_guard_text(opts), ["no --guard-fractions cut is a shape this model allows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.guard-{uuid.uuid4().hex[:8]}"  # ours alone: removed whatever happens
    scratch.mkdir()
    tried: dict[int, Tried] = {}
    try:
        lo, hi, best = 0, len(rungs) - 1, None
        while lo <= hi:  # the first rung (strongest) that passes; every weaker one would too
            mid = (lo + hi) // 2
            tried[mid] = _try(opts, rungs[mid], scratch / f"try-{mid}", run, log=log)
            if tried[mid].passed:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        frontier = [tried[i] for i in sorted(tried)]
        if best is None:
            raise QualityGuardError(_guard_text(opts), [t.line() for t in frontier])
        log(f"guard: chose {rungs[best].describe()}, the strongest of {len(rungs)} candidates within it "
            f"({len(tried)} tried)")
        return _install(scratch / f"try-{best}", out, opts, _report(opts, rungs, frontier, tried[best]),
                        repo_id=repo_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _try(opts: PackageOptions, rung: Rung, folder: Path, run: Run, *, log: Log) -> Tried:
    log(f"guard: trying {rung.describe()}")
    t = time.perf_counter()
    run(_one(opts, rung, folder).model_copy(update={"overwrite": False}))
    tried = measure(folder, rung, opts, time.perf_counter() - t)
    log(f"guard: {tried.line()}")
    return tried


def _guard_text(opts: PackageOptions) -> str:
    facts = f" and fact prompts of at least {opts.min_fact_agreement:g}" if opts.min_fact_agreement is not None else ""
    return f"held-out perplexity within {opts.max_ppl_ratio:g}x the original's{facts}"


def _report(opts: PackageOptions, rungs: list[Rung], frontier: list[Tried], chosen: Tried) -> dict[str, Any]:
    return {"max_ppl_ratio": opts.max_ppl_ratio, "min_fact_agreement": opts.min_fact_agreement,
            "guard": _guard_text(opts), "candidates": [asdict(r) for r in rungs],
            "tried": [{**asdict(t.rung), **{k: v for k, v in asdict(t).items() if k != "rung"}} for t in frontier],
            "chosen": asdict(chosen.rung), "measured_ppl_ratio": chosen.ppl_ratio,
            "why": f"the strongest candidate whose {_guard_text(opts)}; the next stronger one tried was outside it"
                   if any(t.rung != chosen.rung and not t.passed for t in frontier) else
                   f"the strongest candidate of all, and within the guard ({_guard_text(opts)})"}


def _install(chosen: Path, out: Path, opts: PackageOptions, report: dict[str, Any], *,
             repo_id: str | None) -> Manifest:
    """The chosen try's files become ``out`` (atomically), its manifest and card saying what the guard did."""
    from serve_pruned.hub.card import render_card

    with atomic_dir(out, overwrite=opts.overwrite, owner=PACKAGE_OWNER) as tmp:
        for item in chosen.iterdir():
            item.replace(tmp / item.name)  # the same filesystem: a rename, not a copy
        body = json.loads((tmp / MANIFEST_NAME).read_text())
        body.pop("files", None)
        body.pop("format_version", None)
        body["guard"] = report
        body["options"] = {**body.get("options", {}), "out": str(out)}
        (tmp / "README.md").write_text(render_card(body, name=out.name, repo_id=repo_id))
        write_manifest(tmp, body)
    return read_manifest(out)
