"""Streaming text from token ids: what a client may be shown while a row is still generating.

The engine's final text is decode(all tokens) cut at the first stop string. While generating,
the visible text is the same thing minus what may still change:
  - a trailing partial UTF-8 character (the decoder shows an unfinished byte sequence as U+FFFD);
  - a suffix that could be the start of a stop string (it is cut away if the stop completes).
So every visible text is a prefix of the next one and of the final text, and the deltas joined
are exactly the final text.

The text of the tokens so far comes from a TokenText: for byte-level BPE tokenizers (ours) each
token's bytes go through one incremental UTF-8 decoder (O(1) a token, so a 4,096-token stream is
not decoded whole at every flush), checked at start-up to agree with tokenizer.decode; any other
tokenizer decodes the whole output at each read.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Callable
from typing import Protocol

REPLACEMENT = "\ufffd"


def visible_text(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """The part of `text` (decoded so far) that no later token can change."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cuts:
        return text[: min(cuts)]
    text = text.rstrip(REPLACEMENT)
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


def tokens_within(decode: Callable[[list[int]], str], ids: list[int], start: int, chars: int) -> int:
    """How many of `ids` (at least `start`) fit in the first `chars` characters of their text: the
    largest k whose decoded prefix, less a trailing partial character, is no longer than `chars`.
    It says which tokens' log-probabilities go with a text cut at a stop string, or streamed so far."""
    k = start
    while k < len(ids) and len(visible_text(decode(ids[: k + 1]), ())) <= chars:
        k += 1
    return k


class TokenText(Protocol):
    """Token ids in (push, from the engine thread), text out (from a writer thread)."""

    ids: list[int]

    def push(self, token_id: int) -> None: ...

    @property
    def text(self) -> str: ...  # the text of the ids so far, less a trailing partial character

    def tokens_within(self, start: int, chars: int) -> int: ...  # tokens_within() for these ids

    def recent(self, before: int) -> str: ...  # a suffix of text: what the last token added, `before` chars more


class WholeText:
    """Any tokenizer: the whole output decoded at each read."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode, self.ids = decode, []

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)

    @property
    def text(self) -> str:
        return visible_text(self._decode(self.ids[:]), ())

    def tokens_within(self, start: int, chars: int) -> int:
        return tokens_within(self._decode, self.ids[:], start, chars)

    def recent(self, before: int) -> str:
        return self.text


class ByteText:
    """Byte-level BPE: each token's bytes (skipped ids: none) through one incremental UTF-8 decoder,
    which holds an unfinished character back; ends[k]: the text's length after token k."""

    def __init__(self, table: list[bytes], skip: frozenset[int]) -> None:
        self._table, self._skip = table, skip
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids: list[int] = []
        self._pieces: list[str] = []
        self._ends: list[int] = []

    def push(self, token_id: int) -> None:
        known = token_id < len(self._table) and token_id not in self._skip  # decode() drops ids it lacks, as here
        piece = self._utf8.decode(self._table[token_id]) if known else ""
        self._pieces.append(piece)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(piece))
        self.ids.append(token_id)  # last: a reader sizes its view by len(ids)

    @property
    def text(self) -> str:
        return "".join(self._pieces[: len(self.ids)])

    def tokens_within(self, start: int, chars: int) -> int:
        ends, k = self._ends[: len(self.ids)], start
        while k < len(ends) and ends[k] <= chars:
            k += 1
        return k

    def recent(self, before: int) -> str:
        want, pieces = len(self._pieces[-1]) + before if self._pieces else 0, []
        got = 0
        for piece in reversed(self._pieces):  # (engine thread only: the pusher's own view)
            if got >= want:
                break
            pieces.append(piece)
            got += len(piece)
        return "".join(reversed(pieces))


def text_factory(
    decode: Callable[[list[int]], str], table: list[bytes], skip: frozenset[int], byte_level: bool, checks: int = 300
) -> Callable[[], TokenText]:
    """-> a new TokenText per stream: ByteText when the tokenizer is byte-level and `checks` seeded
    sequences (half of their tokens partial UTF-8 characters, some skipped) decode the same both
    ways; WholeText otherwise. decode: ids -> text, skipping the `skip` ids."""
    if byte_level and _agrees(decode, table, skip, checks):
        return lambda: ByteText(table, skip)
    return lambda: WholeText(decode)


def _agrees(decode: Callable[[list[int]], str], table: list[bytes], skip: frozenset[int], checks: int) -> bool:
    partial = [
        i for i, b in enumerate(table) if i not in skip and b.decode("utf-8", "replace") != b.decode("utf-8", "ignore")
    ]
    rng, pool = random.Random(0), partial or list(range(len(table)))
    for _ in range(checks):
        ids = [rng.choice(pool) if rng.random() < 0.5 else rng.randrange(len(table)) for _ in range(rng.randint(1, 24))]
        if skip and rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(sorted(skip)))
        t = ByteText(table, skip)
        for i in ids:
            t.push(i)
        if t.text + t._utf8.decode(b"", final=True) != decode(ids):
            return False
    return True


class TextDeltas:
    """Token ids in, text deltas out. push() from the engine thread, take() from a writer thread
    (list.append and a slice copy are atomic under the GIL)."""

    def __init__(self, text: TokenText | Callable[[list[int]], str], stop: tuple[str, ...] | list[str] = ()) -> None:
        """text: a TokenText, or a decode function (WholeText)."""
        self.text = text if hasattr(text, "push") else WholeText(text)
        self._stop = tuple(stop)
        self.sent = ""  # the text returned by take() so far

    def push(self, token_id: int) -> None:
        self.text.push(token_id)

    @property
    def tokens(self) -> int:
        return len(self.text.ids)

    @property
    def ids(self) -> list[int]:
        return self.text.ids[:]

    def take(self) -> str:
        """The visible text not yet taken ("" when nothing new)."""
        text = visible_text(self.text.text, self._stop)
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new (a decoder that rewrote earlier text shows nothing until the end)
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def tokens_sent(self, start: int) -> int:
        """How many tokens (at least `start`) the text taken so far holds."""
        return self.text.tokens_within(start, len(self.sent))
