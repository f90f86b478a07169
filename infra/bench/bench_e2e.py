"""End-to-end benchmark on the local stack (what `make serve` runs), over HTTP on loopback.

  python infra/bench/bench_e2e.py --model build/models/smollm2-int8 --out build/bench

  hit          cache-hit latency of POST /v1/chat/completions (keep-alive connection), p50/p99
  overhead     for distinct greedy requests sent one at a time: end-to-end latency minus
                 (a) the bare engine's latency for the same request in this process, same threads
                 (b) the worker's own engine time for it (the job's timings.total_s)
               i.e. gateway + api function + DynamoDB + SQS + worker bookkeeping + result polling,
               and where it went: the medians of each phase of the replies' Server-Timing headers
               (stratus.timeline: submit, queue, claim, engine, result, notice, reply)
  throughput   16 client threads sending distinct requests for --seconds, with 1 and 2 workers
               (each worker gets cores / workers onnxruntime threads):
               requests/s, tokens/s

AWS is moto in server mode on this machine, so its latencies are loopback + moto, not DynamoDB's.
Writes e2e.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from stratus_local.serve import free_port, start

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 16


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def summary_ms(samples: list[float]) -> dict:
    return {
        "p50_ms": round(1000 * pct(samples, 0.5), 2),
        "p99_ms": round(1000 * pct(samples, 0.99), 2),
        "n": len(samples),
    }


class Client:
    """One keep-alive HTTP connection to the local gateway."""

    def __init__(self, port: int, key: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict) -> tuple[int, dict, dict]:
        self.conn.request("POST", path, json.dumps(body), self.headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.getheaders()}

    def get(self, path: str) -> dict:
        self.conn.request("GET", path, headers=self.headers)
        r = self.conn.getresponse()
        return json.loads(r.read())


def chat(model: str, text: str, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


def measure_hit(client: Client, model: str, calls: int) -> dict:
    body = chat(model, "What is the capital of France?")
    client.post("/v1/chat/completions", body)  # the miss that fills the cache
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        status, _, headers = client.post("/v1/chat/completions", body)
        samples.append(time.perf_counter() - t)
        assert status == 200 and headers["x-stratus-cache"] == "hit"
    return summary_ms(samples)


def measure_overhead(client: Client, model: str, model_dir: Path, threads: int, n: int) -> dict:
    from stratus.params import SamplingParams
    from stratus.timeline import read_server_timing
    from stratus_engine.engine import Engine, GenerationRequest
    from stratus_engine.numerics import load_verified

    prompts = [f"Give one fact about the number {i}." for i in range(n)]
    e2e, worker_engine, completions, spans = [], [], [], []
    for p in prompts:
        t = time.perf_counter()
        status, body, headers = client.post("/v1/chat/completions", chat(model, p))
        e2e.append(time.perf_counter() - t)
        assert status == 200, body
        spans.append(read_server_timing(headers.get("server-timing", "")))
        job = client.get(f"/v1/jobs/{body['id'].removeprefix('chatcmpl-')}")
        worker_engine.append(job["timings"]["total_s"])
        completions.append(body["usage"]["completion_tokens"])
    engine = Engine(load_verified(model_dir, threads=threads).model, max_batch=1)  # the worker's configuration
    bare = []
    for p, n_tokens in zip(prompts, completions):
        ids = engine.encode_chat([{"role": "user", "content": p}])
        params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)  # the same token count
        t = time.perf_counter()
        engine.generate([GenerationRequest(ids, params)])
        bare.append(time.perf_counter() - t)
    vs_bare = [a - b for a, b in zip(e2e, bare)]
    vs_worker = [a - b for a, b in zip(e2e, worker_engine)]
    return {
        "e2e": summary_ms(e2e),
        "bare_engine": summary_ms(bare),
        "minus_bare_engine": summary_ms(vs_bare),
        "minus_worker_engine_time": summary_ms(vs_worker),
        "phases_p50_ms": {k: round(statistics.median(s[k] for s in spans if k in s), 1) for k in spans[0]},
    }


def measure_throughput(port: int, key: str, model: str, clients: int, seconds: float, tag: str) -> dict:
    done, tokens, errors = [], [], []
    stop = time.monotonic() + seconds

    def run(c: int) -> None:
        client, i = Client(port, key), 0
        while time.monotonic() < stop:
            status, body, _ = client.post(
                "/v1/chat/completions", chat(model, f"[{tag}] client {c} request {i}: name a city.", 32)
            )
            i += 1
            if status == 200:
                done.append(time.monotonic())
                tokens.append(body["usage"]["completion_tokens"])
            else:
                errors.append(status)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(done),
        "errors": len(errors),
        "requests_per_s": round(len(done) / wall, 2),
        "completion_tokens_per_s": round(sum(tokens) / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "build/models/smollm2-int8")
    ap.add_argument("--hits", type=int, default=500)
    ap.add_argument("--misses", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "build/bench")
    ap.add_argument("--without-wakes", action="store_true", help="requests only re-read their jobs (stratus.wake off)")
    args = ap.parse_args()
    settings = {"STRATUS_WAKE_PREFIX": ""} if args.without_wakes else None
    cores = os.cpu_count() or 1
    os.environ.setdefault("STRATUS_LOCAL_LOG_DIR", str(args.out / "e2e-logs"))
    report: dict = {"model": str(args.model), "cores": cores, "wakes": not args.without_wakes, "throughput": []}
    for workers in (1, 2):
        port = free_port()
        threads = max(1, cores // workers)
        stack = start(args.model, port=port, workers=workers, threads=threads, environment=settings)
        try:
            client = Client(port, stack.api_key)
            if workers == 1:
                report["hit"] = measure_hit(client, stack.model_id, args.hits)
                print(
                    f"cache hit over HTTP   p50 {report['hit']['p50_ms']:.1f} ms  p99 {report['hit']['p99_ms']:.1f} ms"
                    "  (target p50 <= 10 ms)",
                    flush=True,
                )
                report["overhead"] = measure_overhead(client, stack.model_id, args.model, threads, args.misses)
                o = report["overhead"]
                print(
                    f"miss end to end       p50 {o['e2e']['p50_ms']:.0f} ms; bare engine p50 "
                    f"{o['bare_engine']['p50_ms']:.0f} ms",
                    flush=True,
                )
                print(
                    f"pipeline overhead     p50 {o['minus_bare_engine']['p50_ms']:.1f} ms vs the bare engine, "
                    f"{o['minus_worker_engine_time']['p50_ms']:.1f} ms vs the worker's engine time"
                    "  (target p50 <= 30 ms)",
                    flush=True,
                )
                print(
                    "where it went (p50 ms) " + ", ".join(f"{k} {v}" for k, v in o["phases_p50_ms"].items()), flush=True
                )
            t = measure_throughput(port, stack.api_key, stack.model_id, 16, args.seconds, f"w{workers}")
            t.update(workers=workers, threads_per_worker=threads)
            report["throughput"].append(t)
            print(
                f"throughput {workers} worker(s) x {threads} threads, 16 clients: {t['requests_per_s']} req/s, "
                f"{t['completion_tokens_per_s']} tok/s ({t['requests']} requests, {t['errors']} errors)",
                flush=True,
            )
        finally:
            stack.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'e2e.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
