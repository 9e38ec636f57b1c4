"""Perplexity and top-1 agreement, on fixed non-overlapping windows of an evaluation token stream.

The same windows are sent to vLLM (prompt_logprobs) by :mod:`serve_pruned.serving.vllm_eval`, so the
two perplexities are directly comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from serve_pruned.errors import UsageError


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
    """Perplexity of ``model`` on ``ids`` (and top-1 agreement with ``reference`` when given).

    ``keep_top1`` collects this model's next-token argmax per batch; passed back later as
    ``reference_top1`` it stands in for the reference model, so the reference runs once, not per stage.
    """
    wins = windows(ids, seq_len)
    total_nll, count, agree = 0.0, 0, 0
    # full windows batch together; the short last one goes alone
    batches: list[list[list[int]]] = []
    full = [w for w in wins if len(w) == seq_len]
    batches.extend(full[i : i + batch_size] for i in range(0, len(full), batch_size))
    batches.extend([w] for w in wins if len(w) != seq_len)
    compare = reference is not None or reference_top1 is not None
    for bi, batch in enumerate(batches):
        x = torch.tensor(batch, dtype=torch.long)
        logits = model(input_ids=x, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = x[:, 1:]
        total_nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        top1 = logits[:, :-1].argmax(-1)
        if keep_top1 is not None:
            keep_top1.append(top1)
        if reference_top1 is not None:
            agree += (reference_top1[bi] == top1).sum().item()
        elif reference is not None:
            ref_logits = reference(input_ids=x, use_cache=False).logits
            agree += (ref_logits[:, :-1].argmax(-1) == top1).sum().item()
        if progress is not None:
            progress.update(len(batch))
    nll = total_nll / count
    return QualityReport(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        seq_len=seq_len,
        top1_agreement=(agree / count) if compare else None,
    )


@torch.no_grad()
def mean_loss(model: Any, samples: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token loss over calibration samples (used to rank candidate shapes)."""
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        x = samples[i : i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def evaluate_folder(
    model_dir: str,
    text: list[str],
    *,
    base: str | None = None,
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    dtype: str = "float32",
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
    from serve_pruned.compress.model_io import load_model, load_tokenizer, quiet_transformers
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
    model = load_model(src.path, dtype=dtype, trust_remote_code=trust_remote_code)
    reference = load_model(base_src.path, dtype=dtype, trust_remote_code=trust_remote_code) if base_src else None
    n_win = len(windows(ids, seq_len))
    with tqdm(total=n_win * (2 if reference is not None else 1), desc="evaluating", unit="seq",
              disable=not progress, leave=False) as bar:
        report = evaluate(model, ids, seq_len=seq_len, batch_size=batch_size, reference=reference, progress=bar)
        result: dict[str, Any] = {"model": model_dir, "backend": "transformers", **report.to_dict()}
        if reference is not None:
            base_report = evaluate(reference, ids, seq_len=seq_len, batch_size=batch_size, progress=bar)
            result["base"] = {"model": base, **base_report.to_dict()}
            result["perplexity_ratio"] = report.perplexity / base_report.perplexity
    result["text"] = [s.name for s in sources]
    result["text_sha256"] = fingerprint_sources(sources)
    return result



@torch.no_grad()
def greedy_continuations(model: Any, tokenizer: Any, prompts: list[str] | tuple[str, ...], *,
                         max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt, without a KV cache so any model state works."""
    out = []
    for prompt in prompts:
        x = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        ids = x
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        out.append(ids[0, x.shape[1] :].tolist())
    return out


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
