"""Which architectures we prune, and how each maps onto stock vLLM.

Only architectures whose vLLM implementation honours an explicit ``head_dim`` from config.json can
have attention heads pruned (the pruned ``num_heads * head_dim`` no longer equals ``hidden_size``).
Every row here is proven by ``tests/compress/test_vllm_support.py``, which prunes a tiny random model
of that architecture and compares vLLM's greedy tokens with transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_pruned.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSupport:
    """What we know about one ``model_type``.

    Attributes:
        model_type: config.json ``model_type``.
        architecture: the ``architectures[0]`` class name transformers and vLLM use.
        prune_heads: query heads and KV groups can be pruned (vLLM reads explicit head_dim).
        qk_norm: per-head RMSNorm on q and k (Qwen3); its weight has head_dim entries and is kept whole.
        heads_divide_hidden: the config class refuses ``hidden_size % num_attention_heads != 0`` even
            with an explicit head_dim (transformers 5 LlamaConfig), so pruned head counts must divide it.
        notes: shown in the README support table.
    """

    model_type: str
    architecture: str
    prune_heads: bool = True
    qk_norm: bool = False
    heads_divide_hidden: bool = False
    notes: str = ""

    @property
    def prune_hidden(self) -> bool:
        """The hidden size can be pruned: the same condition as heads (an explicit head_dim, which vLLM reads, keeps
        num_heads * head_dim apart from hidden_size)."""
        return self.prune_heads


SUPPORTED: dict[str, ArchSupport] = {
    s.model_type: s
    for s in (
        ArchSupport("llama", "LlamaForCausalLM", heads_divide_hidden=True,
                    notes="SmolLM2, Llama 2/3; kept query heads must divide hidden_size"),
        ArchSupport("mistral", "MistralForCausalLM", notes="sliding window kept as configured"),
        ArchSupport("qwen2", "Qwen2ForCausalLM", prune_heads=False,
                    notes="FFN and layers only: vLLM's Qwen2 derives head_dim = hidden_size // heads"),
        ArchSupport("qwen3", "Qwen3ForCausalLM", qk_norm=True, notes="q/k norms (per head_dim) kept whole"),
    )
}


def support_for(config: dict) -> ArchSupport:
    """Return the support row for a config.json, or raise UnsupportedArchitectureError."""
    model_type = str(config.get("model_type", ""))
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED:
        name = archs[0] if archs else (model_type or "<no model_type in config.json>")
        raise UnsupportedArchitectureError(name, sorted(s.architecture for s in SUPPORTED.values()))
    support = SUPPORTED[model_type]
    if archs and archs[0] != support.architecture:
        # e.g. LlamaForSequenceClassification: same backbone, but not a causal LM vLLM serves as one.
        raise UnsupportedArchitectureError(archs[0], sorted(s.architecture for s in SUPPORTED.values()))
    return support
