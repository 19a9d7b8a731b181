"""A loaded model's parameter check, remembered across starts.

``registry.check_params`` traces the whole model to prove its parameter tree complete,
on every load's path to ready. Its outcome depends on mrs's source, JAX, the model config
and the tree's structure, shapes and dtypes, never on the values: a marker in the
executable cache's folder for this source version (``mrs.engine.executable_cache``)
records each tree that passed, and a later load of the same tree skips the trace.
Failures are not recorded.
"""

from __future__ import annotations

import hashlib

import jax

from mrs.compile_cache import enable_persistent_cache
from mrs.engine.executable_cache import version_folder
from mrs.loading.param_spec import param_spec
from mrs.models import registry
from mrs.models.config import ModelConfig

CHECKED = "checked"


def check_params(config: ModelConfig, params: dict) -> None:
    """``registry.check_params``, unless this config and tree layout passed it before."""
    enable_persistent_cache()  # as the engine will: the first model loads before any engine starts
    folder = version_folder()
    if folder is None:
        registry.check_params(config, params)
        return
    described = repr((jax.__version__, config, param_spec(params)))
    marker = folder / CHECKED / hashlib.sha256(described.encode()).hexdigest()
    if marker.exists():
        return
    registry.check_params(config, params)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache: the check runs again next time
        pass
