"""The engine on a genuine Hugging Face Optimum export (standard attention, concat cache).

tests/fixtures/optimum_tiny comes from infra/model/reference/optimum_tiny.py: a seeded tiny Llama
exported by optimum-onnx, with PyTorch's greedy tokens. Its vocabulary size matches our tiny
tokenizer, which the test supplies (the engine needs a tokenizer.json to load a directory).
"""

import json
import shutil
from pathlib import Path

import pytest

from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.kv_cache import ConcatCache
from stratus_model.source import GGUFSource
from stratus_model.tokenizer import build_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/optimum_tiny"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def optimum_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("optimum") / "model"
    shutil.copytree(FIXTURE, d)
    build_tokenizer(GGUFSource(tiny.gguf).tokenizer).save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def engine(optimum_dir):
    return Engine.from_dir(optimum_dir, threads=1)


def test_loads_optimum_config_and_picks_the_concat_cache(engine):
    assert isinstance(engine.cache, ConcatCache)
    s = engine.spec
    assert (s.num_layers, s.num_kv_heads, s.head_dim, s.vocab_size, s.context_length) == (2, 2, 8, 267, 256)
    assert s.eos_token_ids == (2,)


def test_greedy_equals_pytorch_one_at_a_time(engine):
    for prompt, ref in zip(REFERENCE["prompts"], REFERENCE["greedy"]):
        assert engine.generate([GenerationRequest(prompt, greedy(len(ref)))])[0].token_ids == ref


def test_greedy_equals_pytorch_batched_with_joins_and_leaves(engine):
    # Given rows of different lengths (masked holes in a shared cache width), one joining late and
    # one leaving early, every row still equals PyTorch's greedy continuation.
    (p0, p1, p2), (r0, r1, r2) = REFERENCE["prompts"], REFERENCE["greedy"]
    first = [engine.submit(GenerationRequest(p0, greedy(len(r0)))), engine.submit(GenerationRequest(p1, greedy(7)))]
    for _ in range(3):
        engine.step()
    late = engine.submit(GenerationRequest(p2, greedy(len(r2))))
    engine.step()
    assert engine.num_running == 3
    while not all(f.done() for f in first + [late]):
        engine.step()
    assert first[0].result().token_ids == r0
    assert first[1].result().token_ids == r1[:7]
    assert late.result().token_ids == r2
    assert engine.num_running == 0 and engine.cache.valid.shape[0] == 0


def test_n_choices_and_echo_on_the_concat_cache(engine):
    # n > 1 copies the prefilled row by appending it; an echo prompt is prefilled on its own
    (p0, p1, _), (r0, r1, _) = REFERENCE["prompts"], REFERENCE["greedy"]
    n3 = SamplingParams(max_tokens=len(r0), temperature=0, ignore_eos=True, n=3)
    echo = SamplingParams(max_tokens=len(r1), temperature=0, ignore_eos=True, echo=True, logprobs=1)
    got = engine.generate([GenerationRequest(p0, n3), GenerationRequest(p1, echo)])
    assert [c.token_ids for c in got[0].choices] == [r0] * 3
    assert got[1].token_ids == r1 and len(got[1].prompt_logprobs) == len(p1)
    assert engine.num_running == 0 and engine.cache.valid.shape[0] == 0
