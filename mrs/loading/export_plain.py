"""Write a GGUF checkpoint as a Plain (Hugging Face layout) directory.

``config.json``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template), and ``model.safetensors``
holding float32 weights under HF names and layouts (q/k unpermuted, norms
un-offset): what transformers' own ``save_pretrained`` would write for the model
the GGUF was converted from. It gives the safetensors loader a real checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mrs.loading.gguf_config import hf_config_from_gguf
from mrs.loading.gguf_loader import eos_token_ids
from mrs.loading.gguf_reader import open_gguf
from mrs.loading.gguf_tokenizer import gguf_add_bos, tokenizer_from_gguf
from mrs.loading.gguf_weights import iter_hf_tensors
from mrs.models import registry

PLAIN_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")


def is_complete(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in PLAIN_FILES)


def write_plain_copy(gguf_path: Path, out_dir: Path) -> Path:
    """Write ``out_dir`` from ``gguf_path`` unless it is already complete; return it.

    The files are written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a directory that looks complete.
    """
    if is_complete(out_dir):
        return out_dir
    g = open_gguf(gguf_path)
    hf = hf_config_from_gguf(g)
    config = registry.config_from_hf(g.architecture, hf, dtype="float32")
    bos, eos = g.get("tokenizer.ggml.bos_token_id"), list(eos_token_ids(g))
    hf_class = registry.get_gguf_tables(g.architecture, g.path).hf_class
    hf |= {"architectures": [hf_class], "torch_dtype": "float32",
           "bos_token_id": bos, "eos_token_id": eos[0], "pad_token_id": g.get("tokenizer.ggml.padding_token_id")}
    tensors = {name: np.asarray(value, np.float32) for name, value in iter_hf_tensors(g, config, keep_quantized=False)}
    tokenizer = tokenizer_from_gguf(g)
    tokenizer.chat_template = g.get("tokenizer.chat_template")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the cache private to this user
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {"bos_token_id": bos, "eos_token_id": eos if len(eos) > 1 else eos[0], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp), save_jinja_files=False)  # template inside tokenizer_config.json
        _set_add_bos(tmp / "tokenizer_config.json", gguf_add_bos(g))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _set_add_bos(path: Path, add_bos: bool) -> None:
    """Record the GGUF's add_bos_token flag explicitly, so AutoTokenizer reproduces it."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["add_bos_token"] = add_bos
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
