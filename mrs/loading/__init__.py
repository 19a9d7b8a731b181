"""Checkpoint sources, GGUF and safetensors readers, tokenizers and chat templates."""
