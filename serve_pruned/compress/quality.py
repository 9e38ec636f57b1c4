"""The quality report: each stage measured on held-out and out-of-domain text and fact prompts, vs the original.

Measuring (``Quality.stage``) is kept apart from formatting (``describe``) and from the manifest section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_pruned.compress.data import FACT_PROMPTS, TextSource, fingerprint_sources
from serve_pruned.compress.progress import progress_bar
from serve_pruned.compress.timer import Timer
from serve_pruned.options import PackageOptions

Log = Callable[[str], None]


class Quality:
    """Quality of each stage on held-out text (and out-of-domain text, and fact prompts), vs the original."""

    def __init__(self, opts: PackageOptions, tokenizer: Any, ids: list[int], ood_ids: list[int], *,
                 timer: Timer | None = None, device: Any = None, progress: bool, log: Log) -> None:
        self.timer = timer or Timer()  # the "eval" stage's clock and memory
        self.opts, self.tokenizer, self.ids, self.ood_ids = opts, tokenizer, ids, ood_ids
        self.device = device  # where each stage's model runs, layer by layer (None: where its weights are)
        self.progress, self.log = progress, log
        self.prompts = list(opts.eval_prompts if opts.eval_prompts is not None else FACT_PROMPTS)
        self.report: dict[str, Any] = {}
        self.reference: Any = None
        self.reference_top1: dict[str, list[Any]] = {}
        self.reference_continuations: list[list[int]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.ids)

    def stage(self, name: str, model: Any) -> None:
        """Measure ``model`` as the report's stage ``name`` (timed as the run's "eval" stage)."""
        if not self.enabled:
            return
        with self.timer("eval"):
            self._measure(name, model)

    def _measure(self, name: str, model: Any) -> None:
        from serve_pruned.compress.evaluate import eval_passes, evaluate, greedy_continuations, prompt_agreement
        from serve_pruned.compress.stream import streamed

        model = streamed(model, self.device)
        is_original = name == "original"
        entry: dict[str, Any] = {}
        for key, ids in (("held_out", self.ids), ("out_of_domain", self.ood_ids)):
            if not ids:
                continue
            cached = self.reference_top1.get(key)
            reference = None if is_original or cached is not None else streamed(self.reference, self.device)
            passes = eval_passes(model) + (eval_passes(reference) if reference is not None else 0)
            with progress_bar(passes, f"evaluating {name} ({key})", self.progress, unit="layer") as bar:
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
        self.log(describe(name, entry))

    def manifest_section(self, *, eval_sources: list[TextSource], ood_sources: list[TextSource]) -> dict[str, Any]:
        """The manifest's ``quality``: what was measured on, and each stage's entry."""
        if not self.enabled:
            return {}
        return {"eval_text": [s.name for s in eval_sources], "eval_text_sha256": fingerprint_sources(eval_sources),
                "ood_text": [s.name for s in ood_sources], "compute_dtype": self.opts.compute_dtype,
                "prompts": self.prompts, **self.report}


def describe(name: str, entry: dict[str, Any]) -> str:
    """One stage's quality as the log line the report shows."""
    msg = f"{name}: perplexity {entry['perplexity']:.2f}"
    if "perplexity_ratio" in entry:
        msg += f" ({entry['perplexity_ratio']:.2f}x the original)"
    if "out_of_domain" in entry:
        msg += f", out of domain {entry['out_of_domain']['perplexity']:.2f}"
    if entry.get("top1_agreement") is not None:
        msg += f", top-1 agreement {entry['top1_agreement']:.3f}"
    if "prompts" in entry and name != "original":
        msg += f", fact prompts {entry['prompts']['prefix_agreement']:.2f}"
    return msg
