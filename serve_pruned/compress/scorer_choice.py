"""Which importance scorer a run uses: ``--scorer auto`` decides from obs's predicted cost (torch-free).

obs ranks FFN channels for exactly the least-squares refit that follows, and with the refit it ties
activation in domain and is 1.4% better out of domain (SmolLM2 at 0.75, bench/scorers.py); without the refit
it is worse (2.90x / 6.27x against 2.64x / 3.58x). Its greedy elimination is cubic in the FFN width, though:
a second or two a layer at SmolLM2's 1536, hours in all at Llama-3.1-8B's 14336 on the host CPU
(bench/obs_cost.py). So ``auto`` takes obs when the refit runs and its elimination is predicted to fit
``AUTO_OBS_BUDGET_S`` (or runs on an accelerator, where the elimination's dense products are cheap), and
activation otherwise; the plan says which and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_pruned.model.shapes import Shape
from serve_pruned.options import PackageOptions

# obs_order's seconds per decoder layer divided by the FFN width cubed, on the host CPU of this machine kind
# (2 cores; fitted by bench/obs_cost.py, docs/benchmarks.md "obs-cost"). More cores make it faster.
OBS_SECONDS_PER_WIDTH_CUBED = 0.106e-9
# How long auto lets obs's elimination take on the host before it picks activation instead.
AUTO_OBS_BUDGET_S = 600.0


@dataclass(frozen=True)
class ScorerChoice:
    """The scorer a run uses, and why (for the log, the plan and the manifest)."""

    name: str
    reason: str
    obs_seconds: float | None = None  # the elimination's predicted host time, where it was predicted

    def as_manifest(self) -> dict[str, object]:
        out: dict[str, object] = {"scorer": self.name, "scorer_reason": self.reason}
        if self.obs_seconds is not None:
            out["obs_predicted_s"] = round(self.obs_seconds, 1)
        return out


def obs_seconds(shape: Shape) -> float:
    """obs's greedy elimination over every layer of ``shape``, predicted for the host CPU."""
    return OBS_SECONDS_PER_WIDTH_CUBED * shape.intermediate_size ** 3 * shape.num_layers


def choose_scorer(opts: PackageOptions, before: Shape, *, on_device: bool) -> ScorerChoice:
    """The scorer ``opts`` asks for, or (``auto``) the one its cost allows."""
    if opts.scorer != "auto":
        return ScorerChoice(opts.scorer, "asked for (--scorer)")
    if not (opts.recover and opts.refit):
        return ScorerChoice("activation", "auto: obs ranks for the refit, and there is none")
    if on_device:  # its cost there is not measured yet (bench/gpu_check.py records it)
        return ScorerChoice("obs", "auto: the refit follows, and obs's elimination runs on the accelerator")
    cost = obs_seconds(before)
    if cost <= AUTO_OBS_BUDGET_S:
        return ScorerChoice("obs", f"auto: the refit follows, and obs's elimination is predicted at {cost:.0f} s "
                            "on the host", cost)
    return ScorerChoice("activation", f"auto: obs's elimination is predicted at {_duration(cost)} on the host "
                        f"(FFN width {before.intermediate_size}, cubic in it), over the {AUTO_OBS_BUDGET_S:.0f} s "
                        "auto allows; --scorer obs runs it anyway, --device cuda makes it cheap", cost)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"
