"""Hydra composition of ``conf/`` (installed as ``mrs.conf``) into the typed configs.

The schema dataclasses live in Hydra's ConfigStore (``server/schema``, ``engine/schema``,
``model/schema``) and every YAML preset lists its schema first, so a wrong key or type
fails at composition with the key's full name. ``${models_dir:}`` in presets resolves
to ``mrs.fetch.models_dir()`` so demo paths follow ``MRS_MODELS_DIR``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mrs.config.mistralrs import load_multi_model_config
from mrs.config.schema import EngineConfig, ModelEntry, ServeConfig, ServerConfig
from mrs.config.validate import check_serve_config
from mrs.errors import ConfigError
from mrs.fetch import models_dir

CONF_MODULE = "mrs.conf"


def _register() -> None:
    if not OmegaConf.has_resolver("models_dir"):
        OmegaConf.register_new_resolver("models_dir", lambda: str(models_dir()))
    store = ConfigStore.instance()
    store.store(group="server", name="schema", node=ServerConfig)
    store.store(group="engine", name="schema", node=EngineConfig)
    store.store(group="model", name="schema", node=ModelEntry)


_register()


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    """Initialize Hydra on our config module unless a caller already did."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(config_module=CONF_MODULE, version_base=None):
        yield


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/config.yaml`` with command-line style overrides, errors as ConfigError."""
    try:
        with _hydra():
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise ConfigError(f"bad configuration: {e}{cause}") from None


def presets() -> list[str]:
    """Names of the model presets shipped in conf/model/."""
    folder = resources.files(CONF_MODULE) / "model"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def model_preset(name: str, overrides: Sequence[str] = ()) -> ModelEntry:
    """A preset from conf/model/ as a ModelEntry (``overrides`` like ``model.dtype=bfloat16``)."""
    if name not in presets():
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(presets())}", param="model")
    cfg = compose_config([*_without_model(overrides), f"model={name}"])
    return to_model_entry(cfg.model, f"preset {name!r}")


def to_model_entry(node: DictConfig, where: str) -> ModelEntry:
    try:
        entry = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None
    assert isinstance(entry, ModelEntry)  # model/schema types every preset
    return entry


def serve_config(overrides: Sequence[str] = ()) -> ServeConfig:
    """The ServeConfig for ``mrs serve key=value ...``.

    Models come from ``model=<preset>``, ``models=[<preset>,...]`` and
    ``multi_model_config=<json>``. Field overrides such as ``model.dtype=bfloat16``
    apply to every preset listed.
    """
    has_model = any(_is_model_choice(o) for o in overrides)
    # Without a model= choice there is no `model` node to override in the primary config.
    cfg = compose_config([o for o in overrides if has_model or not _is_model_field(o)])
    entries: list[ModelEntry] = []
    if cfg.get("model") is not None:
        entries.append(to_model_entry(cfg.model, "model"))
    for name in cfg.models:
        entries.append(model_preset(str(name), overrides))
    if cfg.multi_model_config:
        entries.extend(load_multi_model_config(cfg.multi_model_config))
    quant = quant_fields(cfg)
    entries = [dataclasses.replace(e, **quant) for e in entries]
    config = ServeConfig(
        server=OmegaConf.to_object(cfg.server),
        engine=OmegaConf.to_object(cfg.engine),
        models=entries,
        default_model_id=cfg.default_model_id,
        interactive=bool(cfg.interactive),
    )
    check_serve_config(config)
    return config


QUANT_FIELDS = ("in_situ_quant", "isq_embeddings")


def quant_fields(cfg: DictConfig) -> dict[str, str | None]:
    """The ModelEntry fields a ``quant=<preset>`` choice sets on every model (those it names)."""
    quant: Any = cfg.get("quant")
    if quant is None:
        return {}
    unknown = sorted(set(quant) - set(QUANT_FIELDS))
    if unknown:
        raise ConfigError(f"quant preset: unknown key(s) {', '.join(unknown)}; expected {', '.join(QUANT_FIELDS)}",
                          param="quant")
    return {k: None if quant[k] is None else str(quant[k]) for k in QUANT_FIELDS if k in quant}


def _is_model_choice(override: str) -> bool:
    return override.lstrip("+~").startswith("model=")


def _is_model_field(override: str) -> bool:
    return override.lstrip("+~").startswith("model.")


def _without_model(overrides: Sequence[str]) -> list[str]:
    """Drop a ``model=`` choice (the caller sets its own) but keep ``model.x=`` field overrides."""
    return [o for o in overrides if not _is_model_choice(o)]
