"""Load generators, unmodified, against the whole local stack and against llama.cpp's llama-server
on the same model, in the same run: GuideLLM, and `vllm bench serve` where it is installed.

  python infra/bench/bench_clients.py --model build/models/smollm2-int8 --llama-server PATH \
      --guidellm build/venv-clients/bin/guidellm [--vllm build/venv-vllm/bin/vllm] --out build/bench

Each tool runs as its users run it: streaming chat completions with synthetic prompts of
PROMPT_TOKENS tokens and a fixed output of OUTPUT_TOKENS tokens (the tools send max_tokens with
ignore_eos), at concurrency 1 and 8, REQUESTS requests a level, --runs runs per server (a new data
seed each run, the same seeds on both servers). Per server and level: the medians over the runs
of the tool's own TTFT and ITL medians and output tokens/s, over the runs whose answered requests
all had the output length asked; failed requests are counted beside them, with what they got.

The tools run in throwaway environments (`make bench-clients` makes them: both need PyTorch).
Writes clients.json; prints the table and the ratios to llama-server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench_stream import llama_server

from stratus_local.serve import free_port, start

ROOT = Path(__file__).resolve().parents[2]
PROMPT_TOKENS, OUTPUT_TOKENS, REQUESTS = 64, 32, 16
LEVELS = (1, 8)
FIGURES = ("ttft_ms", "itl_ms", "output_tok_s")


def run_tool(command: list[str], work: Path, env: dict | None = None) -> None:
    """Run a tool in the scratch folder; its output is shown only when it fails."""
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{Path(command[0]).name} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def guidellm(tool: str, base: str, key: str, model: str, tokenizer: Path, seed: int, work: Path) -> dict:
    """One GuideLLM run (concurrency LEVELS) -> {level: {figures, requests, errors}}."""
    out = work / f"guidellm-{seed}.json"
    command = [
        tool,
        "run",
        "--backend",
        f"kind=openai_http,target={base},api_key={key},model={model}",
        "--profile",
        f"kind=concurrent,streams={LEVELS[0]}",
        "--override",
        "profile.streams",
        ",".join(map(str, LEVELS)),
        "--constraint",
        f"kind=max_requests,count={REQUESTS}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
        "--seed",
        f"kind=static,value={seed}",
        "--tokenizer",
        f"kind=hf_auto,model={tokenizer}",
        "--output",
        f"kind=json,path={out}",
        "--disable-progress",
    ]
    run_tool(command, work)
    levels = {}
    for b in json.loads(out.read_text())["benchmarks"]:
        m = b["metrics"]
        lengths = {int(r["output_tokens"] or 0) for r in b["requests"]["successful"]}
        levels[b["config"]["strategy"]["streams"]] = {
            "ttft_ms": m["time_to_first_token_ms"]["successful"]["median"],
            "itl_ms": m["inter_token_latency_ms"]["successful"]["median"],
            "output_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
            "requests": m["request_totals"],
            "output_lengths": sorted(lengths),
        }
    return levels


def vllm_bench(tool: str, base: str, key: str, model: str, tokenizer: Path, seed: int, work: Path) -> dict:
    """One `vllm bench serve` run per level -> {level: {figures, requests, errors}}."""
    levels = {}
    for c in LEVELS:
        name = f"vllm-{seed}-c{c}.json"
        command = [
            tool,
            "bench",
            "serve",
            "--backend",
            "openai-chat",
            "--base-url",
            base,
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            model,
            "--tokenizer",
            str(tokenizer),
            "--dataset-name",
            "random",
            "--random-input-len",
            str(PROMPT_TOKENS),
            "--random-output-len",
            str(OUTPUT_TOKENS),
            "--ignore-eos",
            "--num-prompts",
            str(REQUESTS),
            "--max-concurrency",
            str(c),
            "--seed",
            str(seed),
            "--save-result",
            "--save-detailed",
            "--result-dir",
            str(work),
            "--result-filename",
            name,
        ]
        env = {**os.environ, "OPENAI_API_KEY": key, "HF_HUB_OFFLINE": "1"}  # (the tokenizer is the model's file)
        run_tool(command, work, env)
        r = json.loads((work / name).read_text())
        levels[c] = {
            "ttft_ms": r["median_ttft_ms"],
            "itl_ms": r["median_itl_ms"],
            "output_tok_s": r["output_throughput"],
            "requests": {"successful": r["completed"], "errored": r["failed"]},
            "output_lengths": sorted({n for n, e in zip(r["output_lens"], r["errors"]) if not e}),
            "errors": sorted(
                {e.strip().splitlines()[-1][:300] for e in r["errors"] if e}
            ),  # (the exceptions' last lines)
        }
    return levels


TOOLS: dict[str, Callable[..., dict]] = {"guidellm": guidellm, "vllm bench serve": vllm_bench}


def warm(base: str, key: str, model: str) -> None:
    """One request before the runs: both servers' first request pays for loading lazily."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=300).read()


