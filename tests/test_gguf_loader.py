"""GGUF loader: reading, error cases, metadata -> config, tensor mapping, on tiny files
written with gguf-py's GGUFWriter (the demo files are covered by test_gguf_parity)."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf_files import write_llama_gguf
from hf_checkpoints import SMALL, byte_level_tokenizer, hf_generate, mrs_generate
from transformers import LlamaConfig, LlamaForCausalLM

from mrs.config.schema import GGUF, VISION_PLAIN, ModelEntry, ModelSource
from mrs.errors import ConfigError, LoadError
from mrs.loading.gguf_config import model_config_from_gguf
from mrs.loading.gguf_reader import open_gguf
from mrs.loading.gguf_weights import hf_tensor_name
from mrs.loading.load import load_checkpoint
from mrs.models import registry


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(**SMALL, tie_word_embeddings=tied, rope_theta=5000.0,
                         eos_token_id=SMALL["vocab_size"] - 1, bos_token_id=SMALL["vocab_size"] - 1)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms away from 1, weights large enough to matter
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = byte_level_tokenizer(SMALL["vocab_size"])
    untied, tied = tiny_llama(tied=False), tiny_llama(tied=True)
    return {
        "tokenizer": tokenizer,
        "untied": (untied, write_llama_gguf(root / "untied.gguf", untied, tokenizer)),
        "tied_q8": (tied, write_llama_gguf(root / "tied_q8.gguf", tied, tokenizer, quantized=True)),
        "root": root,
    }


def entry(path: Path, **source) -> ModelEntry:
    return ModelEntry(model_id="tiny", model=ModelSource(kind=GGUF, quantized_model_id=str(path), **source))


# --- reading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["untied", "tied_q8"])
def test_reader_agrees_with_gguf_py(tiny, variant: str) -> None:
    path = tiny[variant][1]
    ours, reference = open_gguf(path), gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == fields.keys()
    for key, value in fields.items():
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) else ours.metadata[key] == value
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        assert (mine.ggml_type, mine.shape) == (t.tensor_type, tuple(int(d) for d in t.shape))
        assert mine.data.dtype == t.data.dtype and np.array_equal(mine.data, t.data)
    ours.release_pages()  # out of resident memory, still readable from the file
    assert all(np.array_equal(ours.tensors[t.name].data, t.data) for t in reference.tensors)


# --- error cases -------------------------------------------------------------------------------

def test_text_file_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model\n")
    with pytest.raises(LoadError, match=r"notes.gguf is not a GGUF file \(bad magic b'just'"):
        open_gguf(path)


def test_wrong_magic(tmp_path: Path, tiny) -> None:
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + tiny["untied"][1].read_bytes()[4:])
    with pytest.raises(LoadError, match="bad magic b'GGML'"):
        open_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 24, 200])
def test_truncated_file(tmp_path: Path, tiny, keep: float) -> None:
    data = tiny["untied"][1].read_bytes()
    cut = int(len(data) * keep) if keep < 1 else int(keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(LoadError, match=r"cut.gguf is truncated"):
        open_gguf(path)


def test_missing_file_names_places_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError) as err:
        load_checkpoint(entry(tmp_path / "nowhere" / "model.gguf"))
    message = err.value.message
    assert "looked in: local path" in message and "nowhere/model.gguf" in message
    assert "not a valid repo id" in message  # a path is never tried on the hub


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError, match="unsupported architecture 'mamba'"):
        load_checkpoint(entry(path))


def test_unknown_tensor_name() -> None:
    with pytest.raises(LoadError, match="'blk.0.ssm_conv1d.weight' has no counterpart in the llama model"):
        hf_tensor_name("blk.0.ssm_conv1d.weight", "llama")


# --- tiny llama round trip -------------------------------------------------------------------------

def test_metadata_maps_to_the_hf_config(tiny) -> None:
    model, path = tiny["untied"]
    ours = model_config_from_gguf(open_gguf(path))
    expected = registry.config_from_hf("llama", model.config.to_dict())
    # GGUF stores eps as float32
    assert ours == expected.replace(norm_eps=ours.norm_eps)
    assert ours.norm_eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)


@pytest.mark.parametrize("variant", ["untied", "tied_q8"])
def test_tiny_llama_loads_to_the_original_weights(tiny, variant: str) -> None:
    model, path = tiny[variant]
    checkpoint = load_checkpoint(entry(path, tok_model_id=None))
    assert checkpoint.config.tie_word_embeddings == (variant == "tied_q8")
    layer = checkpoint.params["model"]["layers_1"]["self_attn"]
    for proj in ("q_proj", "k_proj"):
        got = np.asarray(_dense(layer[proj]["weight"]))
        want = model.state_dict()[f"model.layers.1.self_attn.{proj}.weight"].numpy()
        # Q8_0 keeps 8 bits per value: the permutation is undone exactly, the values are close.
        np.testing.assert_allclose(got, want, atol=0 if variant == "untied" else 2e-2 * np.abs(want).max())
    prompt = tiny["tokenizer"]("The capital of France is").input_ids
    ours, _ = mrs_generate(checkpoint.config, checkpoint.params, prompt, 1)
    ref, _ = hf_generate(model, prompt, 1)
    if variant == "untied":
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    else:  # quantized weights: same argmax, logits near
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    assert checkpoint.eos_token_ids == (SMALL["vocab_size"] - 1,)
    assert checkpoint.add_bos is False


def _dense(w):
    return w.dequantize(jnp.float32) if hasattr(w, "dequantize") else w


def test_tokenizer_and_template_from_tok_model_id(tiny) -> None:
    model, path = tiny["untied"]
    tok_dir = tiny["root"] / "tok"
    tokenizer = tiny["tokenizer"]
    tokenizer.chat_template = "TOKENIZER DIR {{ messages[0]['content'] }}"
    tokenizer.save_pretrained(tok_dir)
    checkpoint = load_checkpoint(entry(path, tok_model_id=str(tok_dir)))
    text = "def greet(name):\n    return 42"
    assert checkpoint.tokenizer(text).input_ids == tokenizer(text).input_ids
    assert "tokenizer from" in " ".join(checkpoint.notes)
    assert checkpoint.chat_template == tokenizer.chat_template  # the checkpoint's own outranks GGUF metadata
    literal = "{{ 'ENTRY' }}"
    overridden = load_checkpoint(ModelEntry(model_id="tiny", chat_template=literal,
                                            model=ModelSource(kind=GGUF, quantized_model_id=str(path))))
    assert overridden.chat_template == literal
    assert "chat template: chat_template (literal)" in overridden.notes


def test_kind_dispatch(tiny) -> None:
    with pytest.raises(LoadError, match="VisionPlain model needs model.model_id"):
        load_checkpoint(ModelEntry(model_id="v", model=ModelSource(kind=VISION_PLAIN)))
    with pytest.raises(ConfigError, match="unknown model kind 'onnx'"):
        load_checkpoint(ModelEntry(model_id="o", model=ModelSource(kind="onnx")))
    with pytest.raises(ConfigError, match="a Gguf entry needs quantized_model_id"):
        load_checkpoint(ModelEntry(model_id="g", model=ModelSource(kind=GGUF)))
