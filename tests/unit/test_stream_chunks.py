"""The worker's chunk writer (stratus_worker.streams) when chunk writes fail."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from stratus.chunks import Assembler, Chunk
from stratus_engine.deltas import WholeText
from stratus_worker.streams import ChunkWriter

LETTERS = {i: c for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}


def aws_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "..."}}, "BatchWriteItem")


class Store:
    """A chunk table whose writes fail as told: a write carrying a job of `once` fails once, one
    carrying a job of `always` every time."""

    def __init__(self) -> None:
        self.items, self.once, self.always = [], {}, {}

    def put(self, chunks) -> None:
        jobs = {c.stream for c, _ in chunks}
        bad = next((self.once.pop(j) for j in jobs if j in self.once), None) or next(
            (self.always[j] for j in jobs if j in self.always), None
        )
        if bad is not None:
            raise bad
        self.items += [c for c, _ in chunks]

    def shown(self, job_id: str) -> str:
        asm, text = Assembler(), ""
        for c in self.items:
            if c.stream == job_id:
                text += asm.apply(c)[0]
        return text


def writer(store: Store, now: list[float]) -> ChunkWriter:
    return ChunkWriter(
        store, lambda: WholeText(lambda ids: "".join(LETTERS[i] for i in ids)), flush_s=0.1, clock=lambda: now[0]
    )


def feed(on_token, text: str) -> None:
    for ch in text:
        on_token(next(i for i, c in LETTERS.items() if c == ch))


def test_a_failed_chunk_write_keeps_its_text_for_the_next_round():
    store, now = Store(), [0.0]
    w = writer(store, now)
    on_token = w.open("j1", "", 1, (), 10**10, streamed=True)
    feed(on_token, "he")
    assert w.flush() == 1
    feed(on_token, "ll")
    now[0] += 1
    store.once["j1"] = aws_error("ProvisionedThroughputExceededException")
    with pytest.raises(ClientError):
        w.flush()
    feed(on_token, "o w")
    now[0] += 1
    w.flush()
    assert store.shown("j1") == "hello w"  # (the failed chunk's text is kept, and the later ones leave no gap)


def test_each_write_hands_its_chunks_to_their_streams_readers_as_it_begins():
    store, now, woken = Store(), [0.0], []
    w = ChunkWriter(
        store,
        lambda: WholeText(lambda ids: "".join(LETTERS[i] for i in ids)),
        flush_s=0.1,
        clock=lambda: now[0],
        wake=woken.extend,
    )
    a = w.open("a", "", 1, (), 10**10, streamed=True, wake="q1")
    b = w.open("b", "", 1, (), 10**10, streamed=True, wake="q1")
    c = w.open("c", "", 1, (), 10**10, streamed=True)  # (a stream nobody's wake queue waits on)
    feed(a, "ab")
    feed(b, "xy")
    feed(c, "mn")
    store.always["b"] = aws_error("ProvisionedThroughputExceededException")
    with pytest.raises(ClientError):
        w.flush()  # (the round fails, then each stream is written alone: b's fails)
    handed = lambda: [(url, job, "".join(c.text for c in chunks)) for url, job, chunks in woken]
    assert handed() == [("q1", "a", "ab"), ("q1", "b", "xy")]  # (c's reader waits on no queue)
    assert store.shown("b") == ""
    del store.always["b"]
    now[0] += 1
    w.flush()  # b's kept chunk goes out now, and is handed again (its reader skips what it has)
    assert handed()[2:] == [("q1", "b", "xy")] and store.shown("b") == "xy"


def test_one_streams_refused_chunk_never_holds_the_others_text():
    store, now = Store(), [0.0]
    w = writer(store, now)
    a, b = w.open("a", "", 1, (), 10**10, streamed=True), w.open("b", "", 1, (), 10**10, streamed=True)
    feed(a, "abc")
    feed(b, "xyz")
    store.always["a"] = aws_error("ValidationException")  # (an item past DynamoDB's size, say)
    with pytest.raises(ClientError):
        w.flush()
    assert store.shown("b") == "xyz" and store.shown("a") == ""
    # and the refused stream stops streaming: its readers take the job's result at the end
    feed(a, "d")
    feed(b, "w")
    now[0] += 1
    assert w.flush() == 1 and store.shown("b") == "xyzw"


def test_handed_chunks_are_taken_only_when_they_go_on_from_the_text_sent():
    asm = Assembler()
    a, b, c = (Chunk("j.r", 1_000_000 + i, off, t) for i, (off, t) in enumerate([(0, "ab"), (2, "cd"), (4, "e")]))
    assert asm.follows([a, b]) and not asm.follows([b]) and not asm.follows([a, c])  # (c: b is missing)
    asm.apply(a)
    assert asm.follows([b, c]) and not asm.follows([a]) and not asm.follows([c])
    # a takeover's chunks start again from the first character: read, not handed
    assert not asm.follows([Chunk("j.r", 2_000_000, 0, "abcd")])
    # log-probability entries go on from those sent, too
    with_lp = Chunk("j.r", 1_000_001, 2, "cd", logprobs=[{"token": "cd"}], lp_offset=3)
    assert not asm.follows([with_lp]) and asm.follows([Chunk("j.r", 1_000_001, 2, "cd", logprobs=[{}], lp_offset=0)])
