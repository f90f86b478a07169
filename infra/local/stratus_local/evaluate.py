"""EleutherAI's lm-evaluation-harness against a running Stratus (`stratus serve`, or a deployment):
local task YAML over JSONL written here, so the harness downloads nothing. Used by the harness
test and `make bench-quality`; the harness itself lives in its own environment (.venv-eval).

  write_mc_task(dir, name, questions)      a multiple-choice task: {"question", "choices", "answer"}
  run(base_url, model, key, dir, task)     -> (results JSON, logged samples)
  encode_pair(tokenizer, context, cont)    how the harness splits a request into token ids
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LM_EVAL = ROOT / ".venv-eval/bin/lm_eval"

MC_TASK = """task: {name}
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


class HarnessMissing(Exception):
    pass


def write_mc_task(folder: Path, name: str, questions: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / f"{name}.yaml").write_text(MC_TASK.format(name=name, data=data))


def completions_args(base_url: str, model: str, key: str) -> str:
    """local-completions, tokenizing through our /tokenize and sending token ids (echo + logprobs)."""
    return (
        f"base_url={base_url}/v1/completions,model={model},tokenized_requests=True,tokenizer_backend=remote,"
        f"auth_token={key},num_concurrent=1,max_retries=1"
    )


def run(
    model_type: str, model_args: str, key: str, folder: Path, task: str, *extra: str, timeout_s: float = 1800
) -> tuple[dict, list[dict]]:
    """Run the harness on `task` (a YAML in `folder`) -> (results JSON, the logged samples)."""
    if not LM_EVAL.is_file():
        raise HarnessMissing(
            f"{LM_EVAL} is missing: `make test` (or `make {LM_EVAL.parent.parent.name}/.installed`) "
            "installs lm-eval[api] there"
        )
    out = folder / f"out-{task}"
    env = {
        **os.environ,
        "OPENAI_API_KEY": key,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [
            str(LM_EVAL),
            "--model",
            model_type,
            "--model_args",
            model_args,
            "--tasks",
            task,
            "--include_path",
            str(folder),
            "--output_path",
            str(out),
            "--log_samples",
            "--seed",
            "0",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    [results] = list(out.rglob("results_*.json"))
    [samples] = list(out.rglob(f"samples_{task}_*.jsonl"))
    return json.loads(results.read_text()), [json.loads(line) for line in samples.read_text().splitlines()]


def request_pairs(sample: dict) -> list[tuple[str, str]]:
    """A logged multiple-choice sample -> its (context, continuation) requests, in choice order."""
    args = sorted(sample["arguments"].items(), key=lambda kv: int(kv[0].removeprefix("gen_args_")))
    return [(a["arg_0"], a["arg_1"]) for _, a in args]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's own split (lm_eval.api.model._encode_pair): trailing spaces move to the
    continuation; the whole is encoded and the context's tokens cut off (no special tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx) :]
