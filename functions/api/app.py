"""The api function's routes: OpenAI-compatible, over the shared layer (stratus.service,
stratus.streaming, stratus.batches; bodies shaped by stratus.shapes).

In AWS the function runs asgi.py under the Lambda Web Adapter (run.sh), which streams
`stream: true` completions itself and hands every other request to `lambda_handler` as an API
Gateway event; `stratus invoke`, `sam local invoke` and the tests call `lambda_handler` directly
(a streamed completion then comes back whole: its events, buffered)."""

from __future__ import annotations

import base64
import functools
import json

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from stratus import batches, openapi, responses, service, shapes, streaming, tokenizer
from stratus.deps import deps_from_env
from stratus.errors import PayloadTooLarge, RateLimited, StratusError, Unavailable, refusal_reason
from stratus.keys import Tenant, authenticate
from stratus.observability import logger, metrics, tracer
from stratus.wire import parse_json, require_unicode

app = APIGatewayHttpResolver()


get_deps = functools.cache(deps_from_env)  # clients created once per container


def shut_down() -> None:
    """The container is stopping: delete its wake queue (stratus.wake), if it made its clients."""
    if get_deps.cache_info().currsize and get_deps().waker is not None:
        get_deps().waker.close()


def _tenant() -> Tenant:
    deps = get_deps()
    return authenticate(deps.table, app.current_event.headers.get("authorization"), deps.key_cache)


def _body() -> dict:
    event = app.current_event  # bytes that are not UTF-8 arrive base64-encoded: parse_body says 400, not 500
    raw = base64.b64decode(event.body or "") if event.is_base64_encoded else (event.body or "")
    return parse_body(raw, get_deps().settings.max_body_bytes)


def parse_body(raw: str | bytes, limit: int):
    """A request body -> its JSON value (PayloadTooLarge, InvalidRequest)."""
    if len(raw.encode() if isinstance(raw, str) else raw) > limit:
        raise PayloadTooLarge(f"request body must be at most {limit} bytes")
    value = parse_json(raw or "null", "the request body")
    require_unicode(value, "the request body")
    return value


def _reply(r: service.Reply) -> Response:
    return Response(r.status, content_types.APPLICATION_JSON, json.dumps(r.body), r.headers)


def _complete(route: str) -> Response:
    tenant, body = _tenant(), _body()
    cache_control = app.current_event.headers.get("cache-control", "")
    stream = streaming.open_stream(route, body, tenant, get_deps(), cache_control=cache_control)
    if stream is not None:  # an event handler answers whole: the events, buffered (asgi.py streams them)
        return Response(200, streaming.CONTENT_TYPE, b"".join(stream.events()).decode(), streaming.HEADERS)
    return _reply(service.submit(route, body, tenant, get_deps(), cache_control=cache_control))


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _complete("chat")


@app.post("/v1/completions")
def completions() -> Response:
    return _complete("completion")


@app.post("/v1/responses")
def create_response() -> Response:
    tenant, body, deps = _tenant(), _body(), get_deps()
    cache_control = app.current_event.headers.get("cache-control", "")
    created = responses.create(body, tenant, deps, cache_control=cache_control)
    if body.get("stream") is True:  # (read checked it is a bool) an event handler answers whole: the events, buffered
        stream = responses.open_response_stream(created, tenant, deps)
        return Response(200, streaming.CONTENT_TYPE, b"".join(stream.events()).decode(), streaming.HEADERS)
    background = created.record["fields"]["background"]
    return _reply(service.Reply(200, responses.answer(created, tenant, deps, wait=not background)))


@app.get("/v1/responses/<response_id>")
def get_response(response_id: str) -> Response:
    return _reply(service.Reply(200, responses.get(response_id, _tenant(), get_deps())))


