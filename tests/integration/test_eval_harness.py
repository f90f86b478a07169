"""EleutherAI's lm-evaluation-harness against `stratus serve` (the real SmolLM2 int8 model), as an
evaluation user runs it: `local-completions` with tokenized_requests=True (the harness tokenizes
through our /tokenize route and sends token ids with echo + logprobs), and `local-chat-completions`
for a generation task. Tasks are local YAML over JSONL this test writes; nothing is downloaded.
The harness runs from its own environment (.venv-eval, which `make test` installs).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from stratus_engine.engine import Engine
from stratus_engine.sampling import log_softmax
from test_local_stack import KEY, stack  # noqa: F401 - the running `stratus serve` (module scope)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LM_EVAL = ROOT / ".venv-eval/bin/lm_eval"

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which planet is known as the red planet?", "choices": ["Venus", "Jupiter", "Mars"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "What colour is the sky on a clear day?", "choices": ["green", "blue", "red"], "answer": 1},
]
MC_TASK = """task: stratus_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: stratus_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def run_harness(tmp: Path, model_type: str, model_args: str, task: str, *extra: str) -> tuple[dict, list[dict]]:
    """-> (the results JSON, the logged samples)"""
    if not LM_EVAL.is_file():
        pytest.fail("lm-eval is not installed: `make test` installs it into .venv-eval")
    out = tmp / f"out-{task}"
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(LM_EVAL), "--model", model_type, "--model_args", model_args, "--tasks", task,
                           "--include_path", str(tmp), "--output_path", str(out), "--log_samples", "--seed", "0",
                           *extra], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    [results] = list(out.rglob("results_*.json"))
    [samples] = list(out.rglob(f"samples_{task}_*.jsonl"))
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's own split (lm_eval.api.model._encode_pair): trailing spaces move to the
    continuation; the whole is encoded and the context's tokens cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


def test_loglikelihoods_the_harness_reports_equal_the_bare_engines(stack, real_models, tmp_path):  # noqa: F811
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "stratus_mc.yaml").write_text(MC_TASK.format(data=data))
    base = stack.url.removesuffix("/v1")
    results, samples = run_harness(
        tmp_path, "local-completions",
        f"base_url={base}/v1/completions,model={stack.model},tokenized_requests=True,tokenizer_backend=remote,"
        f"auth_token={KEY},num_concurrent=1,max_retries=1", "stratus_mc")
    model = real_models["int8"]
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    engine = Engine.from_dir(model, threads=1)
    compared, worst = 0, 0.0
    for s in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for _, a in sorted(s["arguments"].items(), key=lambda kv: int(kv[0][9:]))]
        for (context, continuation), [[ll, _greedy]] in zip(pairs, s["resps"]):
            ctx, cont = encode_pair(tok, context, continuation)
            lp = log_softmax(engine.score(ctx + cont))  # [S, V]
            expected = sum(float(lp[len(ctx) - 1 + j][t]) for j, t in enumerate(cont))
            assert abs(float(ll) - expected) < 1e-3, (context, continuation, ll, expected)
            compared, worst = compared + 1, max(worst, abs(float(ll) - expected))
    assert compared == sum(len(q["choices"]) for q in QUESTIONS)
    acc = results["results"]["stratus_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    print(f"stratus_mc: accuracy {acc:.2f} over {len(QUESTIONS)} questions; {compared} log-likelihoods within "
          f"{worst:.1e} of the bare engine's")


def test_chat_completions_run_a_generation_task(stack, tmp_path):  # noqa: F811
    data = tmp_path / "gen.jsonl"
    data.write_text(json.dumps({"question": "What is the capital of France?",
                                "target": "The capital of France is Paris."}) + "\n")
    (tmp_path / "stratus_gen.yaml").write_text(GEN_TASK.format(data=data))
    results, [sample] = run_harness(
        tmp_path, "local-chat-completions",
        f"base_url={stack.url}/chat/completions,model={stack.model},num_concurrent=1,max_retries=1",
        "stratus_gen", "--apply_chat_template")
    assert sample["resps"] == [["The capital of France is Paris."]]  # the model's greedy answer on every host
    assert results["results"]["stratus_gen"]["exact_match,none"] == 1.0

