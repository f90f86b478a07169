"""The api function's web app: what the Lambda Web Adapter runs in AWS (run.sh) and what
`make serve`'s gateway forwards to locally.

  POST /v1/chat/completions, /v1/completions, /v1/responses with "stream": true
      authenticate, validate, enqueue (stratus.streaming.open_stream; an error keeps its status and
      JSON body), then server-sent events, each sent as soon as the stream yields it
  anything else
      app.lambda_handler with an API Gateway (HTTP API, v2) event built from the request: the
      same routes, errors and Powertools logging/metrics as `sam local invoke`

A client that disconnects mid-stream is noticed at the next event (at most stream_keepalive_s
later): the stream is closed, which cancels a job nobody else can be waiting on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl

import app as handlers
from botocore.exceptions import BotoCoreError, ClientError

from stratus import responses, streaming
from stratus.errors import StratusError
from stratus.keys import authenticate
from stratus.observability import logger, metrics
from stratus.wire import ROUTE_PATHS

STREAMING = {**ROUTE_PATHS, "/v1/responses": "response"}  # POST routes that may stream: path -> route

THREADS = 64  # blocking work (boto3 calls, a stream's waits) runs in threads: one per open stream


@dataclass
class LambdaContext:
    """What Powertools reads from a Lambda context; the Web Adapter passes the invocation's
    values in the x-amzn-lambda-context header."""

    aws_request_id: str
    function_name: str = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "api")
    memory_limit_in_mb: int = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512"))
    invoked_function_arn: str = ""

    @classmethod
    def from_headers(cls, headers: dict[str, str]) -> LambdaContext:
        try:
            ctx = json.loads(headers.get("x-amzn-lambda-context", "{}"))
        except json.JSONDecodeError:
            ctx = {}
        return cls(ctx.get("request_id") or uuid.uuid4().hex, invoked_function_arn=ctx.get("invoked_function_arn", ""))


def http_event(scope: dict, headers: dict[str, str], body: bytes) -> dict:
    """An ASGI HTTP request -> an API Gateway HTTP API (payload 2.0) event."""
    method, path = scope["method"], scope["path"]
    query = scope.get("query_string", b"").decode()
    try:
        text, encoded = body.decode(), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode(), True
    now = time.time()
    client = scope.get("client") or ("127.0.0.1", 0)
    event = {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "-",
            "apiId": "-",
            "domainName": headers.get("host", "localhost"),
            "stage": "$default",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": client[0],
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": f"{method} {path}",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if body:
        event["body"] = text
    if query:
        event["queryStringParameters"] = dict(parse_qsl(query, keep_blank_values=True))
    return event


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    body = await _read_body(receive)
    route = STREAMING.get(scope["path"]) if scope["method"] == "POST" else None  # the routes that stream
    if route is not None and _wants_stream(body):
        return await _stream(route, headers, body, receive, send)
    out = await asyncio.to_thread(
        handlers.lambda_handler, http_event(scope, headers, body), LambdaContext.from_headers(headers)
    )
    raw = out.get("body") or ""
    data = base64.b64decode(raw) if out.get("isBase64Encoded") else raw.encode()
    await _respond(send, out.get("statusCode", 200), out.get("headers") or {}, data)


def _wants_stream(body: bytes) -> bool:
    """Whether the body asks for a stream, read as JSON (a key may be spelled with escapes, so no
    byte search); the real parse (and its errors) happens in the handler or the stream."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # (not JSON, not UTF-8, an integer too long, too deep)
        return False
    return isinstance(value, dict) and value.get("stream") is True


def _open(route: str, headers: dict[str, str], body: bytes) -> streaming.Stream:
    logger.clear_state()  # as inject_lambda_context(clear_state=True) does for every other request
    deps = handlers.get_deps()
    tenant = authenticate(deps.table, headers.get("authorization"), deps.key_cache)
    parsed = handlers.parse_body(body, deps.settings.max_body_bytes)
    cache_control = headers.get("cache-control", "")
    if route == "response":
        created = responses.create(parsed, tenant, deps, cache_control=cache_control)
        return responses.open_response_stream(created, tenant, deps)
    return streaming.open_stream(route, parsed, tenant, deps, cache_control=cache_control)


async def _stream(route: str, headers: dict[str, str], body: bytes, receive, send) -> None:
    try:
        stream = await asyncio.to_thread(_open, route, headers, body)
    except (StratusError, BotoCoreError, ClientError) as exc:  # before the first byte: as any other request
        refused = handlers.stratus_error(exc) if isinstance(exc, StratusError) else handlers.storage_unreachable(exc)
        metrics.flush_metrics()
        return await _respond(send, refused.status_code, refused.headers, refused.body.encode())
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, gone))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": _header_list({"content-type": streaming.CONTENT_TYPE, **streaming.HEADERS}),
        }
    )
    events = stream.events()
    try:
        while not gone.is_set():
            event = await asyncio.to_thread(next, events, None)
            if event is None:
                break
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:  # the connection broke under a write
        gone.set()
    finally:
        watcher.cancel()
        if gone.is_set():
            await asyncio.to_thread(_abandon, stream, events)
        metrics.flush_metrics()


def _abandon(stream: streaming.Stream, events) -> None:
    events.close()
    stream.close()
    logger.info("client disconnected from a stream", extra={"job_id": stream.job.job_id})


async def _watch_disconnect(receive, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send, status: int, headers: dict, data: bytes) -> None:
    headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "connection")}
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _header_list({**headers, "content-length": str(len(data))}),
        }
    )
    await send({"type": "http.response.body", "body": data})


def _header_list(headers: dict) -> list[tuple[bytes, bytes]]:
    return [(str(k).lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="api"))
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(handlers.shut_down)
            await send({"type": "lifespan.shutdown.complete"})
            return
