"""Shared-prefix reuse benchmark: 16 chat requests sharing a ~500-token system prompt, each with a
different short question, submitted together to the engine, with and without prefix reuse.

  python infra/bench/bench_prefix.py --model build/models/smollm2-int8 --threads 2 --out build/bench

Each mode runs in its own engine. With reuse, run 1 starts from an empty prefix cache (the first
request prefills the system prompt, the other 15 wait for it and reuse it: "cold"); later runs find
it stored ("warm"), as a worker does once the prompt has been seen. Greedy, 32 new tokens (EOS
ignored). Figures are medians over --runs (warm runs for reuse):
  ttft_p50_s, ttft_p90_s    submitted -> first token, over the 16 requests
  aggregate_tok_s           16 * 32 / wall time (prefill included)
Also checks that every request's tokens are the same with and without reuse. Writes prefix.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import report as report_file  # infra/bench/report.py

NEW_TOKENS, REQUESTS = 32, 16
RULES = [
    "Answer in plain English and keep every answer under three sentences unless the user asks for more.",
    "When a question is about cloud infrastructure, name the managed service that solves it and say why.",
    "Never invent numbers: if a figure is needed and not given, say what would have to be measured.",
    "Prefer queues for absorbing bursts, caches for repeated reads, and batch jobs for work that can wait.",
    "When the user shares logs, quote the one line that explains the failure before suggesting a fix.",
    "Security first: keys are stored hashed, tenants are isolated, and permissions are the least needed.",
    "If two options are equally good, pick the one with fewer moving parts and explain the trade-off.",
    "Costs matter: mention when an idle resource still bills, and how to scale it to zero if possible.",
]
SYSTEM = (
    "You are the on-call assistant of a small platform team that runs language-model inference "
    "on AWS without servers. Follow these rules. "
    + " ".join(f"Rule {i + 1}: {r}" for i, r in enumerate(RULES * 2 + RULES[:4]))
)
QUESTIONS = [
    "What is a dead-letter queue?",
    "How do I cache API responses?",
    "Why is my Lambda slow to start?",
    "What does SQS visibility timeout do?",
    "How should I store API keys?",
    "What is DynamoDB TTL for?",
    "When do I need a GPU?",
    "How do I scale a worker pool?",
    "What is a cache hit ratio?",
    "Why use a job store?",
    "How can batch work wait?",
    "What is least privilege?",
    "How do I stream responses?",
    "What is an idempotent write?",
    "How do I read a stack trace?",
    "What makes a good alarm?",
]


def run(model: Path, threads: int, prefix_bytes: int, runs: int) -> dict:
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest
    from stratus_engine.model_dir import load

    engine = Engine(load(model, threads=threads), max_batch=REQUESTS, prefix_cache_bytes=prefix_bytes)
    prompts = [
        engine.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]) for q in QUESTIONS
    ]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    engine.generate([GenerationRequest(engine.encode("warm up"), SamplingParams(max_tokens=2, temperature=0))])
    out = {"ttft_p50_s": [], "ttft_p90_s": [], "aggregate_tok_s": []}
    tokens = None
    for _ in range(runs + (1 if prefix_bytes else 0)):
        t = time.perf_counter()
        results = engine.generate([GenerationRequest(p, params) for p in prompts])
        wall = time.perf_counter() - t
        ttfts = sorted(r.timings.ttft_s for r in results)
        sample = {
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
            "aggregate_tok_s": REQUESTS * NEW_TOKENS / wall,
        }
        if prefix_bytes and "cold" not in out:
            out["cold"] = sample  # the first run found nothing stored
        else:
            for k, v in sample.items():
                out[k].append(v)
        tokens = [r.token_ids for r in results]
    med = {k: statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    report = {
        "median": med,
        "runs": {k: v for k, v in out.items() if k != "cold"},
        "prompt_tokens": [len(p) for p in prompts],
        "tokens": tokens,
    }
    if "cold" in out:
        report["cold"] = out["cold"]
    if engine.prefixes:
        report["prefix_cache"] = engine.prefixes.report()
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/smollm2-int8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefix-mb", type=int, default=256)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    from stratus_engine.numerics import host_description

    host = host_description()
    without = run(Path(args.model), args.threads, 0, args.runs)
    with_reuse = run(Path(args.model), args.threads, args.prefix_mb << 20, args.runs)
    same = without.pop("tokens") == with_reuse.pop("tokens")
    a, b = without["median"], with_reuse["median"]
    ratio = {
        "ttft_p50": a["ttft_p50_s"] / b["ttft_p50_s"],
        "aggregate_tok_s": b["aggregate_tok_s"] / a["aggregate_tok_s"],
    }
    report = {
        "host": host,
        "model": Path(args.model).name,
        "requests": REQUESTS,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "without_reuse": without,
        "with_reuse": with_reuse,
        "ttft_p50_lower_by": ratio["ttft_p50"],
        "aggregate_higher_by": ratio["aggregate_tok_s"],
        "same_tokens": same,
    }
    print(f"host: {host}")
    print(
        f"{REQUESTS} requests, prompts {min(without['prompt_tokens'])}-{max(without['prompt_tokens'])} tokens "
        f"(shared system prompt), {NEW_TOKENS} new tokens greedy, medians of {args.runs} runs"
    )
    for name, r in (("without reuse", without), ("with reuse (warm)", with_reuse)):
        m = r["median"]
        print(
            f"  {name:20} TTFT p50 {m['ttft_p50_s'] * 1000:7.0f} ms  p90 {m['ttft_p90_s'] * 1000:7.0f} ms  "
            f"aggregate {m['aggregate_tok_s']:6.1f} tok/s"
        )
    cold = with_reuse["cold"]
    print(
        f"  {'with reuse (cold)':20} TTFT p50 {cold['ttft_p50_s'] * 1000:7.0f} ms  p90 "
        f"{cold['ttft_p90_s'] * 1000:7.0f} ms  aggregate {cold['aggregate_tok_s']:6.1f} tok/s"
    )
    print(
        f"  TTFT p50 {ratio['ttft_p50']:.1f}x lower with reuse (target >= 3x); aggregate {ratio['aggregate_tok_s']:.2f}x;"
        f" tokens {'the same' if same else 'DIFFERENT'} with and without; cache {with_reuse['prefix_cache']}"
    )
    report_file.write(args.out, "prefix", report)


if __name__ == "__main__":
    main()
