"""Model families beside Llama's (stratus_model.families): each built from a tiny seeded model,
written as GGUF and as a Hugging Face directory, against the numpy reference."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest

from stratus_model.build import build_from_gguf, build_from_hf
from stratus_model.config import llama3_freq_factors
from stratus_model.hf import HFSource
from stratus_model.source import GGUFSource
from stratus_model.synthetic import TINY, tiny_vocab, write_tiny_gguf, write_tiny_hf
from support.graphs import PROMPT, empty_past, run
from support.llama_ref import forward

QWEN2 = dataclasses.replace(TINY, family="qwen2", rope_theta=1_000_000.0)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    encoded = write_tiny_gguf(root / "q.gguf", seed=7, cfg=QWEN2)
    return root, encoded


def logits(model_dir, cfg) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    s = len(PROMPT)
    out, _ = run(session, [PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(cfg, 1))
    return out[0]


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_qwen2_with_its_qkv_biases_and_unpermuted_rows_computes_the_reference(qwen2, tmp_path, quant):
    root, encoded = qwen2
    src = GGUFSource(root / "q.gguf")
    assert src.config.family == "qwen2" and src.tensor("layers.1.k_bias").shape == (QWEN2.kv_hidden,)
    # (llama.cpp interleaves q/k rows for Llama-style RoPE only: a Qwen 2 file's rows are as they are)
    np.testing.assert_array_equal(src.tensor("layers.0.q").dense(), encoded["layers.0.q"])
    build_from_gguf(root / "q.gguf", quant, tmp_path / "m")
    assert json.loads((tmp_path / "m/config.json").read_text())["architecture"] == "qwen2"
    full = dataclasses.replace(QWEN2, vocab_size=len(tiny_vocab()))
    ref = forward(encoded, full, PROMPT)
    got = logits(tmp_path / "m", full)
    assert np.abs(got - ref).max() < (1e-3 if quant == "fp32" else 0.02) * np.abs(ref).max()
    # and without its biases the model would be another one: the test can tell
    plain = forward({k: v for k, v in encoded.items() if "_bias" not in k}, full, PROMPT)
    assert np.abs(plain - ref).max() > 0.05 * np.abs(ref).max()


def test_a_qwen2_directory_builds_the_model_its_gguf_builds(qwen2, tmp_path):
    root, encoded = qwen2
    write_tiny_hf(tmp_path / "hf", encoded, cfg=QWEN2)
    hf = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf["model_type"] == "qwen2" and hf["use_sliding_window"] is False  # (named, not used: built)
    build_from_hf(tmp_path / "hf", "fp32", tmp_path / "from-hf")
    build_from_gguf(root / "q.gguf", "fp32", tmp_path / "from-gguf")
    assert (tmp_path / "from-hf/model.onnx.data").read_bytes() == (tmp_path / "from-gguf/model.onnx.data").read_bytes()


QWEN3 = dataclasses.replace(TINY, family="qwen3", head_dim=32, rope_theta=1_000_000.0)  # (Qwen 3 sets its head_dim)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_qwen3_normalizes_q_and_k_per_head_before_rope(tmp_path, quant):
    encoded = write_tiny_gguf(tmp_path / "q3.gguf", seed=8, cfg=QWEN3)
    assert GGUFSource(tmp_path / "q3.gguf").tensor("layers.1.k_norm").shape == (32,)
    build_from_gguf(tmp_path / "q3.gguf", quant, tmp_path / "m")
    full = dataclasses.replace(QWEN3, vocab_size=len(tiny_vocab()))
    ref = forward(encoded, full, PROMPT)
    got = logits(tmp_path / "m", full)
    assert np.abs(got - ref).max() < (1e-3 if quant == "fp32" else 0.02) * np.abs(ref).max()
    plain = forward({k: v for k, v in encoded.items() if not k.endswith((".q_norm", ".k_norm"))}, full, PROMPT)
    assert np.abs(plain - ref).max() > 0.05 * np.abs(ref).max()  # (the norms matter: the test can tell)
    # and its Hugging Face directory builds the same model
    if quant == "fp32":
        write_tiny_hf(tmp_path / "hf", encoded, cfg=QWEN3)
        build_from_hf(tmp_path / "hf", "fp32", tmp_path / "from-hf")
        assert (tmp_path / "from-hf/model.onnx.data").read_bytes() == (tmp_path / "m/model.onnx.data").read_bytes()


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LLAMA3 = dataclasses.replace(
    TINY,
    rope_theta=500_000.0,
    rope_freq_factors=llama3_freq_factors(16, 500_000.0, 8.0, 1.0, 4.0, 64),
)


def test_llama3_rope_scaling_from_rope_freqs_and_from_config_json(tmp_path):
    # Given Llama 3's RoPE scaling: a GGUF's rope_freqs.weight, a directory's rope_scaling
    factors = LLAMA3.rope_freq_factors
    assert factors[0] == 1.0 and factors[-1] == 8.0 and any(1.0 < f < 8.0 for f in factors)  # (and blended)
    encoded = write_tiny_gguf(tmp_path / "l3.gguf", seed=9, cfg=LLAMA3)
    src = GGUFSource(tmp_path / "l3.gguf")
    np.testing.assert_allclose(src.config.rope_freq_factors, factors, rtol=1e-6)
    build_from_gguf(tmp_path / "l3.gguf", "fp32", tmp_path / "m")
    full = dataclasses.replace(src.config, vocab_size=len(tiny_vocab()))
    ids = PROMPT + list(range(20, 60))  # (48 positions: the scaled low frequencies turn visibly)
    session = ort.InferenceSession(str(tmp_path / "m/model.onnx"))
    got, _ = run(session, [ids], np.ones((1, len(ids))), [np.arange(len(ids))], empty_past(full, 1))
    ref = forward(encoded, full, ids)
    assert np.abs(got[0] - ref).max() < 1e-3 * np.abs(ref).max()
    unscaled = forward(encoded, dataclasses.replace(full, rope_freq_factors=()), ids)
    assert np.abs(unscaled - ref).max() > 0.01 * np.abs(ref).max()
    # and the directory's rope_scaling gives the same factors (to float32's rounding in the GGUF)
    write_tiny_hf(tmp_path / "hf", encoded, cfg=LLAMA3, extra={"rope_scaling": LLAMA3_SCALING})
    np.testing.assert_allclose(HFSource(tmp_path / "hf").config.rope_freq_factors, factors, rtol=1e-12)


def test_a_phi3_gguf_is_refused_naming_what_is_missing(tmp_path):
    import gguf

    from stratus.errors import ModelBuildError

    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelBuildError, match="architecture 'phi3' is not supported: Phi 3's fused qkv"):
        GGUFSource(tmp_path / "phi.gguf")


def test_gemmas_end_of_turn_ends_a_reply():
    from types import SimpleNamespace

    from stratus_model.build import eos_ids
    from stratus_model.source import TokenizerSpec

    tokens = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
    spec = TokenizerSpec("llama", "default", tokens, [3] * 5, [], 2, 1, template)
    assert eos_ids(SimpleNamespace(tokenizer=spec)) == [4, 1]
