"""Quantized weights: the QArray type, GGUF repacking and in-situ quantization."""
