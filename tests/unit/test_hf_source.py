"""A Hugging Face model directory (config.json, safetensors, tokenizer files) as a weight source
(stratus_model.hf): the tiny model written both ways builds the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stratus.errors import ModelBuildError
from stratus_model.build import build_from_hf
from stratus_model.hf import HFSource, hf_name, read_header
from stratus_model.synthetic import TINY, to_bf16_bits, write_safetensors, write_tiny_gguf, write_tiny_hf


def same_model(a, b) -> None:
    """Two built model directories hold the same weights, tokenizer, template and EOS ids."""
    from tokenizers import Tokenizer

    assert (a / "model.onnx.data").read_bytes() == (b / "model.onnx.data").read_bytes()
    text = "<|im_start|>user\nthe heron 42 ünïcode<|im_end|>"
    enc = [Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids for d in (a, b)]
    assert enc[0] == enc[1]
    assert (a / "chat_template.jinja").read_text() == (b / "chat_template.jinja").read_text()
    gen = [json.loads((d / "generation_config.json").read_text()) for d in (a, b)]
    assert gen[0]["eos_token_ids"] == gen[1]["eos_token_ids"] == [2]
    golden = [json.loads((d / "manifest.json").read_text())["golden"] for d in (a, b)]
    assert golden[0] == golden[1]


def test_a_sharded_float32_directory_builds_the_model_its_gguf_builds(tiny, tmp_path):
    # Given the tiny model's weights (what its GGUF's blocks decode to) as two safetensors shards
    write_tiny_hf(tmp_path / "hf", tiny.weights, shards=2)
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    # When it is built as the GGUF was
    build_from_hf(tmp_path / "hf", "fp32", tmp_path / "model")
    # Then the model is the same, weight for weight
    same_model(tmp_path / "model", tiny.dirs["fp32"])


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_16_bit_checkpoints_read_exactly(tmp_path, dtype):
    # Given a GGUF of 16-bit matrices and the same values as a safetensors directory of that type
    encoded = write_tiny_gguf(tmp_path / "w.gguf", seed=3, matrix_type=dtype)
    write_tiny_hf(tmp_path / "hf", encoded, dtype=dtype)
    src = HFSource(tmp_path / "hf")
    for name in ("embed", "layers.0.q", "layers.1.down", "final_norm"):
        expected = encoded[name]
        if dtype == "BF16" and expected.ndim == 1:  # (the GGUF keeps norms float32; here they are rounded)
            expected = (to_bf16_bits(expected).astype(np.uint32) << 16).view(np.float32)
        if dtype == "F16" and expected.ndim == 1:
            expected = expected.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(src.tensor(name).dense(), expected)
    assert src.config == TINY.__class__(**{**TINY.to_json(), "vocab_size": src.config.vocab_size})
    # and it builds quantized, and answers
    assert build_from_hf(tmp_path / "hf", "int4", tmp_path / "model")["quantization"] == "int4"


def test_bf16_rounds_to_nearest_even():
    # bfloat16 steps by 2^-7 near 1: 1 + 2^-8 is a tie (to even: 1.0), 1 + 0.75 * 2^-7 rounds up
    x = np.array([1.0, 1.00390625, 1.005859375, -2.5], np.float32)
    back = (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    assert back.tolist() == [1.0, 1.0, 1.0078125, -2.5]


def _dir(tmp_path, tiny, **config):
    d = tmp_path / "hf"
    write_tiny_hf(d, tiny.weights)
    hf = json.loads((d / "config.json").read_text())
    hf.update(config)
    (d / "config.json").write_text(json.dumps(hf))
    return d


@pytest.mark.parametrize(
    "change, says",
    [
        (
            {"model_type": "gpt_neox"},
            "model_type 'gpt_neox' is not supported (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text)",
        ),
        ({"model_type": "phi3"}, "model_type 'phi3' is not supported: Phi 3's fused qkv and gate_up"),
        ({"hidden_act": "gelu"}, "sets hidden_act ('gelu')"),
        ({"attention_bias": True}, "sets attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "sets rope_scaling"),
        ({"sliding_window": 4096}, "sets sliding_window"),
        ({"head_dim": 7}, "do not fit together"),
        ({"num_hidden_layers": None}, "wrong type"),
        ({"num_key_value_heads": 3}, "do not fit together"),
    ],
)
def test_what_the_builder_does_not_implement_is_named(tmp_path, tiny, change, says):
    with pytest.raises(ModelBuildError, match=says.replace("(", r"\(").replace(")", r"\)")):
        HFSource(_dir(tmp_path, tiny, **change))


def test_missing_and_damaged_files_are_named(tmp_path, tiny):
    d = _dir(tmp_path, tiny)
    hf = json.loads((d / "config.json").read_text())
    del hf["hidden_size"]
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelBuildError, match="lacks 'hidden_size'"):
        HFSource(d)
    with pytest.raises(ModelBuildError, match="no config.json"):
        HFSource(tmp_path / "nowhere")
    write_tiny_hf(tmp_path / "sharded", tiny.weights, shards=2)
    (tmp_path / "sharded/model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelBuildError, match="shard model-00002-of-00002.safetensors is missing"):
        HFSource(tmp_path / "sharded")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelBuildError, match="not a safetensors file"):
        read_header(tmp_path / "junk.safetensors")


def test_a_missing_tensor_or_an_unsupported_dtype_fails_the_build_and_leaves_nothing(tmp_path, tiny):
    d = _dir(tmp_path, tiny)
    weights = {k: v for k, v in tiny.weights.items() if k != "layers.1.up"}
    write_safetensors(d / "model.safetensors", {hf_name(k): v for k, v in weights.items()}, "F32")
    with pytest.raises(ModelBuildError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        build_from_hf(d, "int8", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    raw = (d / "model.safetensors").read_bytes().replace(b'"F32"', b'"I8" ', 1)
    (d / "model.safetensors").write_bytes(raw)
    with pytest.raises(ModelBuildError, match="dtype 'I8'"):
        build_from_hf(d, "int8", tmp_path / "model")


def test_the_cli_builds_from_a_directory_and_refuses_two_sources(tmp_path, tiny, capsys):
    from stratus_cli.main import main as stratus

    write_tiny_hf(tmp_path / "hf", tiny.weights)
    assert (
        stratus(["model", "build", "--hf", str(tmp_path / "hf"), "--quant", "int8", "--out", str(tmp_path / "m")]) == 0
    )
    assert json.loads((tmp_path / "m/manifest.json").read_text())["model_id"] == "hf-int8"
    both = ["model", "build", "--hf", str(tmp_path / "hf"), "--gguf", str(tiny.gguf), "--out", str(tmp_path / "n")]
    assert stratus(both) == 2 and "name one source" in capsys.readouterr().err


def test_a_head_dim_of_its_own_builds_from_either_source_and_matches_the_reference(tmp_path):
    import dataclasses

    import onnxruntime as ort

    from stratus_model.build import build_from_gguf
    from stratus_model.synthetic import tiny_vocab
    from support.graphs import PROMPT, empty_past, run
    from support.llama_ref import forward

    # Given a model whose heads are wider than hidden / heads (4 heads of 32 beside hidden 64: a
    # 128-wide query, as Gemma 3's 4 heads of 256 beside hidden 640)
    cfg = dataclasses.replace(TINY, head_dim=32)
    encoded = write_tiny_gguf(tmp_path / "w.gguf", seed=4, cfg=cfg)
    write_tiny_hf(tmp_path / "hf", encoded, cfg=cfg)
    build_from_gguf(tmp_path / "w.gguf", "fp32", tmp_path / "from-gguf")
    build_from_hf(tmp_path / "hf", "fp32", tmp_path / "from-hf")
    # Then both sources build the same model, and it computes the reference's logits
    same_model(tmp_path / "from-gguf", tmp_path / "from-hf")
    full = dataclasses.replace(cfg, vocab_size=len(tiny_vocab()))
    assert json.loads((tmp_path / "from-hf/config.json").read_text())["head_dim"] == 32
    session = ort.InferenceSession(str(tmp_path / "from-hf/model.onnx"))
    s = len(PROMPT)
    logits, _ = run(session, [PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(full, 1))
    ref = forward(encoded, full, PROMPT)
    np.testing.assert_allclose(logits[0], ref, atol=1e-3 * np.abs(ref).max())
    # and the engine serves it (its KV cache takes the head_dim from config.json), greedy as the reference
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest

    engine = Engine.from_dir(tmp_path / "from-hf", threads=1)
    [out] = engine.generate([GenerationRequest(list(PROMPT), SamplingParams(max_tokens=1, temperature=0.0))])
    assert out.choices[0].token_ids == [int(ref[-1].argmax())]
