"""Engine benchmark: our fp32/int8/int4 ONNX models (each graph configuration) vs llama.cpp on the
same GGUF, same threads, on this host (its CPU and SIMD features are recorded beside the figures).

  python infra/bench/bench_engine.py --models build/models --threads 2 \
      --llama-bench build/llama/.../bin/llama-batched-bench --out build/bench

Each contender runs in its own child process (so peak RSS is its own) on a fixed ~60-token chat
prompt, greedy, 128 new tokens (EOS ignored). Each ONNX configuration is also run through the
golden-output check (stratus_engine.numerics): `text` says whether a worker here would serve it.
Figures are medians over --runs (peak_rss_mb: the whole process, start-up included; our
configurations also report peak_rss_mb@1, the peak through start-up, the check and the one-request
runs, and rss_end_mb, what the process holds after its runs):
  ttft_s            prompt submitted -> first token, one request
  prefill_tok_s     prompt tokens / ttft
  decode_tok_s@1    (128 - 1) / (time after the first token), one request
  aggregate_tok_s@C C requests submitted together: C*128 / wall time (prefill included)
Writes engine.json and engine.png (if matplotlib is present) and prints a table with each
figure's ratio to llama.cpp. The llama.cpp side is its own `llama-batched-bench` (C sequences,
each with its own copy of the prompt, decoded together): ttft = its prompt time at C=1, decode =
its generation speed at C=1, aggregate = C*128 / its total time (prompts included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

NEW_TOKENS = 128
CONCURRENCY = "1,4,16"  # --concurrency: the request counts submitted together (1 also gives TTFT and decode)
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a cloud engineering team."},
    {
        "role": "user",
        "content": "Explain in a few paragraphs how a message queue helps a web service absorb bursts "
        "of traffic, and what a dead-letter queue is for.",
    },
]


def peak_rss_mb(field: str = "VmHWM") -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would carry the parent's over fork), or
    with field="VmRSS" what it holds now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- contenders (run inside child processes) ---------------------------------------------------


def run_onnx(target: str, prompt: list[int], threads: int, runs: int, levels: list[int]) -> dict:
    """target: "<model dir>:<configuration>" (see stratus_engine.numerics)."""
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest
    from stratus_engine.numerics import configurations, host_description, load_checked, read_golden

    model, _, name = target.rpartition(":")
    conf = next(c for c in configurations(Path(model)) if c.name == name)
    # checked as a worker would, and benchmarked whatever the verdict (the table says which text is right)
    loaded, check = load_checked(Path(model), conf, read_golden(Path(model)), threads)
    engine = Engine(loaded, max_batch=max(levels), initial_capacity=256)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    def batch(c: int) -> tuple[float, list]:
        t = time.perf_counter()
        results = engine.generate([GenerationRequest(list(prompt), params) for _ in range(c)])
        return time.perf_counter() - t, results

    batch(1)  # warm-up: first-run allocations and kernel selection
    out = {"ttft_s": [], "decode_tok_s@1": []}
    for c in levels:
        out[f"aggregate_tok_s@{c}"] = []
        for _ in range(runs):
            wall, results = batch(c)
            out[f"aggregate_tok_s@{c}"].append(c * NEW_TOKENS / wall)
            if c == 1:
                r = results[0]
                out["ttft_s"].append(r.timings.ttft_s)
                out["decode_tok_s@1"].append(r.timings.decode_tokens_per_s(r.usage.completion_tokens))
        if c == 1:  # start-up, the check and one request at a time (the figure a one-at-a-time worker sees)
            out["peak_rss_mb@1"] = [peak_rss_mb()]
    out["text_right"] = [float(check.passed)]
    out["max_logprob_error"] = [check.max_logprob_error]
    out["rss_end_mb"] = [peak_rss_mb("VmRSS")]  # (held after the runs, the engine alive; the peak includes start-up)
    return out, host_description(loaded.providers)


def run_llama(binary: str, gguf: str, prompt_tokens: int, threads: int, runs: int, levels: list[int]) -> dict:
    """llama-batched-bench, once per run, all concurrencies in one call (it prints JSON lines)."""
    out: dict[str, list[float]] = {"ttft_s": [], "decode_tok_s@1": [], "peak_rss_mb": []}
    for _ in range(runs):
        cmd = [
            "/usr/bin/time",
            "-f",
            "maxrss_kb=%M",
            binary,
            "-m",
            gguf,
            "-c",
            "8192",
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            str(prompt_tokens),
            "-ntg",
            str(NEW_TOKENS),
            "-npl",
            ",".join(map(str, levels)),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "--output-format",
            "jsonl",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                c = int(row["pl"])
                out.setdefault(f"aggregate_tok_s@{c}", []).append(c * NEW_TOKENS / row["t"])
                if c == 1:
                    out["ttft_s"].append(row["t_pp"])
                    out["decode_tok_s@1"].append(row["speed_tg"])
        rss = [ln for ln in proc.stderr.splitlines() if ln.startswith("maxrss_kb=")]
        out["peak_rss_mb"].append(int(rss[-1].split("=")[1]) / 1024 if rss else 0.0)
    return out


# ---- driver ------------------------------------------------------------------------------------


def child(args) -> None:
    prompt = json.loads(args.prompt)
    raw, host = run_onnx(args.target, prompt, args.threads, args.runs, levels(args))
    print(json.dumps({**summarize(raw, len(prompt), peak_rss_mb()), "host": host}))


def summarize(raw: dict, prompt_tokens: int, rss_mb: float | None = None) -> dict:
    med = {k: statistics.median(v) for k, v in raw.items()}
    med["prefill_tok_s"] = prompt_tokens / med["ttft_s"]
    if rss_mb is not None:
        med["peak_rss_mb"] = rss_mb
    return {"median": med, "runs": raw}


def spawn(target: str, prompt: list[int], args) -> dict:
    threads = args.threads
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "onnx",
        "--target",
        target,
        "--prompt",
        json.dumps(prompt),
        "--threads",
        str(threads),
        "--runs",
        str(args.runs),
        "--concurrency",
        args.concurrency,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def levels(args) -> list[int]:
    return sorted({1, *map(int, args.concurrency.split(","))})


def figures(args) -> list[str]:
    return [
        "decode_tok_s@1",
        *(f"aggregate_tok_s@{c}" for c in levels(args) if c > 1),
        "ttft_s",
        "prefill_tok_s",
        "peak_rss_mb",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="build/models")
    ap.add_argument(
        "--model", default="smollm2", help="which PyPI model's builds (<models>/<model>-<quant>): smollm2, gemma3-270m"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-batched-bench (infra/bench/build_llama.py)")
    ap.add_argument("--quants", default="fp32,int8,int4")
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--concurrency", default=CONCURRENCY, help="comma-separated request counts, e.g. 1,16,64")
    ap.add_argument("--child"), ap.add_argument("--target"), ap.add_argument("--prompt")
    args = ap.parse_args()
    if args.child:
        return child(args)

    from tokenizers import Tokenizer

    from stratus.chat_template import render_chat
    from stratus_engine.model_dir import read_spec
    from stratus_engine.numerics import configurations, host_description
    from stratus_model.build import pypi_gguf

    first = Path(args.models) / f"{args.model}-{args.quants.split(',')[0]}"  # tokenizer only: keep this process small
    tokenizer = Tokenizer.from_file(str(first / "tokenizer.json"))
    template = read_spec(first).chat_template
    if template:
        prompt = tokenizer.encode(render_chat(template, MESSAGES), add_special_tokens=False).ids
    else:  # a base model: the same words as text to continue, its tokenizer's BOS first
        prompt = tokenizer.encode("\n\n".join(m["content"] for m in MESSAGES), add_special_tokens=True).ids
    host = host_description()
    print(f"host: {host}")
    print(f"prompt {len(prompt)} tokens, {NEW_TOKENS} new tokens greedy, {args.threads} threads, {args.runs} runs")
    results = {}
    if args.llama_bench:
        raw = run_llama(
            args.llama_bench, str(pypi_gguf(args.model)), len(prompt), args.threads, args.runs, levels(args)
        )
        rss = raw.pop("peak_rss_mb")
        results["llama.cpp"] = summarize(raw, len(prompt), statistics.median(rss))
    for q in args.quants.split(","):
        model = Path(args.models) / f"{args.model}-{q}"
        for conf in configurations(model):
            name = f"{q}" + ("" if conf.name == "default" else f" {conf.name}")
            results[name] = spawn(f"{model}:{conf.name}", prompt, args)
    base = results.get("llama.cpp", {}).get("median")
    shown = figures(args)
    for r in results.values():
        if "median" in r and base:
            r["ratio_to_llama_cpp"] = {k: r["median"][k] / base[k] for k in shown if base.get(k)}
    report = {
        "model": args.model,
        "host": host,
        "prompt_tokens": len(prompt),
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "runs": args.runs,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "engine" if args.model == "smollm2" else f"engine-{args.model}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(f"{'':28}" + "".join(f"{k:>20}" for k in shown) + "   text (golden check)")
    for name, r in results.items():
        if "median" not in r:
            print(f"{name:28} error: {r.get('error')}")
            continue
        cells = []
        for k in shown:
            ratio = r.get("ratio_to_llama_cpp", {}).get(k)
            cells.append(f"{r['median'][k]:.3g}" + (f" ({ratio:.2f}x)" if ratio and name != "llama.cpp" else ""))
        med = r["median"]
        text = (
            ""
            if "text_right" not in med
            else (f"{'right' if med['text_right'] else 'WRONG'} (max logprob error {med['max_logprob_error']:.3f})")
        )
        if "peak_rss_mb@1" in med:
            text += f", peak {med['peak_rss_mb@1']:.0f} MB serving one at a time"
        if "rss_end_mb" in med:
            text += f", {med['rss_end_mb']:.0f} MB resident after"
        where = f"   on {r['host']}" if r.get("host", host) != host else ""
        print(f"{name:28}" + "".join(f"{c:>20}" for c in cells) + f"   {text}{where}")
    plot(report, out / f"{stem}.png", shown)
    print(f"wrote {out / stem}.json")


def plot(report: dict, path: Path, keys_shown: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = [n for n, r in report["results"].items() if "median" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, keys, title in (
        (axes[0], [k for k in keys_shown if "tok_s@" in k], "tokens/s (higher is better)"),
        (axes[1], ["ttft_s"], "time to first token, s (lower is better)"),
        (axes[2], ["peak_rss_mb"], "peak RSS, MB"),
    ):
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar(
                [j + i * width for j in range(len(keys))],
                [report["results"][n]["median"][k] for k in keys],
                width,
                label=n,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{report['model']}, {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, "
        f"{report['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
