"""SageMaker's container contract, served by the same image as the queue worker
(`python -m stratus_worker serve`, which is how SageMaker starts a container):

  GET  /ping          200 once the model is loaded and has computed its golden outputs on this
                      host (the server starts listening only then; a model that fails the check
                      never gets a listening server, so SageMaker's health check fails); 503 once
                      the engine has died
  POST /invocations   a queue message {"job_id", "request", ...} (what the dispatcher sends an async
                      endpoint): the job is run through the job store like any worker's
                      (invocations.py) -> job view; or a plain OpenAI chat/completion body -> the
                      OpenAI response (no store)

Port 8080 (SAGEMAKER_BIND_TO_PORT overrides). Requests run concurrently in the engine's continuous
batch. The main thread keeps the queue worker's housekeeping for the jobs it runs: heartbeat,
cancels (DELETE /v1/jobs/{id}, a streaming client that left), streaming requests that joined,
metrics. SIGTERM: stop accepting, let in-flight requests finish (still housekept), exit 0. The engine
dying: its requests' jobs fail (async endpoints never redeliver), /ping says 503 while they end,
then the server stops and the process exits 1 (SageMaker replaces the instance).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from stratus.contracts import JOB_ID, Job, NewerMessage, QueueMessage, Status
from stratus.errors import InvalidRequest, StratusError
from stratus.observability import logger
from stratus.shapes import completion_body, error_body, job_view
from stratus.wire import parse_request
from stratus_engine.engine import GenerationRequest
from stratus_worker import choices
from stratus_worker.choices import encode_prompts, gather
from stratus_worker.invocations import INVOCATION_FAILED, run_one
from stratus_worker.results import chunk_error
from stratus_worker.worker import Worker

DEFAULT_PORT = 8080
HOUSEKEEP_EVERY_S = 0.1  # how often the main thread looks for due chores (each has its own period)


def invoke(worker: Worker, body: dict) -> tuple[int, dict]:
    """One /invocations body -> (HTTP status, JSON body)."""
    if "job_id" in body and "request" in body:
        return _invoke_job(worker, body)
    return 200, _complete(worker, body)


def _invoke_job(worker: Worker, body: dict) -> tuple[int, dict]:
    """A queue message: its job run through the job store (invocations.run_one) -> the job view."""
    job_id = str(body["job_id"])
    try:
        msg = QueueMessage.from_body(json.dumps(body))
    except NewerMessage as exc:  # a newer API queued it: this image cannot serve it, and nothing retries
        logger.warning("message from a newer version", extra={"job_id": job_id, "reason": str(exc)})
        error = {
            "message": f"the worker is older than the API that queued this job ({exc}); the endpoint "
            "needs the new worker image",
            "type": "server_error",
            "code": "worker_outdated",
        }
        if JOB_ID.fullmatch(job_id):  # (only a QUEUED one: a newer instance may be running it)
            worker.jobs.fail(job_id, error, running=False)
        return 500, {"error": error}
    try:
        job = run_one(worker, msg)
    except Exception:
        logger.exception("invocation failed", extra={"job_id": msg.job_id})
        return 500, {"error": INVOCATION_FAILED}
    return (200, job_view(job)) if job is not None else (404, {"error": {"message": "job not found"}})


def _complete(worker: Worker, body: dict) -> dict:
    """A plain OpenAI chat/completion body -> the OpenAI response, generated without the job store."""
    route = "chat" if "messages" in body else "completion"
    s = worker.settings
    req = parse_request(route, body, max_messages=s.max_messages, max_tokens_limit=s.max_tokens)
    engine = worker.engine
    results = gather(
        [engine.submit(GenerationRequest(ids, req.params)) for ids in encode_prompts(engine, req)]
    ).result()
    now, job_id = time.time(), "sm" + uuid.uuid4().hex
    result = choices.result_body(
        req,
        results,
        engine.token_bytes,
        lambda ids: engine.model.tokenizer.decode(ids, skip_special_tokens=False),
        job_id,
    )
    job = Job(
        job_id,
        "sagemaker",
        Status.DONE,
        req,
        False,
        now,
        int(now),
        result=result,
        usage=choices.usage(results),
    )
    return completion_body(job)


def make_server(worker: Worker, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/ping":
                if worker.failure is not None:
                    return self._send(503, {"status": "engine failed"})
                return self._send(200, {"status": "ok"})
            self._send(404, {"error": {"message": f"no route GET {self.path}"}})

        def do_POST(self) -> None:
            if self.path.split("?")[0] != "/invocations":
                return self._send(404, {"error": {"message": f"no route POST {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                if not isinstance(body, dict):
                    raise InvalidRequest("the body must be a JSON object")
                self._send(*invoke(worker, body))
            except json.JSONDecodeError as exc:
                self._send(400, error_body(InvalidRequest(f"the body is not valid JSON: {exc.msg}")))
            except StratusError as exc:
                self._send(exc.status, error_body(exc))
            except Exception:
                logger.exception("invocation failed")
                self._send(500, {"error": INVOCATION_FAILED})

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = False  # server_close() waits for in-flight requests
    return server


def serve(worker: Worker, stop: threading.Event) -> None:
    """Run the engine and the HTTP server until `stop` (SIGTERM) is set or the engine dies
    (worker.failure); the main thread does the housekeeping meanwhile."""
    port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT") or DEFAULT_PORT)
    threading.Thread(target=worker.run_engine, daemon=True, name="engine").start()
    threading.Thread(target=worker.chunks.run, args=(worker.halt, chunk_error), daemon=True, name="chunks").start()
    server = make_server(worker, port)
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    print(json.dumps({"message": "sagemaker server listening", "port": port}), flush=True)
    while not stop.wait(HOUSEKEEP_EVERY_S) and worker.failure is None:
        worker.housekeep()
    server.shutdown()  # no new request; the ones in flight finish, with their housekeeping
    closing = threading.Thread(target=server.server_close, name="drain")  # joins in-flight request threads
    closing.start()
    while closing.is_alive():
        if worker.failure is None:
            worker.housekeep()
        closing.join(HOUSEKEEP_EVERY_S)
    worker.halt.set()
