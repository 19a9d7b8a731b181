"""One engine thread per model: scheduler, KV cache, jitted steps, sampling, detokenizer."""
