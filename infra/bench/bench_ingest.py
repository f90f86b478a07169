"""How fast a batch file is read into jobs on the local stack (moto over HTTP: every line is a
cache read and a conditional write, as on AWS, at loopback latency).

  python infra/bench/bench_ingest.py --model build/models/smollm2-int8 --lines 5000 --out build/bench

Uploads a --lines file of distinct chat lines under batches/input/<tenant>/ (S3 -> the batch
function), with no worker, and samples the batch item every 0.5 s: when its first slice was in
(status in_progress, its first lines releasable) and when the whole file was read; lines/s and the
seconds a 1,000-line slice took. Writes ingest.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import boto3
import report as report_file  # infra/bench/report.py
from bench_mixed import LINE_TOKENS, chat

from stratus.batches import batch_id_for_upload
from stratus.settings import BatchLimits
from stratus_local.serve import DEV_TENANT, REGION, free_port, start

SLICE = BatchLimits().slice_lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/smollm2-int8")
    ap.add_argument("--lines", type=int, default=5000)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    from stratus_engine.numerics import host_description

    stack = start(Path(args.model), port=free_port(), workers=0)
    try:
        session = boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name=REGION)
        s3, table = (
            session.client("s3", endpoint_url=stack.aws_endpoint),
            session.resource("dynamodb", endpoint_url=stack.aws_endpoint).Table(stack.refs["JobsTable"]),
        )
        body = "".join(
            json.dumps(
                {
                    "custom_id": f"q{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": chat(stack.model_id, f"item {i}: one sentence about a river.", LINE_TOKENS),
                }
            )
            + "\n"
            for i in range(args.lines)
        ).encode()
        bucket, key = stack.refs["ResultsBucket"], f"batches/input/{DEV_TENANT}/ingest.jsonl"
        began = time.perf_counter()
        etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
        batch_id = batch_id_for_upload(bucket, key, etag)
        first = None
        while time.perf_counter() - began < 3600:
            item = table.get_item(Key={"pk": f"batch#{batch_id}"}).get("Item") or {}
            if first is None and item.get("status") == "in_progress":
                first = time.perf_counter() - began
            if item.get("lines_total") and int(item["ingested"]) == int(item["lines_total"]):
                break
            time.sleep(0.5)
        read_s = time.perf_counter() - began
    finally:
        stack.stop()
    report = {
        "host": host_description(),
        "lines": args.lines,
        "slice": SLICE,
        "first_slice_s": round(first, 1),
        "read_s": round(read_s, 1),
        "lines_per_s": round(args.lines / read_s, 1),
        "slice_s": round(read_s / -(-args.lines // SLICE), 1),
    }
    print(f"host: {report['host']}")
    print(
        f"a {args.lines}-line file: first slice of {SLICE} in after {first:.1f} s (its lines releasable), "
        f"the whole file read after {read_s:.1f} s = {report['lines_per_s']} lines/s, {report['slice_s']} s a slice "
        f"(local moto over loopback; no workers)"
    )
    report_file.write(args.out, "ingest", report)


if __name__ == "__main__":
    main()
