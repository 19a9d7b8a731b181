"""num_device_layers and tensor_parallel: parsing, errors, which parameters each stage holds,
and (in a subprocess with 4 host devices) the Engine serving placed models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrs.errors import ConfigError
from mrs.sharding.device_map import device_map, parse_device_layers, stage_params
from mrs.sharding.placement import Placement, resolve_placement
from mrs.sharding.tensor_parallel import check_heads, make_mesh

DEVICES = ["gpu0", "gpu1"]  # device_map only compares and repeats them


def test_parse_forms() -> None:
    assert parse_device_layers(None) == []
    assert parse_device_layers(["12"]) == [(None, 12)]
    assert parse_device_layers(["0:16;1:14"]) == [(0, 16), (1, 14)]
    assert parse_device_layers(["0:16", "1:14"]) == [(0, 16), (1, 14)]


def test_layer_assignment() -> None:
    dmap = device_map(["0:2;1:3"], 6, DEVICES, host="cpu")
    assert dmap.layers == ("gpu0", "gpu0", "gpu1", "gpu1", "gpu1", "cpu")
    assert [(d, list(r)) for d, r in dmap.stages()] == [("gpu0", [0, 1]), ("gpu1", [2, 3, 4]), ("cpu", [5])]
    assert device_map(["4"], 6, DEVICES, host="cpu").layers == ("gpu0",) * 4 + ("cpu",) * 2
    assert device_map(None, 3, DEVICES, host="cpu").layers == ("gpu0",) * 3


@pytest.mark.parametrize(
    "spec, message",
    [
        (["0:16;x"], "malformed entry 'x'"),
        (["a:3"], "malformed entry 'a:3'"),
        (["0:1;0:2"], "ordinal 0 appears twice"),
        (["5:2"], "unknown device ordinal 5"),
        (["0:20;1:20"], "places 40 layers but the model has 30"),
        (["31"], "places 31 layers but the model has 30"),
        ([], "is empty"),
        ("8", "must be a list of strings"),
    ],
)
def test_device_layers_errors(spec, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        device_map(spec, 30, DEVICES, host="cpu")
    assert message in str(err.value)
    assert err.value.param == "num_device_layers"


def test_tensor_parallel_needs_devices() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel 64 needs 64 devices"):
        make_mesh(64)
    with pytest.raises(ConfigError, match="positive integer"):
        make_mesh(0)


@pytest.mark.parametrize(
    "spec, tp, message",
    [
        (None, 2, "tensor_parallel 2 needs 2 devices"),  # one CPU device in this process
        (None, 0, "positive integer"),
        (["0:1"], 2, "cannot be combined"),
        (["0:1;1:1"], None, "unknown device ordinal 1"),
    ],
)
def test_placement_errors(spec, tp, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_placement(spec, tp, num_layers=2, num_heads=4, num_kv_heads=2)


def test_tensor_parallel_splits_whole_heads() -> None:
    check_heads(2, 4, 2)
    message = r"tensor_parallel 4 must divide the attention heads \(4\) and the kv heads \(2\)"
    with pytest.raises(ConfigError, match=message) as err:
        check_heads(4, 4, 2)
    assert err.value.param == "tensor_parallel"


def test_one_device_placement_is_the_default() -> None:
    """["N"] on a CPU-only host: the first accelerator is the host, every layer stays put."""
    for spec, tp in ((["1"], None), (["0:2"], None), (None, 1), (None, None)):
        assert resolve_placement(spec, tp, num_layers=2, num_heads=4, num_kv_heads=2) == Placement()


def test_stage_params_hold_what_each_stage_reads() -> None:
    llama = {"model": {"embed_tokens": "E", "layers_0": "L0", "layers_1": "L1", "layers_2": "L2", "norm": "N"},
             "lm_head": "H"}
    split = [stage_params(llama, r, 3, ("embed_tokens",), tied=False) for r in (range(0, 1), range(1, 3))]
    assert split == [{"model": {"embed_tokens": "E", "layers_0": "L0"}},
                     {"model": {"layers_1": "L1", "layers_2": "L2", "norm": "N"}, "lm_head": "H"}]
    # a tied head reads the token embedding on the last stage too; position embeddings stay first
    gpt2 = {"transformer": {"wte": "T", "wpe": "P", "h_0": "B0", "h_1": "B1", "ln_f": "F"}}
    split = [stage_params(gpt2, r, 2, ("wte", "wpe"), tied=True) for r in (range(0, 1), range(1, 2))]
    assert split == [{"transformer": {"wte": "T", "wpe": "P", "h_0": "B0"}},
                     {"transformer": {"wte": "T", "h_1": "B1", "ln_f": "F"}}]
    whole = stage_params(gpt2, range(0, 2), 2, ("wte", "wpe"), tied=True)
    assert whole == gpt2


def test_four_host_devices(tmp_path) -> None:
    """The Engine on placed models: parameters and KV cache per layer where asked, outputs
    equal to one device, steps stored in an empty executable cache and loaded back (see
    multi_device_check.py)."""
    script = Path(__file__).with_name("multi_device_check.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("num_device_layers=['1:1;2:1']", "num_device_layers=['1:1;2:1'] from the executable cache",
                  "num_device_layers=['1']",
                  "num_device_layers=['1:2'] gemma3 Q8_0", "tensor_parallel=2 gemma3 Q8_0"):
        assert f"OK {check}" in result.stdout, result.stdout
