"""Gemma 2 and Gemma 3 (stratus_model.families): tiny seeded models written as GGUF and as Hugging
Face directories, against the numpy reference, including decoding far past the sliding window."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_model.build import build_from_gguf, build_from_hf
from stratus_model.source import GGUFSource
from stratus_model.synthetic import TINY, tiny_vocab, write_tiny_gguf, write_tiny_hf
from support.graphs import PROMPT, empty_past, run
from support.llama_ref import forward

# 6 layers: 5 local (window 4, RoPE base 10,000) and the 6th global (base 1e6); head_dim 32 beside
# hidden 64 / 4 heads = 16, as Gemma 3 270M has 256 beside 640 / 4
GEMMA3 = dataclasses.replace(
    TINY,
    family="gemma3",
    num_layers=6,
    head_dim=32,
    rope_theta=1_000_000.0,
    rms_eps=1e-6,
    sliding_window=4,
    global_every=6,
    rope_local_theta=10_000.0,
)
GEMMA2 = dataclasses.replace(
    TINY, family="gemma2", sliding_window=4, global_every=2, attn_softcap=2.0, logit_softcap=3.0, rms_eps=1e-6
)


def full(cfg):
    return dataclasses.replace(cfg, vocab_size=len(tiny_vocab()))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    encoded = write_tiny_gguf(root / "g.gguf", seed=11, cfg=GEMMA3)
    return root, encoded


def stepwise_logits(model_dir, cfg, ids: list[int], prompt_len: int) -> np.ndarray:
    """The prompt in one run, then one token a run with the cache -> logits [len(ids), vocab]."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    out, past = run(session, [ids[:prompt_len]], np.ones((1, prompt_len)), [np.arange(prompt_len)], empty_past(cfg, 1))
    rows = list(out[0])
    for pos in range(prompt_len, len(ids)):
        out, past = run(session, [[ids[pos]]], np.ones((1, pos + 1)), [[pos]], past)
        rows.append(out[0, -1])
    return np.array(rows)


