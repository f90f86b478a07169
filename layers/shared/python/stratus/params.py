"""Generation parameters: one definition shared by the API, the queue message and the engine.

Pure Python (no numpy) so the API Lambda can validate requests without the engine's dependencies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from stratus.errors import InvalidRequest, shown

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string's length: a worker matches every stop against each flush of text
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions: 5; we allow 20 on both, as vLLM does)
MAX_N = 16  # choices per prompt; at most the engine's batch (Engine.check_request)
# Fields added after the first queue-message format: left out of to_json() at their defaults, so
# requests that do not use them keep their cache keys and older workers still read them.
OPTIONAL = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": (),
    "n": 1,
    "logprobs": None,
    "echo": False,
    "json_schema": "",
    "min_tokens": 0,
    "grammar": "",
}
# The engine's sampling arithmetic (stratus_engine.sampling, the engine's stop and EOS handling):
# bump it with any change that can change a seeded or greedy request's tokens. It is part of every
# cache key, so results of the old sampling are never served for the new.
# 2: temperature divides logits shifted by their max (no overflow); 3: an inverse-CDF draw and a
# top_p that sorts only the likeliest tokens (the same distributions, other rounding at the edges)
SAMPLING_VERSION = 3


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
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), sorted by id
    n: int = 1  # choices, each its own row after one shared prefill; seeds seed, seed + 1, ...
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    echo: bool = False  # completions: the prompt comes back before the text (with its logprobs, if asked)
    json_schema: str = ""  # response_format: the output must be JSON valid for this schema (compact JSON text)
    min_tokens: int = 0  # end of sequence masked until this many tokens are out (stop strings still stop)
    grammar: str = ""  # the output must match this llguidance Lark grammar (stratus.tools: a chat's tools)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if (
            not isinstance(self.max_tokens, int)
            or isinstance(self.max_tokens, bool)
            or self.max_tokens < (0 if self.echo else 1)
        ):  # echo + max_tokens 0: score the prompt only
            raise InvalidRequest(
                f"max_tokens must be an integer >= 1 (0 with echo), got {self.max_tokens!r}", param="max_tokens"
            )
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}", param="top_k")
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, lo_open=True)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}", param="seed")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest(
                f"stop must be up to {MAX_STOP_STRINGS} non-empty strings, got {shown(list(self.stop))}", param="stop"
            )
        if (longest := max((len(s) for s in self.stop), default=0)) > MAX_STOP_CHARS:
            raise InvalidRequest(
                f"each stop string must be at most {MAX_STOP_CHARS} characters, got one of {longest}", param="stop"
            )
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        _check_int("n", self.n, 1, MAX_N)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        if not isinstance(self.echo, bool):
            raise InvalidRequest(f"echo must be true or false, got {self.echo!r}", param="echo")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}", param="ignore_eos")
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)

    @property
    def prompt_logprobs(self) -> int | None:
        """echo with logprobs: the prompt's tokens get log-probabilities too (k alternatives each)."""
        return self.logprobs if self.echo else None

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or top_k 1) means argmax: no randomness, seed irrelevant."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def deterministic(self) -> bool:
        """Same request -> same text: greedy, or sampling with an explicit seed (cacheable)."""
        return self.greedy or self.seed is not None

    @property
    def edits_logits(self) -> bool:
        """Anything beyond temperature / top-k / top-p: the engine samples this row on its own."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        for name, default in OPTIONAL.items():
            if getattr(self, name) == default:
                del d[name]
        return d

    @classmethod
    def from_json(cls, d: dict) -> SamplingParams:
        return cls(**d)  # an unknown field raises TypeError: never sample by rules this code lacks


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", param=name)


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """{"<token id>": bias} (JSON object keys are strings), a dict, or pairs -> sorted (id, bias) pairs."""
    pairs = value.items() if isinstance(value, dict) else value
    try:
        out = sorted((int(t), float(b)) for t, b in pairs)
    except (TypeError, ValueError, OverflowError):  # (OverflowError: an integer bias past float range)
        raise InvalidRequest("logit_bias must map token ids to numbers in [-100, 100]", param="logit_bias") from None
    if len(out) > MAX_LOGIT_BIAS or any(t < 0 or not -100 <= b <= 100 for t, b in out):
        raise InvalidRequest(
            f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (>= 0) to numbers in [-100, 100]",
            param="logit_bias",
        )
    return tuple(out)
