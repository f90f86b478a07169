"""`stratus serve` (`make serve`): the whole system on one machine.

  moto server (DynamoDB, SQS, S3) on loopback
    └─ the table, queues and bucket declared in template.yaml, created from the template
  local gateway ──HTTP, streamed back──▶ the api function's web app (its run.sh, as the Lambda Web
                                          Adapter runs it; webapp.py)
  event sources (SQS, S3, schedules)        ──▶ the functions that subscribe to them
  N worker processes (python -m stratus_worker) running the model on the CPU, per model

The functions and workers are the same code as in AWS with the template's environment; only
AWS_ENDPOINT_URL (moto) and the model parameters (read from the model's manifest) differ. Given
several models, the template is the catalogue's (stratus_local.fleets.render: a queue pair per
model), and each model gets its own workers on its own queues.
Logs go to build/local/logs/ ($STRATUS_LOCAL_LOG_DIR) so the terminal shows the ready banner and problems only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stratus import tokenizer
from stratus_engine.artifact import publish
from stratus_engine.model_dir import read_spec
from stratus_local.fleets import render, resource_name
from stratus_local.template import ROOT, active, create_resources, function_environment, load_template, web_adapter


def log_dir() -> Path:
    return Path(os.environ.get("STRATUS_LOCAL_LOG_DIR") or ROOT / "build/local/logs")


REGION = "us-east-1"
DEV_TENANT = "local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_parameters(model_dir: Path) -> dict[str, str]:
    """The template parameters a model directory decides: its id, digest and context length."""
    from stratus_engine.model_dir import read_spec

    manifest = json.loads((model_dir / "manifest.json").read_text())
    return {
        "ModelId": manifest["model_id"],
        "ModelDigest": manifest["digest"],
        "ModelContextLength": str(read_spec(model_dir).context_length),
    }


def catalogue_entries(each: list[dict[str, str]]) -> list[dict]:
    """Each model's parameters (model_parameters) -> catalogue entries (stratus_local.fleets), the
    first the default."""
    return [
        {
            "name": resource_name(p["ModelId"]),
            "id": p["ModelId"],
            "digest": p["ModelDigest"],
            "context_length": int(p["ModelContextLength"]),
        }
        for p in each
    ]


@dataclass
class LocalStack:
    url: str
    api_key: str
    model_id: str  # the default model's
    aws_endpoint: str
    refs: dict
    logs: Path
    model_ids: list[str] = field(default_factory=list)  # every model served, the default first
    pools: dict = field(default_factory=dict)  # function -> FunctionPool
    _stops: list = field(default_factory=list)  # callables, run in reverse order

    def stop(self) -> None:
        while self._stops:
            try:
                self._stops.pop()()
            except Exception as exc:
                print(f"stratus serve: while stopping: {exc}", file=sys.stderr)


def start(
    model_dir: Path | list[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    workers: int = 1,
    api_key: str | None = None,
    threads: int | None = None,
    schedule_every_s: float = 5.0,
    environment: dict[str, str] | None = None,
) -> LocalStack:
    """model_dir: a built model, or several (each served by its own `workers`, the first the
    default); environment: variables over the template's for every function and worker
    (benchmarks compare settings)."""
    import boto3

    from stratus.keys import create_key
    from stratus_local.gateway import http_routes, make_server
    from stratus_local.instances import FunctionPool
    from stratus_local.sources import EventSources
    from stratus_local.webapp import WebApp

    model_dirs = [model_dir] if isinstance(model_dir, Path) else list(model_dir)
    model_dir = model_dirs[0]
    logs = log_dir()
    logs.mkdir(parents=True, exist_ok=True)
    moto_port = free_port()
    # moto in its own process (its request handling does not share a GIL with the gateway), each
    # DynamoDB request atomic as on AWS (moto_server.py)
    with _interrupts_held():
        moto = subprocess.Popen(
            [sys.executable, "-m", "stratus_local.moto_server", "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=open(logs / "moto.log", "ab"),  # noqa: SIM115 — the child keeps the file
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # (Ctrl-C reaches this process only: it stops them in order)
        stack = LocalStack(f"http://{host}:{port}/v1", "", "", f"http://127.0.0.1:{moto_port}", {}, logs)
        stack._stops.append(lambda: _stop_processes([moto], grace_s=5))
    try:
        _wait_for_port(moto_port, moto, logs / "moto.log")
        aws = {
            "AWS_ENDPOINT_URL": stack.aws_endpoint,
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "POWERTOOLS_TRACE_DISABLED": "true",
        }
        session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name=REGION)
        os.environ["AWS_ENDPOINT_URL"] = stack.aws_endpoint  # this process's clients talk to moto too
        each = [model_parameters(d) for d in model_dirs]
        params, entries = each[0], catalogue_entries(each)  # (the first model's are the template's parameters)
        template = load_template() if len(entries) == 1 else render(load_template(), entries)
        template = active(template, params)  # resources whose Condition holds (no SageMaker dispatcher)
        stack.model_id, stack.model_ids = params["ModelId"], [e["id"] for e in entries]
        stack.refs = refs = create_resources(template, session=session, parameters=params)
        # the API's tokenizer routes read the published models; the workers load the directories themselves
        s3 = session.client("s3")
        uris = [publish(d, s3, refs["ResultsBucket"], only=tokenizer.FILES) for d in model_dirs]
        refs["ModelUri"] = uris[0]
        if len(entries) > 1:  # (the catalogue again, now with where each tokenizer is)
            entries = [{**e, "uri": u} for e, u in zip(entries, uris)]
            template = active(render(load_template(), entries), params)
        table = session.resource("dynamodb").Table(refs["JobsTable"])
        stack.api_key = create_key(table, DEV_TENANT, rpm=100_000, tpm=100_000_000, key=api_key)

        functions = [n for n, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"]
        # schedules run every schedule_every_s here, not each minute: a batch pass is one release step
        fast = {"STRATUS_BATCH_PASS_S": "0"} if schedule_every_s else {}

        def env_of(fn: str) -> dict[str, str]:  # a function's, in its pool and in its web app alike
            return {**function_environment(template, fn, refs), **aws, **fast, **(environment or {})}

        pools = {fn: FunctionPool(fn, {**env_of(fn), "STRATUS_LOCAL_LOG": str(logs / f"{fn}.log")}) for fn in functions}
        stack.pools = pools
        stack._stops.append(lambda: [p.close() for p in pools.values()])

        def invoke(function: str, event: dict) -> dict:
            return pools[function].invoke(event)

        worker_env = {
            **os.environ,
            **function_environment(template, None, refs),
            **aws,
            "STRATUS_ORT_SPINNING": "false",  # the workers share the machine with the rest
        }
        cmd = [sys.executable, "-m", "stratus_worker"] + (["--threads", str(threads)] if threads else [])
        # (env, log) of each worker: `workers` per model, each on its model's queues (what its
        # fleet's nested stack gives it in AWS)
        specs = [
            (
                {**worker_env, **fleet_environment(e, i, refs), "STRATUS_MODEL_DIR": str(d), **(environment or {})},
                logs / (f"worker-{n}.log" if len(entries) == 1 else f"worker-{e['name']}-{n}.log"),
            )
            for i, (e, d) in enumerate(zip(entries, model_dirs))
            for n in range(workers)
        ]

        def spawn(i: int) -> subprocess.Popen:
            env, log = specs[i]
            return subprocess.Popen(
                cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
            )

        procs: list[subprocess.Popen] = []
        supervising = threading.Event()
        stack._stops.append(lambda: (supervising.set(), _stop_processes(procs)))
        for i in range(len(specs)):
            with _interrupts_held():  # (each child is recorded before an interrupt can leave it running)
                procs.append(spawn(i))
        _wait_for_workers(procs, [log for _, log in specs])
        threading.Thread(target=_supervise, args=(procs, spawn, supervising), daemon=True, name="supervisor").start()

        sources = EventSources(
            template,
            refs,
            invoke,
            session,
            schedule_every_s=schedule_every_s,
            log=lambda m: print(f"stratus serve: {m}", file=sys.stderr),
        )
        sources.start()
        stack._stops.append(sources.stop)

        apps = {
            fn: WebApp(template, fn, env_of(fn), free_port(), logs / f"{fn}.log")
            for fn in functions
            if web_adapter(template, fn)
        }
        stack._stops.append(lambda: [a.stop() for a in apps.values()])
        for a in apps.values():
            a.wait_ready()
        server = make_server(host, port, http_routes(template), invoke, {fn: a.url for fn, a in apps.items()})
        threading.Thread(target=server.serve_forever, daemon=True, name="gateway").start()
        stack._stops.append(lambda: (server.shutdown(), server.server_close()))
        write_state(stack, params)
        return stack
    except BaseException:
        stack.stop()
        raise


def fleet_environment(entry: dict, i: int, refs: dict) -> dict[str, str]:
    """The variables a model's workers get from its fleet (ecs-workers.yaml's parameters): its id,
    digest and context length, its two queues. The first model's are the template's own."""
    prefix = "" if i == 0 else entry["name"]
    return {
        "STRATUS_MODEL_ID": entry["id"],
        "STRATUS_MODEL_DIGEST": entry["digest"],
        "STRATUS_CONTEXT_LENGTH": str(entry["context_length"]),
        "STRATUS_QUEUE_URL": refs[f"{prefix}JobsQueue"],
        "STRATUS_BATCH_QUEUE_URL": refs[f"{prefix}BatchJobsQueue"],
    }


def state_file() -> Path:
    """Where a running `stratus serve` says how to reach it (`stratus invoke` reads it)."""
    return log_dir().parent / "stack.json"


def write_state(stack: LocalStack, params: dict) -> None:
    path = state_file()
    path.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "url": stack.url,
                "aws_endpoint": stack.aws_endpoint,
                "refs": {".".join(k) if isinstance(k, tuple) else k: v for k, v in stack.refs.items()},
                "parameters": params,
                "api_key": stack.api_key,
            }
        )
    )
    stack._stops.append(lambda: path.unlink(missing_ok=True))


def read_state() -> dict | None:
    """The running stack's state, if its process is alive and its moto answers."""
    try:
        state = json.loads(state_file().read_text())
        os.kill(state["pid"], 0)
        host, port = state["aws_endpoint"].removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=1):
            state["refs"] = {tuple(k.split(".", 1)) if "." in k else k: v for k, v in state["refs"].items()}
            return state
    except (OSError, ValueError, KeyError):
        return None


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"moto server did not listen on {port} in {timeout_s:.0f} s")


