"""Both front doors' parsing, without loading a model: the seed's JSON (array and map
forms), the ``mrs-server`` command line, Hydra composition, and the errors they report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mrs.config.hydra import model_preset, presets, serve_config
from mrs.config.mistralrs import load_multi_model_config, parse_multi_model_config
from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, ModelEntry
from mrs.errors import ConfigError
from serving.cli import build_parser, serve_config_from_args

SEED_EXAMPLE = [  # the seed document's own example, verbatim
    {"model_id": "llama3-8b", "model": {"Plain": {"model_id": "meta-llama/Meta-Llama-3-8B-Instruct"}}},
    {"model_id": "mistral-7b", "model": {"Plain": {"model_id": "mistralai/Mistral-7B-Instruct-v0.3"}},
     "num_device_layers": ["8"], "in_situ_quant": "Q4K"},
]


def _cli(*argv: str):
    return serve_config_from_args(build_parser().parse_args(list(argv)))


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data))
    return path


def test_seed_array_form(tmp_path: Path) -> None:
    entries = load_multi_model_config(_write(tmp_path, SEED_EXAMPLE))
    assert [e.model_id for e in entries] == ["llama3-8b", "mistral-7b"]
    assert entries[0].model.kind == PLAIN and entries[0].model.model_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert entries[1].num_device_layers == ["8"] and entries[1].in_situ_quant == "Q4K"
    assert entries[0].in_situ_quant is None and entries[0].dtype == "float32"


def test_gguf_and_defaults() -> None:
    gguf, bare = parse_multi_model_config([
        {"model_id": "llama-gguf", "model": {"Gguf": {
            "tok_model_id": None, "quantized_model_id": "TheBloke/Llama-2-7b-Chat-GGUF",
            "quantized_filename": "llama-2-7b-chat.Q4_K_M.gguf"}}},
        {"model_id": "gpt2", "model": {"Plain": {}}},  # every field inside `model` has a default
    ])
    assert gguf.model.kind == GGUF and gguf.model.quantized_filename == "llama-2-7b-chat.Q4_K_M.gguf"
    assert gguf.model.tok_model_id is None
    assert bare.model.model_id == "gpt2" and bare.model.arch is None


def test_map_form_alias_and_model_id() -> None:
    entries = parse_multi_model_config({
        "llama3-3b": {"Plain": {"model_id": "meta-llama/Llama-3.2-3B-Instruct"}},
        "qwen3-4b": {"alias": "qwen", "Plain": {"model_id": "Qwen/Qwen3-4B"}, "in_situ_quant": "Q4K"},
    })
    assert [e.model_id for e in entries] == ["meta-llama/Llama-3.2-3B-Instruct", "qwen"]
    assert entries[1].in_situ_quant == "Q4K"


def test_isq_embeddings_in_every_front_door(tmp_path: Path) -> None:
    (entry,) = parse_multi_model_config([{"model_id": "a", "model": {"Plain": {"model_id": "x"}},
                                          "in_situ_quant": "Q4_0", "isq_embeddings": "Q8_0"}])
    assert (entry.in_situ_quant, entry.isq_embeddings) == ("Q4_0", "Q8_0")
    (entry,) = serve_config(["model=smollm2-135m", "quant=q4_0_embed_q8_0"]).models
    assert (entry.in_situ_quant, entry.isq_embeddings) == ("Q4_0", "Q8_0")
    # A preset that names only in_situ_quant leaves a field override of isq_embeddings alone.
    (entry,) = serve_config(["model=smollm2-135m", "quant=q8_0", "model.isq_embeddings=Q8_0"]).models
    assert (entry.in_situ_quant, entry.isq_embeddings) == ("Q8_0", "Q8_0")
    assert serve_config(["model=smollm2-135m"]).models[0].isq_embeddings is None


@pytest.mark.parametrize("data, words", [
    ([{"model_id": "a", "modle": {}}], ["entry 0", "unknown key 'modle'"]),
    ([{"model_id": "a", "model": {"Plain": {"model_idd": "x"}}}], ["entry 0 ('a')", "Plain", "'model_idd'"]),
    ([{"model": {"Plain": {"model_id": "x"}}}], ["entry 0", "model_id"]),
    ([{"model_id": "a"}, {"model_id": "b"}, {"model_id": "a"}], ["duplicate model_id 'a'", "entries 0 and 2"]),
    ([{"model_id": "a", "model": {"Plain": {}, "Gguf": {}}}], ["entry 0 ('a')", "exactly one of"]),
    ([{"model_id": "a", "model": {"Onnx": {}}}], ["unknown model type 'Onnx'"]),
    ([{"model_id": "a", "num_device_layers": 8}], ["num_device_layers"]),
    ([{"model_id": "a", "isq_embeddings": 8}], ["entry 0", "'isq_embeddings' must be a string"]),
    ({"label": {"Plain": {}}}, ["entry 'label'", "Plain.model_id"]),
    ({"label": {"Plain": {"model_id": "x"}, "aliass": "y"}}, ["entry 'label'", "unknown key 'aliass'"]),
    ([], ["no model entries"]),
    ("models", ["expected a JSON array"]),
])
def test_json_errors_name_entry_and_field(data: object, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_multi_model_config(data, source="models.json")
    for word in words:
        assert word in info.value.message


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[{'model_id': 'a'}]")
    with pytest.raises(ConfigError, match="is not JSON: .* line 1"):
        load_multi_model_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_multi_model_config(tmp_path / "absent.json")


def test_seed_cli_single_model_forms() -> None:
    config = _cli("--port", "4321", "--max-seqs", "4", "plain", "-m", "microsoft/DialoGPT-medium", "-a", "gpt2")
    (entry,) = config.models
    assert config.server.port == 4321 and config.engine.max_batch == 4
    assert config.engine.variant_idle_s == 60.0  # idle step variants leave memory by default
    assert _cli("--variant-idle", "-1", "gguf", "-m", "x.gguf").engine.variant_idle_s is None
    assert _cli("--variant-idle", "5", "gguf", "-m", "x.gguf").engine.variant_idle_s == 5.0
    assert serve_config(["model=smollm2-135m", "engine.variant_idle_s=null"]).engine.variant_idle_s is None
    with pytest.raises(ConfigError, match="variant_idle_s"):
        serve_config(["model=smollm2-135m", "engine.variant_idle_s=-5"])
    assert config.engine.decode_steps == 4
    assert _cli("--decode-steps", "1", "gguf", "-m", "x.gguf").engine.decode_steps == 1
    assert serve_config(["model=smollm2-135m", "engine.decode_steps=2"]).engine.decode_steps == 2
    with pytest.raises(ConfigError, match="decode_steps"):
        serve_config(["model=smollm2-135m", "engine.decode_steps=0"])
    assert entry.model_id == "microsoft/DialoGPT-medium" and entry.model.arch == "gpt2" and entry.model.kind == PLAIN
    config = _cli("--isq", "Q8_0", "gguf", "-m", "/models", "-f", "x.gguf", "-t", "tok/repo", "--dtype", "bfloat16")
    (entry,) = config.models
    assert (entry.model.kind, entry.model.quantized_model_id, entry.model.quantized_filename) == (GGUF, "/models", "x.gguf")
    assert (entry.model.tok_model_id, entry.in_situ_quant, entry.dtype, entry.model_id) == ("tok/repo", "Q8_0", "bfloat16", "x.gguf")
    # per-model options also after the subcommand, as mistral.rs's plain -d
    (entry,) = _cli("plain", "-m", "m", "--isq", "Q4K", "-c", "tpl.jinja", "-n", "0:16;1:14").models
    assert (entry.in_situ_quant, entry.chat_template, entry.num_device_layers) == ("Q4K", "tpl.jinja", ["0:16;1:14"])
    assert entry.isq_embeddings is None
    (entry,) = _cli("--isq-embeddings", "Q8_0", "plain", "-m", "m", "--isq", "Q4_0").models
    assert (entry.in_situ_quant, entry.isq_embeddings) == ("Q4_0", "Q8_0")


def test_seed_cli_multi_model(tmp_path: Path) -> None:
    path = _write(tmp_path, SEED_EXAMPLE)
    config = _cli("--port", "1234", "--multi-model", "--multi-model-config", str(path), "--default-model-id", "mistral-7b")
    assert [e.model_id for e in config.models] == ["llama3-8b", "mistral-7b"]
    assert config.default_model_id == "mistral-7b"
    with pytest.raises(ConfigError, match="'nope' matches no model; configured ids: llama3-8b, mistral-7b"):
        _cli("--multi-model", "--multi-model-config", str(path), "--default-model-id", "nope")
    with pytest.raises(ConfigError, match="--multi-model needs --multi-model-config"):
        _cli("--multi-model")
    vision = _cli("vision-plain", "-m", "google/gemma-3-4b-it", "-a", "gemma3").models[0]
    assert (vision.model_id, vision.model.kind, vision.model.arch) == ("google/gemma-3-4b-it", VISION_PLAIN, "gemma3")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)


def test_mrs_server_reports_errors_without_traceback(tmp_path: Path) -> None:
    bad = _write(tmp_path, [{"model_id": "a"}, {"model_id": "a"}])
    for argv, words in [
        (["--multi-model", "--multi-model-config", str(bad)], "duplicate model_id 'a'"),
        (["vision-plain", "-m", "x", "-a", "llama"], "architecture 'llama' has no vision model"),
        (["plain", "-m", str(tmp_path), "-a", "nosuch"], "unsupported architecture 'nosuch'"),
    ]:
        result = _run("-m", "serving.cli", *argv)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr


def test_hydra_serve_config_matches_seed_cli(tmp_path: Path) -> None:
    config = serve_config(["models=[smollm2-135m,gemma3-270m]", "default_model_id=smollm2-135m",
                           "server.port=4321", "model.dtype=bfloat16", "quant=q8_0", "engine=small"])
    assert [e.model_id for e in config.models] == ["smollm2-135m", "gemma3-270m"]
    assert all(e.dtype == "bfloat16" and e.in_situ_quant == "Q8_0" for e in config.models)
    assert config.server.port == 4321 and config.engine.max_batch == 4 and config.default_model_id == "smollm2-135m"
    from_json = serve_config([f"multi_model_config={_write(tmp_path, SEED_EXAMPLE)}"])
    assert [e.model_id for e in from_json.models] == ["llama3-8b", "mistral-7b"]
    assert from_json.models == load_multi_model_config(tmp_path / "models.json")


def test_presets_follow_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRS_MODELS_DIR", str(tmp_path))
    assert {"smollm2-135m", "smollm2-135m-plain", "gemma3-270m"} <= set(presets())
    smol = model_preset("smollm2-135m")
    assert isinstance(smol, ModelEntry) and smol.model.kind == GGUF
    assert smol.model.quantized_model_id == str(tmp_path)
    assert smol.model.quantized_filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    plain = model_preset("smollm2-135m-plain", ["model.dtype=bfloat16"])
    assert plain.model.model_id == str(tmp_path / "SmolLM2-135M-Instruct") and plain.dtype == "bfloat16"


@pytest.mark.parametrize("overrides, words", [
    (["server.port=abc"], "server.port"),
    (["model=nope"], "model/nope"),
    (["models=[nope]"], "unknown model preset 'nope'"),
    (["model=gemma3-270m", "model.model.kindd=gguf"], "kindd"),
    (["model=gemma3-270m", "default_model_id=other"], "'other' matches no model"),
    ([], "no models configured"),
])
def test_hydra_errors(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        serve_config(overrides)
    assert words in info.value.message


def test_mrs_cli_errors_and_cfg() -> None:
    result = _run("-m", "mrs.cli", "serve", "models=[nope]")
    assert result.returncode == 2 and "unknown model preset 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("-m", "mrs.cli", "generate", "model=gemma3-270m", "max_tokens=7", "--cfg")
    assert result.returncode == 0, result.stderr
    assert "max_tokens: 7" in result.stdout and "gemma-3-270m-q4_k_m.gguf" in result.stdout
    result = _run("-m", "mrs.cli", "frobnicate")
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_load_failure_at_startup_exits_1_with_the_reason(tmp_path: Path) -> None:
    from server_process import free_port

    result = _run("-m", "serving.cli", "--port", str(free_port()), "gguf", "-m", str(tmp_path / "absent"),
                  "-f", "model.gguf")
    assert result.returncode == 1, result.stderr
    assert "startup failed" in result.stderr and "absent" in result.stderr
    assert "Traceback" not in result.stderr


def test_mrs_command_help_prints_usage(capsys) -> None:
    from mrs.cli import main

    assert main(["serve", "--help"]) == 0
    assert "mrs serve models=" in capsys.readouterr().out
