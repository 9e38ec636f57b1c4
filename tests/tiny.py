"""Tiny random models of every supported architecture, with a small trained tokenizer (hermetic)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a model layer head channel token weight prune serve memory cache query key value group "
    "fast small dense sparse quantize scale vector matrix kernel batch stream text data python "
    "is are was has can will should must may and or but if then when while for with from into "
    "river mountain city garden window market music paper stone light water bread coffee night"
).split()


def synthetic_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-prose: enough structure for a tokenizer, no external data."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 14):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    return " ".join(out) + "\n"


def make_tokenizer(dest: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([synthetic_text(20000, 0)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return dest


ARCH_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, use_sliding_window=False, attention_bias=False),
}


def make_tiny_model(arch: str, dest: Path, tokenizer_dir: Path, *, dtype: str = "float32", seed: int = 0,
                    layers: int = 4, heads: int = 6, kv_heads: int = 2, head_dim: int = 32,
                    ffn: int = 256, hidden: int = 192, init_range: float = 0.08) -> Path:
    """A random ``arch`` model saved as a Hugging Face folder (safetensors + tokenizer)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(ARCH_CONFIGS[arch])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512,
        initializer_range=init_range, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # non-trivial norms so that every structure matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    model.save_pretrained(dest)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy2(f, dest / f.name)
    return dest


def prune_tiny(model_dir: Path, tokenizer_dir: Path, calib: Path, *, heads: int | None = None,
               kv_heads: int | None = None, ffn: int, hidden: int | None = None, num_samples: int = 16,
               seq_len: int = 64):
    """Load a tiny model, score it on ``calib`` and prune it to the given counts.

    Returns (original model, pruned model, selection, calibration samples, tokenizer).
    """
    import json

    from transformers import AutoTokenizer

    from serve_pruned.compress.data import calibration_samples, read_sources
    from serve_pruned.compress.importance import collect_stats, compute_scores, select
    from serve_pruned.compress.model_io import load_model
    from serve_pruned.compress.prune import prune_model
    from serve_pruned.model.shapes import Shape

    cfg = json.loads((model_dir / "config.json").read_text())
    model = load_model(model_dir, dtype="float32", trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = calibration_samples(tok, read_sources([str(calib)]), num_samples=num_samples, seq_len=seq_len, seed=0)
    before = Shape.from_config(cfg)
    after = Shape(before.num_layers, heads or before.num_heads, kv_heads or before.num_kv_heads, before.head_dim, ffn,
                  hidden or before.hidden_size)
    sel = select(compute_scores(collect_stats(model, samples), before, "activation"), before, after)
    pruned, _ = prune_model(model, cfg, before, after, sel)
    return model, pruned, sel, samples, tok
