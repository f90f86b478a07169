"""Stop strings: when a row's text reaches one, and what of its output is kept.

The kept text is the decoded output cut at the earliest stop string, whatever the stops' order (as
streamed, deltas.visible_text); the log-probabilities kept are those of the tokens with text before
the cut, the token the cut splits included.
"""

from __future__ import annotations

from collections.abc import Sequence

from stratus_engine.deltas import TokenText
from stratus_engine.outputs import TokenLogprob


def stop_hit(text: TokenText, stop: Sequence[str]) -> bool:
    """Whether a stop string is in the text: a new one ends in what the last token added, so only
    that and the longest stop's length before it are searched."""
    tail = text.recent(max(len(s) for s in stop) - 1)
    return any(s in tail for s in stop)


def tokens_starting_before(text: TokenText, chars: int) -> int:
    """How many tokens start within the first `chars` characters of their text: those wholly in it,
    and the one a cut at `chars` splits (its text is partly kept, so its log-probability goes too)."""
    whole = text.tokens_within(0, chars)
    split = chars > 0 and whole < len(text.ids) and text.tokens_within(0, chars - 1) == whole
    return whole + split


def trim(
    decoded: str, logprobs: list[TokenLogprob] | None, stop: Sequence[str], text: TokenText | None
) -> tuple[str, list[TokenLogprob] | None]:
    """A finished output's decoded text and log-probabilities -> those kept (module docstring).
    `text`: the output's TokenText, kept whenever there are stop strings."""
    cuts = [i for i in (decoded.find(s) for s in stop) if i >= 0]
    kept = decoded[: min(cuts)] if cuts else decoded
    if logprobs is not None and len(kept) < len(decoded):
        logprobs = logprobs[: tokens_starting_before(text, len(kept))]
    return kept, logprobs
