"""Engine benchmark: our fp32/int8/int4 ONNX models vs llama.cpp on the same GGUF, same threads.

  python infra/bench/bench_engine.py --models build/models --threads 2 \
      --llama-python .venv-bench/bin/python --out build/bench

Each contender runs in its own child process (so peak RSS is its own) on a fixed ~60-token chat
prompt, greedy, 128 new tokens (EOS ignored). Figures are medians over --runs:
  ttft_s            prompt submitted -> first token, one request
  prefill_tok_s     prompt tokens / ttft
  decode_tok_s@1    (128 - 1) / (time after the first token), one request
  aggregate_tok_s@C C requests submitted together: C*128 / wall time (prefill included)
Writes engine.json and engine.png (if matplotlib is present) and prints a table with each
figure's ratio to llama.cpp. The llama.cpp side uses llama-cpp-python's low-level API: one
sequence per request in a shared batch, so batched decode is a real llama_decode over C rows.
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
CONCURRENCY = (1, 4, 16)
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for a cloud engineering team."},
    {"role": "user", "content": "Explain in a few paragraphs how a message queue helps a web service absorb bursts "
                                "of traffic, and what a dead-letter queue is for."},
]


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would carry the parent's over fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- contenders (run inside child processes) ---------------------------------------------------

def run_onnx(model: str, prompt: list[int], threads: int, runs: int) -> dict:
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest

    engine = Engine.from_dir(model, threads=threads, max_batch=max(CONCURRENCY), initial_capacity=256)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    def batch(c: int) -> tuple[float, list]:
        t = time.perf_counter()
        results = engine.generate([GenerationRequest(list(prompt), params) for _ in range(c)])
        return time.perf_counter() - t, results

    batch(1)  # warm-up: first-run allocations and kernel selection
    out = {"ttft_s": [], "decode_tok_s@1": []}
    for c in CONCURRENCY:
        out[f"aggregate_tok_s@{c}"] = []
        for _ in range(runs):
            wall, results = batch(c)
            out[f"aggregate_tok_s@{c}"].append(c * NEW_TOKENS / wall)
            if c == 1:
                r = results[0]
                out["ttft_s"].append(r.timings.ttft_s)
                out["decode_tok_s@1"].append(r.timings.decode_tokens_per_s(r.usage.completion_tokens))
    return out


def run_llama(gguf: str, prompt: list[int], threads: int, runs: int) -> dict:
    import ctypes

    import llama_cpp as L
    import numpy as np

    llm = L.Llama(model_path=gguf, n_ctx=512, n_threads=threads, verbose=False)  # loads the weights
    cp = L.llama_context_default_params()  # our own context: the high-level one allows 1 sequence
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, max(CONCURRENCY)
    cp.n_threads, cp.n_threads_batch = threads, threads
    ctx, n_vocab = L.llama_init_from_model(llm.model, cp), llm.n_vocab()

    def clear() -> None:
        mem = getattr(L, "llama_get_memory", None)
        if mem is not None:
            L.llama_memory_clear(mem(ctx), True)
        else:
            L.llama_kv_self_clear(ctx)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, want_logits)."""
        b = L.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (tok, pos, seq, want) in enumerate(entries):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0], b.logits[i] = seq, want
            b.n_tokens = len(entries)
            if L.llama_decode(ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            L.llama_batch_free(b)

    def argmax(i: int) -> int:
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))))

    def batch(c: int) -> tuple[float, float, float]:
        """C sequences: prefill each prompt (one decode call), then C-row decode steps."""
        clear()
        t0 = time.perf_counter()
        nxt = []
        for s in range(c):
            decode([(tok, p, s, p == len(prompt) - 1) for p, tok in enumerate(prompt)])
            nxt.append(argmax(len(prompt) - 1))
        t_first = time.perf_counter()
        for step in range(1, NEW_TOKENS):
            decode([(nxt[s], len(prompt) + step - 1, s, True) for s in range(c)])
            nxt = [argmax(s) for s in range(c)]
        return t0, t_first, time.perf_counter()

    batch(1)
    out = {"ttft_s": [], "decode_tok_s@1": []}
    for c in CONCURRENCY:
        out[f"aggregate_tok_s@{c}"] = []
        for _ in range(runs):
            t0, t1, t2 = batch(c)
            out[f"aggregate_tok_s@{c}"].append(c * NEW_TOKENS / (t2 - t0))
            if c == 1:
                out["ttft_s"].append(t1 - t0)
                out["decode_tok_s@1"].append((NEW_TOKENS - 1) / (t2 - t1))
    return out


