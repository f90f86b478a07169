"""Streamed text: the chunk items a worker writes while it generates, and how a reader puts them
back together.

StreamTable items (one per flush of one job; never an append to the job item, which DynamoDB
would bill at the whole item's size on every write):
  job_id (HASH)   the stream: stream_key(job id, the job's run), so a job made again under its id
                  (a retry after it failed, no-cache) never shows a new reader the earlier run's chunks
  seq (RANGE)     attempt * 10**6 + n: a takeover (a later delivery, a higher attempt) sorts after
                  every chunk of the attempts before it
  offset, text    this chunk is the job's output text[offset : offset + len(text)]
  logprobs        (requests with logprobs) entries[lp_offset : lp_offset + n] of the job's
  lp_offset       log-probability entries (JSON), for the tokens this chunk's text completes
  final           on the chunk written after the job's result: {"finish_reason", "usage"} (JSON)
  expires_at      TTL, the job's own

A takeover regenerates from offset 0. Greedy and seeded requests give the same text, and the
Assembler skips what the client already has; text that disagrees with what was sent is a
Diverged error, never garbled output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from boto3.dynamodb.conditions import Key

ATTEMPT_STRIDE = 10**6  # chunks per attempt: more than any job writes (max_tokens <= context length)


def stream_key(job_id: str, run: str) -> str:
    """The partition of one run of a job (Job.run; "" for a job stored before runs existed)."""
    return f"{job_id}.{run}" if run else job_id


@dataclass(frozen=True)
class Chunk:
    stream: str  # stream_key(job id, run)
    seq: int
    offset: int
    text: str
    final: dict | None = None  # the last chunk: {"finish_reason", "usage"}
    logprobs: list[dict] | None = None  # chat-shaped entries (stratus_worker.choices), when asked for
    lp_offset: int = 0

    def to_item(self, expires_at: int) -> dict:
        item = {
            "job_id": self.stream,
            "seq": self.seq,
            "offset": self.offset,
            "text": self.text,
            "expires_at": expires_at,
        }
        if self.final is not None:
            item["final"] = json.dumps(self.final, separators=(",", ":"))
        if self.logprobs is not None:
            item["logprobs"] = json.dumps(self.logprobs, separators=(",", ":"), ensure_ascii=False)
            item["lp_offset"] = self.lp_offset
        return item

    @classmethod
    def from_item(cls, item: dict) -> Chunk:
        return cls(
            item["job_id"],
            int(item["seq"]),
            int(item["offset"]),
            item.get("text", ""),
            json.loads(item["final"]) if "final" in item else None,
            json.loads(item["logprobs"]) if "logprobs" in item else None,
            int(item.get("lp_offset", 0)),
        )


def first_seq(attempt: int) -> int:
    return max(1, attempt) * ATTEMPT_STRIDE


class ChunkStore:
    def __init__(self, table) -> None:  # a boto3 DynamoDB Table resource (StreamTable)
        self.table = table

    def put(self, chunks: list[tuple[Chunk, int]]) -> None:
        """Write (chunk, expires_at) pairs, 25 per BatchWriteItem (the batch writer resends
        unprocessed items)."""
        with self.table.batch_writer() as batch:
            for chunk, expires_at in chunks:
                batch.put_item(Item=chunk.to_item(expires_at))

    def after(self, stream: str, seq: int) -> list[Chunk]:
        """The stream's chunks with a sequence number above `seq`, in order (strongly consistent)."""
        out: list[Chunk] = []
        kwargs = {"KeyConditionExpression": Key("job_id").eq(stream) & Key("seq").gt(seq), "ConsistentRead": True}
        while True:
            got = self.table.query(**kwargs)
            out.extend(Chunk.from_item(i) for i in got.get("Items", []))
            if "LastEvaluatedKey" not in got:
                return out
            kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]


class Diverged(Exception):
    """A restarted attempt produced text that differs from what the client was already sent."""


@dataclass
class Assembler:
    """Chunks (in sequence order, from any number of attempts) -> the text to send, once.

    sent: everything the client has been sent. A chunk that repeats it is skipped; one that
    extends it yields the extension; one that contradicts it raises Diverged."""

    sent: str = ""
    last_seq: int = 0
    entries_sent: int = 0  # log-probability entries sent

    def apply(self, chunk: Chunk) -> tuple[str, list[dict]]:
        """-> (new text, new log-probability entries)"""
        self.last_seq = max(self.last_seq, chunk.seq)
        if chunk.offset > len(self.sent):  # cannot happen within one attempt; wait for the result
            return "", []
        self._agree(chunk.offset, chunk.text)
        new = chunk.text[len(self.sent) - chunk.offset :]
        self.sent += new
        return new, self._entries(chunk.logprobs or [], chunk.lp_offset)

    def finish(self, text: str, entries: list[dict] | None = None) -> tuple[str, list[dict]]:
        """The job's final text (and log-probability entries) -> what is left to send."""
        if not text.startswith(self.sent):
            raise Diverged("the job's result differs from the text already sent")
        new = text[len(self.sent) :]
        self.sent += new
        return new, self._entries(entries or [], 0)

    def _entries(self, entries: list[dict], offset: int) -> list[dict]:
        if offset > self.entries_sent:  # a gap: the rest comes with the result
            return []
        new = entries[self.entries_sent - offset :]
        self.entries_sent += len(new)
        return new

    def _agree(self, offset: int, text: str) -> None:
        overlap = self.sent[offset : offset + len(text)]
        if text[: len(overlap)] != overlap:
            raise Diverged(f"a restarted attempt produced different text at character {offset}")
