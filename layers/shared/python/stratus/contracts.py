"""Typed contracts shared by the API, the ingest functions and the workers.

InferenceRequest  a validated, normalized OpenAI chat or completion request (stratus.wire parses one)
Tools             a chat's function tools and tool_choice (stratus.tools offers and answers them)
Job               one DynamoDB item: job store and result cache entry
QueueMessage      what the jobs queue carries (exactly one definition)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from stratus.params import SamplingParams

ROUTES = ("chat", "completion")  # InferenceRequest.route; stratus.wire.ROUTE_PATHS maps URL paths to them
# Scheduling tiers: a worker takes interactive jobs first and fills spare slots with batch jobs;
# its engine admits waiting interactive rows before waiting batch rows (Engine priority = index).
TIERS = ("interactive", "batch")
# Job ids, in one place: a cacheable request's is its cache key, "c" + SHA-256; any other's is
# "j" + a random uuid, or where the request may come again (a batch file's line, a requests-queue
# message) 32 hex digits of SHA-256(tenant, its origin) (kept only to be polled or streamed; its
# prompt is dropped when it finishes).
CACHED_PREFIX, UNCACHED_PREFIX = "c", "j"
JOB_ID = re.compile(r"c[0-9a-f]{64}|j[0-9a-f]{32}")


class Status(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED, Status.EXPIRED)


MAX_CHOICES = 16  # choices in one request (prompts x n): so also prompts in one completions request
Prompt = str | tuple[int, ...]  # text, or the client's own token ids (used exactly: no BOS, no re-tokenizing)


TOOL_CHOICES = ("auto", "required", "none", "function")  # Tools.choice ("function": the one named)


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict, ...]  # {"name", "description", "parameters"} each, in the request's order
    choice: str = "auto"  # TOOL_CHOICES
    name: str = ""  # choice "function": the function to call
    parallel: bool = True  # parallel_tool_calls: several calls in one answer

    def to_json(self) -> dict:
        return {
            "functions": [dict(f) for f in self.functions],
            "choice": self.choice,
            "name": self.name,
            "parallel": self.parallel,
        }

    @classmethod
    def from_json(cls, d: dict) -> Tools:
        return cls(tuple(d["functions"]), d.get("choice", "auto"), d.get("name", ""), d.get("parallel", True))


@dataclass(frozen=True)
class InferenceRequest:
    route: str  # "chat" | "completion"
    model: str
    params: SamplingParams
    messages: tuple[dict, ...] = ()  # {role, content} (+ tool_calls, tool_call_id: stratus.wire.chat_message)
    prompt: str | tuple[Prompt, ...] = ""  # one text (most requests), or several prompts / token ids
    tools: Tools | None = None  # chat: the functions offered (None: none; left out of to_json then)

    def to_json(self) -> dict:
        prompt = (
            self.prompt if isinstance(self.prompt, str) else [p if isinstance(p, str) else list(p) for p in self.prompt]
        )
        out = {
            "route": self.route,
            "model": self.model,
            "params": self.params.to_json(),
            "messages": [dict(m) for m in self.messages],
            "prompt": prompt,
        }
        if self.tools is not None:
            out["tools"] = self.tools.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> InferenceRequest:
        prompt = d.get("prompt", "")
        if not isinstance(prompt, str):
            prompt = tuple(p if isinstance(p, str) else tuple(p) for p in prompt)
        tools = Tools.from_json(d["tools"]) if d.get("tools") else None
        messages = tuple(d.get("messages", ()))
        return cls(d["route"], d["model"], SamplingParams.from_json(d["params"]), messages, prompt, tools)

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        """Completions: each prompt, in order (choice index = prompt index * n + i)."""
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    @property
    def choices(self) -> int:
        return (len(self.prompts) if self.route == "completion" else 1) * self.params.n

    @property
    def stored_bytes(self) -> int:
        """Its size in the job item (JSON, non-ASCII escaped as json.dumps does)."""
        return len(json.dumps(self.to_json(), separators=(",", ":")))

    @property
    def text_bytes(self) -> int:
        prompts = sum(len(p.encode()) if isinstance(p, str) else 0 for p in self.prompts)
        calls = sum(len(c["function"]["arguments"].encode()) for m in self.messages for c in m.get("tool_calls") or ())
        offered = len(json.dumps(self.tools.to_json(), ensure_ascii=False).encode()) if self.tools else 0
        return prompts + sum(len(m["content"].encode()) for m in self.messages) + calls + offered

    @property
    def prompt_token_ids(self) -> int:
        """Tokens the client sent as ids (known exactly without a tokenizer)."""
        return sum(len(p) for p in self.prompts if not isinstance(p, str))


@dataclass
class Job:
    job_id: str
    tenant: str
    status: Status
    request: InferenceRequest
    cacheable: bool
    created_at: float
    expires_at: int  # epoch seconds: DynamoDB TTL attribute, also checked in code
    updated_at: float = 0.0
    result: dict | None = None  # {"text", "finish_reason"}; None when stored in S3
    result_s3: str | None = None  # s3://bucket/results/<job id>.json when too big for the item
    usage: dict | None = None  # {"prompt_tokens", "completion_tokens", "total_tokens"}
    timings: dict | None = None
    attempts: int = 0
    error: dict | None = None  # {"message", "type", "code"}
    worker: str | None = None
    last_error: str | None = None  # a worker's last retryable failure (shown when the job dies in the DLQ)
    notify: list[dict] = field(default_factory=list)  # replies to post when finished: {"queue_url", "id"}
    notified: bool = False
    tier: str = "interactive"  # TIERS: the queue its message went to (stored only when "batch")
    batch: str | None = None  # the batch whose line created it (its cancel cancels only those)
    # this making of the job: a job made again under its id (a retry after it failed, no-cache)
    # gets a new run, so its stream never shows the earlier run's chunks (stratus.chunks.stream_key);
    # "" for items written before runs existed
    run: str = field(default_factory=lambda: secrets.token_hex(6))

    def to_item(self) -> dict:
        """The prompt (messages / prompt) is its own attribute, so a finished job that is not
        cacheable can drop it (JobStore.transition) and keep the rest for GET /v1/jobs."""
        request = self.request.to_json()
        prompt = {"messages": request.pop("messages"), "prompt": request.pop("prompt")}
        if "tools" in request:  # (the functions' words are the prompt's too)
            prompt["tools"] = request.pop("tools")
        item = {
            "pk": self.job_id,
            "tenant": self.tenant,
            "status": self.status.value,
            "cacheable": self.cacheable,
            "created_at": _dec(self.created_at),
            "updated_at": _dec(self.updated_at or self.created_at),
            "expires_at": self.expires_at,
            "attempts": self.attempts,
            "request": json.dumps(request, separators=(",", ":")),
            "prompt": json.dumps(prompt, separators=(",", ":")),
        }
        for name in ("result", "usage", "timings", "error"):
            value = getattr(self, name)
            if value is not None:
                item[name] = json.dumps(value, separators=(",", ":"))
        if self.worker:
            item["worker"] = self.worker
        if self.result_s3:
            item["result_s3"] = self.result_s3
        if self.tier != "interactive":
            item["tier"] = self.tier
        elif not self.status.finished:  # keys the tenant-live-jobs index while QUEUED or RUNNING
            item["live_tenant"] = self.tenant
        if self.batch:
            item["batch_id"] = self.batch
        if self.run:
            item["run"] = self.run
        return item

    @classmethod
    def from_item(cls, item: dict) -> Job:
        load = lambda k: json.loads(item[k]) if k in item else None  # noqa: E731
        return cls(
            job_id=item["pk"],
            tenant=item["tenant"],
            status=Status(item["status"]),
            request=InferenceRequest.from_json({**json.loads(item.get("prompt", "{}")), **json.loads(item["request"])}),
            cacheable=bool(item["cacheable"]),
            created_at=float(item["created_at"]),
            expires_at=int(item["expires_at"]),
            updated_at=float(item.get("updated_at", 0)),
            result=load("result"),
            usage=load("usage"),
            timings=load("timings"),
            attempts=int(item.get("attempts", 0)),
            error=load("error"),
            worker=item.get("worker"),
            result_s3=item.get("result_s3"),
            last_error=item.get("last_error"),
            notify=[json.loads(n) for n in item.get("notify", [])],
            notified=bool(item.get("notified", False)),
            tier=item.get("tier", "interactive"),
            batch=item.get("batch_id"),
            run=item.get("run", ""),
        )


def _dec(x: float):
    from decimal import Decimal

    return Decimal(str(round(x, 6)))


QUEUE_MESSAGE_VERSION = 1  # bump for a change an older worker cannot serve right; optional fields need none


class NewerMessage(Exception):
    """A queue message of a version this code does not know (a newer API before newer workers)."""


@dataclass(frozen=True)
class QueueMessage:
    job_id: str
    tenant: str
    request: InferenceRequest
    enqueued_at: float
    deadline: float  # epoch seconds; workers drop the job (EXPIRED) after it
    version: int = 1
    stream: bool = False  # a client streams the text: the worker writes chunk items (stratus.chunks)
    tier: str = "interactive"  # TIERS: which queue carries it and how the engine orders it
    wake: str | None = None  # the queue of the API instance waiting for it, woken when it finishes (stratus.wake)

    def to_body(self) -> str:
        d = asdict(self)
        d["request"] = self.request.to_json()
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_body(cls, body: str) -> QueueMessage:
        """Fields this version does not know are ignored (they are optional by contract); a newer
        version raises NewerMessage instead of being served by rules it may have changed."""
        d = json.loads(body)
        if int(d.get("version", 1)) > QUEUE_MESSAGE_VERSION:
            raise NewerMessage(f"message version {d['version']} is newer than this code's {QUEUE_MESSAGE_VERSION}")
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        try:
            d["request"] = InferenceRequest.from_json(d["request"])
        except TypeError as exc:  # a sampling parameter this code does not implement
            raise NewerMessage(f"the request uses a sampling parameter this code lacks: {exc}") from None
        return cls(**d)
