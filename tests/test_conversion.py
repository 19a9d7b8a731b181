"""mrs conversions (the Orbax cache): ``mrs convert`` writes a loaded model, a Plain entry
restores it bit for bit, without quantizing again; and the errors a user can meet."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_checkpoints import PROMPTS, hf_model, mrs_generate, save_checkpoint
from jax import monitoring
from server_process import BIN, TINY_ENGINE_CONFIG

import mrs
from mrs.config.mistralrs import load_multi_model_config
from mrs.config.schema import GGUF, ModelEntry, ModelSource
from mrs.convert import convert
from mrs.errors import ConfigError, LoadError
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.conversion import MARKER, read_marker
from mrs.loading.load import load_checkpoint
from mrs.quant import QArray, param_bytes

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def plain(path: Path, **fields) -> ModelEntry:
    return ModelEntry(model_id="m", model=ModelSource(model_id=str(path)), **fields)


def assert_same_params(ours: dict, reference: dict) -> None:
    """Same pytree (QArray metadata included), same dtypes, the same bits."""
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def assert_same_serving_data(ours: Checkpoint, reference: Checkpoint) -> None:
    assert ours.config == reference.config
    assert (ours.eos_token_ids, ours.bos_token_id, ours.add_bos) == (
        reference.eos_token_ids, reference.bos_token_id, reference.add_bos)
    assert ours.chat_template == reference.chat_template
    for text in [*PROMPTS, "Grüße, 東京! <|endoftext|>"]:
        assert ours.tokenizer.encode(text) == reference.tokenizer.encode(text)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def q4_conversion(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(plain(llama_dir, in_situ_quant="Q4_0"), tmp_path_factory.mktemp("conv") / "q4_0")


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_restores_the_quantized_model_bit_for_bit(quant: str, llama_dir: Path, tmp_path: Path) -> None:
    source = load_checkpoint(plain(llama_dir, in_situ_quant=quant, chat_template=TEMPLATE))
    out = convert(plain(llama_dir, in_situ_quant=quant, chat_template=TEMPLATE), tmp_path / "out")
    restored = load_checkpoint(plain(out))  # no in_situ_quant: served as converted

    assert_same_params(restored.params, source.params)
    q_proj = restored.params["model"]["layers_0"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(q_proj, QArray) and q_proj.fmt == quant
    assert_same_serving_data(restored, source)
    assert restored.in_situ_quant == quant and f"at conversion: in-situ quantized to {quant}" in restored.notes
    ids = source.tokenizer(PROMPTS[0])["input_ids"]
    assert mrs_generate(restored.config, restored.params, ids, 12)[1] == mrs_generate(
        source.config, source.params, ids, 12)[1]


@contextlib.contextmanager
def lowerings() -> Iterator[list[str]]:
    """Every jit lowering while inside (a compile, or a persistent-cache hit, comes after one)."""
    seen: list[str] = []

    def listen(event: str, seconds: float, **kwargs: object) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            seen.append(event)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listen)


def test_the_engine_serves_a_conversion_without_compiling_again(q4_conversion: Path) -> None:
    """Restored parameters sit on the device as loaded ones do (committed ones would give the
    warmed-up steps a new input signature, and requests would wait for compiles)."""
    with mrs.load(plain(q4_conversion), TINY_ENGINE_CONFIG) as pipe:
        assert pipe.wait_compiled(600)  # the background compile lowers too
        with lowerings() as seen:
            for _ in range(3):
                assert len(pipe.generate(PROMPTS[0], max_tokens=8, ignore_eos=True).token_ids) == 8
        assert seen == []
        assert pipe.engine.stats()["param_bytes"] == param_bytes(pipe.checkpoint.params)


def test_gguf_packed_tensors_survive(gemma3_gguf: Path, tmp_path: Path) -> None:
    """Gemma 3's GGUF keeps Q4_K, Q5_0, Q6_K and Q8_0 packings (4/8 bits, blocks of 16/32,
    with and without mins): every QArray layout comes back as it was."""
    entry = ModelEntry(model_id="g", model=ModelSource(kind=GGUF, quantized_model_id=str(gemma3_gguf)))
    source = load_checkpoint(entry)
    restored = load_checkpoint(plain(convert(entry, tmp_path / "gemma3")))
    assert_same_params(restored.params, source.params)
    assert_same_serving_data(restored, source)
    formats = {leaf.fmt for leaf in jax.tree.leaves(restored.params, is_leaf=lambda x: isinstance(x, QArray))
               if isinstance(leaf, QArray)}
    assert len(formats) >= 3, formats


def test_mrs_convert_command(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-q8"
    argv = [str(BIN / "mrs"), "convert", "model=smollm2-135m-plain", f"model.model.model_id={llama_dir}",
            "quant=q8_0", f"out={out}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out) and (out / MARKER).is_file()
    # served through the seed's JSON format: a Plain entry whose model_id is the directory
    models = tmp_path / "models.json"
    models.write_text(json.dumps([{"model_id": "tiny", "model": {"Plain": {"model_id": str(out)}}}]))
    restored = load_checkpoint(load_multi_model_config(models)[0])
    assert_same_params(restored.params, load_checkpoint(plain(llama_dir, in_situ_quant="Q8_0")).params)

    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr
    no_out = subprocess.run(argv[:-1], capture_output=True, text=True, timeout=600)
    assert no_out.returncode == 2 and "out=DIR" in no_out.stderr


def test_in_situ_quant_must_match_the_conversion(q4_conversion: Path) -> None:
    assert load_checkpoint(plain(q4_conversion, in_situ_quant="q4_0")).in_situ_quant == "Q4_0"
    for asked in ("Q8_0", "Q4K"):
        with pytest.raises(ConfigError, match=f"converted with in_situ_quant=Q4_0, the entry asks for in_situ_quant={asked}") as err:
            load_checkpoint(plain(q4_conversion, in_situ_quant=asked))
        assert err.value.param == "in_situ_quant"
    with pytest.raises(ConfigError, match="converted with no isq_embeddings, the entry asks for isq_embeddings=Q8_0") as err:
        load_checkpoint(plain(q4_conversion, isq_embeddings="Q8_0"))
    assert err.value.param == "isq_embeddings"
    with pytest.raises(ConfigError, match="holds a 'llama' model"):
        load_checkpoint(ModelEntry(model_id="m", model=ModelSource(model_id=str(q4_conversion), arch="gemma3")))


def test_not_a_conversion_or_another_version(q4_conversion: Path, tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no config.json .* and no mrs-conversion.json"):
        load_checkpoint(plain(tmp_path))
    with pytest.raises(LoadError, match="is not an mrs conversion"):
        read_marker(tmp_path)

    copy = tmp_path / "copy"
    shutil.copytree(q4_conversion, copy)
    meta = json.loads((copy / MARKER).read_text())
    (copy / MARKER).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(LoadError, match="format version 99, but this mrs reads version 1; convert the model again"):
        load_checkpoint(plain(copy))
    (copy / MARKER).write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(LoadError, match="not an mrs conversion marker"):
        load_checkpoint(plain(copy))

    (copy / MARKER).write_text(json.dumps(meta))
    shutil.rmtree(copy / "params")
    with pytest.raises(LoadError, match="cannot restore the converted parameters"):
        load_checkpoint(plain(copy))
