"""``mrs``: the Hydra front door. ``mrs <command> key=value ...`` composes ``conf/``.

    mrs serve models=[smollm2-135m,gemma3-270m] default_model_id=smollm2-135m server.port=1234
    mrs serve multi_model_config=models.json engine=small
    mrs generate model=smollm2-135m prompt='Hello' max_tokens=32
    mrs chat model=smollm2-135m prompt='What is the capital of France?'
    mrs convert model=smollm2-135m-plain model.in_situ_quant=Q4_0 out=DIR
    mrs fetch-models
    mrs <command> ... --cfg        # print the composed config and exit

``serve`` hands its ServeConfig to ``serving.runner.run``, the same code path as
``mrs-server``; ``serving`` is imported inside the command because ``mrs`` never
imports ``serving`` at module level (the library below the server; README "Layout").
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mrs.config.schema import ModelEntry
from mrs.errors import ConfigError, MrsError

USAGE = __doc__.split("\n\n")[1]


def _serve(overrides: list[str]) -> int:
    from mrs.config.hydra import serve_config

    config = serve_config(overrides)
    from serving.runner import run  # lazy: mrs does not depend on serving at import time

    return run(config)


def _model_entry(cfg: DictConfig) -> ModelEntry:
    """The one model of ``model=<preset>`` (and ``model.*=``, ``quant=``) overrides."""
    from mrs.config.hydra import quant_fields, to_model_entry

    if cfg.get("model") is None:
        raise ConfigError("choose a model: model=<preset> (see conf/model/)", param="model")
    return dataclasses.replace(to_model_entry(cfg.model, "model"), **quant_fields(cfg))


def _generate(overrides: list[str], chat: bool) -> int:
    from mrs.config.hydra import compose_config

    cfg = compose_config(overrides)
    entry = _model_entry(cfg)
    from mrs.pipeline import load

    # The serving engine preset is sized for many clients; one prompt only needs the
    # Python API's small engine unless engine=/engine.* was given.
    engine = OmegaConf.to_object(cfg.engine) if any(o.startswith("engine") for o in overrides) else None
    begin = time.perf_counter()
    pipeline = load(entry, engine)
    print(f"[loaded {entry.model_id} in {time.perf_counter() - begin:.1f}s]", file=sys.stderr, flush=True)
    options = dict(max_tokens=int(cfg.max_tokens), temperature=float(cfg.temperature),
                   top_k=int(cfg.top_k), top_p=float(cfg.top_p), seed=cfg.seed)
    if chat:
        messages = ([{"role": "system", "content": str(cfg.system)}] if cfg.system else [])
        messages.append({"role": "user", "content": str(cfg.prompt)})
        result = pipeline.chat(messages, **options)
    else:
        result = pipeline.generate(str(cfg.prompt), **options)
    pipeline.close()
    print(result.text)
    print(_speed_line(result), file=sys.stderr)
    return 0


def _speed_line(result: Any) -> str:
    t = result.timing
    return (f"[prompt: {t.prompt_tokens} tokens, {t.prompt_tok_per_s:.1f} tok/s; "
            f"decode: {t.completion_tokens} tokens, {t.decode_tok_per_s:.1f} tok/s]")


def _convert(overrides: list[str]) -> int:
    from mrs.config.hydra import compose_config

    cfg = compose_config(overrides)
    entry = _model_entry(cfg)
    if not cfg.get("out"):
        raise ConfigError("choose where to write the conversion: out=DIR", param="out")
    from mrs.convert import convert

    begin = time.perf_counter()
    root = convert(entry, str(cfg.out))
    print(f"[converted {entry.model_id} in {time.perf_counter() - begin:.1f}s; serve it as a Plain model "
          f"whose model_id is the directory, e.g. mrs-server plain -m {root}]", file=sys.stderr)
    print(root)
    return 0


def _fetch(overrides: list[str]) -> int:
    from mrs.fetch import main as fetch_main

    return fetch_main(overrides) or 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": _serve,
    "generate": lambda o: _generate(o, chat=False),
    "chat": lambda o: _generate(o, chat=True),
    "convert": _convert,
    "fetch-models": _fetch,
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(f"usage:{USAGE}\ncommands: {', '.join(COMMANDS)}")
        return 0 if args else 2
    command, overrides = args[0], args[1:]
    if command != "fetch-models" and any(o in ("-h", "--help") for o in overrides):
        print(f"usage:{USAGE}\nkeys: see conf/config.yaml, or add --cfg to print the composed config")
        return 0
    if command not in COMMANDS:
        print(f"mrs: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if "--cfg" in overrides and command != "fetch-models":
            from mrs.config.hydra import compose_config

            cfg: DictConfig = compose_config([o for o in overrides if o != "--cfg"])
            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        return COMMANDS[command](overrides)
    except MrsError as e:
        print(f"mrs {command}: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
