"""OpenAI response bodies, shaped in one place for the API, the streaming path, batch output
files, queue replies and SageMaker's /invocations."""

from __future__ import annotations

import codecs

from stratus.catalogue import Catalogue, ModelEntry
from stratus.contracts import Job, Status
from stratus.errors import InvalidRequest, StratusError
from stratus.keys import Tenant
from stratus.settings import Settings


def job_view(job: Job) -> dict:
    view = {
        "id": job.job_id,
        "object": "job",
        "status": job.status.value,
        "created_at": int(job.created_at),
        "model": job.request.model,
        "endpoint": {"chat": "/v1/chat/completions", "completion": "/v1/completions"}[job.request.route],
    }
    if job.status == Status.DONE:
        view["response"] = completion_body(job)
    for name in ("usage", "timings", "error"):
        if getattr(job, name) is not None:
            view[name] = getattr(job, name)
    return view


def completion_body(job: Job) -> dict:
    """The OpenAI response body for a DONE job (its result: stratus_worker.choices)."""
    result, req = job.result or {}, job.request
    common = {
        "created": int(job.created_at),
        "model": req.model,
        "service_tier": "flex" if job.tier == "batch" else "default",  # the tier it ran in
        "usage": job.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    choices = result.get("choices") or [result]
    if req.route == "chat":
        return {
            "id": f"chatcmpl-{job.job_id}",
            "object": "chat.completion",
            **common,
            "choices": [
                {
                    "index": i,
                    "message": _message(c),
                    "finish_reason": c.get("finish_reason", "stop"),
                    "logprobs": {"content": c["logprobs"]} if "logprobs" in c else None,
                }
                for i, c in enumerate(choices)
            ],
        }
    return {
        "id": f"cmpl-{job.job_id}",
        "object": "text_completion",
        **common,
        "choices": [
            {
                "index": i,
                "text": c.get("text", ""),
                "finish_reason": c.get("finish_reason", "stop"),
                "logprobs": completion_logprobs(c["logprobs"]) if "logprobs" in c else None,
            }
            for i, c in enumerate(choices)
        ],
    }


def _message(choice: dict) -> dict:
    """A chat choice's message: its text, or (a call: stratus.tools) its tool_calls and no content."""
    if "tool_calls" in choice:
        return {"role": "assistant", "content": None, "tool_calls": choice["tool_calls"]}
    return {"role": "assistant", "content": choice.get("text", "")}


class TextOffsets:
    """Each log-probability entry's start in the choice's text, entry after entry. A stream keeps
    one for all its chunks, so a chunk whose text starts inside a token (the worker held part of it
    back) still gives that token's own start: the offsets are the whole response's."""

    def __init__(self) -> None:
        self.at, self._utf8 = 0, codecs.getincrementaldecoder("utf-8")("replace")

    def of(self, entries: list[dict]) -> list[int]:
        out = []
        for e in entries:  # (a token may hold part of a character: its text counts once the character ends)
            out.append(self.at)
            self.at += len(self._utf8.decode(bytes(e["bytes"])))
        return out


def completion_logprobs(entries: list[dict], offsets: TextOffsets | None = None) -> dict:
    """Chat-shaped entries -> /v1/completions' logprobs: tokens, token_logprobs, top_logprobs
    ({token: logprob}; null for an echoed prompt's first token) and text_offset (each token's
    start in the choice's text; `offsets` carries on from the entries before, for a streamed chunk)."""
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in entries
        ],
        "text_offset": (offsets or TextOffsets()).of(entries),
    }


def model_object(model: ModelEntry, catalogue: Catalogue) -> dict:
    """The OpenAI model object of a model this deployment serves."""
    return {
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": "stratus",
        "digest": model.digest,
        "context_length": model.context_length,
        "aliases": catalogue.aliases_of(model),
    }


def models_body(settings: Settings, tenant: Tenant) -> dict:
    """GET /v1/models: the models served that the tenant's key may use."""
    c = settings.catalogue
    return {
        "object": "list",
        "data": [model_object(m, c) for m in c.models if tenant.may_use(m.id)],
    }


def error_body(exc: StratusError) -> dict:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}


MAX_LIST = 100  # items a list route returns at once


def list_params(query: dict | None) -> tuple[int, str | None, bool]:
    """A list route's ?limit= (1-100, default 20), ?after= (an id) and ?order= (desc, the default,
    or asc) -> (limit, after, newest first)."""
    query = query or {}
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be an integer in [1, {MAX_LIST}]", param="limit")
    if query.get("order", "desc") not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order")
    return limit, query.get("after") or None, query.get("order", "desc") == "desc"


def list_page(ids: list[str], after: str | None, limit: int) -> tuple[list[str], bool]:
    """The ids past `after` (from the first when None; none when it is not among them: a client's
    auto-pagination then ends), at most `limit` -> (the page, whether more follow)."""
    start = 0 if after is None else ids.index(after) + 1 if after in ids else len(ids)
    return ids[start : start + limit], start + limit < len(ids)


def list_body(data: list[dict], has_more: bool) -> dict:
    """OpenAI's list object (its items carry their ids)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
