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
from stratus_model import tiles
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


def q4_weights(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGML Q4_1-like blocks: q 0..15 [N, K], d and m [N, K/32] float16."""
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = rng.uniform(0.001, 0.05, (n, k // 32)).astype(np.float16)
    m = rng.uniform(-0.3, 0.1, (n, k // 32)).astype(np.float16)
    return q, d, m


def test_q4_tiles_hold_the_weights_in_the_kernels_layout():
    q, d, m = q4_weights(np.random.default_rng(3), 32, 64)
    t = tiles.pack(q, d, m)
    assert t.shape == (2, 2, 320) and t.dtype == np.uint8
    # tile 1, block 0, chunk 2, lane 3, byte 1: output 19's inputs 4*2+1 (low nibble) and 16+9 (high)
    assert t[1, 0, 2 * 64 + 3 * 4 + 1] == q[19, 9] | (q[19, 25] << 4)
    assert t[1, 0, 256:288].view(np.float16)[3] == d[19, 0] and t[1, 0, 288:320].view(np.float16)[3] == m[19, 0]
    back = tiles.unpack(t)
    for a, b in zip(back, (q, d, m)):
        np.testing.assert_array_equal(a, b)


def test_q4_tiles_are_made_from_matmulnbits_operands_only_where_exact():
    n, k = 32, 64
    q, d, m = q4_weights(np.random.default_rng(4), n, k)
    scales = d.astype(np.float32).reshape(-1)
    offsets = np.ascontiguousarray((m.astype(np.float32) + 8 * d.astype(np.float32)).T)  # graph: zero point 8 + c
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, k // 32, 16)
    want = tiles.pack(q, d, m)
    np.testing.assert_array_equal(tiles.from_nbits(nibbles, scales, None, offsets, 4, n, k, 32), want)
    bytes8 = (q + 120).astype(np.uint8).reshape(n, k // 32, 32)  # the int8 build: zero point 128
    np.testing.assert_array_equal(tiles.from_nbits(bytes8, scales, None, offsets, 8, n, k, 32), want)
    assert tiles.from_nbits(nibbles, scales * np.float32(1.0001), None, offsets, 4, n, k, 32) is None  # not a float16
    assert tiles.from_nbits(nibbles, scales, None, offsets, 4, n, k, 16) is None  # another block size
    assert tiles.from_nbits(nibbles[:24], scales[: 24 * 2], None, offsets[:, :24], 4, 24, k, 32) is None  # N % 16


def q4_linear(tmp_path, q4: np.ndarray, n: int, k: int) -> ort.InferenceSession:
    node = helper.make_node("Q4Linear", ["x", "w"], ["y"], domain=KERNELS_DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node],
        "q4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
        [onnx.numpy_helper.from_array(q4, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(KERNELS_DOMAIN, 1)]
    )
    onnx.save_model(model, str(tmp_path / "q4.onnx"))
    return session(tmp_path / "q4.onnx")


@needs_library
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 13, 37])
def test_q4_linear_computes_the_product_alike_on_every_path(tmp_path, monkeypatch, rows):
    # 5 tiles (a group of four and one more) and 1..37 rows: each of the AVX-512 kernel's shapes
    n, k = 80, 96
    rng = np.random.default_rng(rows)
    q, d, m = q4_weights(rng, n, k)
    x = (rng.standard_normal((1, rows, k)) * rng.uniform(0.01, 10, (1, rows, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block: its scales 1e-30 (hi) and 0 (lo)
    got = {}
    for path in ("plain", "avx2", "avx512"):  # capped at what the host has
        monkeypatch.setenv("STRATUS_KERNELS_ISA", path)
        got[path] = q4_linear(tmp_path, tiles.pack(q, d, m), n, k).run(None, {"x": x})[0]
    w = d.astype(np.float64).repeat(32, 1) * q + m.astype(np.float64).repeat(32, 1)
    ref = x.astype(np.float64) @ w.T
    for path, y in got.items():
        np.testing.assert_array_equal(y, got["plain"], err_msg=path)  # the same operations in the same order
    assert np.abs(got["plain"] - ref).max() < 1e-4 * np.abs(ref).max()  # split activations: float32-level


@needs_library
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("graph", ["model.fused.onnx", "model.linear.onnx"])
def test_the_fused_graphs_compute_what_the_split_graph_does(tiny, quant, graph):
    # Given the same weights, the fused graph's split is the split graph's bit for bit; its block
    # offsets are summed in another order (and Q4Linear's products too): all within float32
    # rounding of a numpy forward pass.
    s = len(PROMPT)
    outs = []
    for sess in (
        ort.InferenceSession(str(tiny.dirs[quant] / "model.onnx")),
        session(tiny.dirs[quant] / graph),
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
    # fused-linear: every Q4_1 linear one Q4Linear over tiles in a file of its own; the Q8_0 LM head as in fused-split
    linear = [c for c in configurations(tiny.dirs["int4"]) if c.name == "fused-linear"]
    assert len(linear) == 1 and linear[0].kernels and linear[0].graph == "model.linear.onnx"
    assert {"model.linear.onnx", "model.linear.onnx.data"} <= manifest["files"].keys()
    graph = onnx.load(str(tiny.dirs["int4"] / "model.linear.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Q4Linear") == ops.count("JoinRows") + ops.count("Q4Linear") and ops.count("Q4Linear") > 0
    assert ops.count("MatMulNBits") == ops.count("SumHalves") == 1
    files = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert files == {"model.onnx.data", "model.linear.onnx.data"}  # the other weights read where they were


@needs_library
@pytest.mark.parametrize("name,graph", [("fused-split", "model.fused.onnx"), ("fused-linear", "model.linear.onnx")])
def test_a_host_with_the_kernels_checks_and_serves_the_fused_graphs(tiny, name, graph):
    result = load_verified(tiny.dirs["int4"], threads=1, only=name)
    check = result.checks[0]
    assert result.configuration == name and result.model.graph == graph
    assert check.passed and check.max_logprob_error < 1e-3 and check.tokens_agree == check.positions == 64


def test_a_host_without_the_kernels_skips_to_the_split_graph(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.ENV, str(tmp_path / "absent.so"))
    result = load_verified(tiny.dirs["int4"], threads=1)
    lines = result.report().splitlines()
    for name in ("fused-linear", "fused-split"):
        assert f"{name:<18} skip  {kernels.ENV}={tmp_path / 'absent.so'} is not a file" in lines
    assert result.configuration in ("int8-activations", "split-activations")
    # and asked for by name (a benchmark's load_checked), each is refused naming why, not by onnxruntime
    fused = [c for c in configurations(tiny.dirs["int4"]) if c.kernels]
    assert [c.name for c in fused] == ["fused-linear", "fused-split"]
    for conf in fused:
        with pytest.raises(ModelLoadError, match=f"{conf.name} runs on Stratus's kernels: {kernels.ENV}="):
            load_checked(tiny.dirs["int4"], conf, None, threads=1)