def _supervise(procs: list[subprocess.Popen], spawn, stopping: threading.Event) -> None:
    """Replace a worker that died, as the ECS service replaces a stopped task."""
    while not stopping.wait(0.5):
        for i, p in enumerate(procs):
            if p.poll() not in (None, 2) and not stopping.is_set():  # 2: the model was refused, for good
                print(f"stratus serve: worker {i} exited ({p.returncode}); starting another", file=sys.stderr)
                procs[i] = spawn(i)


def _wait_for_workers(procs: list[subprocess.Popen], logs: list[Path], timeout_s: float = 300.0) -> None:
    """Until every worker has loaded the model and logged "worker started" (a few seconds)."""
    offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
    deadline = time.monotonic() + timeout_s
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                said = [ln for ln in logs[i].read_text(errors="replace").splitlines() if ln.startswith("error:")]
                raise RuntimeError(
                    f"worker {i} exited with {procs[i].returncode}{': ' + said[-1] if said else ''}; see {logs[i]}"
                )
            with open(logs[i], "rb") as f:
                f.seek(offsets[i])
                if b'"worker started"' in f.read():
                    pending.discard(i)
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(pending)} did not start in {timeout_s:.0f} s; see {logs[0].parent}")
        time.sleep(0.1)


def _stop_processes(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # workers drain: finish or release what they hold
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def banner(stack: LocalStack, workers: int, chat: bool = True) -> str:
    """What `make serve` prints once ready: a chat to try, or for a base model (no chat template) a
    completion."""
    if chat:
        route, body = "chat/completions", '"messages": [{"role": "user", "content": "What is the capital of France?"}]'
        call = 'chat.completions.create(model="{m}", messages=[{{"role": "user", "content": "Hi!"}}], temperature=0).choices[0].message.content'
    else:
        route, body = "completions", '"prompt": "The capital of France is", "max_tokens": 16'
        call = 'completions.create(model="{m}", prompt="Water boils at", max_tokens=16, temperature=0).choices[0].text'
    served = f"model {stack.model_id}" if len(stack.model_ids) < 2 else f"models {', '.join(stack.model_ids)}"
    return f"""
Stratus is running locally ({workers} worker{"s" if workers != 1 else ""}{" each" if len(stack.model_ids) > 1 else ""}, {served}).
  base URL   {stack.url}
  API key    {stack.api_key}
  AWS (moto) {stack.aws_endpoint}
  logs       {stack.logs}/

  curl {stack.url}/{route} -H "Authorization: Bearer {stack.api_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{stack.model_id}", {body}, "temperature": 0}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{stack.url}", api_key="{stack.api_key}"); \\
print(c.{call.format(m=stack.model_id)})'

Ready on {stack.url} — Ctrl-C stops everything.
"""


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C or SIGTERM while a child process starts is held until the child is recorded among
    what start() stops, then raised: an interrupt between the fork and the record left a worker
    running with nobody to stop it. (Signals are the main thread's: elsewhere nothing is held.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


def main(model_dirs: Path | list[Path], *, port: int, workers: int, api_key: str | None, threads: int | None) -> int:
    model_dirs = [model_dirs] if isinstance(model_dirs, Path) else model_dirs
    for d in model_dirs:
        if not (d / "manifest.json").is_file():
            print(f"error: {d} is not a built model (run `make model`)", file=sys.stderr)
            return 2
    print(
        f"starting: moto, the resources of template.yaml, {workers} worker(s) loading "
        f"{' and '.join(d.name for d in model_dirs)}{' each' if len(model_dirs) > 1 else ''}, "
        f"the gateway on 127.0.0.1:{port} …",
        flush=True,
    )
    model_dir = model_dirs[0]
    signal.signal(signal.SIGTERM, _interrupt)  # while starting: start() stops what it started, then we exit
    try:
        stack = start(model_dirs, port=port, workers=workers, api_key=api_key, threads=threads)
    except (RuntimeError, OSError) as exc:  # a worker refused the model, a port is taken, something did not start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped while starting", file=sys.stderr)
        return 130
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(banner(stack, workers, chat=bool(read_spec(model_dir).chat_template)), flush=True)
    stopping.wait()
    print("stopping: the gateway takes no more requests, workers drain, then the functions and moto stop", flush=True)
    stack.stop()
    return 0