def greedy_reference(weights, cfg, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(forward(weights, cfg, ids)[-1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_gemma3_computes_the_reference_far_past_its_window(gemma3, tmp_path, quant):
    root, encoded = gemma3
    src = GGUFSource(root / "g.gguf")
    # (llama.cpp's Gemma 3: every 6th layer global, local RoPE base 10,000, fixed by the family)
    assert (src.config.sliding_window, src.config.global_every, src.config.rope_local_theta) == (4, 6, 10_000.0)
    assert [src.config.is_local(i) for i in range(6)] == [True] * 5 + [False]
    # (Gemma's q/k rows are stored as they are: only Llama-style RoPE is interleaved by llama.cpp)
    np.testing.assert_array_equal(src.tensor("layers.0.q").dense(), encoded["layers.0.q"])
    build_from_gguf(root / "g.gguf", quant, tmp_path / "m")
    cfg = full(GEMMA3)
    ids = PROMPT + [7 * k % 200 + 3 for k in range(12)]  # 20 positions, 5 windows' worth
    ref = forward(encoded, cfg, ids)
    got = stepwise_logits(tmp_path / "m", cfg, ids, len(PROMPT))
    assert np.abs(got - ref).max() < (1e-3 if quant == "fp32" else 0.03) * np.abs(ref).max()
    # each Gemma piece changes the answer: the test can tell if one were missing
    for piece in (
        dataclasses.replace(cfg, sliding_window=0),  # every layer global
        dataclasses.replace(cfg, sliding_window=5),  # W + 1 keys
        dataclasses.replace(cfg, rope_local_theta=0.0),  # the global base everywhere
    ):
        assert np.abs(forward(encoded, piece, ids) - ref).max() > 0.05 * np.abs(ref).max()
    no_post = {k: v for k, v in encoded.items() if not k.endswith(("post_attn_norm", "post_mlp_norm"))}
    assert (
        np.abs(forward(no_post, dataclasses.replace(cfg, family="qwen3"), ids) - ref).max() > 0.05 * np.abs(ref).max()
    )


def test_the_engine_decodes_gemma3_greedily_as_the_reference(gemma3, tmp_path):
    root, encoded = gemma3
    build_from_gguf(root / "g.gguf", "fp32", tmp_path / "m")
    engine = Engine.from_dir(tmp_path / "m", threads=1)
    got = engine.generate([GenerationRequest(PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))])
    assert got[0].token_ids == greedy_reference(encoded, full(GEMMA3), PROMPT, 16)


def test_a_gemma3_directory_builds_the_model_its_gguf_builds(gemma3, tmp_path):
    root, encoded = gemma3
    write_tiny_hf(tmp_path / "hf", encoded, cfg=GEMMA3)
    hf = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf["model_type"] == "gemma3_text" and hf["layer_types"][4:] == ["sliding_attention", "full_attention"]
    build_from_hf(tmp_path / "hf", "fp32", tmp_path / "from-hf")
    build_from_gguf(root / "g.gguf", "fp32", tmp_path / "from-gguf")
    cfg = full(GEMMA3)
    a = stepwise_logits(tmp_path / "from-hf", cfg, PROMPT, len(PROMPT))
    b = stepwise_logits(tmp_path / "from-gguf", cfg, PROMPT, len(PROMPT))
    # (HF stores norm weights w, GGUF 1 + w: float32 sums, so equal to rounding, not bit for bit)
    assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()


def test_gemma2_caps_its_attention_scores_and_logits(tmp_path):
    encoded = write_tiny_gguf(tmp_path / "g2.gguf", seed=12, cfg=GEMMA2)
    src = GGUFSource(tmp_path / "g2.gguf")
    assert (src.config.attn_softcap, src.config.logit_softcap, src.config.global_every) == (2.0, 3.0, 2)
    build_from_gguf(tmp_path / "g2.gguf", "fp32", tmp_path / "m")
    cfg = full(GEMMA2)
    ids = PROMPT + [11, 12, 13, 14]
    ref = forward(encoded, cfg, ids)
    got = stepwise_logits(tmp_path / "m", cfg, ids, len(PROMPT))
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max() and np.abs(got).max() < 3.0
    uncapped = forward(encoded, dataclasses.replace(cfg, attn_softcap=0.0), ids)
    assert np.abs(uncapped - ref).max() > 0.05 * np.abs(ref).max()
    # and its Hugging Face directory (caps, window and norms as config.json says them) builds the same
    write_tiny_hf(tmp_path / "hf", encoded, cfg=GEMMA2)
    build_from_hf(tmp_path / "hf", "fp32", tmp_path / "from-hf")
    from_hf = stepwise_logits(tmp_path / "from-hf", cfg, ids, len(PROMPT))
    assert np.abs(from_hf - got).max() < 1e-5 * np.abs(got).max()


@pytest.mark.parametrize("embed_type", ["Q8_0", "Q5_1", "Q4_1"])
def test_the_quantized_embedding_is_the_files_values_and_shared_with_the_tied_head(tmp_path, embed_type):
    # Given an embedding of a scale-only (Q8_0) or affine (Q5_1, Q4_1: offsets) GGML type, when built
    # int8, then the graph holds its blocks once (GatherBlockQuantized and the LM head read one
    # initializer) and the embedding rows are exactly the file's dequantized values.
    encoded = write_tiny_gguf(tmp_path / "t.gguf", seed=3, types={"embed": embed_type})
    build_from_gguf(tmp_path / "t.gguf", "int8", tmp_path / "m")
    proto = onnx.load(str(tmp_path / "m/model.onnx"), load_external_data=False)
    readers = [n.op_type for n in proto.graph.node if "model.embed_tokens.qweight" in n.input]
    assert readers == ["GatherBlockQuantized", "MatMulNBits"]
    assert "model.embed_tokens.weight" not in {t.name for t in proto.graph.initializer}
    # read the embedding's output for every token through the graph itself
    reshape = next(n for n in proto.graph.node if n.name == "/model/embed_tokens/Reshape")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(reshape.output[0], onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(tmp_path / "m/probe.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m/probe.onnx"))
    vocab = len(tiny_vocab())
    outs = session.run(
        [reshape.output[0]],
        {  # every token, one a row
            "input_ids": np.arange(vocab)[:, None],
            "attention_mask": np.ones((vocab, 1), np.int64),
            "position_ids": np.zeros((vocab, 1), np.int64),
            **empty_past(full(TINY), vocab),
        },
    )
    np.testing.assert_array_equal(outs[0][:, 0], encoded["embed"])


def test_a_window_pattern_is_every_nth_layer_global_or_refused():
    from stratus_model.config import global_every_of

    assert global_every_of([True] * 5 + [False] + [True] * 5 + [False]) == 6  # Gemma 3
    assert global_every_of([True, False] * 3) == 2 and global_every_of([True] * 3) == 0  # Gemma 2; all local
    assert global_every_of([True, False, True, True]) is None  # (not a pattern the builder implements)
