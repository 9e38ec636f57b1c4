"""serve_pruned: prune and quantize Hugging Face causal LMs into checkpoints stock vLLM serves."""

__version__ = "0.1.0"
