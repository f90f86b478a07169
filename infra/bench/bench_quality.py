"""Quality of each built model: perplexity on a fixed passage and greedy agreement.

  python infra/bench/bench_quality.py --models build/models --out build/bench

Agreement is the common prefix (in tokens, of 40) between our greedy output and (a) the Hugging
Face fp32 reference in tests/fixtures/hf_reference.json, (b) our fp32 model, on 5 chat prompts.
Every graph configuration of a build is measured (int8/int4: int8 and split activations).

Harness accuracy: EleutherAI's lm-evaluation-harness (local-completions, token ids through our
/tokenize) against `stratus serve` running each build, on a multiple-choice task written here
(QUESTIONS: arithmetic, capitals, opposites; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from stratus_engine.engine import Engine
from stratus_engine.model_dir import load
from stratus_engine.numerics import configurations
from stratus_engine.quality import agreement, greedy_tokens, perplexity

ROOT = Path(__file__).resolve().parents[2]
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Cuba": "Havana",
    "Sweden": "Stockholm",
    "China": "Beijing",
    "Thailand": "Bangkok",
}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "open": "closed",
    "early": "late",
    "light": "dark",
    "full": "empty",
    "happy": "sad",
    "old": "young",
}


def questions(seed: int = 0) -> list[dict]:
    """60 fixed multiple-choice questions (the same on every run)."""
    rng, out = random.Random(seed), []
    for _ in range(30):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        choices = [str(a + b), str(a + b + 1), str(a + b - 2), str(a + b + 10)]
        out.append({"question": f"What is {a} + {b}?", "choices": choices, "answer": 0})
    cities = sorted(CAPITALS.values())
    for country, city in CAPITALS.items():
        out.append(
            {
                "question": f"What is the capital of {country}?",
                "choices": [city] + rng.sample([c for c in cities if c != city], 3),
                "answer": 0,
            }
        )
    words = sorted(OPPOSITES.values())
    for word, opposite in OPPOSITES.items():
        out.append(
            {
                "question": f"What is the opposite of {word}?",
                "choices": [opposite] + rng.sample([w for w in words if w != opposite], 2),
                "answer": 0,
            }
        )
    for q in out:  # the right answer in a seeded position
        k = rng.randrange(len(q["choices"]))
        q["choices"][0], q["choices"][k] = q["choices"][k], q["choices"][0]
        q["answer"] = k
    return out


def harness_accuracy(model: Path, threads: int | None) -> dict:
    """Start `stratus serve` on `model` (1 worker) and run the harness on QUESTIONS -> acc."""
    from stratus_local import evaluate
    from stratus_local.serve import free_port, start

    stack = start(model, port=free_port(), workers=1, threads=threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            qs = questions()
            evaluate.write_mc_task(Path(tmp), "stratus_quality", qs)
            results, _ = evaluate.run(
                "local-completions",
                evaluate.completions_args(stack.url.removesuffix("/v1"), stack.model_id, stack.api_key),
                stack.api_key,
                Path(tmp),
                "stratus_quality",
            )
        r = results["results"]["stratus_quality"]
        return {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "questions": len(qs)}
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="build/models")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    ref = json.loads((ROOT / "tests/fixtures/hf_reference.json").read_text())
    prompts = [p["prompt_ids"] for p in ref["prompts"]]
    report, fp32 = {}, None
    for quant in ("fp32", "int8", "int4"):
        model = Path(args.models) / f"smollm2-{quant}"
        for conf in configurations(model):
            name = quant if conf.name == "default" else f"{quant} {conf.name}"
            engine = Engine(load(model, threads=args.threads, graph=conf.graph))
            tokens = greedy_tokens(engine, prompts, 40)
            fp32 = fp32 or tokens
            report[name] = {
                "perplexity": perplexity(engine),
                "agreement_with_hf": [agreement(a, p["greedy_ids"]) for a, p in zip(tokens, ref["prompts"])],
                "agreement_with_fp32": [agreement(a, b) for a, b in zip(tokens, fp32)],
            }
    harness = {
        quant: harness_accuracy(Path(args.models) / f"smollm2-{quant}", args.threads)
        for quant in ("fp32", "int8", "int4")
    }  # each build as a worker serves it
    for name, r in report.items():
        r["perplexity_vs_fp32"] = r["perplexity"] / report["fp32"]["perplexity"] - 1
        print(
            f"{name:28} perplexity {r['perplexity']:.2f} ({r['perplexity_vs_fp32']:+.1%} vs fp32)  "
            f"agreement with HF {r['agreement_with_hf']}  with fp32 {r['agreement_with_fp32']}"
        )
    for quant, h in harness.items():
        print(
            f"{quant:28} lm-eval accuracy {h['acc']:.3f} ± {h['acc_stderr']:.3f} ({h['questions']} questions, "
            "stratus serve)"
        )
    report = {"configurations": report, "harness_accuracy": harness}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
