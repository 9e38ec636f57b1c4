"""The model card: Hub metadata that says what the model is relative to its base, and an evaluation table."""

from __future__ import annotations

import yaml

from serve_pruned.hub.card import card_metadata, render_card


def _body(kind: str, quant: dict | None) -> dict:
    shape = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536}
    return {
        "kind": kind, "created_by": "serve-pruned 0.1.0", "architecture": "LlamaForCausalLM",
        "source": {"model": "/models/smol", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "license": "apache-2.0"},
        "shape_before": shape, "shape_after": {**shape, "intermediate_size": 832 if "pruned" in kind else 1536},
        "params_before": 134_515_008, "params_after": 98_000_000, "params_fraction": 0.7286,
        "weight_bytes_before": 269_060_000, "weight_bytes": 126_600_000,
        "kv_cache_bytes_per_token_before": 23040, "kv_cache_bytes_per_token": 23040,
        "quantization": quant, "pruning": {"scorer": "activation"} if "pruned" in kind else None,
        "recovery": {"schedule": "iterative", "steps": [{}, {}], "refit": True, "distill_steps": 200},
        "quality": {
            "eval_text": ["tutorial"], "ood_text": ["GPL-3"],
            "original": {"perplexity": 14.5, "tokens": 8191, "out_of_domain": {"perplexity": 22.1}},
            "quantized": {"perplexity": 17.9, "perplexity_ratio": 1.234, "top1_agreement": 0.71,
                          "out_of_domain": {"perplexity": 30.2, "perplexity_ratio": 1.367},
                          "prompts": {"prefix_agreement": 0.625}},
        },
    }


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_pruned_model_is_a_finetune_of_its_base_with_licence_carried():
    meta = _front_matter(render_card(_body("pruned-quantized", {"scheme": "w8a8", "group_size": None}), name="p75"))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune"
    assert meta["license"] == "apache-2.0"
    assert {"pruned", "w8a8", "compressed-tensors", "vllm"} <= set(meta["tags"])


def test_quantized_only_model_is_quantized():
    meta = card_metadata(_body("quantized", {"scheme": "w4a16", "group_size": 64}))
    assert meta["base_model_relation"] == "quantized" and "pruned" not in meta["tags"]


def test_no_known_base_means_no_relation_claimed():
    body = _body("pruned", None)
    body["source"] = {"model": "/models/x"}
    meta = card_metadata(body)
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta


def test_card_has_the_evaluation_table_and_a_vllm_snippet():
    card = render_card(_body("pruned-quantized", {"scheme": "w8a8", "group_size": None}), name="p75",
                       repo_id="acme/smol-p75")
    assert "| final (quantized) | 17.90 | 1.23 | 30.20 | 1.37 | 0.710 | 0.62 |" in card
    assert "| original | 14.50 | 1.00 | 22.10 | 1.00 |" in card
    assert "vllm serve acme/smol-p75 --max-model-len 4096" in card
    assert "serve-pruned plan acme/smol-p75" in card


def test_calibrated_fp8_kv_scales_are_served_with_the_fp8_kv_cache():
    plain = render_card(_body("pruned-quantized", {"scheme": "w8a8", "group_size": None}), name="p75")
    card = render_card(_body("pruned-quantized", {"scheme": "w8a8", "group_size": None, "kv_cache": "fp8"}),
                       name="p75")
    assert "--kv-cache-dtype" not in plain
    assert "vllm serve ./p75 --max-model-len 4096 --kv-cache-dtype fp8" in card
    assert "serve-pruned serve ./p75 --instances 2 --kv-cache-dtype fp8" in card
    assert "| quantization | – | w8a8; FP8 KV-cache scales calibrated |" in card
