"""Torch-free description of a model: its config, its safetensors headers, its shape and the architectures we
support. Everything below compress/ and serving/ reads models through here, before any weight is loaded."""
