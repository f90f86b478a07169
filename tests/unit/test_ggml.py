"""GGML block types kept exactly (stratus_model.ggml, quant.exact_nbits): every type decodes to
gguf-py's own values bit for bit, goes into MatMulNBits as its integers, and a model of each type
computes the numpy reference's logits."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf.quants import dequantize, quantize

from stratus_model.build import build_from_gguf
from stratus_model.ggml import DECODERS
from stratus_model.quant import FOUR_BIT_TYPES, dequantize_nbits, exact_nbits
from stratus_model.synthetic import K_SCALE_BYTES, TINY, random_blocks, tiny_vocab, write_tiny_gguf
from support.graphs import PROMPT, empty_past, run
from support.llama_ref import forward

Q = gguf.GGMLQuantizationType
K_TINY = dataclasses.replace(TINY, hidden=256, ffn=512, head_dim=64)  # K types keep rows of 256


def blocks_of(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in K_SCALE_BYTES:
        return random_blocks(rows, cols, qtype, rng, scale=1e-3)
    return quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q[qtype])


@pytest.mark.parametrize("qtype", sorted(DECODERS))
def test_every_type_decodes_to_gguf_pys_values_bit_for_bit(qtype):
    raw = blocks_of(qtype, 5, 512, seed=1)
    np.testing.assert_array_equal(DECODERS[qtype](raw).values(), dequantize(raw, Q[qtype]).astype(np.float32))


@pytest.mark.parametrize(
    "qtype, bits", [(t, 8) for t in sorted(DECODERS)] + [(t, 4) for t in FOUR_BIT_TYPES]
)  # (a wider type always goes in 8 bits)
def test_matmulnbits_operands_hold_the_same_values(qtype, bits):
    raw = blocks_of(qtype, 6, 512, seed=2)
    b = DECODERS[qtype](raw)
    n, offsets = exact_nbits(b, bits)
    got = dequantize_nbits(n, 6, 512, block=b.size).reshape(6, -1, b.size)
    if offsets is not None:
        got = got + offsets.T[..., None]
    np.testing.assert_array_equal(got.reshape(6, 512), dequantize(raw, Q[qtype]).astype(np.float32))


def matmulnbits(model_dir) -> list[dict]:
    proto = onnx.load(str(model_dir / "model.int8act.onnx"), load_external_data=False)
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    ]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_a_model_of_each_type_builds_exactly_and_computes_the_reference(tmp_path, qtype):
    cfg = K_TINY if qtype in K_SCALE_BYTES else TINY
    encoded = write_tiny_gguf(tmp_path / "m.gguf", seed=5, cfg=cfg, matrix_type=qtype)
    full = dataclasses.replace(cfg, vocab_size=len(tiny_vocab()))
    ref = forward(encoded, full, PROMPT)
    s = len(PROMPT)
    for quant in ("int8", "int4"):
        out = tmp_path / quant
        build_from_gguf(tmp_path / "m.gguf", quant, out)
        # the linears hold the type's integers: 4-bit types in 4 bits in int4, the rest in 8
        nodes = matmulnbits(out)
        bits = 4 if quant == "int4" and qtype in FOUR_BIT_TYPES else 8
        assert {n["bits"] for n in nodes[:-1]} == {bits}, nodes  # (the last is the 8-bit LM head)
        assert {n["block_size"] for n in nodes} == {16 if qtype == "Q6_K" else 32}
        # and the served configuration (split activations, on the type's own blocks) gives the
        # reference's logits
        sess = ort.InferenceSession(str(out / "model.onnx"))
        got, _ = run(sess, [PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(full, 1))
        assert np.abs(got[0] - ref).max() < 0.02 * np.abs(ref).max(), (quant, np.abs(got[0] - ref).max())
        assert (got[0].argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_a_pack_of_different_types_keeps_every_value():
    from stratus_model.ggml import PACKABLE, packed

    raws = [blocks_of("Q4_K", 4, 512, 3), blocks_of("Q6_K", 2, 512, 4), quantize(np.ones((3, 512), np.float32), Q.Q4_1)]
    kinds = ["Q4_K", "Q6_K", "Q4_1"]
    b = packed([PACKABLE[t](r) for t, r in zip(kinds, raws)])
    want = np.concatenate([dequantize(r, Q[t]).astype(np.float32) for t, r in zip(kinds, raws)])
    assert b.size == 16 and b.offset is not None
    np.testing.assert_array_equal(b.values(), want)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_q4_k_m_style_model_packs_q_k_v_of_two_types_exactly(tmp_path, quant):
    # Given q and k in Q4_K and v and down in Q6_K, as a Q4_K_M file mixes them
    encoded = write_tiny_gguf(
        tmp_path / "m.gguf", seed=6, cfg=K_TINY, matrix_type="Q4_K", types={"v": "Q6_K", "down": "Q6_K"}
    )
    build_from_gguf(tmp_path / "m.gguf", quant, tmp_path / "m")
    nodes = {n["name"]: n for n in matmulnbits_named(tmp_path / "m")}
    # Then q/k/v go in as one 8-bit MatMulNBits on 16-weight blocks (their integers, not re-quantized),
    # gate/up (both Q4_K) as the build's bits, down as Q6_K's 8 bits
    qkv = nodes["/model/layers.0/attn/qkv_proj/MatMulNBits"]
    assert (qkv["bits"], qkv["block_size"]) == (8, 16)
    assert nodes["/model/layers.0/mlp/gate_up_proj/MatMulNBits"]["bits"] == (4 if quant == "int4" else 8)
    assert (nodes["/model/layers.0/mlp/down_proj/MatMulNBits"]["block_size"]) == 16
    full = dataclasses.replace(K_TINY, vocab_size=len(tiny_vocab()))
    ref = forward(encoded, full, PROMPT)
    s = len(PROMPT)
    got, _ = run(
        ort.InferenceSession(str(tmp_path / "m/model.onnx")),
        [PROMPT],
        np.ones((1, s)),
        [np.arange(s)],
        empty_past(full, 1),
    )
    assert np.abs(got[0] - ref).max() < 0.02 * np.abs(ref).max()


def matmulnbits_named(model_dir) -> list[dict]:
    proto = onnx.load(str(model_dir / "model.int8act.onnx"), load_external_data=False)
    return [
        {"name": n.name, **{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}}
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    ]


def test_a_build_names_the_types_it_re_quantizes():
    from types import SimpleNamespace

    from stratus_model.build import inexact_types

    src = SimpleNamespace(description={"tensor_types": {"F32": 5, "Q4_K": 3, "Q3_K": 2, "IQ4_XS": 1, "Q6_K": 1}})
    assert inexact_types(src, "int4") == "Q3_K x 2, IQ4_XS x 1"
    assert inexact_types(src, "fp32") == ""  # (every type dequantizes exactly to float32)
    assert inexact_types(SimpleNamespace(description={}), "int8") == ""  # (a directory of float tensors)
