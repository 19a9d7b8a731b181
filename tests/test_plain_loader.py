"""The Plain (safetensors) loader: layouts, dtypes, tokenizer/EOS/template sources, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_checkpoints import PROMPTS, hf_generate, hf_model, mrs_generate, save_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from mrs.config.schema import ModelEntry, ModelSource
from mrs.engine.executable_cache import version_folder
from mrs.errors import ConfigError, LoadError
from mrs.fetch import fetch_plain_copy
from mrs.loading.load import load_checkpoint
from mrs.loading.safetensors_reader import load_plain
from mrs.models import registry
from mrs.models.config import FULL, SLIDING
from mrs.models.gemma3 import config_from_hf as gemma3_config, hf_name
from mrs.models.llama import config_from_hf as llama_config
from mrs.models.registry import detect_arch
from mrs.quant import QArray
from mrs.sharding.placement import Placement


def entry(path: Path, **fields) -> ModelEntry:
    source = {k: fields.pop(k) for k in ("arch", "tok_model_id") if k in fields}
    return ModelEntry(model_id="m", model=ModelSource(model_id=str(path), **source), **fields)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = hf_model("llama")
    return model, save_checkpoint(model, tmp_path_factory.mktemp("llama"))


def assert_parity(checkpoint, reference: torch.nn.Module, steps: int = 32) -> None:
    ids = checkpoint.tokenizer(PROMPTS[0])["input_ids"]
    ours_logits, ours = mrs_generate(checkpoint.config, checkpoint.params, ids, steps)
    ref_logits, ref = hf_generate(reference, ids, steps)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=2e-5, rtol=1e-5)
    assert ours == ref


def test_sharded_checkpoint(llama, tmp_path):
    model, _ = llama
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_parity(load_plain(entry(path)), model)


def test_bfloat16_checkpoint(tmp_path):
    path = save_checkpoint(hf_model("llama"), tmp_path / "bf16", dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Stored bf16, run in float32: exactly what HF does when asked for float32.
    assert_parity(load_plain(entry(path)), reference)
    # Run in bf16: every floating leaf is bf16, and logits stay close to float32's.
    bf16 = load_plain(entry(path, dtype="bfloat16"))
    assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(bf16.params)} == {"bfloat16"}
    ids = bf16.tokenizer(PROMPTS[1])["input_ids"]
    ours, _ = mrs_generate(bf16.config, bf16.params, ids, 1)
    ref, _ = hf_generate(reference, ids, 1)
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_generation_config_eos_list_and_template(llama, tmp_path):
    model, src = llama
    path = shutil.copytree(src, tmp_path / "ck")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [511, 7], "bos_token_id": 3}))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (path / "chat_template.jinja").write_text(template)
    checkpoint = load_plain(entry(path))
    assert checkpoint.eos_token_ids == (511, 7)
    assert checkpoint.bos_token_id == 3
    assert checkpoint.chat_template == template
    assert checkpoint.notes == []


def test_tokenizer_from_tok_model_id(llama, tmp_path):
    _, src = llama
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, weights / name)
    with pytest.raises(LoadError, match="cannot load a tokenizer"):
        load_plain(entry(weights))
    checkpoint = load_plain(entry(weights, tok_model_id=str(src)))
    assert checkpoint.tokenizer("The capital")["input_ids"] == load_plain(entry(src)).tokenizer("The capital")["input_ids"]
    assert checkpoint.eos_token_ids == (511,)  # config.json's, as there is no generation_config.json


def test_in_situ_quantization(llama):
    model, path = llama
    checkpoint = load_checkpoint(entry(path, in_situ_quant="Q8_0"))
    q_proj = checkpoint.params["model"]["layers_0"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(q_proj, QArray)
    ids = checkpoint.tokenizer(PROMPTS[0])["input_ids"]
    ours, _ = mrs_generate(checkpoint.config, checkpoint.params, ids, 1)
    ref, _ = hf_generate(model, ids, 1)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
    with pytest.raises(ConfigError, match="in_situ_quant"):
        load_checkpoint(entry(path, in_situ_quant="Q3_NOPE"))


def test_isq_embeddings(llama):
    _, path = llama
    checkpoint = load_checkpoint(entry(path, in_situ_quant="Q4_0", isq_embeddings="Q8_0"))
    params = checkpoint.params
    assert params["model"]["layers_0"]["mlp"]["up_proj"]["weight"].fmt == "Q4_0"
    assert params["model"]["embed_tokens"]["weight"].fmt == "Q8_0"
    assert "embedding and LM head in-situ quantized to Q8_0" in checkpoint.notes
    with pytest.raises(ConfigError) as err:
        load_checkpoint(entry(path, isq_embeddings="bf16"))
    assert err.value.param == "isq_embeddings" and "unknown isq_embeddings 'bf16'" in err.value.message


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="no config.json"):
        load_plain(entry(tmp_path))


def test_missing_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="not found"):
        load_plain(entry(tmp_path / "nope"))


def test_unknown_model_type(llama, tmp_path):
    _, src = llama
    path = shutil.copytree(src, tmp_path / "bert")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"unsupported architecture.*'bert'.*supported: gemma3, gpt2, kosmos2, llama, mistral, qwen2"):
        load_plain(entry(path))
    with pytest.raises(LoadError, match="unsupported architecture 'bert'"):
        load_plain(entry(path, arch="bert"))


def test_arch_that_does_not_fit_config(llama):
    _, path = llama
    with pytest.raises(LoadError, match="describes a 'llama' model, which arch 'gpt2' cannot load"):
        load_plain(entry(path, arch="gpt2"))
    assert load_plain(entry(path, arch="mistral")).config.arch == "mistral"  # same family: allowed


def test_missing_tensor_is_named(llama, tmp_path):
    _, src = llama
    path = shutil.copytree(src, tmp_path / "partial")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' missing for arch 'llama'"):
        load_plain(entry(path))


def test_a_tree_that_passed_its_check_skips_the_trace_next_time(llama, tmp_path, monkeypatch):
    """The parameter check (a trace of the whole model) runs once per config and tree layout;
    failures are not remembered."""
    _, src = llama
    partial = shutil.copytree(src, tmp_path / "partial")
    tensors = load_file(partial / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    try:
        load_plain(entry(src))
        markers = list((version_folder() / "checked").iterdir())
        assert len(markers) == 1
        for _ in range(2):
            with pytest.raises(LoadError, match="missing for arch 'llama'"):
                load_plain(entry(partial))
        assert list((version_folder() / "checked").iterdir()) == markers

        def traced(config, params):
            raise AssertionError(f"{config.arch} traced again")

        monkeypatch.setattr(registry, "check_params", traced)
        load_plain(entry(src))  # the marker stands for the trace
        with pytest.raises(AssertionError, match="mistral traced again"):  # another config: checked anew
            load_plain(entry(src, arch="mistral"))
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_missing_weights_and_shards(llama, tmp_path):
    _, src = llama
    path = shutil.copytree(src, tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"no model\.safetensors.*found: .*config\.json"):
        load_plain(entry(path))
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="shard files missing: model-00001-of-00002.safetensors"):
        load_plain(entry(path))


def test_detect_arch_from_architectures():
    assert detect_arch({"architectures": ["Gemma3ForConditionalGeneration"]}) == "gemma3"
    assert detect_arch({"model_type": "gemma3_text"}) == "gemma3"
    assert detect_arch({"architectures": ["GPT2LMHeadModel"]}) == "gpt2"
    with pytest.raises(ValueError, match="pass -a/--arch"):
        detect_arch({})


def test_gemma3_legacy_config_layout():
    """google/gemma-3-270m's config.json (pre-v5 layout: rope_local_base_freq, sliding_window_pattern)."""
    legacy = {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "rope_scaling": None, "sliding_window": 512,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
    }
    config = gemma3_config(legacy)
    assert config.layer_types == tuple(Gemma3TextConfig(**legacy).layer_types)
    assert config.layer_types[:6] == (SLIDING,) * 5 + (FULL,)
    assert (config.rope_theta, config.rope_local_theta, config.rope_linear_factor) == (1e6, 1e4, None)
    scaled = gemma3_config({**legacy, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert scaled.rope_linear_factor == 8.0
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        gemma3_config({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})


@pytest.fixture(scope="module")
def smollm2_plain(demo_models_dir: Path) -> Path:
    """The real SmolLM2 as a Plain checkpoint (mrs.fetch writes it from the GGUF; idempotent)."""
    return fetch_plain_copy(demo_models_dir)


def test_smollm2_plain_matches_hf(smollm2_plain: Path):
    """The real checkpoint: chat prompt through its own template, greedy 32 tokens equal HF's."""
    checkpoint = load_plain(entry(smollm2_plain))
    reference = AutoModelForCausalLM.from_pretrained(smollm2_plain, dtype=torch.float32).eval()
    assert checkpoint.config.arch == "llama" and checkpoint.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = checkpoint.tokenizer.apply_chat_template(messages, chat_template=checkpoint.chat_template,
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    ours_logits, ours = mrs_generate(checkpoint.config, checkpoint.params, ids, 32, bucket=64, cache_len=128)
    ref_logits, ref = hf_generate(reference, ids, 32, incremental=True)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=1e-3, rtol=1e-4)
    assert ours == ref
    assert checkpoint.eos_token_ids == (2, 0)  # generation_config.json's list
    assert "Paris" in checkpoint.tokenizer.decode(ours)


def test_qwen2_sliding_layers(tmp_path):
    """qwen2 slides only from max_window_layers on; HF saves that as layer_types."""
    model = hf_model("qwen2", use_sliding_window=True, sliding_window=8,
                     layer_types=["full_attention", "sliding_attention"])
    checkpoint = load_plain(entry(save_checkpoint(model, tmp_path / "qwen2-sliding")))
    assert checkpoint.config.layer_types == (FULL, SLIDING)
    assert_parity(checkpoint, model)
    legacy = json.loads((tmp_path / "qwen2-sliding" / "config.json").read_text())
    del legacy["layer_types"]
    legacy["max_window_layers"] = 1
    assert llama_config(legacy).layer_types == (FULL, SLIDING)


def test_gemma3_multimodal_text_tower():
    """Gemma3ForConditionalGeneration: text_config nested, tying decided at the top level,
    the text tower's tensor names under model.language_model (v5) or language_model.model."""
    config = gemma3_config({"model_type": "gemma3", "tie_word_embeddings": False,
                            "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "sliding_window_pattern": 2}})
    assert (config.hidden_size, config.num_layers, config.tie_word_embeddings) == (64, 2, False)
    assert config.layer_types == (SLIDING, FULL)
    assert hf_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("language_model.model.norm.weight") == "model.norm.weight"
    assert hf_name("language_model.lm_head.weight") == "lm_head.weight"
    assert hf_name("model.vision_tower.encoder.layers.0.mlp.fc1.weight") is None
    assert hf_name("multi_modal_projector.mm_input_projection_weight") is None


def test_saved_rope_buffers_are_ignored(llama, tmp_path):
    """Older llama checkpoints saved ``rotary_emb.inv_freq`` next to the weights."""
    _, src = llama
    path = shutil.copytree(src, tmp_path / "old-llama")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    attention = load_plain(entry(path)).params["model"]["layers_0"]["self_attn"]
    assert set(attention) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_placement_is_resolved_or_refused(llama):
    _, path = llama
    # One CPU device here: ["1"] keeps every layer on it (the default placement).
    assert load_checkpoint(entry(path, num_device_layers=["1"])).placement == Placement()
    with pytest.raises(ConfigError, match="model 'm': num_device_layers: unknown device ordinal 1"):
        load_checkpoint(entry(path, num_device_layers=["0:1;1:1"]))
    with pytest.raises(ConfigError, match="places 3 layers but the model has 2"):
        load_checkpoint(entry(path, num_device_layers=["3"]))
    with pytest.raises(ConfigError, match="model 'm': tensor_parallel 2 needs 2 devices"):
        load_checkpoint(entry(path, tensor_parallel=2))
