"""Quantized weights: the QArray type, GGUF repacking, in-situ quantization, memory accounting."""

from mrs.quant.isq import SCHEMES, quantize_params, resolve_scheme
from mrs.quant.memory import cache_bytes, param_bytes
from mrs.quant.qarray import QArray

__all__ = ["QArray", "SCHEMES", "cache_bytes", "param_bytes", "quantize_params", "resolve_scheme"]
