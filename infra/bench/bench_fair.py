"""Two tenants' batch files on the local stack: does the second tenant's file wait for the first?

  python infra/bench/bench_fair.py --model build/models/smollm2-int8 --lines 400 --other-lines 100 --out build/bench

Tenant acme uploads a --lines file; --after seconds later tenant other uploads an --other-lines
file (both 64 new tokens a line, distinct lines, through the openai SDK's batch flow). Run twice,
each on a fresh stack with one worker:

  metered      the default: release steps share the batch queue between the tenants (stratus.release)
  arrival      every line released at once (STRATUS_BATCH_RELEASE_FLOOR above the lines), as before
               metered release: the queue hands out lines in arrival order

For each: other's completion time from its upload, and its share of the lines finished while both
files were open (other's lines / all lines finished from its upload to its completion; 0.5 is an
even split, ~0 is waiting behind acme). Writes fair.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import boto3
import report as report_file  # infra/bench/report.py
from bench_mixed import LINE_TOKENS, chat
from openai import OpenAI

from stratus.keys import create_key
from stratus_local.serve import free_port, start

FIFO = {"STRATUS_BATCH_RELEASE_FLOOR": "1000000"}


def upload(client: OpenAI, model: str, tag: str, lines: int) -> str:
    body = "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": chat(model, f"{tag} item {i}: write one sentence about a river.",
                                            LINE_TOKENS)}) + "\n" for i in range(lines))
    f = client.files.create(file=(f"{tag}.jsonl", io.BytesIO(body.encode())), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id


def completed(client: OpenAI, batch_id: str) -> tuple[str, int]:
    b = client.batches.retrieve(batch_id)
    return b.status, (b.request_counts.completed if b.request_counts else 0)


def run(model_dir: Path, threads: int, lines: int, other_lines: int, after: float, env: dict) -> dict:
    stack = start(model_dir, port=free_port(), workers=1, threads=threads, environment=env)
    try:
        acme = OpenAI(base_url=stack.url, api_key=stack.api_key, max_retries=0, timeout=600)
        table = boto3.resource("dynamodb").Table(stack.refs["JobsTable"])
        other = OpenAI(base_url=stack.url, api_key=create_key(table, "other", rpm=100_000, tpm=100_000_000),
                       max_retries=0, timeout=600)
        acme.chat.completions.create(**chat(stack.model_id, "warm up", 2))
        began = time.perf_counter()
        a = upload(acme, stack.model_id, "acme", lines)
        time.sleep(after)
        b_began = time.perf_counter()
        a_at_b = completed(acme, a)[1]
        b = upload(other, stack.model_id, "other", other_lines)
        while (state := completed(other, b))[0] != "completed":
            if state[0] in ("failed", "expired", "cancelled"):
                raise RuntimeError(f"batch {b} ended {state[0]}")
            time.sleep(1.0)
        b_s = time.perf_counter() - b_began
        a_during = completed(acme, a)[1] - a_at_b
        while completed(acme, a)[0] != "completed":
            time.sleep(1.0)
        return {"other_s": round(b_s, 1), "acme_s": round(time.perf_counter() - began, 1),
                "acme_lines_during_other": a_during, "other_share": round(other_lines / (other_lines + a_during), 3)}
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/smollm2-int8")
    ap.add_argument("--lines", type=int, default=400)
    ap.add_argument("--other-lines", type=int, default=100)
    ap.add_argument("--after", type=float, default=20.0, help="seconds between the two uploads")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    from stratus_engine.numerics import host_description

    runs = {name: run(Path(args.model), args.threads, args.lines, args.other_lines, args.after, env)
            for name, env in (("metered", {}), ("arrival", FIFO))}
    report = {"host": host_description(), "threads": args.threads, "lines": args.lines,
              "other_lines": args.other_lines, "after_s": args.after, "line_tokens": LINE_TOKENS, **runs,
              "other_faster": runs["arrival"]["other_s"] / runs["metered"]["other_s"]}
    print(f"host: {report['host']}; one worker, {args.threads} threads")
    for name, r in runs.items():
        print(f"{name:8s} other's {args.other_lines} lines done {r['other_s']:.0f} s after upload; its share while both "
              f"ran {r['other_share']:.2f} (acme finished {r['acme_lines_during_other']} meanwhile); acme's "
              f"{args.lines} lines {r['acme_s']:.0f} s")
    print(f"other's file finishes {report['other_faster']:.2f}x sooner with metered release")
    report_file.write(args.out, "fair", report)


if __name__ == "__main__":
    main()
