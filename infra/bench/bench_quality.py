"""Quality of each built model: perplexity on a fixed passage and greedy agreement.

  python infra/bench/bench_quality.py --models build/models --out build/bench

Agreement is the common prefix (in tokens, of 40) between our greedy output and (a) the Hugging
Face fp32 reference in tests/fixtures/hf_reference.json, (b) our fp32 model, on 5 chat prompts.
Every graph configuration of a build is measured (int8/int4: int8 and split activations).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stratus_engine.engine import Engine
from stratus_engine.model_dir import load
from stratus_engine.numerics import configurations
from stratus_engine.quality import agreement, greedy_tokens, perplexity

ROOT = Path(__file__).resolve().parents[2]


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
    for quant, r in report.items():
        r["perplexity_vs_fp32"] = r["perplexity"] / report["fp32"]["perplexity"] - 1
        print(f"{quant:28} perplexity {r['perplexity']:.2f} ({r['perplexity_vs_fp32']:+.1%} vs fp32)  "
              f"agreement with HF {r['agreement_with_hf']}  with fp32 {r['agreement_with_fp32']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
