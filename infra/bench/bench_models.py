"""Two models in one local stack: does one model's batch backlog delay the other's interactive
requests? Each model has its own queues and workers (stratus_local.fleets), so it should not,
except for what the two workers' share of the host's cores costs.

  python infra/bench/bench_models.py --models build/models/smollm2-int8 build/models/gemma3-270m-int8 \
      --lines 200 --out build/bench

The first model takes interactive chats (REQUESTS, one at a time, distinct, greedy, 16 new
tokens): first with nothing else running (idle), then while a batch file of --lines completions
for the second model drains (then cancelled, and its worker left to go idle). --runs rounds of
both; prints each round's p50s, their ratio, and the median ratio; writes models.json. Each worker
gets one thread (one core each on a 2-core host; the gateway, functions and moto share them).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

from stratus_local.serve import free_port, start

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 20


def interactive(client, model: str, tag: str, n: int = REQUESTS) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"[{tag} {i}] Name one animal that lives in the sea."}],
            max_tokens=16,
            temperature=0,
        )
        out.append(time.perf_counter() - started)
    return out


def backlog(client, model: str, lines: int, tag: str) -> str:
    """A batch file of `lines` completions for `model` -> its batch id (created, draining)."""
    text = "\n".join(
        json.dumps(
            {
                "custom_id": f"l{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": model,
                    "prompt": f"[{tag}] Item {i}: a short story about",
                    "max_tokens": 32,
                    "seed": i,
                },
            }
        )
        for i in range(lines)
    )
    upload = client.files.create(file=("backlog.jsonl", io.BytesIO(text.encode())), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h").id


def one_round(client, chat_model: str, batch_model: str, lines: int, r: int) -> dict:
    idle = interactive(client, chat_model, f"idle {r}")
    batch_id = backlog(client, batch_model, lines, f"round {r}")  # (new lines each round: no cache hits)
    while client.batches.retrieve(batch_id).request_counts.completed < 5:  # its worker is busy
        time.sleep(0.5)
    loaded = interactive(client, chat_model, f"loaded {r}")
    done = client.batches.retrieve(batch_id).request_counts.completed
    client.batches.cancel(batch_id)
    while client.batches.retrieve(batch_id).status != "cancelled":  # its queued lines are dropped
        time.sleep(0.5)
    time.sleep(2)  # (the line its worker was generating)
    out = {
        "idle_p50_s": round(statistics.median(idle), 4),
        "with_backlog_p50_s": round(statistics.median(loaded), 4),
        "batch_lines_done_meanwhile": done,
    }
    out["ratio"] = round(out["with_backlog_p50_s"] / out["idle_p50_s"], 2)
    print(
        f"round {r + 1}: {chat_model} interactive p50 idle {out['idle_p50_s'] * 1000:.0f} ms, beside {lines} "
        f"batch lines of {batch_model} {out['with_backlog_p50_s'] * 1000:.0f} ms ({out['ratio']:.2f}x; "
        f"{done} lines done meanwhile)",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, nargs=2, required=True, help="the interactive model, then the batch one")
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "build/bench")
    args = ap.parse_args()
    from openai import OpenAI

    from stratus_engine.numerics import host_description

    stack = start(list(args.models), port=free_port(), workers=1, threads=1)
    report: dict = {"host": host_description(), "lines": args.lines, "requests": REQUESTS}
    try:
        client = OpenAI(base_url=stack.url, api_key=stack.api_key, max_retries=0, timeout=300)
        chat_model, batch_model = stack.model_ids
        report |= {"interactive_model": chat_model, "batch_model": batch_model}
        interactive(client, chat_model, "warm-up", 2)
        print(f"host: {report['host']}", flush=True)
        report["runs"] = [one_round(client, chat_model, batch_model, args.lines, r) for r in range(args.runs)]
        report["median_ratio"] = statistics.median(r["ratio"] for r in report["runs"])
    finally:
        stack.stop()
    print(f"median ratio over {args.runs} rounds: {report['median_ratio']:.2f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'models.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
