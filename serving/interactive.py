r"""``mrs-server -i``: chat in the terminal with the default (else first) model, streaming.

Commands: \help, \exit, \system <text>, \clear, \temperature <t>, \topk <k>, \topp <p>.
A model without a chat template (a base model) continues the text you type instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from mrs.config.schema import ServeConfig
from mrs.engine.types import Finish, GenerationRequest, SamplingParams, TokenDelta
from mrs.errors import MrsError
from mrs.pipeline import Pipeline, load

_MAX_REPLY_TOKENS = 512
HELP = r"""Commands:
  \help              this help
  \exit              quit (Ctrl-D works too)
  \system <text>     set the system prompt (and clear the history)
  \clear             forget the conversation
  \temperature <t>   sampling temperature (0 = greedy)
  \topk <k>          keep the k most likely tokens (0 = off)
  \topp <p>          nucleus sampling mass in (0, 1]"""


@dataclass
class _Session:
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_p=0.9))


def chat_loop(config: ServeConfig, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    entry = next((e for e in config.models if e.model_id == config.default_model_id), config.models[0])
    print(f"loading {entry.model_id!r} ...", file=out, flush=True)
    served = load(entry, config.engine)
    chat = served.has_chat_template
    mode = "chat" if chat else "text continuation (the model has no chat template)"
    print(f"model {entry.model_id!r} ready, {mode}. Type \\help for commands.", file=out, flush=True)
    session = _Session()
    try:
        while True:
            print("> ", end="", file=out, flush=True)
            line = stdin.readline()
            if not line:  # EOF
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("\\"):
                if not _command(line, session, out):
                    break
                continue
            _reply(served, session, line, chat, out)
    except KeyboardInterrupt:
        pass
    finally:
        served.close()
    print("bye", file=out, flush=True)
    return 0


def _command(line: str, session: _Session, out: TextIO) -> bool:
    """Apply one backslash command; False means exit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    sampling = session.sampling
    try:
        if name == "\\exit":
            return False
        if name == "\\help":
            print(HELP, file=out)
        elif name == "\\clear":
            session.history.clear()
            print("history cleared", file=out)
        elif name == "\\system":
            session.system = arg or None
            session.history.clear()
            print(f"system prompt {'set' if arg else 'removed'}; history cleared", file=out)
        elif name == "\\temperature":
            sampling.temperature = _number(arg, float, 0.0, 2.0)
            print(f"temperature = {sampling.temperature}", file=out)
        elif name == "\\topk":
            sampling.top_k = _number(arg, int, 0, 1 << 20)
            print(f"top_k = {sampling.top_k}", file=out)
        elif name == "\\topp":
            sampling.top_p = _number(arg, float, 1e-6, 1.0)
            print(f"top_p = {sampling.top_p}", file=out)
        else:
            print(f"unknown command {name}; \\help lists them", file=out)
    except ValueError as e:
        print(f"{name}: {e}", file=out)
    out.flush()
    return True


def _number(text: str, kind: type, low: float, high: float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"expected a{'n integer' if kind is int else ' number'}, got {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"must be in [{low}, {high}]")
    return value


def _reply(served: Pipeline, session: _Session, line: str, chat: bool, out: TextIO) -> None:
    if chat:
        messages = ([{"role": "system", "content": session.system}] if session.system else [])
        messages += [*session.history, {"role": "user", "content": line}]
        ids = served.encode_chat(messages)
    else:
        ids = served.encode(line)
    sp = session.sampling
    room = served.context_limit - len(ids)  # none left: the engine raises ContextLengthExceeded
    sampling = SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                              max_tokens=min(_MAX_REPLY_TOKENS, room) if room > 0 else None)
    request = GenerationRequest(ids, sampling)
    text = ""
    try:
        for event in served.submit(request):
            if isinstance(event, TokenDelta):
                text += event.text
                print(event.text, end="", file=out, flush=True)
            elif isinstance(event, Finish) and event.reason == "error":
                raise event.error or MrsError("generation failed")
    except MrsError as e:
        print(f"\nerror: {e.message}", file=out, flush=True)
        return
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
        served.cancel(request.request_id)
        print("\n[interrupted]", file=out, flush=True)
    print(file=out, flush=True)
    if chat:
        session.history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
