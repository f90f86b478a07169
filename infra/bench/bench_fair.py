"""Two tenants' batch files on the local stack: does the second tenant's file wait for the first?

  python infra/bench/bench_fair.py --model build/models/smollm2-int8 --lines 400 --other-lines 100 --out build/bench

Tenant acme uploads a --lines file; --after seconds later tenant other uploads an --other-lines
file (both 64 new tokens a line, distinct lines, through the openai SDK's batch flow). Run twice,
each on a fresh stack with one worker:

  metered      the default: release steps share the batch queue between the tenants (stratus.release)
  arrival      every line released at once (STRATUS_BATCH_RELEASE_FLOOR above the lines), as if
               there were no metered release: the queue hands out lines in arrival order

For each (from 1-second samples of both batches): other's first and last line done after its
upload, and its share of the lines finished while both files were open (0.5 is an even split, ~0
is waiting behind acme), also counted from its first finished line on (after the lines queued
ahead of it). Writes fair.json.
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
from stratus_local.serve import REGION, free_port, start

FIFO = {"STRATUS_BATCH_RELEASE_FLOOR": "1000000"}


def upload(client: OpenAI, model: str, tag: str, lines: int) -> str:
    body = "".join(
        json.dumps(
            {
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat(model, f"{tag} item {i}: write one sentence about a river.", LINE_TOKENS),
            }
        )
        + "\n"
        for i in range(lines)
    )
    f = client.files.create(file=(f"{tag}.jsonl", io.BytesIO(body.encode())), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id


def completed(client: OpenAI, batch_id: str) -> tuple[str, int]:
    b = client.batches.retrieve(batch_id)
    return b.status, (b.request_counts.completed if b.request_counts else 0)


def summarize(samples: list[tuple], after: float, total_s: float) -> dict:
    """Timings from 1-second samples of both batches' (status, lines completed)."""
    first = lambda pred: next(x for x in samples if pred(x))  # noqa: E731
    other_done = first(lambda x: x[2][0] == "completed")
    acme_done = first(lambda x: x[1][0] == "completed")
    other_first = first(lambda x: x[2][1] > 0)
    both_end = min(other_done, acme_done, key=lambda x: x[0])  # while both files were open
    a_both, b_both = both_end[1][1] - samples[0][1][1], both_end[2][1] - samples[0][2][1]
    a_run, b_run = other_done[1][1] - other_first[1][1], other_done[2][1] - other_first[2][1]
    return {
        "other_s": round(other_done[0], 1),
        "other_first_line_s": round(other_first[0], 1),
        "acme_s": round(acme_done[0] + after, 1),
        "total_s": round(total_s, 1),
        "other_share_while_both_open": round(b_both / max(a_both + b_both, 1), 3),
        "other_share_from_its_first_line": round(b_run / max(a_run + b_run, 1), 3),
    }


def run(model_dir: Path, threads: int, lines: int, other_lines: int, after: float, env: dict) -> dict:
    stack = start(model_dir, port=free_port(), workers=1, threads=threads, environment=env)
    try:
        acme = OpenAI(base_url=stack.url, api_key=stack.api_key, max_retries=0, timeout=600)
        table = (
            boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name=REGION)
            .resource("dynamodb", endpoint_url=stack.aws_endpoint)
            .Table(stack.refs["JobsTable"])
        )
        other = OpenAI(
            base_url=stack.url,
            api_key=create_key(table, "other", rpm=100_000, tpm=100_000_000),
            max_retries=0,
            timeout=600,
        )
        acme.chat.completions.create(**chat(stack.model_id, "warm up", 2))
        began = time.perf_counter()
        a = upload(acme, stack.model_id, "acme", lines)
        time.sleep(after)
        b = upload(other, stack.model_id, "other", other_lines)
        t0, samples = time.perf_counter(), []  # (seconds since other's upload, acme's state, other's state)
        while True:
            sa, sb = completed(acme, a), completed(other, b)
            samples.append((time.perf_counter() - t0, sa, sb))
            if {sa[0], sb[0]} & {"failed", "expired", "cancelled"}:
                raise RuntimeError(f"a batch ended {sa[0]} / {sb[0]}")
            if sa[0] == sb[0] == "completed":
                break
            time.sleep(1.0)
        return summarize(samples, after, time.perf_counter() - began)
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

    runs = {
        name: run(Path(args.model), args.threads, args.lines, args.other_lines, args.after, env)
        for name, env in (("metered", {}), ("arrival", FIFO))
    }
    report = {
        "host": host_description(),
        "threads": args.threads,
        "lines": args.lines,
        "other_lines": args.other_lines,
        "after_s": args.after,
        "line_tokens": LINE_TOKENS,
        **runs,
        "other_faster": runs["arrival"]["other_s"] / runs["metered"]["other_s"],
    }
    print(f"host: {report['host']}; one worker, {args.threads} threads")
    for name, r in runs.items():
        print(
            f"{name:8s} other's {args.other_lines} lines: first done {r['other_first_line_s']:.0f} s, all done "
            f"{r['other_s']:.0f} s after its upload; its share of the lines finished while both files were open "
            f"{r['other_share_while_both_open']:.2f} ({r['other_share_from_its_first_line']:.2f} from its first "
            f"line on); acme's {args.lines} lines {r['acme_s']:.0f} s"
        )
    print(f"other's file finishes {report['other_faster']:.2f}x sooner with metered release")
    report_file.write(args.out, "fair", report)


if __name__ == "__main__":
    main()
