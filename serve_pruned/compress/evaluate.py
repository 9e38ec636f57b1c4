"""Perplexity and top-1 agreement, on fixed non-overlapping windows of an evaluation token stream.

The same windows are sent to vLLM (prompt_logprobs) by :mod:`serve_pruned.serving.vllm_eval`, so the
two perplexities are directly comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from serve_pruned.compress.stream import Streamed, streamed
from serve_pruned.errors import UsageError
from serve_pruned.model.config import compute_dtype_for


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``seq_len`` tokens (a last window needs 2 tokens to count)."""
    return [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) >= 2]


@dataclass
class QualityReport:
    """Perplexity on held-out text, and agreement with a reference model when one is given.

    Attributes:
        perplexity: exp(mean negative log-likelihood) over ``tokens`` predicted tokens.
        nll: that mean negative log-likelihood (nats per token).
        tokens: predicted tokens counted.
        seq_len: window length used.
        top1_agreement: share of positions where this model's argmax equals the reference's
            (teacher-forced greedy agreement), or None without a reference.
    """

    perplexity: float
    nll: float
    tokens: int
    seq_len: int
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: Any,
    ids: list[int],
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    reference: Any = None,
    reference_top1: list[torch.Tensor] | None = None,
    keep_top1: list[torch.Tensor] | None = None,
    progress: Any = None,
) -> QualityReport:
    """Perplexity of ``model`` (a model in memory or a :class:`Streamed` one) on ``ids``, and top-1 agreement
    with ``reference`` when given.

    ``keep_top1`` collects this model's next-token argmax per batch; passed back later as
    ``reference_top1`` it stands in for the reference model, so the reference runs once, not per stage.
    ``progress`` advances once per decoder layer and once for the head, per model run.
    """
    batches = [torch.tensor(b, dtype=torch.long) for b in _window_batches(windows(ids, seq_len), seq_len, batch_size)]
    nll, top1 = _nll_and_top1(streamed(model), batches, progress=progress)
    if keep_top1 is not None:
        keep_top1.extend(top1)
    if reference is not None and reference_top1 is None:
        reference_top1 = _nll_and_top1(streamed(reference), batches, progress=progress)[1]
    count = sum(b[:, 1:].numel() for b in batches)
    agree = sum((r == t).sum().item() for r, t in zip(reference_top1, top1, strict=True)) if reference_top1 else 0
    mean = nll / count
    return QualityReport(perplexity=math.exp(mean), nll=mean, tokens=count, seq_len=seq_len,
                         top1_agreement=(agree / count) if reference_top1 is not None else None)


def eval_passes(model: Any) -> int:
    """Progress steps of one :func:`evaluate` run of ``model``: its decoder layers and the head."""
    return streamed(model).num_layers + 1


def _window_batches(wins: list[list[int]], seq_len: int, batch_size: int) -> list[list[list[int]]]:
    # full windows batch together; the short last one goes alone
    full = [w for w in wins if len(w) == seq_len]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    return batches + [[w] for w in wins if len(w) != seq_len]


def _nll_and_top1(model: Streamed, batches: list[torch.Tensor], *, progress: Any = None,
                  ) -> tuple[float, list[torch.Tensor]]:
    """Summed next-token negative log-likelihood over ``batches``, and each batch's argmax predictions."""
    hidden = model.hidden_states(batches, progress=progress)
    total, top1 = 0.0, []
    with model.head() as head:
        for x, h in zip(batches, hidden, strict=True):
            logits = head(h).float()[:, :-1]
            target = x[:, 1:].to(logits.device)
            total -= torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).sum().item()
            top1.append(logits.argmax(-1).cpu())
    if progress is not None:
        progress.update(1)
    return total, top1