def measure(tools: dict[str, str], base: str, key: str, model: str, tokenizer: Path, runs: int) -> dict:
    """Every tool's runs against one server -> {tool: {"runs": [...], "c<level>": medians}}."""
    warm(base, key, model)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in tools.items():
            results = [TOOLS[name](path, base, key, model, tokenizer, 1000 + i, Path(tmp)) for i in range(runs)]
            out[name] = {"runs": results}
            for c in LEVELS:
                good = [r[c] for r in results if r[c]["output_lengths"] == [OUTPUT_TOKENS]]
                out[name][f"c{c}"] = {f: median([g[f] for g in good]) for f in FIGURES} | {
                    "runs_as_asked": len(good),
                    "runs": len(results),
                    "failed_requests": sum(failed(r[c]) for r in results),
                }
    return out


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def failed(level: dict) -> int:
    """Requests of a run that did not succeed (errored, or cut off)."""
    return level["requests"].get("errored", 0) + level["requests"].get("incomplete", 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "build/models/smollm2-int8")
    ap.add_argument("--llama-server", required=True, help="llama.cpp's llama-server (infra/bench/build_llama.py)")
    ap.add_argument("--guidellm", required=True, help="the guidellm command")
    ap.add_argument("--vllm", default=None, help="the vllm command, for `vllm bench serve` (optional)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "build/bench")
    args = ap.parse_args()
    from stratus_engine.numerics import host_description
    from stratus_model.build import default_gguf

    threads = os.cpu_count() or 1
    tools = {"guidellm": args.guidellm} | ({"vllm bench serve": args.vllm} if args.vllm else {})
    tools = {name: str(Path(path).resolve()) for name, path in tools.items()}  # (they run in a scratch folder)
    args.model = args.model.resolve()
    os.environ.setdefault("STRATUS_LOCAL_LOG_DIR", str(args.out / "clients-logs"))
    report: dict = {
        "host": host_description(),
        "model": str(args.model),
        "threads": threads,
        "shape": {"prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "requests": REQUESTS},
        "results": {},
    }
    print(f"host: {report['host']}; {threads} threads; tools: {', '.join(tools)}", flush=True)
    stack = start(args.model, port=free_port(), workers=1, threads=threads)
    try:
        base = stack.url.removesuffix("/v1")
        report["results"]["stratus"] = measure(tools, base, stack.api_key, stack.model_id, args.model, args.runs)
    finally:
        stack.stop()
    with llama_server(args.llama_server, str(default_gguf()), threads, max(LEVELS)) as base:
        report["results"]["llama-server"] = measure(tools, base, "none", "smollm2", args.model, args.runs)
    ours, peer = report["results"]["stratus"], report["results"]["llama-server"]
    report["ratios"] = {
        f"{tool} c{c} {f}": round(mine / theirs, 2)
        for tool in tools
        for c in LEVELS
        for f in FIGURES
        if (mine := ours[tool][f"c{c}"][f]) is not None and (theirs := peer[tool][f"c{c}"][f])
    }
    for tool in tools:
        print(f"\n{tool} (medians of the runs whose answered requests all had {OUTPUT_TOKENS} tokens)")
        print(f"  {'server':13s} {'level':5s} {'TTFT ms':>8s} {'ITL ms':>7s} {'out tok/s':>9s} runs  failed requests")
        for server, r in report["results"].items():
            for c in LEVELS:
                x = r[tool][f"c{c}"]
                figures = " ".join(f"{'-' if x[f] is None else x[f]:>{w}}" for f, w in zip(FIGURES, (8, 7, 9)))
                print(
                    f"  {server:13s} c{c:<4d} {figures} {x['runs_as_asked']}/{x['runs']}  "
                    f"{x['failed_requests']} of {x['runs'] * REQUESTS}"
                )
    for k, v in report["ratios"].items():
        print(f"  stratus / llama-server, {k}: {v:.2f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clients.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'clients.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
