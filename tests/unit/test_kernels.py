"""Stratus's onnxruntime kernels (infra/worker/kernels) and the fused-split configuration on them.

`make test` builds the library first; run alone without it, these tests skip and say so."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from stratus.errors import ModelLoadError
from stratus_engine import kernels
from stratus_engine.numerics import configurations, load_checked, load_verified
from stratus_model.variants import KERNELS_DOMAIN
from support.graphs import PROMPT, empty_past, run
from support.llama_ref import forward

LIBRARY = kernels.library()
needs_library = pytest.mark.skipif(LIBRARY is None, reason=f"{kernels.missing()}")


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(str(path), so)


def one_op_graph(tmp_path, op: str, shape: list, out_shape: list, **attrs) -> ort.InferenceSession:
    node = helper.make_node(op, ["x"], ["y"], domain=KERNELS_DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(KERNELS_DOMAIN, 1)]
    )
    onnx.save_model(model, str(tmp_path / f"{op}.onnx"))
    return session(tmp_path / f"{op}.onnx")


def split_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy, in float32: x [B, S, K] -> hi, lo as variants.make_split_linear computes them."""
    blocks = x.reshape(*x.shape[:-1], -1, block)
    scale = np.maximum(np.abs(blocks).max(-1, keepdims=True) * np.float32(1 / 127), np.float32(1e-30))
    hi = np.round(blocks / scale) * scale  # numpy rounds half to even, as ONNX Round
    return hi.reshape(x.shape), (blocks - hi).reshape(x.shape)


@needs_library
@pytest.mark.parametrize("block", [32, 16])
def test_split_rows_gives_the_int8_grid_part_and_the_rest(tmp_path, block):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 64)) * rng.uniform(0.01, 10, (2, 3, 1))).astype(np.float32)
    x[0, 0, :block] = 0.0  # an all-zero block
    x[1, 2, 5] = 2.5 * (x[1, 2, :block].__abs__().max() / 127)  # a tie on the grid: rounds to even
    got = one_op_graph(tmp_path, "SplitRows", ["B", "S", 64], ["B2", "S", 64], block_size=block).run(None, {"x": x})[0]
    hi, lo = split_reference(x, block)
    assert got.shape == (4, 3, 64)
    np.testing.assert_array_equal(got[:2], hi)
    np.testing.assert_array_equal(got[2:], lo)
    assert not got[0, 0, :block].any() and not got[2, 0, :block].any()  # the zero block: no 0/0
    # hi is on its own int8 grid: onnxruntime's quantization of it (scale = block max / 127) is exact
    blocks = got[:2].reshape(2, 3, -1, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    q = np.divide(blocks, scale, out=np.zeros_like(blocks), where=scale > 0)
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)
    assert np.abs(np.round(q)).max() <= 127


@needs_library
def test_sum_halves_adds_the_two_halves_of_the_first_axis(tmp_path):
    y = np.random.default_rng(1).standard_normal((4, 3, 8)).astype(np.float32)
    got = one_op_graph(tmp_path, "SumHalves", [4, 3, 8], [2, 3, 8]).run(None, {"x": y})[0]
    np.testing.assert_array_equal(got, y[:2] + y[2:])


@needs_library
def test_an_odd_first_axis_is_refused_by_name(tmp_path):
    sess = one_op_graph(tmp_path, "SumHalves", ["N", 2], ["M", 2])
    with pytest.raises(Exception, match="SumHalves: the first axis must be even"):
        sess.run(None, {"x": np.zeros((3, 2), np.float32)})


