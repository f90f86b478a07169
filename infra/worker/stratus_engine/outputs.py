"""What a generation returns: each choice's tokens and text, log-probabilities when asked, usage
and timings. Plain data: the worker shapes it into OpenAI responses (stratus_worker/choices.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from a stored prefix (prefix_cache.py), not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_s: float  # submitted -> admitted to the batch
    ttft_s: float  # submitted -> first token
    decode_s: float  # first token -> finished
    total_s: float

    def decode_tokens_per_s(self, completion_tokens: int) -> float:
        return (completion_tokens - 1) / self.decode_s if self.decode_s > 0 and completion_tokens > 1 else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: a prompt's first token (nothing before it to predict it)
    top: tuple[tuple[int, float], ...] | None  # the k most likely tokens at that position, best first


@dataclass(frozen=True)
class Choice:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    logprobs: list[TokenLogprob] | None = None  # one per generated token (the end-of-sequence token
    #                                             included), up to a stop string; when asked for


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    choices: list[Choice]  # params.n of them
    usage: Usage
    timings: Timings
    prompt_logprobs: list[TokenLogprob] | None = None  # echo + logprobs: one per prompt token

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason
