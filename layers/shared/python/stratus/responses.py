"""OpenAI's Responses API over the chat path: a response is a chat job plus, when stored, a record
of its conversation.

  POST /v1/responses         body -> ResponseCall (the chat body it becomes) -> the same submission
                             as chat completions (cache, limits, tiers, queues); a stored response
                             writes its record; answered whole, in the background, or streamed
  GET /v1/responses/{id}     the record + its job -> the response object
  .../cancel, DELETE, .../input_items

The record (an item of the jobs table, pk "resp_" + 32 hex digits): the tenant, the job id, the
request's own fields (echoed in the response object), the conversation so far as chat messages
(earlier responses' input and output, then this one's input: what previous_response_id continues)
and, once seen finished, the output, so a conversation outlives its job. Kept RESPONSE_TTL_S.

Input items -> chat messages (stratus.wire reads them as any chat's):
  a string, or {"type": "message", role, content: str | [input_text / output_text parts]}
  {"type": "function_call", call_id, name, arguments}   an assistant turn's tool_calls
  {"type": "function_call_output", call_id, output}     a tool turn
Anything else (images, files, reasoning items, built-in tools) is a 400 that says so.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace

from stratus import service, submission
from stratus.contracts import Job, Status
from stratus.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, shown
from stratus.service import with_result
from stratus.shapes import list_body, list_page, list_params
from stratus.streaming import Stream, stream_of
from stratus.wire import StreamOptions, flag, metadata_field

RESPONSE_TTL_S = 30 * 86400  # as long as OpenAI keeps a stored response
PREFIX = "resp_"
MAX_RECORD_BYTES = 300_000  # DynamoDB items stop at 400 KB
TEXT_PARTS = ("input_text", "output_text")
# Fields of a Responses body this server reads; the rest are refused unless harmless (below)
HARMLESS = {
    "user": lambda v: True,
    "truncation": lambda v: v in (None, "disabled", "auto"),
    "include": lambda v: not v,
    "reasoning": lambda v: v is None or v == {} or (isinstance(v, dict) and v.get("effort") in (None, "none")),
    "service_tier": lambda v: True,
    "prompt_cache_key": lambda v: True,
    "safety_identifier": lambda v: True,
    "top_logprobs": lambda v: v in (None, 0),
    "stream_options": lambda v: True,
}
READ = (
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools", "tool_choice",
    "parallel_tool_calls", "store", "previous_response_id", "background", "stream", "metadata",
)  # fmt: skip


@dataclass(frozen=True)
class ResponseCall:
    """A Responses body read: the chat body it becomes, and what the response object echoes."""

    chat: dict  # a chat completions body (stratus.wire reads it)
    fields: dict  # instructions, metadata, tools, tool_choice, text, ... as the response shows them
    new: list[dict]  # this response's own input, as chat messages
    store: bool
    background: bool
    stream: bool
    previous: str | None  # previous_response_id


def read(body) -> ResponseCall:
    """A POST /v1/responses body -> ResponseCall (InvalidRequest naming the field)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name, value in body.items():
        if name not in READ and not HARMLESS.get(name, lambda v: False)(value):
            raise InvalidRequest(f"{name}={shown(value)} is not supported by this server's Responses API", param=name)
    store, background, stream = (
        flag(body, k, d) for k, d in (("store", True), ("background", False), ("stream", False))
    )
    if background and not store:
        raise InvalidRequest(
            "background responses are polled, so they must be stored (store: true)", param="background"
        )
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("instructions must be a string", param="instructions")
    metadata = metadata_field(body.get("metadata"))
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous.startswith(PREFIX)):
        raise InvalidRequest(
            f"previous_response_id must be a response id (resp_...), got {shown(previous)}",
            param="previous_response_id",
        )
    new = input_messages(body.get("input"))
    tools, choice = _tools(body.get("tools")), _tool_choice(body.get("tool_choice"))
    chat = {
        "model": body.get("model"),
        "messages": new,  # (the conversation before it and the instructions go first: see messages())
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "response_format": _text_format(body.get("text")),
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "stream": stream or None,
    }
    fields = {
        "instructions": instructions,
        "metadata": metadata,
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": previous,
        "store": store,
        "background": background,
    }
    return ResponseCall(
        {k: v for k, v in chat.items() if v is not None}, fields, new, store, background, stream, previous
    )


def messages(call: ResponseCall, before: list[dict]) -> list[dict]:
    """The chat messages a response runs on: its instructions, the conversation before it, its input."""
    lead = [{"role": "system", "content": call.fields["instructions"]}] if call.fields["instructions"] else []
    return [*lead, *before, *call.new]


def input_messages(value) -> list[dict]:
    """`input` -> chat messages (the module docstring)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input must be a string or a non-empty list of input items", param="input")
    out: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)  # (calls made together: one turn)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(output, where)})
        else:
            raise InvalidRequest(
                f"{where}: items of type {shown(kind)} are not supported here (messages, function_call and "
                "function_call_output are)",
                param=where,
            )
    return out


def _text(content, where: str):
    """A message's content: a string, or text parts joined (other parts are refused)."""
    if not isinstance(content, list):
        return content  # (stratus.wire says what is wrong with anything but a string)
    if not all(isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str) for p in content):
        raise InvalidRequest(
            f"{where}.content: only input_text and output_text parts are supported", param=f"{where}.content"
        )
    return "".join(p["text"] for p in content)


def _tools(value):
    """Responses' flat function tools -> chat's ({"type": "function", "function": {...}})."""
    if not value:
        return value
    if not isinstance(value, list):
        raise InvalidRequest("tools must be a list", param="tools")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise InvalidRequest(
                f"tools[{i}]: {shown(kind)} tools are not supported here (function tools are)", param=f"tools[{i}]"
            )
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out


def _tool_choice(value):
    if isinstance(value, dict) and value.get("type") == "function" and "function" not in value:
        return {"type": "function", "function": {"name": value.get("name")}}
    return value


def _text_format(value):
    """text.format -> response_format."""
    if value is None:
        return None
    fmt = value.get("format") if isinstance(value, dict) else None
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema", {})}}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    raise InvalidRequest(
        'text.format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name": ..., '
        '"schema": {...}}',
        param="text",
    )


# ---- batch lines --------------------------------------------------------------------------------

BATCH_REFUSED = {
    "previous_response_id": "a batch line cannot continue a stored response (send the conversation as input)",
    "background": "a batch line is already run in the background: background is for POST /v1/responses",
    "stream": "batch lines are not streamed: stream is for POST /v1/responses",
}


def batch_chat(body) -> dict:
    """A batch line's Responses body -> the chat body its job runs. A line is not stored: there is
    no conversation to continue, nothing to poll or stream (InvalidRequest naming the field)."""
    call = read(body)
    for name, why in BATCH_REFUSED.items():
        if body.get(name) not in (None, False):
            raise InvalidRequest(why, param=name)
    return {**call.chat, "messages": messages(call, [])}


def batch_body(job: Job) -> dict:
    """A batch line's DONE job -> the response object of its output line (the request's own fields
    as its job kept them: instructions were folded into its messages)."""
    req, p = job.request, job.request.params
    tools = req.tools
    fields = {
        "instructions": None,
        "metadata": {},
        "max_output_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "text": {
            "format": {"type": "json_schema", "schema": json.loads(p.json_schema)}
            if p.json_schema
            else {"type": "text"}
        },
        "tools": [{"type": "function", **f} for f in tools.functions] if tools else [],
        "tool_choice": (tools.choice if tools.choice != "function" else {"type": "function", "name": tools.name})
        if tools
        else "auto",
        "parallel_tool_calls": tools.parallel if tools else True,
        "previous_response_id": None,
        "store": False,
        "background": False,
    }
    record = {"created_at": int(job.created_at), "model": req.model, "fields": fields}
    return body(f"{PREFIX}{job.job_id}", record, job)


# ---- output ------------------------------------------------------------------------------------


