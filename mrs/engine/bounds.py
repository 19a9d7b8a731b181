"""The one table of request-field bounds: the protocol models, the Python API and the engine
all check against it, so a value is valid or invalid the same way at every door.

The ranges are OpenAI's where OpenAI has the field (temperature 0-2, penalties -2..2,
logit_bias -100..100, top_logprobs 0-20); the engine's extras follow vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_TOP_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # a seed must fit a signed or unsigned 64-bit integer


@dataclass(frozen=True)
class Bound:
    """A closed or half-open interval; ``None`` leaves that side unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def field(self) -> dict[str, float]:
        """The bound as pydantic ``Field`` keywords."""
        out: dict[str, float] = {}
        if self.lo is not None:
            out["gt" if self.lo_open else "ge"] = self.lo
        if self.hi is not None:
            out["le"] = self.hi
        return out

    def describe(self) -> str:
        if self.hi is None:
            return f"must be {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"must be in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"


def _num(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


SAMPLING = {
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, lo_open=True),
    "top_k": Bound(-1),  # -1 and 0 both mean off (vLLM's -1, mistral.rs's 0)
    "min_p": Bound(0.0, 1.0),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(0.0, 100.0, lo_open=True),  # far past 100 a float32 factor overflows
    "logit_bias": Bound(-100.0, 100.0),  # each bias value
    "top_logprobs": Bound(0, MAX_TOP_LOGPROBS),
    "prompt_logprobs": Bound(0, MAX_TOP_LOGPROBS),  # echo with logprobs: alternatives per prompt token
    "n": Bound(1),  # the upper end is the engine's max_batch (or the server's max_n)
    "max_tokens": Bound(1),
    "seed": Bound(SEED_MIN, SEED_MAX),
}