# ---- driver ------------------------------------------------------------------------------------

def child(args) -> None:
    prompt = json.loads(args.prompt)
    fn = run_llama if args.child == "llama" else run_onnx
    raw = fn(args.target, prompt, args.threads, args.runs)
    med = {k: statistics.median(v) for k, v in raw.items()}
    med["prefill_tok_s"] = len(prompt) / med["ttft_s"]
    med["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps({"median": med, "runs": raw}))


def spawn(python: str, kind: str, target: str, prompt: list[int], threads: int, runs: int) -> dict:
    cmd = [python, __file__, "--child", kind, "--target", target, "--prompt", json.dumps(prompt),
           "--threads", str(threads), "--runs", str(runs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


FIGURES = ["decode_tok_s@1", "aggregate_tok_s@4", "aggregate_tok_s@16", "ttft_s", "prefill_tok_s", "peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="build/models")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--llama-python", default=None, help="python with llama-cpp-python installed")
    ap.add_argument("--quants", default="fp32,int8,int4")
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--child"), ap.add_argument("--target"), ap.add_argument("--prompt")
    args = ap.parse_args()
    if args.child:
        return child(args)

    from tokenizers import Tokenizer

    from stratus_engine.chat import render_chat
    from stratus_engine.model_dir import read_spec
    from stratus_model.build import default_gguf

    first = Path(args.models) / f"smollm2-{args.quants.split(',')[0]}"  # tokenizer only: keep this process small
    tokenizer = Tokenizer.from_file(str(first / "tokenizer.json"))
    prompt = tokenizer.encode(render_chat(read_spec(first).chat_template, MESSAGES), add_special_tokens=False).ids
    print(f"prompt {len(prompt)} tokens, {NEW_TOKENS} new tokens greedy, {args.threads} threads, {args.runs} runs")
    results = {}
    if args.llama_python:
        results["llama.cpp"] = spawn(args.llama_python, "llama", str(default_gguf()), prompt, args.threads, args.runs)
    for q in args.quants.split(","):
        results[f"onnx-{q}"] = spawn(sys.executable, "onnx", str(Path(args.models) / f"smollm2-{q}"), prompt,
                                     args.threads, args.runs)
    base = results.get("llama.cpp", {}).get("median")
    for name, r in results.items():
        if "median" in r and base:
            r["ratio_to_llama_cpp"] = {k: r["median"][k] / base[k] for k in FIGURES if base.get(k)}
    report = {"prompt_tokens": len(prompt), "new_tokens": NEW_TOKENS, "threads": args.threads, "runs": args.runs,
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=2))
    print(f"{'':12}" + "".join(f"{k:>20}" for k in FIGURES))
    for name, r in results.items():
        if "median" not in r:
            print(f"{name:12} error: {r.get('error')}")
            continue
        cells = []
        for k in FIGURES:
            ratio = r.get("ratio_to_llama_cpp", {}).get(k)
            cells.append(f"{r['median'][k]:.3g}" + (f" ({ratio:.2f}x)" if ratio and name != "llama.cpp" else ""))
        print(f"{name:12}" + "".join(f"{c:>20}" for c in cells))
    plot(report, out / "engine.png")
    print(f"wrote {out / 'engine.json'}")


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = [n for n, r in report["results"].items() if "median" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, keys, title in ((axes[0], ["decode_tok_s@1", "aggregate_tok_s@4", "aggregate_tok_s@16"], "tokens/s (higher is better)"),
                            (axes[1], ["ttft_s"], "time to first token, s (lower is better)"),
                            (axes[2], ["peak_rss_mb"], "peak RSS, MB")):
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            ax.bar([j + i * width for j in range(len(keys))], [report["results"][n]["median"][k] for k in keys], width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, "
                 f"{report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
