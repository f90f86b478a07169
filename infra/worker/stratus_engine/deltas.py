"""Streaming text from token ids: what a client may be shown while a row is still generating.

The engine's final text is decode(all tokens) cut at the first stop string. While generating,
the visible text is the same thing minus what may still change:
  - a trailing partial UTF-8 character (the decoder shows an unfinished byte sequence as U+FFFD);
  - a suffix that could be the start of a stop string (it is cut away if the stop completes).
So every visible text is a prefix of the next one and of the final text, and the deltas joined
are exactly the final text.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


def visible_text(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """The part of `text` (decoded so far) that no later token can change."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cuts:
        return text[:min(cuts)]
    text = text.rstrip(REPLACEMENT)
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]


def tokens_within(decode: Callable[[list[int]], str], ids: list[int], start: int, chars: int) -> int:
    """How many of `ids` (at least `start`) fit in the first `chars` characters of their text: the
    largest k whose decoded prefix, less a trailing partial character, is no longer than `chars`.
    It says which tokens' log-probabilities go with a text cut at a stop string, or streamed so far."""
    k = start
    while k < len(ids) and len(visible_text(decode(ids[:k + 1]), ())) <= chars:
        k += 1
    return k


class TextDeltas:
    """Token ids in, text deltas out. push() from the engine thread, take() from a writer thread
    (list.append and a slice copy are atomic under the GIL)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] | list[str] = ()) -> None:
        self._decode, self._stop = decode, tuple(stop)
        self._ids: list[int] = []
        self.sent = ""  # the text returned by take() so far

    def push(self, token_id: int) -> None:
        self._ids.append(token_id)

    @property
    def tokens(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[int]:
        return self._ids[:]

    def take(self) -> str:
        """The visible text not yet taken ("" when nothing new)."""
        text = visible_text(self._decode(self._ids[:]), self._stop)
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new (a decoder that rewrote earlier text shows nothing until the end)
        delta, self.sent = text[len(self.sent):], text
        return delta
