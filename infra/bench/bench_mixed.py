"""Mixed load on the local stack (what `make serve` runs): interactive chat requests while a batch
file drains, with the openai SDK over loopback.

  python infra/bench/bench_mixed.py --model build/models/smollm2-int8 --lines 500 --out build/bench

  idle         interactive requests (distinct, 8 new tokens, greedy) one every --every seconds on
               the idle stack: latency p50/p99
  batch alone  a --lines batch file (64 new tokens a line, distinct lines) through the batch API
               with no interactive work: completion time, lines/s
  one queue    the same lines sent as jobs (POST /v1/jobs) into the interactive queue, as if there
               were no batch tier: completion time (the throughput the batch tier keeps)
  mixed        the batch file again (new lines), and interactive requests at the same rate until it
               completes: interactive latency p50/p99 against idle, the batch's completion time

One worker on all cores by default (--workers N: N workers, --threads each). Writes mixed.json
(mixed-<N>w.json for N workers). Targets (issue 13): interactive p50 under load <= 1.5x
idle; the batch alone within 10% of the one-queue throughput.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report as report_file  # infra/bench/report.py
from openai import OpenAI

from stratus_local.serve import free_port, start

LINE_TOKENS, INTERACTIVE_TOKENS = 64, 8


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def stats_ms(samples: list[float]) -> dict:
    return {
        "p50_ms": round(1000 * statistics.median(samples), 1),
        "p99_ms": round(1000 * pct(samples, 0.99), 1),
        "n": len(samples),
    }


def chat(model: str, text: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


class Interactive:
    """One request every `every` seconds from a thread, until stopped: latencies in seconds."""

    def __init__(self, client: OpenAI, model: str, tag: str, every: float) -> None:
        self.client, self.model, self.tag, self.every = client, model, tag, every
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Interactive:
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.latencies

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            began = time.perf_counter()
            self.client.chat.completions.create(
                **chat(self.model, f"{self.tag} question {n}: name a colour.", INTERACTIVE_TOKENS)
            )
            self.latencies.append(time.perf_counter() - began)
            n += 1
            self._stop.wait(max(0.0, self.every - (time.perf_counter() - began)))


def run_batch(client: OpenAI, model: str, tag: str, lines: int) -> float:
    """Upload a batch file of distinct lines and wait for it to complete -> seconds."""
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
    began = time.perf_counter()
    f = client.files.create(file=(f"{tag}.jsonl", io.BytesIO(body.encode())), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(1.0)
        batch = client.batches.retrieve(batch.id)
    if batch.status != "completed":
        raise RuntimeError(f"batch {batch.id} ended {batch.status}")
    return time.perf_counter() - began


def run_jobs(client: OpenAI, model: str, tag: str, lines: int) -> float:
    """The same lines as jobs in the interactive queue -> seconds until every one is done."""
    began = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda i: client.post(
                    "/jobs",
                    cast_to=dict,
                    body=chat(model, f"{tag} item {i}: write one sentence about a river.", LINE_TOKENS),
                )["id"],
                range(lines),
            )
        )
    for job_id in ids:
        while client.get(f"/jobs/{job_id}", cast_to=dict)["status"] not in ("DONE", "FAILED", "EXPIRED"):
            time.sleep(0.5)
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/smollm2-int8")
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--idle", type=int, default=20, help="interactive requests on the idle stack")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between interactive requests")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="per worker (default: the cores / workers)")
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    from stratus_engine.numerics import host_description

    stack = start(Path(args.model), port=free_port(), workers=args.workers, threads=args.threads)
    try:
        client = OpenAI(base_url=stack.url, api_key=stack.api_key, max_retries=0, timeout=600)
        client.chat.completions.create(**chat(stack.model_id, "warm up", 2))
        idle = Interactive(client, stack.model_id, "idle", args.every).start()
        while len(idle.latencies) < args.idle:
            time.sleep(0.2)
        idle_lat = idle.stop()
        alone_s = run_batch(client, stack.model_id, "alone", args.lines)
        jobs_s = run_jobs(client, stack.model_id, "jobs", args.lines)
        load = Interactive(client, stack.model_id, "mixed", args.every).start()
        mixed_s = run_batch(client, stack.model_id, "mixed", args.lines)
        mixed_lat = load.stop()
    finally:
        stack.stop()
    report = {
        "host": host_description(),
        "lines": args.lines,
        "line_tokens": LINE_TOKENS,
        "interactive_tokens": INTERACTIVE_TOKENS,
        "every_s": args.every,
        "workers": args.workers,
        "threads": args.threads,
        "interactive_idle": stats_ms(idle_lat),
        "interactive_mixed": stats_ms(mixed_lat),
        "mixed_over_idle_p50": statistics.median(mixed_lat) / statistics.median(idle_lat),
        "batch_alone_s": round(alone_s, 1),
        "batch_alone_lines_per_s": round(args.lines / alone_s, 2),
        "one_queue_s": round(jobs_s, 1),
        "one_queue_lines_per_s": round(args.lines / jobs_s, 2),
        "batch_alone_over_one_queue_throughput": jobs_s / alone_s,
        "batch_mixed_s": round(mixed_s, 1),
    }
    print(f"host: {report['host']}; {args.workers} worker(s), {args.threads} threads each")
    print(
        f"interactive ({INTERACTIVE_TOKENS} tokens, one every {args.every} s): idle p50 "
        f"{report['interactive_idle']['p50_ms']:.0f} ms p99 {report['interactive_idle']['p99_ms']:.0f} ms; while "
        f"a {args.lines}-line batch drains p50 {report['interactive_mixed']['p50_ms']:.0f} ms p99 "
        f"{report['interactive_mixed']['p99_ms']:.0f} ms = {report['mixed_over_idle_p50']:.2f}x idle (target <= 1.5x)"
    )
    print(
        f"batch of {args.lines} lines x {LINE_TOKENS} tokens: alone {alone_s:.0f} s ({args.lines / alone_s:.2f} lines/s), "
        f"as jobs in one queue {jobs_s:.0f} s ({args.lines / jobs_s:.2f}/s): "
        f"{report['batch_alone_over_one_queue_throughput']:.2f}x (target >= 0.9x); with interactive load {mixed_s:.0f} s"
    )
    report_file.write(args.out, "mixed" if args.workers == 1 else f"mixed-{args.workers}w", report)


if __name__ == "__main__":
    main()
