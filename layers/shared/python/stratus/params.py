"""Generation parameters: one definition shared by the API, the queue message and the engine.

Pure Python (no numpy) so the API Lambda can validate requests without the engine's dependencies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from stratus.errors import InvalidRequest

MAX_STOP_STRINGS = 4  # OpenAI's limit
# The engine's sampling arithmetic (stratus_engine.sampling, the engine's stop and EOS handling):
# bump it with any change that can change a seeded or greedy request's tokens. It is part of every
# cache key, so results of the old sampling are never served for the new.
SAMPLING_VERSION = 1


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise InvalidRequest(f"{name} must be in {left}{lo}, {hi}], got {value}", param=name)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or output
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", param="max_tokens")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}", param="top_k")
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}", param="seed")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {list(self.stop)!r}",
                                 param="stop")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or top_k 1) means argmax: no randomness, seed irrelevant."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def deterministic(self) -> bool:
        """Same request -> same text: greedy, or sampling with an explicit seed (cacheable)."""
        return self.greedy or self.seed is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_json(cls, d: dict) -> SamplingParams:
        return cls(**d)
