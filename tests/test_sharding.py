"""num_device_layers parsing and errors, plus multi-device placement and tensor parallel in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrs.errors import ConfigError
from mrs.sharding.device_map import device_map, parse_device_layers
from mrs.sharding.tensor_parallel import make_mesh

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


def test_four_host_devices() -> None:
    """Placement per layer and tensor-parallel outputs equal to one device (see multi_device_check.py)."""
    script = Path(__file__).with_name("multi_device_check.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("tensor_parallel=2 float32", "tensor_parallel=4 float32", "tensor_parallel=2 Q8_0",
                  "tensor_parallel=4 Q8_0", "num_device_layers=['0:1;1:2;3:1']", "num_device_layers=['2']"):
        assert f"OK {check}" in result.stdout, result.stdout
