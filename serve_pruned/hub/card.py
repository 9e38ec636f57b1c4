"""The model card (README.md) of a packaged model: Hub metadata, what was done, how well it does, how to serve it.

Torch-free. The YAML front matter follows the Hub's model-card metadata: ``base_model`` and
``base_model_relation`` (``finetune`` for a pruned model -- its weights changed --, ``quantized`` when
it was only quantized), ``license`` carried from the source, ``library_name``, ``pipeline_tag``, tags.
"""

from __future__ import annotations

from typing import Any

import yaml

STAGES = ("original", "pruned", "recovered", "quantized")
STAGE_TITLES = {"original": "original", "pruned": "pruned (before recovery)", "recovered": "pruned + recovered",
                "quantized": "final (quantized)"}


def card_metadata(body: dict[str, Any]) -> dict[str, Any]:
    """The front matter for ``body`` (the manifest without its file table)."""
    src = body.get("source") or {}
    pruned = (body.get("kind") or "").startswith("pruned")
    quant = body.get("quantization")
    tags = ["serve-pruned", "vllm", "compressed-tensors" if quant else "safetensors"]
    if pruned:
        tags.append("pruned")
    if quant:
        tags.append(str(quant["scheme"]))
    meta: dict[str, Any] = {}
    if src.get("license"):
        meta["license"] = src["license"]
    if src.get("base_model"):
        meta["base_model"] = src["base_model"]
        meta["base_model_relation"] = "finetune" if pruned else "quantized"
    meta.update(library_name="transformers", pipeline_tag="text-generation", tags=tags)
    return meta


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _table(quality: dict[str, Any]) -> list[str]:
    stages = [s for s in STAGES if s in quality]
    if not stages:
        return ["No evaluation text was given when this model was packaged."]
    ood = any("out_of_domain" in quality[s] for s in stages)
    head = "| stage | perplexity (held out) | x original |"
    sep = "|---|---|---|"
    if ood:
        head += " perplexity (out of domain) | x original |"
        sep += "---|---|"
    head += " top-1 agreement | fact prompts (greedy prefix agreement) |"
    sep += "---|---|"
    rows = [head, sep]
    for s in stages:
        q = quality[s]
        row = f"| {STAGE_TITLES[s]} | {_fmt(q['perplexity'])} | {_fmt(q.get('perplexity_ratio', 1.0))} |"
        if ood:
            o = q.get("out_of_domain") or {}
            row += f" {_fmt(o.get('perplexity'))} | {_fmt(o.get('perplexity_ratio', 1.0 if o else None))} |"
        prompts = q.get("prompts") or {}
        row += f" {_fmt(q.get('top1_agreement'), '.3f')} | {_fmt(prompts.get('prefix_agreement'))} |"
        rows.append(row)
    return rows


def render_card(body: dict[str, Any], *, name: str, repo_id: str | None = None) -> str:
    """README.md text for a packaged model described by ``body``."""
    meta = card_metadata(body)
    src = body.get("source") or {}
    b, a = body["shape_before"], body["shape_after"]
    quant = body.get("quantization")
    kv = " --kv-cache-dtype fp8" if quant and quant.get("kv_cache") == "fp8" else ""  # vLLM reads the scales in here
    q = body.get("quality") or {}
    rec = body.get("recovery") or {}
    where = repo_id or f"./{name}"
    base = src.get("base_model") or src.get("model")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {repo_id.split('/')[-1] if repo_id else name}", "",
        f"A smaller build of [{base}](https://huggingface.co/{base})" if src.get("base_model")
        else f"A smaller build of `{base}`",
        f"made with serve-pruned ({body.get('created_by', '')}) for dense co-located serving in stock vLLM.", "",
        "| | original | this model |", "|---|---|---|",
        f"| parameters | {body['params_before']:,} | {body['params_after']:,} ({body['params_fraction']:.3f}) |",
        f"| weight bytes | {body['weight_bytes_before']:,} | {body['weight_bytes']:,} |",
        f"| KV cache bytes per token | {body['kv_cache_bytes_per_token_before']:,} | "
        f"{body['kv_cache_bytes_per_token']:,} |",
        f"| layers | {b['num_layers']} | {a['num_layers']} |",
        f"| query / KV heads | {b['num_heads']} / {b['num_kv_heads']} | {a['num_heads']} / {a['num_kv_heads']} |",
        f"| FFN width | {b['intermediate_size']} | {a['intermediate_size']} |",
        *([f"| hidden size | {b['hidden_size']} | {a['hidden_size']} |"] if "hidden_size" in a else []),
        f"| quantization | – | {quant['scheme'] if quant else 'none'}"
        + (f" (group {quant['group_size']})" if quant and quant.get("group_size") else "")
        + ("; FP8 KV-cache scales calibrated" if kv else "") + " |",
        "",
        "## How it was made", "",
    ]
    if body.get("pruning"):
        lines.append(f"- Structured pruning ({rec.get('schedule', 'one-shot')}, {len(rec.get('steps') or [1])} "
                     f"step(s)), importance from `{body['pruning']['scorer']}` scores on calibration text; "
                     "every layer keeps the same shape, so the checkpoint is a standard "
                     f"`{body['architecture']}`.")
        if rec.get("refit"):
            lines.append("- Recovery: least-squares refit of the pruned blocks' output projections.")
        if rec.get("distill_steps"):
            lines.append(f"- Recovery: logit distillation from the original, {rec['distill_steps']} steps in all.")
    if quant:
        lines.append(f"- Quantization: {quant['scheme']} with llmcompressor, saved as compressed-tensors "
                     "(the llmcompressor recipe is `recipe.yaml`).")
    guard = body.get("guard")
    if guard:
        lines.append(f"- Quality guard: {guard['guard']}. Of {len(guard['candidates'])} candidates, "
                     f"{len(guard['tried'])} were packaged and measured; this is {guard['why']} (measured "
                     f"{guard['measured_ppl_ratio']:.3f}x).")
    lines += ["", "## Evaluation", ""]
    if q:
        lines.append(f"Held-out text: {', '.join(q.get('eval_text') or [])}"
                     + (f"; out of domain: {', '.join(q['ood_text'])}" if q.get("ood_text") else "")
                     + f". Perplexity over {q.get('original', q.get('quantized', {})).get('tokens', '?')} tokens; "
                     "top-1 agreement is the share of positions where this model's next-token argmax equals the "
                     "original's; fact prompts compare greedy continuations with the original's.")
        lines.append("")
    lines += _table(q)
    lines += [
        "", "## Serve it", "", "```bash",
        f"vllm serve {where} --max-model-len 4096{kv}",
        "```", "",
        "To pack several instances on one GPU, let serve-pruned size them in bytes:", "", "```bash",
        f"serve-pruned plan {where} --gpu H100-80GB --max-model-len 4096 --concurrency 16{kv}",
        f"serve-pruned serve {where} --instances 2{kv}",
        "```", "",
        "Every file's sha256 is in `serve_pruned.json`; `serve-pruned pull` checks them.", "",
    ]
    return "\n".join(lines)
