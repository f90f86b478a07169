"""API handler benchmark: cache-hit and miss-enqueue latency in-process on moto, and cold import time.

  python infra/bench/bench_api.py --calls 1000 --out build/bench

Latency is the handler call alone (event in, response out) with DynamoDB and SQS served by moto in
the same process, so it includes moto's own cost; p50/p99 over --calls calls. Import time is a
fresh interpreter importing the api function module (median of 5), the Lambda cold-start share
that is ours; it must not pull numpy or onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_PROBE = """
import sys, time
sys.path.insert(0, {path!r})
t = time.perf_counter()
import app
print(time.perf_counter() - t, 'numpy' in sys.modules, 'onnxruntime' in sys.modules)
"""


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {
        "p50_ms": 1000 * s[len(s) // 2],
        "p99_ms": 1000 * s[min(len(s) - 1, int(len(s) * 0.99))],
        "mean_ms": 1000 * statistics.fmean(s),
    }


def import_time(runs: int = 5) -> dict:
    # The variables the Lambda runtime sets: inside Lambda the X-Ray SDK samples locally instead of
    # building a botocore client for the X-Ray service at import (150-230 ms outside Lambda).
    env = dict(
        os.environ,
        STRATUS_TABLE="t",
        STRATUS_QUEUE_URL="q",
        AWS_DEFAULT_REGION="us-east-1",
        LAMBDA_TASK_ROOT=str(ROOT / "functions/api"),
        AWS_LAMBDA_FUNCTION_NAME="api",
    )
    out = [
        subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE.format(path=str(ROOT / "functions/api"))],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout.split()
        for _ in range(runs)
    ]
    return {
        "median_ms": 1000 * statistics.median(float(o[0]) for o in out),
        "imports_numpy": out[0][1] == "True",
        "imports_onnxruntime": out[0][2] == "True",
    }


def handler_latency(calls: int) -> dict:
    for k, v in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "POWERTOOLS_TRACE_DISABLED": "1",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
        "POWERTOOLS_METRICS_DISABLED": "1",
    }.items():
        os.environ[k] = v
    from moto import mock_aws

    from stratus.contracts import Status
    from stratus.jobstore import JobStore
    from stratus.keys import create_key
    from stratus_local.template import (
        LambdaContext,
        apply_environment,
        create_resources,
        function_environment,
        load_handler,
        load_template,
    )

    with mock_aws():
        import boto3

        template = load_template()
        refs = create_resources(template)
        env = function_environment(template, "ApiFunction", refs)
        env["STRATUS_SYNC_WAIT_S"] = "0"
        apply_environment(env)
        handler, _ = load_handler(template, "ApiFunction")
        table = boto3.resource("dynamodb").Table(refs["JobsTable"])
        key = create_key(table, "bench", rpm=10**9, tpm=10**12)
        base = json.loads((ROOT / "events/api_chat_completion.json").read_text())
        base["headers"]["authorization"] = f"Bearer {key}"
        ctx = LambdaContext()

        def event(body: dict) -> dict:
            return {**base, "body": json.dumps(body)}

        request = json.loads(base["body"])
        first = json.loads(handler(event(request), ctx)["body"])
        store = JobStore(table)
        store.transition(first["id"], [Status.QUEUED], Status.RUNNING, worker="bench")
        store.transition(
            first["id"],
            [Status.RUNNING],
            Status.DONE,
            owner="bench",
            result={"text": "Paris.", "finish_reason": "stop"},
            usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
        )
        hit, miss = [], []
        for _ in range(calls):
            t = time.perf_counter()
            out = handler(event(request), ctx)
            hit.append(time.perf_counter() - t)
            assert out["statusCode"] == 200
        for i in range(calls):
            t = time.perf_counter()
            out = handler(event({**request, "seed": i, "temperature": 0.7}), ctx)
            miss.append(time.perf_counter() - t)
            assert out["statusCode"] == 202
        return {"hit": percentiles(hit), "miss_enqueue": percentiles(miss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    report = {"calls": args.calls, **handler_latency(args.calls), "import": import_time()}
    print(
        f"cache hit     p50 {report['hit']['p50_ms']:.2f} ms  p99 {report['hit']['p99_ms']:.2f} ms  (target p50 <= 5 ms)"
    )
    print(f"miss enqueue  p50 {report['miss_enqueue']['p50_ms']:.2f} ms  p99 {report['miss_enqueue']['p99_ms']:.2f} ms")
    imp = report["import"]
    print(
        f"import        {imp['median_ms']:.0f} ms (target <= 300 ms); numpy {imp['imports_numpy']}, "
        f"onnxruntime {imp['imports_onnxruntime']}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "api.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
