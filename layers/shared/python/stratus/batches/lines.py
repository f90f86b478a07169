"""Reading a batch file's lines, and the lines files that record what became of them.

A file is streamed, never held whole: counted once, then read a slice (BatchLimits.slice_lines) at
a time, each slice an S3 range read from where the one before ended. Lines are OpenAI batch lines
({"custom_id", "method": "POST", "url", "body"}) or Bedrock batch records ({"recordId",
"modelInput"}). batches/state/<batch id>/lines/<slice>.json records each slice's Line list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from stratus.batches.model import Batch, Line
from stratus.errors import InvalidRequest, StratusError, shown
from stratus.responses import batch_chat
from stratus.wire import ROUTE_PATHS, json_object, require_unicode

if TYPE_CHECKING:
    from stratus.deps import Deps


# Batch line urls: the routes, and the Responses API (run as a chat: stratus.responses.batch_chat)
RESPONSES = "/v1/responses"
URLS = (*ROUTE_PATHS, RESPONSES)


class Parsed(NamedTuple):
    custom_id: str | None
    route: str  # "chat" | "completion"
    body: dict  # an OpenAI chat or completions body; a Responses body for form "response"
    form: str  # "openai" (a batch line), "bedrock" (a Bedrock record), "response" (a Responses line)

    def request_body(self) -> dict:
        """The chat or completions body its job runs (InvalidRequest naming a field a line cannot use)."""
        return batch_chat(self.body) if self.form == "response" else self.body


def parse_line(raw: str, default_model: str) -> Parsed:
    """A JSONL line -> Parsed; InvalidRequest names the problem."""
    d = json_object(raw, "the line")
    if "modelInput" in d:  # Bedrock batch inference record
        body = d["modelInput"]
        if not isinstance(body, dict):
            raise InvalidRequest("modelInput must be an object", param="modelInput")
        body = {"model": default_model, **body}
        if "max_gen_len" in body:
            body["max_tokens"] = body.pop("max_gen_len")
        require_unicode(d.get("recordId"), "recordId")
        return Parsed(d.get("recordId"), "chat" if "messages" in body else "completion", body, "bedrock")
    custom_id = d.get("custom_id")
    require_unicode(custom_id, "custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest("custom_id is required (a non-empty string)", param="custom_id")
    if d.get("method", "POST") != "POST":
        raise InvalidRequest(f"method must be POST, got {shown(d.get('method'))}", param="method")
    url = d.get("url")
    if not isinstance(url, str) or url not in URLS:  # (a list or an object is no path, nor hashable)
        raise InvalidRequest(f"url must be one of {', '.join(URLS)}, got {shown(url)}", param="url")
    if not isinstance(d.get("body"), dict):
        raise InvalidRequest("body must be an object", param="body")
    if url == RESPONSES:
        return Parsed(custom_id, "chat", d["body"], "response")
    return Parsed(custom_id, ROUTE_PATHS[url], d["body"], "openai")


def line_error(exc: StratusError) -> dict:
    """A refused line's error, as the error file shows it."""
    return {"code": exc.code or "invalid_request", "message": exc.message, "param": exc.param}


@dataclass(frozen=True)
class Row:
    """A non-blank line of a batch file."""

    n: int  # its number in the file, 1-based (blank lines count)
    raw: bytes  # its bytes, without the line end (the first max_line_bytes + 1 of a longer line)
    end: int  # the byte offset just past it: where the next line starts
    too_long: bool = False  # longer than max_line_bytes: an error line, never held whole


