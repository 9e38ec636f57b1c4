"""Push packaged models to the Hugging Face Hub and pull them back, verified against the manifest."""