@app.delete("/v1/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    return _reply(service.Reply(200, responses.delete(response_id, _tenant(), get_deps())))


@app.post("/v1/responses/<response_id>/cancel")
def cancel_response(response_id: str) -> Response:
    return _reply(service.Reply(200, responses.cancel(response_id, _tenant(), get_deps())))


@app.get("/v1/responses/<response_id>/input_items")
def response_input_items(response_id: str) -> Response:
    query = app.current_event.query_string_parameters or {}
    return _reply(service.Reply(200, responses.input_items(response_id, _tenant(), get_deps(), query)))


@app.post("/v1/jobs")
def create_job() -> Response:
    """Always async: the body is a chat (messages) or completion (prompt) request."""
    tenant, body = _tenant(), _body()
    route = "chat" if isinstance(body, dict) and "messages" in body else "completion"
    cache_control = app.current_event.headers.get("cache-control", "")
    return _reply(service.submit(route, body, tenant, get_deps(), cache_control=cache_control, wait=False))


@app.get("/v1/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    deps = get_deps()
    job = service.with_result(service.get_job(job_id, _tenant(), deps), deps)
    return _reply(service.Reply(200, shapes.job_view(job)))


@app.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    return _reply(service.cancel_job(job_id, _tenant(), get_deps()))


@app.post("/v1/batches")
def create_batch() -> Response:
    tenant, deps = _tenant(), get_deps()
    return _reply(
        service.Reply(200, batches.create_from_request(_body(), tenant.name, deps).view(deps.settings.bucket))
    )


@app.get("/v1/batches")
def list_batches() -> Response:
    tenant, deps = _tenant(), get_deps()
    query = app.current_event.query_string_parameters or {}
    return _reply(service.Reply(200, batches.list_page(query, tenant.name, deps)))


@app.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    tenant, deps = _tenant(), get_deps()
    return _reply(service.Reply(200, batches.get(batch_id, tenant.name, deps).view(deps.settings.bucket)))


@app.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    tenant, deps = _tenant(), get_deps()
    return _reply(service.Reply(200, batches.cancel(batch_id, tenant.name, deps).view(deps.settings.bucket)))


@app.post("/v1/files")
def upload_file() -> Response:
    tenant, deps, event = _tenant(), get_deps(), app.current_event
    raw = event.body or ""
    data = base64.b64decode(raw) if event.is_base64_encoded else raw.encode()
    filename, content = batches.read_upload(event.headers.get("content-type", ""), data, deps.settings.max_body_bytes)
    return _reply(service.Reply(200, batches.upload_file(filename, content, tenant.name, deps)))


@app.get("/v1/files")
def list_files() -> Response:
    query = app.current_event.query_string_parameters or {}
    return _reply(service.Reply(200, batches.list_files(query, _tenant().name, get_deps())))


@app.get("/v1/files/<file_id>")
def retrieve_file(file_id: str) -> Response:
    return _reply(service.Reply(200, batches.retrieve_file(file_id, _tenant().name, get_deps())))


@app.delete("/v1/files/<file_id>")
def delete_file(file_id: str) -> Response:
    return _reply(service.Reply(200, batches.delete_file(file_id, _tenant().name, get_deps())))


@app.get("/v1/files/<file_id>/content")
def file_content(file_id: str) -> Response:
    content = batches.file_content(file_id, _tenant().name, get_deps())
    try:
        return Response(200, "application/jsonl", content.decode())
    except UnicodeDecodeError:  # an upload that is not UTF-8 comes back as it was, base64 to the gateway
        if len(content) * 4 > batches.MAX_CONTENT_BYTES * 3:
            raise PayloadTooLarge(
                f"file {file_id!r} is not UTF-8 text and too big for an API response base64-encoded: read it from S3"
            ) from None
        out = Response(200, "application/jsonl", base64.b64encode(content).decode())
        out.base64_encoded = True
        return out


@app.get("/v1/models")
def models() -> Response:
    return _reply(service.Reply(200, shapes.models_body(get_deps().settings, _tenant())))


@app.get("/v1/models/<model_id>")
def model(model_id: str) -> Response:
    return _reply(service.get_model(model_id, _tenant(), get_deps().settings))


@functools.cache
def tokenizer_of(model_id: str) -> tokenizer.ModelTokenizer:  # read from the published model once per container
    model = get_deps().settings.catalogue.find(model_id)
    return tokenizer.fetch(model.uri, get_deps().s3, model.digest)


def get_tokenizer(tenant: Tenant, model: object = None) -> tokenizer.ModelTokenizer:
    """The tokenizer of the model a request names (`model`, an id or an alias; none: the default)."""
    catalogue = get_deps().settings.catalogue
    entry = catalogue.default if model is None else catalogue.find(model)
    tenant.check_model(entry.id)
    return tokenizer_of(entry.id)


def _model_of(body) -> object:
    return body.get("model") if isinstance(body, dict) else None


@app.post("/tokenize")
def tokenize() -> Response:
    tenant, body = _tenant(), _body()
    return _reply(service.Reply(200, get_tokenizer(tenant, _model_of(body)).tokenize(body)))


@app.post("/detokenize")
def detokenize() -> Response:
    tenant, body = _tenant(), _body()
    return _reply(service.Reply(200, get_tokenizer(tenant, _model_of(body)).detokenize(body)))


@app.get("/tokenizer_info")
def tokenizer_info() -> Response:
    tenant, query = _tenant(), app.current_event.query_string_parameters or {}
    return _reply(service.Reply(200, get_tokenizer(tenant, query.get("model")).info()))


@app.get("/openapi.json")
def openapi_document() -> Response:
    return _reply(service.Reply(200, openapi.spec(get_deps().settings)))


@app.get("/health")
def health() -> Response:
    models = [m.id for m in get_deps().settings.catalogue.models]
    return _reply(service.Reply(200, {"status": "ok", "model": models[0], "models": models}))


@app.exception_handler(StratusError)
def stratus_error(exc: StratusError) -> Response:
    with single_metric(name="Refused", unit=MetricUnit.Count, value=1) as metric:  # 4xx/5xx by reason
        metric.add_dimension(name="status", value=str(exc.status))
        metric.add_dimension(name="reason", value=refusal_reason(exc))
    logger.info("request refused", extra={"status": exc.status, "code": exc.code})
    headers = {"retry-after": str(exc.retry_after_s)} if isinstance(exc, (RateLimited, Unavailable)) else {}
    return _reply(service.Reply(exc.status, shapes.error_body(exc), headers))


@app.exception_handler([BotoCoreError, ClientError])
def storage_unreachable(exc: Exception) -> Response:
    """DynamoDB, SQS or S3 unreachable, timing out or throttling after the client's retries: a
    retryable 503 with Retry-After, never a 500 (the cause goes to the log, not to the caller)."""
    logger.warning("storage unavailable", extra={"error": type(exc).__name__})
    return stratus_error(Unavailable("storage is unavailable right now; retry shortly"))


@app.not_found
def not_found(_exc) -> Response:
    return _reply(
        service.Reply(
            404,
            {
                "error": {
                    "message": f"no route {app.current_event.http_method} {app.current_event.path}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            },
        )
    )


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)