def output_items(rid: str, result: dict | None) -> list[dict]:
    """A finished job's result -> the response's output items."""
    if result is None:
        return []
    if result.get("tool_calls"):
        return [
            {
                "type": "function_call",
                "id": "fc_" + c["id"].removeprefix("call_"),
                "call_id": c["id"],
                "name": c["function"]["name"],
                "arguments": c["function"]["arguments"],
                "status": "completed",
            }
            for c in result["tool_calls"]
        ]
    return [message_item(rid, result.get("text", ""), "completed")]


def message_item(rid: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": "msg_" + rid.removeprefix(PREFIX),
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items -> the chat messages a continuation sees."""
    calls = [
        {"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
        for o in output
        if o["type"] == "function_call"
    ]
    if calls:
        return [{"role": "assistant", "content": None, "tool_calls": calls}]
    text = "".join(p["text"] for o in output if o["type"] == "message" for p in o["content"])
    return [{"role": "assistant", "content": text}]


def items_of(messages: list[dict], rid: str) -> list[dict]:
    """Chat messages -> input items (GET .../input_items), with ids."""
    out = []
    for i, m in enumerate(messages):
        base = f"{rid.removeprefix(PREFIX)}_{i}"
        if m["role"] == "tool":
            out.append(
                {
                    "type": "function_call_output",
                    "id": f"fco_{base}",
                    "call_id": m["tool_call_id"],
                    "output": m["content"],
                }
            )
            continue
        for j, c in enumerate(m.get("tool_calls") or ()):
            fn = c["function"]
            out.append(
                {
                    "type": "function_call",
                    "id": f"fc_{base}_{j}",
                    "call_id": c["id"],
                    "name": fn["name"],
                    "arguments": fn["arguments"],
                    "status": "completed",
                }
            )
        if m.get("content") or not m.get("tool_calls"):
            kind = "output_text" if m["role"] == "assistant" else "input_text"
            out.append(
                {
                    "type": "message",
                    "id": f"msg_{base}",
                    "role": m["role"],
                    "status": "completed",
                    "content": [{"type": kind, "text": m["content"] or ""}],
                }
            )
    return out


def usage(job_usage: dict | None) -> dict | None:
    if not job_usage:
        return None
    return {
        "input_tokens": job_usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": (job_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        },
        "output_tokens": job_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": job_usage["total_tokens"],
    }


STATUS = {
    Status.QUEUED: "queued",
    Status.RUNNING: "in_progress",
    Status.DONE: "completed",
    Status.FAILED: "failed",
    Status.CANCELLED: "cancelled",
    Status.EXPIRED: "failed",
}


def body(rid: str, record: dict, job: Job | None) -> dict:
    """The response object: the record's fields, the job's state (or the output the record kept)."""
    fields = record["fields"]
    output, status, error, incomplete, used = record.get("output"), "completed", None, None, record.get("usage")
    if job is not None:
        status = STATUS[job.status]
        if job.status == Status.DONE:
            output, used = output_items(rid, job.result), job.usage
            if (job.result or {}).get("finish_reason") == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        elif job.status in (Status.FAILED, Status.EXPIRED):
            err = job.error or {"message": f"job {job.status.value.lower()}", "code": job.status.value.lower()}
            error = {"code": err.get("code") or "server_error", "message": err.get("message", "")}
    elif output is None:  # the job is gone and its output was never seen
        status, error = (
            "failed",
            {"code": "expired", "message": "the response's job expired before its output was read"},
        )
    elif record.get("incomplete"):
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    return {
        "id": rid,
        "object": "response",
        "created_at": record["created_at"],
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "model": record["model"],
        "output": output or [],
        "usage": usage(used),
        "truncation": "disabled",
        "user": None,
        "service_tier": ("flex" if job.tier == "batch" else "default") if job is not None else "default",
        **fields,
    }


# ---- the record ---------------------------------------------------------------------------------


class ResponseStore:
    """Stored responses' records in the jobs table (the module docstring)."""

    def __init__(self, table) -> None:  # a boto3 DynamoDB Table resource
        self.table = table

    @staticmethod
    def new_id() -> str:
        return PREFIX + uuid.uuid4().hex

    @staticmethod
    def item(
        rid: str, tenant: str, job_id: str, model: str, fields: dict, conversation: list[dict], now: float
    ) -> dict:
        """The record's item; PayloadTooLarge past what an item holds (checked before the job is made)."""
        item = {
            "pk": rid,
            "tenant": tenant,
            "job_id": job_id,
            "created_at": int(now),
            "expires_at": int(now + RESPONSE_TTL_S),
            "model": model,
            "fields": json.dumps(fields, separators=(",", ":")),
            "conversation": json.dumps(conversation, separators=(",", ":")),
        }
        if sum(len(str(v)) for v in item.values()) > MAX_RECORD_BYTES:
            raise PayloadTooLarge(
                f"this conversation is too long to store (over {MAX_RECORD_BYTES:,} bytes): send store: false, "
                "or start a new conversation"
            )
        return item

    def put(self, item: dict) -> None:
        self.table.put_item(Item=item)

    def get(self, rid: str, tenant: str, now: float) -> dict:
        """The record (NotFound for another tenant's, an expired or a missing one)."""
        if not isinstance(rid, str) or not rid.startswith(PREFIX) or len(rid) != len(PREFIX) + 32:
            raise NotFound(f"response {shown(rid)} not found")
        item = self.table.get_item(Key={"pk": rid}, ConsistentRead=True).get("Item")
        if item is None or item.get("tenant") != tenant or int(item.get("expires_at", 0)) < now:
            raise NotFound(f"response {shown(rid)} not found")
        out = {k: item[k] for k in ("tenant", "job_id", "model")}
        out["created_at"] = int(item["created_at"])
        out["fields"] = json.loads(item["fields"])
        out["conversation"] = json.loads(item["conversation"])
        for name in ("output", "usage"):
            if name in item:
                out[name] = json.loads(item[name])
        out["incomplete"] = bool(item.get("incomplete", False))
        return out

    def keep_output(self, rid: str, record: dict, job: Job | None) -> None:
        """Copy a finished job's output into the record (once), so the conversation outlives the job."""
        if job is None or job.status != Status.DONE or "output" in record:
            return
        output, length = output_items(rid, job.result), (job.result or {}).get("finish_reason") == "length"
        self.table.update_item(
            Key={"pk": rid},
            UpdateExpression="SET #o = :o, #u = :u, incomplete = :i",
            ExpressionAttributeNames={"#o": "output", "#u": "usage"},
            ExpressionAttributeValues={":o": json.dumps(output), ":u": json.dumps(job.usage or {}), ":i": length},
        )
        record["output"], record["usage"], record["incomplete"] = output, job.usage, length

    def delete(self, rid: str, tenant: str) -> None:
        self.table.delete_item(
            Key={"pk": rid}, ConditionExpression="tenant = :t", ExpressionAttributeValues={":t": tenant}
        )


def before(record: dict, job: Job | None) -> list[dict]:
    """The conversation a response continues from: its own, then its output (Conflict if unfinished)."""
    output = record.get("output")
    if output is None and job is not None and job.status == Status.DONE:
        output = output_items("resp_", job.result)
    if output is None:
        state = STATUS[job.status] if job is not None else "expired"
        raise Conflict(
            f"the previous response is {state}: a conversation continues from a completed response",
            param="previous_response_id",
        )
    return [*record["conversation"], *output_messages(output)]


# ---- the routes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    """POST /v1/responses: the response id and its record, and the submission (stratus.submission)."""

    rid: str
    record: dict
    sub: object  # submission.Submission
    marks: tuple[float, float]  # the request's arrival and its submit's end (a stream's timeline)


def create(body, tenant, deps, *, cache_control: str = "") -> Created:
    """Read, continue the previous response's conversation, submit as a chat, store the record."""
    call = read(body)
    now, store = deps.clock(), ResponseStore(deps.table)
    earlier: list[dict] = []
    if call.previous:
        prev = store.get(call.previous, tenant.name, now)
        job = deps.store.get(prev["job_id"], now=now, prompt=False)
        earlier = before(prev, with_result(job, deps) if job is not None else None)
    chat = {**call.chat, "messages": messages(call, earlier)}
    rid, conversation = store.new_id(), [*earlier, *call.new]
    model = chat.get("model") if isinstance(chat.get("model"), str) else ""
    item = store.item(rid, tenant.name, "", model, call.fields, conversation, now) if call.store else None
    wake = service.wake_url(deps) if not call.background else None  # (a whole answer or a stream waits)
    how = submission.api(
        deps.settings, cache_control, stream=call.stream, tier=submission.tier_of(body, tenant), wake=wake
    )
    if call.store:
        how = replace(how, keep_s=RESPONSE_TTL_S)
    sub = submission.submit("chat", chat, tenant, deps, how)  # (a record too big was refused first)
    sent = deps.clock()
    record = {"tenant": tenant.name, "job_id": sub.job_id, "model": sub.req.model, "created_at": int(now)}
    record |= {"fields": call.fields, "conversation": conversation}
    if item is not None:
        store.put({**item, "job_id": sub.job_id})
    return Created(rid, record, sub, (now, sent))


def answer(created: Created, tenant, deps, *, wait: bool) -> dict:
    """The response object of a response just created: at once (a cache hit, background), or after
    waiting for its job up to sync_wait_s (still running then: in_progress, to poll if stored)."""
    sub = created.sub
    if sub.hit is not None:
        job = sub.hit
    elif wait:
        job = service.wait_job(sub.job_id, tenant, deps, woken=sub.woken)
        if job.status == Status.FAILED and (job.error or {}).get("type") == "invalid_request_error":
            raise InvalidRequest((job.error or {}).get("message", "invalid request"))  # (the worker's 400)
    else:
        job = sub.job
    return shown_record(created.rid, created.record, job, deps, stored=created.record["fields"]["store"])


def shown_record(rid: str, record: dict, job: Job | None, deps, *, stored: bool = True) -> dict:
    if stored and job is not None:
        ResponseStore(deps.table).keep_output(rid, record, job)
    return body(rid, record, job)


def retrieve(rid: str, tenant, deps) -> tuple[dict, Job | None]:
    record = ResponseStore(deps.table).get(rid, tenant.name, deps.clock())
    job = deps.store.get(record["job_id"], now=deps.clock(), prompt=False)
    return record, with_result(job, deps) if job is not None else None


def get(rid: str, tenant, deps) -> dict:
    record, job = retrieve(rid, tenant, deps)
    return shown_record(rid, record, job, deps)


def cancel(rid: str, tenant, deps) -> dict:
    """Cancel a background response (Conflict once its job has finished)."""
    record, job = retrieve(rid, tenant, deps)
    if not record["fields"]["background"]:
        raise InvalidRequest("only background responses can be cancelled", param="response_id")
    if job is not None and not job.status.finished and deps.store.cancel(job.job_id, tenant.name):
        record, job = retrieve(rid, tenant, deps)
    return shown_record(rid, record, job, deps)


def delete(rid: str, tenant, deps) -> dict:
    ResponseStore(deps.table).get(rid, tenant.name, deps.clock())  # (NotFound for another tenant's)
    ResponseStore(deps.table).delete(rid, tenant.name)
    return {"id": rid, "object": "response", "deleted": True}


def input_items(rid: str, tenant, deps, query: dict) -> dict:
    """GET /v1/responses/{id}/input_items: this response's conversation, as input items (a page)."""
    record = ResponseStore(deps.table).get(rid, tenant.name, deps.clock())
    limit, after, newest_first = list_params(query)
    items = items_of(record["conversation"], rid)
    items = items[::-1] if newest_first else items
    by_id = {i["id"]: i for i in items}
    page, more = list_page(list(by_id), after, limit)
    return list_body([by_id[i] for i in page], more)


# ---- streaming ----------------------------------------------------------------------------------


def event(kind: str, seq: int, **fields) -> bytes:
    """One server-sent event of the Responses API: `event: <type>` and its JSON."""
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def open_response_stream(created: Created, tenant, deps) -> ResponseStream:
    """The typed events of a response created with stream: true (its job marked streamed)."""
    if deps.stream_table is None:
        raise InvalidRequest("streaming is not configured on this deployment (no stream table)", param="stream")
    return stream_of(created.sub, tenant, deps, ResponseStream, created.rid, created.record, marks=created.marks)


class ResponseStream(Stream):
    """The chat stream's reading (chunks, takeovers, keep-alives) in the Responses API's events:
    response.created, .in_progress, then a message's output_text deltas or each call's
    function_call_arguments deltas, their .done events, and response.completed (.incomplete,
    .failed). No `[DONE]`: the last event ends it."""

    def __init__(self, deps, tenant, req, job, rid: str, record: dict, *, hit: bool, woken: bool = False) -> None:
        super().__init__(deps, tenant, req, job, StreamOptions(), hit, woken)
        self.rid, self.record, self.seq = rid, record, 0
        self.text, self.opened = "", False
        self.calls_made: list[tuple[str, str]] = []  # (item id, arguments so far) per call

    def _event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        return event(kind, self.seq - 1, **fields)

    def _start(self):
        obj = body(self.rid, self.record, None if self.job.status.finished else self.job)
        obj.update(status="in_progress", output=[], usage=None, error=None)
        yield self._event("response.created", response=obj)
        yield self._event("response.in_progress", response=obj)

    def _send(self, piece: str, entries: list[dict], usage: dict | None):
        deltas = self.calls.push(piece) if self.calls is not None else ([{"content": piece}] if piece else [])
        for d in deltas:
            if "content" in d:
                yield from self._text(d["content"])
                continue
            call = d["tool_calls"][0]
            i = call["index"]
            if "id" in call:
                item_id = "fc_" + call["id"].removeprefix("call_")
                self.calls_made.append((item_id, ""))
                item = {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"]}
                item |= {"arguments": "", "status": "in_progress"}
                yield self._event("response.output_item.added", output_index=i, item=item)
            if more := call["function"].get("arguments"):
                item_id, so_far = self.calls_made[i]
                self.calls_made[i] = (item_id, so_far + more)
                yield self._event("response.function_call_arguments.delta", item_id=item_id, output_index=i, delta=more)

    def _text(self, piece: str):
        item = message_item(self.rid, "", "in_progress")
        at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        if not self.opened:
            self.opened = True
            yield self._event("response.output_item.added", output_index=0, item={**item, "content": []})
            yield self._event("response.content_part.added", **at, part=item["content"][0])
        self.text += piece
        yield self._event("response.output_text.delta", **at, delta=piece, logprobs=[])

    def _finish(self, finish_reason: str, usage: dict):
        job = self.ended  # (the job it ended with, its result loaded; read when it ended on the final chunk)
        if job is None:
            job = self.deps.store.get(self.job.job_id, now=self.deps.clock(), prompt=False)
            job = with_result(job, self.deps) if job is not None else None
        obj = shown_record(self.rid, self.record, job, self.deps, stored=self.record["fields"]["store"])
        if not self.calls_made:
            if not self.opened:  # (an empty text: its item still opens and closes)
                yield from self._text("")
            item = message_item(self.rid, self.text, "completed")
            at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
            yield self._event("response.output_text.done", **at, text=self.text, logprobs=[])
            yield self._event("response.content_part.done", **at, part=item["content"][0])
            yield self._event("response.output_item.done", output_index=0, item=item)
        for i, ((item_id, arguments), item) in enumerate(zip(self.calls_made, obj["output"])):
            yield self._event(
                "response.function_call_arguments.done", item_id=item_id, output_index=i, arguments=arguments
            )
            yield self._event("response.output_item.done", output_index=i, item=item)
        kind = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(obj["status"])
        yield self._event(kind or "response.completed", response=obj)
        self.finished = True

    def _fail(self, message: str, code: str, error_type: str = "server_error"):
        obj = body(self.rid, self.record, None if self.job.status.finished else self.job)
        obj.update(status="failed", error={"code": code, "message": message})
        yield self._event("response.failed", response=obj)
        self.finished = True