@needs_library
def test_join_rows_adds_the_halves_and_the_block_offsets(tmp_path):
    rng = np.random.default_rng(2)
    y2, x, offsets = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3, 8), (2, 3, 64), (2, 8)))
    node = helper.make_node("JoinRows", ["y2", "x", "offsets"], ["y"], domain=KERNELS_DOMAIN)
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
        for n, a in (("y2", y2), ("x", x), ("offsets", offsets))
    ]
    graph = helper.make_graph(
        [node], "join", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(KERNELS_DOMAIN, 1)]
    )
    onnx.save_model(model, str(tmp_path / "join.onnx"))
    got = session(tmp_path / "join.onnx").run(None, {"y2": y2, "x": x, "offsets": offsets})[0]
    sums = x.reshape(2, 3, 2, 32).astype(np.float64).sum(-1)  # [B, S, K/32]: 32-input blocks
    np.testing.assert_allclose(got, (y2[:2] + y2[2:]) + sums @ offsets, rtol=1e-5, atol=1e-5)


@needs_library
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_fused_graph_computes_what_the_split_graph_does(tiny, quant):
    # Given the same weights, the fused graph's split is the split graph's bit for bit; its block
    # offsets are summed in another order: both within float32 rounding of a numpy forward pass.
    s = len(PROMPT)
    outs = []
    for sess in (
        ort.InferenceSession(str(tiny.dirs[quant] / "model.onnx")),
        session(tiny.dirs[quant] / "model.fused.onnx"),
    ):
        logits, present = run(
            sess, [PROMPT, PROMPT[::-1]], np.ones((2, s)), [np.arange(s)] * 2, empty_past(tiny.config, 2)
        )
        outs.append((logits, present))
    (split, split_kv), (fused, fused_kv) = outs
    np.testing.assert_allclose(fused, split, rtol=0, atol=2e-4 * np.abs(split).max())
    for name in split_kv:
        np.testing.assert_allclose(fused_kv[name], split_kv[name], rtol=0, atol=2e-4 * np.abs(split_kv[name]).max())
    ref = forward(tiny.weights, tiny.config, PROMPT)  # numpy, float64, from the GGUF's values
    assert np.abs(fused[0] - ref).max() / np.abs(ref).max() < 2e-4


def test_quantized_builds_carry_the_fused_configuration(tiny):
    fused = [c for c in configurations(tiny.dirs["int4"]) if c.name == "fused-split"]
    assert len(fused) == 1 and fused[0].kernels and fused[0].graph == "model.fused.onnx"
    manifest = json.loads((tiny.dirs["int4"] / "manifest.json").read_text())
    assert "model.fused.onnx" in manifest["files"]  # in the digest like every graph
    graph = onnx.load(str(tiny.dirs["int4"] / "model.fused.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    # each linear: SplitRows, MatMulNBits, then SumHalves or (an affine type: offsets beside) JoinRows
    assert ops.count("SplitRows") == ops.count("SumHalves") + ops.count("JoinRows") == ops.count("MatMulNBits")
    assert ops.count("JoinRows") > 0 and ops.count("SumHalves") > 0  # Q4_1 linears, the Q8_0 LM head
    assert not {"Round", "ReduceMax", "MatMul"} & set(ops)  # no split chain, no offsets MatMul left


@needs_library
def test_a_host_with_the_kernels_checks_and_serves_the_fused_graph(tiny):
    result = load_verified(tiny.dirs["int4"], threads=1, only="fused-split")
    check = result.checks[0]
    assert result.configuration == "fused-split" and result.model.graph == "model.fused.onnx"
    assert check.passed and check.max_logprob_error < 1e-3 and check.tokens_agree == check.positions == 64


def test_a_host_without_the_kernels_skips_to_the_split_graph(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV, str(tmp_path / "absent.so"))
    result = load_verified(tiny.dirs["int4"], threads=1)
    lines = result.report().splitlines()
    assert f"fused-split        skip  {kernels.ENV}={tmp_path / 'absent.so'} is not a file" in lines
    assert result.configuration in ("int8-activations", "split-activations")
    # and asked for by name (a benchmark's load_checked), it is refused naming why, not by onnxruntime
    [fused] = [c for c in configurations(tiny.dirs["int4"]) if c.kernels]
    with pytest.raises(ModelLoadError, match=f"fused-split runs on Stratus's kernels: {kernels.ENV}="):
        load_checked(tiny.dirs["int4"], fused, None, threads=1)
