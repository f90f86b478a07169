"""EleutherAI's lm-evaluation-harness against `stratus serve` (the real SmolLM2 int8 model), as an
evaluation user runs it: `local-completions` with tokenized_requests=True (the harness tokenizes
through our /tokenize route and sends token ids with echo + logprobs), and `local-chat-completions`
for a generation task. Tasks are local YAML over JSONL this test writes; nothing is downloaded.
The harness runs from its own environment (.venv-eval, which `make test` installs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_local_stack import KEY, stack  # noqa: F401 - the running `stratus serve` (module scope)
from tokenizers import Tokenizer

from stratus_engine.engine import Engine
from stratus_engine.numerics import load_verified
from stratus_engine.sampling import log_softmax
from stratus_local import evaluate

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which planet is known as the red planet?", "choices": ["Venus", "Jupiter", "Mars"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "What colour is the sky on a clear day?", "choices": ["green", "blue", "red"], "answer": 1},
]
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
    try:
        return evaluate.run(model_type, model_args, KEY, tmp, task, *extra, timeout_s=600)
    except evaluate.HarnessMissing as exc:
        pytest.fail(str(exc))


def test_loglikelihoods_the_harness_reports_equal_the_bare_engines(stack, real_models, tmp_path):  # noqa: F811
    evaluate.write_mc_task(tmp_path, "stratus_mc", QUESTIONS)
    results, samples = run_harness(
        tmp_path,
        "local-completions",
        evaluate.completions_args(stack.url.removesuffix("/v1"), stack.model, KEY),
        "stratus_mc",
    )
    model = real_models["int8"]
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    engine = Engine(load_verified(model, threads=1).model)  # the configuration the stack's worker serves
    compared, worst = 0, 0.0
    for s in samples:
        for (context, continuation), [[ll, _greedy]] in zip(evaluate.request_pairs(s), s["resps"]):
            ctx, cont = evaluate.encode_pair(tok, context, continuation)
            lp = log_softmax(engine.score(ctx + cont))  # [S, V]
            expected = sum(float(lp[len(ctx) - 1 + j][t]) for j, t in enumerate(cont))
            assert abs(float(ll) - expected) < 1e-3, (context, continuation, ll, expected)
            compared, worst = compared + 1, max(worst, abs(float(ll) - expected))
    assert compared == sum(len(q["choices"]) for q in QUESTIONS)
    acc = results["results"]["stratus_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    print(
        f"stratus_mc: accuracy {acc:.2f} over {len(QUESTIONS)} questions; {compared} log-likelihoods within "
        f"{worst:.1e} of the bare engine's"
    )


def test_chat_completions_run_a_generation_task(stack, tmp_path):  # noqa: F811
    data = tmp_path / "gen.jsonl"
    data.write_text(
        json.dumps({"question": "What is the capital of France?", "target": "The capital of France is Paris."}) + "\n"
    )
    (tmp_path / "stratus_gen.yaml").write_text(GEN_TASK.format(data=data))
    results, [sample] = run_harness(
        tmp_path,
        "local-chat-completions",
        f"base_url={stack.url}/chat/completions,model={stack.model},num_concurrent=1,max_retries=1",
        "stratus_gen",
        "--apply_chat_template",
    )
    assert sample["resps"] == [["The capital of France is Paris."]]  # the model's greedy answer on every host
    assert results["results"]["stratus_gen"]["exact_match,none"] == 1.0