@torch.no_grad()
def mean_loss(model: Any, samples: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token loss over calibration samples (used to rank candidate shapes)."""
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    total, _ = _nll_and_top1(streamed(model), batches)
    return total / sum(b[:, 1:].numel() for b in batches)


def evaluate_folder(
    model_dir: str,
    text: list[str],
    *,
    base: str | None = None,
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
    backend: str = "transformers",
    serve_python: str | None = None,
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """`serve-pruned eval`: perplexity of a model folder, and agreement with ``base`` when given.

    With ``backend="vllm"`` the folder is served by stock vLLM from the serving environment and the
    perplexity comes from ``prompt_logprobs`` over the same windows, so the two backends compare 1:1.
    """
    from tqdm.auto import tqdm

    from serve_pruned.compress.data import eval_tokens, fingerprint_sources, read_sources
    from serve_pruned.compress.model_io import load_tokenizer, quiet_transformers
    from serve_pruned.model.source import resolve_model

    quiet_transformers(progress)

    sources = read_sources(text)
    src = resolve_model(model_dir, trust_remote_code=trust_remote_code)
    base_src = resolve_model(base, trust_remote_code=trust_remote_code) if base else None
    tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code)
    ids = eval_tokens(tokenizer, sources, max_tokens=max_tokens)
    if prompts and backend != "vllm":
        raise UsageError("--prompt needs --backend vllm (completions come from the served model)")
    if backend == "vllm":
        if base:
            raise UsageError("--base needs --backend transformers (agreement is computed on logits)")
        from serve_pruned.serving.vllm import VLLMServer, find_serve_python, free_port, serve_dtype

        python = find_serve_python(serve_python)
        with VLLMServer(str(src.path), free_port(), dtype=serve_dtype(src.config), max_model_len=seq_len + 16,
                        serve_python=python) as server:
            ppl, count = server.perplexity(windows(ids, seq_len))
            samples = {p: server.complete(p, max_tokens=24)["choices"][0]["text"] for p in prompts or []}
        return {"model": model_dir, "backend": "vllm", "perplexity": ppl, "nll": math.log(ppl), "tokens": count,
                "seq_len": seq_len, "top1_agreement": None, "text": [s.name for s in sources],
                "text_sha256": fingerprint_sources(sources), "completions": samples}
    # as `package` resolves it: from the source (the base, when one is given)
    dtype = compute_dtype_for(dtype, (t.dtype for t in (base_src or src).tensors.values()))
    model = _open(src, dtype=dtype, trust_remote_code=trust_remote_code)
    reference = _open(base_src, dtype=dtype, trust_remote_code=trust_remote_code) if base_src else None
    runs = eval_passes(model) + (eval_passes(reference) if reference is not None else 0)
    with tqdm(total=runs, desc="evaluating", unit="layer",
              disable=not progress, leave=False) as bar:
        report = evaluate(model, ids, seq_len=seq_len, batch_size=batch_size, reference=reference, progress=bar)
        result: dict[str, Any] = {"model": model_dir, "backend": "transformers", "compute_dtype": dtype,
                                  **report.to_dict()}
        if reference is not None:
            base_report = evaluate(reference, ids, seq_len=seq_len, batch_size=batch_size, progress=bar)
            result["base"] = {"model": base, **base_report.to_dict()}
            result["perplexity_ratio"] = report.perplexity / base_report.perplexity
    result["text"] = [s.name for s in sources]
    result["text_sha256"] = fingerprint_sources(sources)
    return result


def _open(src: Any, *, dtype: str, trust_remote_code: bool) -> Any:
    """A folder's model for evaluation: streamed from its files, or loaded whole when quantized (transformers
    decompresses compressed-tensors weights as it loads them; the raw tensors are not the model's weights)."""
    from serve_pruned.compress.model_io import load_model

    if src.config.get("quantization_config"):
        return load_model(src.path, dtype=dtype, trust_remote_code=trust_remote_code)
    return Streamed.from_folder(src, device="cpu", dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)



@torch.no_grad()
def greedy_continuations(model: Any, tokenizer: Any, prompts: list[str] | tuple[str, ...], *,
                         max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt, without a KV cache so any model state works.

    Each new token is one layer-by-layer pass over every prompt (each its own batch: no padding).
    """
    model = streamed(model)
    ids = [torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]], dtype=torch.long) for p in prompts]
    start = [x.shape[1] for x in ids]
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(ids)
        with model.head() as head:
            ids = [torch.cat([x, head(h[:, -1:]).argmax(-1).cpu()], dim=1) for x, h in zip(ids, hidden, strict=True)]
    return [x[0, n:].tolist() for x, n in zip(ids, start, strict=True)]


def prompt_agreement(ours: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How far greedy continuations follow the reference's: mean shared-prefix share, and exact matches."""
    prefix = []
    for a, b in zip(ours, reference, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n / max(len(b), 1))
    return {"prefix_agreement": sum(prefix) / len(prefix),
            "exact_match": sum(1 for a, b in zip(ours, reference, strict=True) if a == b) / len(prefix)}
