"""Two tenants' interactive requests: does a light tenant wait behind a heavy one?

  python infra/bench/bench_tenants.py --model build/models/smollm2-int8 --ratio 10 --out build/bench

Tenant light sends a chat request (8 new tokens, greedy, distinct) every E seconds, closed loop;
tenant heavy sends --ratio times as many, open loop (a request every E/ratio seconds, whatever came
back). Light's latency p50/p99 in each run:

  engine   the engine alone, in a thread, requests submitted as the worker submits them, every
           --engine-every seconds (1: heavy's 10/s is past what the engine serves, so a backlog
           builds in its waiting list, as it does in the messages a worker holds: at most three
           batches' worth, the worker's room; heavy's requests past it are not sent, as they would
           wait in the queue, where SQS fair queues hand light's message over first):
             solo    light alone
             blind   both, every request under one tenant name: arrival order, as before tenants
                     took turns
             fair    both, under their names: tenants take turns (stratus_engine.scheduler)
  stack    the local stack (make serve) over HTTP with the openai SDK, every --stack-every seconds
           (4: heavy's 2.5/s is within what the stack serves; past it the backlog forms in the local
           gateway's threads, which no tenant rule orders): solo, and shared with heavy; heavy's p50
           and how many of its requests were refused (429: MaxInFlightPerTenant)

On AWS, SQS fair queues also deliver a quiet tenant's messages ahead of a backlog
(MessageGroupId), which moto does not do. Writes tenants.json. Target (issue 21): light's p50
beside heavy <= 1.5x its solo p50.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import openai
import report as report_file  # infra/bench/report.py
from bench_mixed import INTERACTIVE_TOKENS, Interactive, chat, stats_ms
from openai import OpenAI

from stratus.keys import create_key
from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_local.serve import REGION, free_port, start


class OpenLoop:
    """A request every `every` seconds, each on its own thread, until stopped -> latencies of the
    answered ones, and how many were refused (429)."""

    def __init__(self, client: OpenAI, model: str, every: float) -> None:
        self.client, self.model, self.every = client, model, every
        self.latencies: list[float] = []
        self.refused = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(128)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> OpenLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _one(self, n: int) -> None:
        began = time.perf_counter()
        try:
            self.client.chat.completions.create(
                **chat(self.model, f"heavy question {n}: name a colour.", INTERACTIVE_TOKENS)
            )
            self.latencies.append(time.perf_counter() - began)
        except openai.RateLimitError:
            self.refused += 1

    def _run(self) -> None:
        n, next_at = 0, time.perf_counter()
        while not self._stop.is_set():
            self._pool.submit(self._one, n)
            n += 1
            next_at += self.every
            self._stop.wait(max(0.0, next_at - time.perf_counter()))


def run_engine(engine: Engine, every: float, ratio: float, requests: int, mode: str) -> dict:
    """One engine run (mode solo, blind or fair) -> light's latency stats (and heavy's, beside it)."""
    count = [0]

    def ask(tenant: str):
        count[0] += 1
        ids = engine.encode_chat([{"role": "user", "content": f"{tenant} question {count[0]}: name a colour."}])
        label = tenant if mode == "fair" else ""
        return engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=INTERACTIVE_TOKENS), tenant=label))

    heavy: list[float] = []
    stop = threading.Event()

    room = 3 * engine.max_batch  # what a worker holds (worker.poll)

    def flood() -> None:
        pending, next_at = [], time.perf_counter()
        while not stop.is_set():
            if len(pending) < room:
                pending.append((time.perf_counter(), ask("heavy")))
            next_at += every / ratio
            stop.wait(max(0.0, next_at - time.perf_counter()))
            heavy.extend(time.perf_counter() - t for t, f in pending if f.done())
            pending = [(t, f) for t, f in pending if not f.done()]

    flooding = threading.Thread(target=flood, daemon=True)
    if mode != "solo":
        flooding.start()
        time.sleep(5 * every)  # the backlog builds first
    light = []
    for _ in range(requests):
        began = time.perf_counter()
        ask("light").result()
        light.append(time.perf_counter() - began)
        time.sleep(max(0.0, every - (time.perf_counter() - began)))
    stop.set()
    if mode != "solo":
        flooding.join()
    while engine.num_running or engine.num_waiting:  # (the backlog drains before the next run)
        time.sleep(0.1)
    return {"light": stats_ms(light), **({"heavy": stats_ms(heavy)} if heavy else {})}


def engine_runs(model_dir: Path, threads: int, every: float, ratio: float, requests: int) -> dict:
    engine = Engine.from_dir(model_dir, threads=threads)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    try:
        engine.submit(
            GenerationRequest(
                engine.encode_chat([{"role": "user", "content": "warm up"}]), SamplingParams(max_tokens=2)
            )
        ).result()
        return {mode: run_engine(engine, every, ratio, requests, mode) for mode in ("solo", "blind", "fair")}
    finally:
        stop.set()
        loop.join()


def run(model_dir: Path, threads: int, every: float, ratio: float, requests: int, heavy: bool) -> dict:
    stack = start(model_dir, port=free_port(), workers=1, threads=threads)
    try:
        table = (
            boto3.Session(aws_access_key_id="local", aws_secret_access_key="local", region_name=REGION)
            .resource("dynamodb", endpoint_url=stack.aws_endpoint)
            .Table(stack.refs["JobsTable"])
        )
        client = lambda tenant: OpenAI(  # noqa: E731
            base_url=stack.url,
            api_key=create_key(table, tenant, rpm=1_000_000, tpm=1_000_000_000),
            max_retries=0,
            timeout=600,
        )
        light = client("light")
        light.chat.completions.create(**chat(stack.model_id, "warm up", 2))
        load = OpenLoop(client("heavy"), stack.model_id, every / ratio).start() if heavy else None
        if load is not None:
            time.sleep(5 * every)  # the heavy tenant's backlog builds first
        probe = Interactive(light, stack.model_id, "light", every).start()
        while len(probe.latencies) < requests:
            time.sleep(0.2)
        latencies = probe.stop()
        out = {"light": stats_ms(latencies)}
        if load is not None:
            load.stop()
            out["heavy"] = {**stats_ms(load.latencies), "refused_429": load.refused}
        return out
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/smollm2-int8")
    ap.add_argument("--ratio", type=float, default=10.0, help="the heavy tenant's rate over the light one's")
    ap.add_argument("--engine-every", type=float, default=1.0, help="seconds between light requests, engine runs")
    ap.add_argument("--stack-every", type=float, default=4.0, help="seconds between light requests, stack runs")
    ap.add_argument("--requests", type=int, default=20, help="light requests timed in each run")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    from stratus_engine.numerics import host_description

    model = Path(args.model)
    engine = engine_runs(model, args.threads, args.engine_every, args.ratio, args.requests)
    stack = {
        name: run(model, args.threads, args.stack_every, args.ratio, args.requests, heavy)
        for name, heavy in (("solo", False), ("shared", True))
    }
    p50 = lambda runs, name: runs[name]["light"]["p50_ms"]  # noqa: E731
    report = {
        "host": host_description(),
        "threads": args.threads,
        "heavy_over_light_rate": args.ratio,
        "tokens": INTERACTIVE_TOKENS,
        "engine": {"every_s": args.engine_every, **engine},
        "stack": {"every_s": args.stack_every, **stack},
        "engine_blind_over_solo_p50": round(p50(engine, "blind") / p50(engine, "solo"), 2),
        "engine_fair_over_solo_p50": round(p50(engine, "fair") / p50(engine, "solo"), 2),
        "stack_shared_over_solo_p50": round(p50(stack, "shared") / p50(stack, "solo"), 2),
    }
    print(f"host: {report['host']}; {args.threads} threads; heavy sends {args.ratio:g}x light's rate")
    print(
        f"engine, light every {args.engine_every} s: solo p50 {p50(engine, 'solo'):.0f} ms; beside heavy in arrival "
        f"order {p50(engine, 'blind'):.0f} ms ({report['engine_blind_over_solo_p50']}x), tenants taking turns "
        f"{p50(engine, 'fair'):.0f} ms ({report['engine_fair_over_solo_p50']}x; target <= 1.5x); heavy p50 "
        f"{engine['fair']['heavy']['p50_ms']:.0f} ms (fair) vs {engine['blind']['heavy']['p50_ms']:.0f} ms (blind)"
    )
    print(
        f"stack, light every {args.stack_every} s: solo p50 {p50(stack, 'solo'):.0f} ms; beside heavy "
        f"{p50(stack, 'shared'):.0f} ms ({report['stack_shared_over_solo_p50']}x; target <= 1.5x); heavy p50 "
        f"{stack['shared']['heavy']['p50_ms']:.0f} ms, {stack['shared']['heavy']['refused_429']} refused (429)"
    )
    report_file.write(args.out, "tenants", report)


if __name__ == "__main__":
    main()
