"""The shared start of the distillation benchmarks: SmolLM2-135M-Instruct pruned one-shot to 0.75 of its
parameters and refit by `package()` (no distillation), the original as teacher, the calibration sources with
the package's own cached generated texts, and the held-out / out-of-domain evaluation tokens."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _report import DOCS, OOD

from serve_pruned.compress.data import TextSource, eval_tokens, read_sources
from serve_pruned.compress.evaluate import evaluate
from serve_pruned.compress.example_model import materialize
from serve_pruned.compress.generation import GenerationJob, generated_texts
from serve_pruned.compress.model_io import load_model, load_tokenizer
from serve_pruned.compress.package import package
from serve_pruned.compress.provenance import source_fingerprint
from serve_pruned.model.source import resolve_model
from serve_pruned.options import PackageOptions

CALIB = (str(DOCS / "howto"), str(DOCS / "faq"), "generated:32")


@dataclass
class Start:
    opts: PackageOptions  # what made the start; its distillation fields are the package defaults
    tokenizer: Any
    teacher: Any
    student: Any  # pruned + refit
    sources: list[TextSource]
    texts: list[list[int]]  # Python tutorial (held out), GPL-3 (out of domain)

    def ppl(self, model: Any) -> tuple[float, float]:
        """Perplexity of ``model`` held out and out of domain (512-token windows)."""
        held_out, ood = (evaluate(model, ids, seq_len=512).perplexity for ids in self.texts)
        return held_out, ood


def refit_start(*, eval_tokens_max: int, refit_target: str = "block") -> Start:
    with tempfile.TemporaryDirectory() as tmp:
        src = materialize(Path(tmp) / "smol")
        out = Path(tmp) / "refit"
        opts = PackageOptions(model=str(src), out=out, target_params=0.75, schedule="one-shot", distill_steps=0,
                              calib=CALIB, refit_target=refit_target)
        package(opts, progress=False)
        tok = load_tokenizer(src, trust_remote_code=False)
        teacher = load_model(src, dtype="float32", trust_remote_code=False)
        student = load_model(out, dtype="float32", trust_remote_code=False)
        sources = read_sources(list(CALIB))
        resolved = resolve_model(str(src))
        for s in sources:  # the same generated texts the packaging used (cached by the model's fingerprint)
            if s.generate:
                job = GenerationJob(Path(resolved.path), dict(resolved.config), s.generate,
                                    seq_len=opts.distill_seq_len, seed=opts.seed,
                                    fingerprint=source_fingerprint(resolved))
                s.docs = generated_texts(job, load_whole=lambda: teacher, tokenizer=tok, progress=False,
                                         log=lambda _m: None)
    texts = [eval_tokens(tok, read_sources([str(p)]), max_tokens=eval_tokens_max) for p in (DOCS / "tutorial", OOD)]
    return Start(opts, tok, teacher, student, sources, texts)
