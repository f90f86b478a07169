"""Streaming latency: time to first token (TTFT) and inter-token latency (ITL) through the whole
local stack (gateway, the api function's web app, DynamoDB and SQS on moto, a worker, chunk
items), against llama.cpp's own `llama-server` (continuous batching, the same GGUF, the same
threads) and against our bare engine, in the same run.

  python infra/bench/bench_stream.py --model build/models/smollm2-int8 \
      --llama-server build/llama/.../bin/llama-server --out build/bench

Client: the openai SDK, stream=True with include_usage, one thread per concurrent request.
Per request: ttft = time to the first non-empty content chunk; itl = (end - first content) /
(completion tokens - 1), as load generators report it. Concurrency 1 and 8, distinct ~30-token
chat prompts, greedy, MAX_TOKENS new tokens (ignore nothing: each side stops where it stops).
The bare engine's figures come from the same prompts in this process (per-token callbacks).
Writes stream.json; prints p50/p99 and the ratios the targets name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from stratus_local.serve import free_port, start

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 64
LEVELS = (1, 8)


def prompts(n: int, tag: str) -> list[str]:
    return [
        f"[{tag} {i}] In two or three sentences, explain why the sky looks blue during the day to a child."
        for i in range(n)
    ]


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def summarize(samples: list[dict]) -> dict:
    out = {}
    for k in ("ttft", "itl"):
        values = [s[k] for s in samples if s[k] is not None]
        out[k] = {
            "p50_ms": round(1000 * pct(values, 0.5), 1),
            "p99_ms": round(1000 * pct(values, 0.99), 1),
            "n": len(values),
        }
    out["tokens"] = round(statistics.mean(s["tokens"] for s in samples), 1)
    return out


def one_stream(client, model: str, prompt: str) -> dict:
    started = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    ttft = first - started if first else None
    itl = (last - first) / (tokens - 1) if first and tokens > 1 else None
    return {"ttft": ttft, "itl": itl, "tokens": tokens}


def measure_server(base_url: str, key: str, model: str, requests: int, tag: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
    one_stream(client, model, f"[{tag} warm-up] Say hi.")
    out = {}
    for c in LEVELS:
        todo = prompts(max(requests, c), f"{tag} c{c}")
        with ThreadPoolExecutor(c) as pool:
            samples = list(pool.map(lambda p: one_stream(client, model, p), todo))
        out[f"c{c}"] = summarize(samples)
        print(
            f"  {tag:12s} concurrency {c}: TTFT p50 {out[f'c{c}']['ttft']['p50_ms']} ms "
            f"p99 {out[f'c{c}']['ttft']['p99_ms']} ms; ITL p50 {out[f'c{c}']['itl']['p50_ms']} ms "
            f"p99 {out[f'c{c}']['itl']['p99_ms']} ms ({out[f'c{c}']['tokens']} tokens a request)",
            flush=True,
        )
    return out


def measure_bare(model_dir: Path, threads: int, requests: int) -> dict:
    """The engine alone, one request at a time: TTFT and the mean gap between its tokens."""
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest
    from stratus_engine.numerics import load_verified

    # the configuration the worker serves (the start-up check's pick), as bench_e2e's bare engine
    engine = Engine(load_verified(model_dir, threads=threads).model, max_batch=max(LEVELS))
    samples = []
    for p in ["warm-up"] + prompts(requests, "bare"):
        stamps: list[float] = []
        req = GenerationRequest(
            engine.encode_chat([{"role": "user", "content": p}]),
            SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
            on_token=lambda _t, _lp, s=stamps: s.append(time.perf_counter()),
        )
        started = time.perf_counter()
        engine.generate([req])
        if p != "warm-up" and len(stamps) > 1:
            samples.append(
                {
                    "ttft": stamps[0] - started,
                    "itl": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
                    "tokens": len(stamps),
                }
            )
    out = {"c1": summarize(samples)}
    print(
        f"  {'bare engine':12s} concurrency 1: TTFT p50 {out['c1']['ttft']['p50_ms']} ms; "
        f"ITL p50 {out['c1']['itl']['p50_ms']} ms",
        flush=True,
    )
    return out


@contextmanager
def llama_server(binary: str, gguf: str, threads: int, slots: int) -> Iterator[str]:
    """llama.cpp's server on the GGUF (continuous batching, `slots` at once, 8192 positions shared)
    -> its base URL (http://127.0.0.1:port), once /health answers."""
    port = free_port()
    command = [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "-c", "8192", "-np", str(slots)]
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_llama_server(binary: str, gguf: str, threads: int, requests: int) -> dict:
    with llama_server(binary, gguf, threads, max(LEVELS)) as url:
        return measure_server(f"{url}/v1", "none", "smollm2", requests, "llama-server")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "build/models/smollm2-int8")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server (infra/bench/build_llama.py)")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--out", type=Path, default=ROOT / "build/bench")
    ap.add_argument("--without-wakes", action="store_true", help="streams only poll their chunks (stratus.wake off)")
    args = ap.parse_args()
    from stratus_engine.numerics import host_description
    from stratus_model.build import default_gguf

    threads = os.cpu_count() or 1
    os.environ.setdefault("STRATUS_LOCAL_LOG_DIR", str(args.out / "stream-logs"))
    report: dict = {
        "host": host_description(),
        "model": str(args.model),
        "threads": threads,
        "max_tokens": MAX_TOKENS,
        "wakes": not args.without_wakes,
        "results": {},
    }
    print(f"host: {report['host']}; {threads} threads; {MAX_TOKENS} new tokens, greedy", flush=True)
    settings = {"STRATUS_WAKE_PREFIX": ""} if args.without_wakes else None
    stack = start(args.model, port=free_port(), workers=1, threads=threads, environment=settings)
    try:
        report["results"]["stratus"] = measure_server(
            stack.url, stack.api_key, stack.model_id, args.requests, "stratus"
        )
    finally:
        stack.stop()
    if args.llama_server:
        report["results"]["llama-server"] = run_llama_server(
            args.llama_server, str(default_gguf()), threads, args.requests
        )
    report["results"]["bare engine"] = measure_bare(args.model, threads, args.requests)
    r = report["results"]
    ratios = {
        "itl_p50_vs_bare_engine_c1": r["stratus"]["c1"]["itl"]["p50_ms"] / r["bare engine"]["c1"]["itl"]["p50_ms"]
    }
    if "llama-server" in r:
        for c in LEVELS:
            ratios[f"ttft_p50_vs_llama_server_c{c}"] = (
                r["stratus"][f"c{c}"]["ttft"]["p50_ms"] / r["llama-server"][f"c{c}"]["ttft"]["p50_ms"]
            )
            ratios[f"itl_p50_vs_llama_server_c{c}"] = (
                r["stratus"][f"c{c}"]["itl"]["p50_ms"] / r["llama-server"][f"c{c}"]["itl"]["p50_ms"]
            )
    report["ratios"] = {k: round(v, 2) for k, v in ratios.items()}
    for k, v in report["ratios"].items():
        print(f"  {k}: {v:.2f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'stream.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