def rows(batch: Batch, deps: Deps, *, offset: int = 0, line: int = 0) -> Iterator[Row]:
    """The file's non-blank lines from byte `offset` on (line `line` + 1 starts there), streamed a
    read_chunk at a time: memory holds the lines a caller keeps, never the file. Lines end at "\\n"
    (a "\\r" before it is dropped), as JSONL says: a U+2028 inside a JSON string is not a line end.
    Always the version the batch was made for (IfMatch on its upload's ETag)."""
    limits = deps.settings.batches
    room = lambda size: max(0, limits.max_line_bytes + 1 - size)  # noqa: E731 — bytes a line keeps, at most max + 1
    get = {"Bucket": deps.settings.bucket, "Key": batch.input_file, **its_version(batch)}
    if offset:
        get["Range"] = f"bytes={offset}-"
    with closing(deps.s3.get_object(**get)["Body"]) as body:
        parts, size, n, end = [], 0, line, offset  # size: the line's bytes so far, kept or not
        for chunk in body.iter_chunks(limits.read_chunk):
            *ended, rest = chunk.split(b"\n")
            for piece in ended:
                raw, size = b"".join([*parts, piece[: room(size)]]), size + len(piece)
                n, end = n + 1, end + size + 1
                if raw.strip():
                    yield Row(n, raw.removesuffix(b"\r"), end, too_long=size > limits.max_line_bytes)
                parts, size = [], 0
            parts.append(rest[: room(size)])  # (past max_line_bytes, the rest of a line is only counted)
            size += len(rest)
        raw = b"".join(parts)
        if raw.strip():  # a last line without a line end
            yield Row(n + 1, raw.removesuffix(b"\r"), end + size, too_long=size > limits.max_line_bytes)


def its_version(batch: Batch) -> dict:
    """S3 read arguments for the version of the file the batch was made for (its upload's ETag)."""
    return {"IfMatch": f'"{batch.input_etag}"'} if batch.input_etag else {}


def text(row: Row, max_line_bytes: int) -> str:
    if row.too_long:
        raise InvalidRequest(f"the line has more than {max_line_bytes} bytes: no request that big can be queued")
    try:
        return row.raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the line is not UTF-8 (a bad byte at {exc.start})") from None


class UnusableFile(InvalidRequest):
    """A file that cannot be a batch: the batch fails, saying why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


CHANGED = {"PreconditionFailed", "412"}  # the object is not the version a batch was made for
PERMANENT_S3 = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidObjectState", "404", "403", *CHANGED}


def error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") or type(exc).__name__


def permanent(exc: Exception) -> bool:
    """A read error that no retry can fix (a missing, forbidden or replaced object, bad content)."""
    return isinstance(exc, UnusableFile) or error_code(exc) in PERMANENT_S3


def lines_in_file(batch: Batch, deps: Deps) -> int:
    """The file's non-blank lines, counted as they stream by; UnusableFile past the limits."""
    limits = deps.settings.batches
    size = deps.s3.head_object(Bucket=deps.settings.bucket, Key=batch.input_file, **its_version(batch))["ContentLength"]
    if size > limits.max_file_bytes:
        raise UnusableFile(
            "file_too_large", f"the file has {size} bytes; at most {limits.max_file_bytes} per batch: split it"
        )
    total = sum(1 for _ in rows(batch, deps))
    if total > limits.max_lines:
        raise UnusableFile(
            "too_many_lines", f"the file has {total} lines; at most {limits.max_lines} per batch: split it"
        )
    return total


# ---- lines files: a slice's Line records --------------------------------------------------------


def lines_key(batch_id: str, part: int) -> str:
    return f"batches/state/{batch_id}/lines/{part:05d}.json"


def write_part(batch: Batch, start: int, lines: list[Line], deps: Deps) -> None:
    """The lines of the slice that starts at line index `start`."""
    part = start // deps.settings.batches.slice_lines
    body = json.dumps([l.__dict__ for l in lines]).encode()
    deps.s3.put_object(Bucket=deps.settings.bucket, Key=lines_key(batch.id, part), Body=body)


def read_part(batch: Batch, part: int, deps: Deps) -> list[Line]:
    raw = deps.s3.get_object(Bucket=deps.settings.bucket, Key=lines_key(batch.id, part))["Body"].read()
    return [Line(**d) for d in json.loads(raw)]


def parts_count(batch: Batch, slice_lines: int) -> int:
    """Lines files written so far (the last may be short)."""
    return -(-batch.ingested // slice_lines)


def read_parts(batch: Batch, deps: Deps, first: int = 0) -> Iterator[list[Line]]:
    """The lines read so far, a lines file (a slice) at a time from part `first` on, in file order."""
    for part in range(first, parts_count(batch, deps.settings.batches.slice_lines)):
        yield read_part(batch, part, deps)


def read_lines(batch: Batch, deps: Deps, start: int = 0) -> list[Line]:
    """The lines read so far from line index `start` on, in file order."""
    size = deps.settings.batches.slice_lines
    return [l for part in read_parts(batch, deps, start // size) for l in part][start % size :]


def slices(lines: list[Line], size: int) -> list[list[Line]]:
    return [lines[i : i + size] for i in range(0, len(lines), size)]
