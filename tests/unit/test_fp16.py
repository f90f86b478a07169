"""Builds for CUDA workers, checked on the CPU: fp16 (float16 activations and KV cache, float32
logits) and fp16-attn (float32 but attention and the KV cache)."""

import numpy as np
import onnx
import pytest

from stratus.errors import ModelBuildError
from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.numerics import load_verified
from stratus_model.build import build_from_gguf

PROMPTS = [[1, 40 + 7 * i, 90 + i, 120 + 3 * i][: 2 + i % 3] for i in range(6)]


@pytest.fixture(scope="module")
def fp16(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "int4-fp16"
    manifest = build_from_gguf(tiny.gguf, "int4", out, activations="fp16")
    return out, manifest


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_the_fp16_build_keeps_a_float16_cache_and_float32_logits(fp16):
    out, manifest = fp16
    assert manifest["activations"] == "fp16" and manifest["model_id"].endswith("-int4-fp16")
    engine = Engine.from_dir(out, threads=1)
    assert engine.model.kv_dtype is np.float16
    assert engine.score([1, 40, 90]).dtype == np.float32


def test_fp16_generates_what_the_fp32_activation_build_does(fp16, tiny):
    e32 = Engine.from_dir(tiny.dirs["int4"], threads=1)
    e16 = Engine.from_dir(fp16[0], threads=1)
    np.testing.assert_allclose(e16.score(PROMPTS[0]), e32.score(PROMPTS[0]), atol=0.25)
    ref = [r.token_ids for r in e32.generate([GenerationRequest(p, greedy(16)) for p in PROMPTS])]
    got = [r.token_ids for r in e16.generate([GenerationRequest(p, greedy(16)) for p in PROMPTS])]
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    assert same >= 0.9 * 16 * len(PROMPTS)


def test_fp16_rows_are_the_same_alone_or_batched_and_survive_cache_growth(fp16):
    engine = Engine.from_dir(fp16[0], threads=1, max_batch=8, initial_capacity=4)  # grows 4 -> 64
    batched = [r.token_ids for r in engine.generate([GenerationRequest(p, greedy(24)) for p in PROMPTS])]
    alone = [engine.generate([GenerationRequest(p, greedy(24))])[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_unknown_activation_types_are_refused(tiny, tmp_path):
    with pytest.raises(ModelBuildError, match="activations must be one of fp32, fp16-attn, fp16"):
        build_from_gguf(tiny.gguf, "int4", tmp_path / "x", activations="bf16")


@pytest.fixture(scope="module")
def fp16_attn(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16-attn") / "int4-fp16-attn"
    return out, build_from_gguf(tiny.gguf, "int4", out, activations="fp16-attn")


def test_the_fp16_attn_build_is_float32_but_attention_and_its_cache(fp16_attn):
    out, manifest = fp16_attn
    assert manifest["model_id"].endswith("-int4-fp16-attn")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in graph.graph.initializer}
    assert types["model.embed_tokens.gather_scales"] == onnx.TensorProto.FLOAT  # the residual stream's type
    assert types["cos_cache"] == onnx.TensorProto.FLOAT16  # attention's
    casts = [n for n in graph.graph.node if n.op_type == "Cast" and "/attn/" in n.name]
    layers = sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
    assert len(casts) == 2 * layers  # into attention and out of it, each layer
    assert Engine.from_dir(out, threads=1).model.kv_dtype is np.float16


def test_fp16_attn_keeps_the_split_configuration_and_passes_on_the_cpu(fp16_attn):
    out, manifest = fp16_attn
    assert [c["name"] for c in manifest["configurations"]] == [
        "fused-linear",
        "int8-activations",
        "fused-split",
        "split-activations",
    ]
    result = load_verified(out, threads=1, only="split-activations")
    assert result.checks[-1].passed, result.report()


def test_fp16_attn_generates_what_the_fp32_activation_build_does(fp16_attn, tiny):
    e32 = Engine.from_dir(tiny.dirs["int4"], threads=1)
    e16 = Engine(load_verified(fp16_attn[0], threads=1, only="split-activations").model)
    ref = [r.token_ids for r in e32.generate([GenerationRequest(p, greedy(16)) for p in PROMPTS])]
    got = [r.token_ids for r in e16.generate([GenerationRequest(p, greedy(16)) for p in PROMPTS])]
    assert got == ref
