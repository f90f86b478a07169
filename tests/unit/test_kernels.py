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


def graph_session(tmp_path, graph: onnx.GraphProto) -> ort.InferenceSession:
    """A session of `graph` (its ops standard, onnxruntime's or ours), saved as <its name>.onnx."""
    opsets = [
        helper.make_opsetid("", 21),
        helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(KERNELS_DOMAIN, 1),
    ]
    onnx.save_model(helper.make_model(graph, opset_imports=opsets), str(tmp_path / f"{graph.name}.onnx"))
    return session(tmp_path / f"{graph.name}.onnx")


def one_op_graph(tmp_path, op: str, shape: list, out_shape: list, **attrs) -> ort.InferenceSession:
    node = helper.make_node(op, ["x"], ["y"], domain=KERNELS_DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    return graph_session(tmp_path, graph)


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
    got = graph_session(tmp_path, graph).run(None, {"y2": y2, "x": x, "offsets": offsets})[0]
    sums = x.reshape(2, 3, 2, 32).astype(np.float64).sum(-1)  # [B, S, K/32]: 32-input blocks
    np.testing.assert_allclose(got, (y2[:2] + y2[2:]) + sums @ offsets, rtol=1e-5, atol=1e-5)


def q4_weights(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGML Q4_1-like blocks: q 0..15 [N, K], d and m [N, K/32] float16."""
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = rng.uniform(0.001, 0.05, (n, k // 32)).astype(np.float16)
    m = rng.uniform(-0.3, 0.1, (n, k // 32)).astype(np.float16)
    return q, d, m


def q8_weights(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray, None]:
    """GGML Q8_0-like blocks as BlockLinear holds them: q - 128 in -128..127 (q [N, K] uint8), d float16.
    (-128: the AVX2 path's |q - 128| is 128, at the edge of a signed pair's int16 sum.)"""
    return (
        (rng.integers(-128, 128, (n, k)) + 128).astype(np.uint8),
        rng.uniform(1e-4, 2e-3, (n, k // 32)).astype(np.float16),
        None,
    )


def dense(q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """The weights [N, K] the tiles hold, in float64."""
    scale = d.astype(np.float64).repeat(32, 1)
    return scale * q + m.astype(np.float64).repeat(32, 1) if m is not None else scale * (q.astype(np.float64) - 128)


def test_tiles_hold_the_weights_in_the_kernels_layout():
    rng = np.random.default_rng(3)
    q, d, m = q4_weights(rng, 32, 64)
    t = tiles.pack(q, d, m)
    assert t.shape == (2, 2, 320) and t.dtype == np.uint8
    # tile 1, block 0, chunk 2, lane 3, byte 1: output 19's inputs 4*2+1 (low nibble) and 16+9 (high)
    assert t[1, 0, 2 * 64 + 3 * 4 + 1] == q[19, 9] | (q[19, 25] << 4)
    assert t[1, 0, 256:288].view(np.float16)[3] == d[19, 0] and t[1, 0, 288:320].view(np.float16)[3] == m[19, 0]
    q8, d8, _ = q8_weights(rng, 32, 64)
    t8 = tiles.pack(q8, d8)
    assert t8.shape == (2, 2, 544) and t8[1, 1, 5 * 64 + 3 * 4 + 1] == q8[19, 32 + 21]  # block 1, chunk 5
    for packed, want in ((t, (q, d, m)), (t8, (q8, d8, None))):
        for a, b in zip(tiles.unpack(packed), want):
            np.testing.assert_array_equal(a, b)


def test_tiles_are_made_from_matmulnbits_operands_only_where_exact():
    n, k = 32, 64
    rng = np.random.default_rng(4)
    q, d, m = q4_weights(rng, n, k)
    scales = d.astype(np.float32).reshape(-1)
    offsets = np.ascontiguousarray((m.astype(np.float32) + 8 * d.astype(np.float32)).T)  # graph: zero point 8 + c
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, k // 32, 16)
    want = (4, tiles.pack(q, d, m))
    assert_tiles(tiles.from_nbits(nibbles, scales, None, offsets, 4, n, k, 32), want)
    bytes8 = (q + 120).astype(np.uint8).reshape(n, k // 32, 32)  # the int8 build: zero point 128
    assert_tiles(tiles.from_nbits(bytes8, scales, None, offsets, 8, n, k, 32), want)
    q8, d8, _ = q8_weights(rng, n, k)  # Q8_0: 8-bit on the default zero point 128, no offsets
    assert_tiles(
        tiles.from_nbits(q8.reshape(n, 2, 32), d8.astype(np.float32), None, None, 8, n, k, 32), (8, tiles.pack(q8, d8))
    )
    assert tiles.from_nbits(nibbles, scales * np.float32(1.0001), None, offsets, 4, n, k, 32) is None  # not a float16
    assert tiles.from_nbits(nibbles, scales, None, offsets, 4, n, k, 16) is None  # another block size
    short = tiles.from_nbits(nibbles[:24], scales[: 24 * 2], None, offsets[:, :24], 4, 24, k, 32)  # a padded tile
    assert_tiles(short, (4, tiles.pack(q[:24], d[:24], m[:24])))
    assert short[1].shape == (2, 2, 320) and not short[1][1, :, :].reshape(2, 320)[:, 8 * 4 : 16 * 4].any()


def assert_tiles(got, want) -> None:
    assert got is not None and got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])


def block_linear(tmp_path, packed: np.ndarray, n: int, k: int, bits: int) -> ort.InferenceSession:
    node = helper.make_node("BlockLinear", ["x", "w"], ["y"], domain=KERNELS_DOMAIN, K=k, N=n, bits=bits)
    graph = helper.make_graph(
        [node],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
        [onnx.numpy_helper.from_array(packed, "w")],
    )
    return graph_session(tmp_path, graph)


@needs_library
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 13, 37])
def test_block_linear_computes_the_product_alike_on_every_path(tmp_path, monkeypatch, rows, bits):
    # 5 tiles (a group of four and one more, its last 9 lanes padding) and 1..37 rows: each of the kernels' shapes
    n, k = 71, 96
    rng = np.random.default_rng(rows)
    weights = (q4_weights if bits == 4 else q8_weights)(rng, n, k)
    x = (rng.standard_normal((1, rows, k)) * rng.uniform(0.01, 10, (1, rows, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block: its scales 1e-30 (hi) and 0 (lo)
    got = {}
    for path in ("plain", "avx2", "avx512"):  # capped at what the host has
        monkeypatch.setenv("STRATUS_KERNELS_ISA", path)
        got[path] = block_linear(tmp_path, tiles.pack(*weights), n, k, bits).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ dense(*weights).T
    for path, y in got.items():
        np.testing.assert_array_equal(y, got["plain"], err_msg=path)  # the same operations in the same order
    assert np.abs(got["plain"] - ref).max() < 1e-4 * np.abs(ref).max()  # split activations: float32-level


def attention(tmp_path, op: str, b: int, s: int, heads: int, kv: int, d: int, cache: int, r: int, **attrs):
    """One attention node, GroupQueryAttention (com.microsoft) or GroupAttention (ours), over packed qkv."""
    if op == "GroupQueryAttention":
        ins, extra = ["qkv", "", "", "past_k", "past_v"], {"do_rotary": 1, "rotary_interleaved": 0}
    else:
        ins, extra = ["qkv", "past_k", "past_v"], {}
    node = helper.make_node(
        op,
        [*ins, "seqlens", "total", "cos", "sin", "positions"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft" if op == "GroupQueryAttention" else KERNELS_DOMAIN,
        num_heads=heads,
        kv_num_heads=kv,
        **extra,
        **attrs,
    )
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("qkv", f, [b, s, (heads + 2 * kv) * d]),
        helper.make_tensor_value_info("past_k", f, [b, kv, cache, d]),
        helper.make_tensor_value_info("past_v", f, [b, kv, cache, d]),
        helper.make_tensor_value_info("seqlens", i32, [b]),
        helper.make_tensor_value_info("total", i32, []),
        helper.make_tensor_value_info("cos", f, [512, r // 2]),
        helper.make_tensor_value_info("sin", f, [512, r // 2]),
        helper.make_tensor_value_info("positions", TensorProto.INT64, [b, s]),
    ]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_k", "present_v")]
    return graph_session(tmp_path, helper.make_graph([node], op, inputs, outputs))


def run_attention(sess, feeds: dict, past: list[np.ndarray], in_place: bool) -> list[np.ndarray]:
    """-> [out, present_k, present_v]; in_place: past and present bound to one buffer, as the engine's cache is."""
    if not in_place:
        return sess.run(None, {**feeds, "past_k": past[0], "past_v": past[1]})
    io = sess.io_binding()
    io.bind_output("out")
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    buffers = [p.copy() for p in past]  # (kept alive: the OrtValues only point at them)
    for (x, y), buf in zip((("past_k", "present_k"), ("past_v", "present_v")), buffers):
        value = ort.OrtValue.ortvalue_from_numpy(buf)
        io.bind_ortvalue_input(x, value)
        io.bind_ortvalue_output(y, value)
    sess.run_with_iobinding(io)
    return [io.get_outputs()[0].numpy(), *buffers]


ATTENTION_CASES = {  # b, s, heads, kv heads, head size, cache, rows' lengths, first prompt?, in place?, rotary, attrs
    "decode in place": (4, 1, 9, 3, 64, 96, [10, 96, 37, 1], False, True, 64, {}),
    "decode into a new present": (3, 1, 9, 3, 64, 40, [10, 41, 37], False, False, 64, {}),
    "first prompt, right-padded": (3, 20, 9, 3, 64, 32, [20, 5, 13], True, True, 64, {}),
    "a prompt after its past": (1, 30, 4, 2, 32, 80, [70], False, True, 32, {}),
    "local window": (2, 20, 4, 1, 32, 48, [20, 11], True, True, 32, {"local_window_size": 8}),
    "local window, decode": (2, 1, 4, 1, 32, 48, [40, 5], False, True, 32, {"local_window_size": 8}),
    "softcap and scale": (2, 1, 8, 2, 48, 64, [30, 50], False, True, 48, {"softcap": 30.0, "scale": 0.2}),
    "partial rotary": (2, 1, 8, 4, 64, 64, [30, 50], False, True, 32, {}),
    "head size 256": (2, 1, 4, 1, 256, 64, [17, 50], False, True, 256, {}),
}


@needs_library
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_group_attention_computes_what_group_query_attention_does(tmp_path, monkeypatch, case):
    # Every path gives the same bits (16 lanes folded in one order, one exp polynomial); against onnxruntime's
    # GroupQueryAttention the outputs differ by float32 rounding and the cache it writes is the same.
    b, s, heads, kv, d, cache, lengths, first, in_place, r, attrs = ATTENTION_CASES[case]
    rng = np.random.default_rng(len(case))
    angles = rng.uniform(0, 6.3, (512, r // 2))
    pasts = [0 if first else n - s for n in lengths]
    feeds = {
        "qkv": rng.standard_normal((b, s, (heads + 2 * kv) * d)).astype(np.float32),
        "seqlens": np.array(lengths, np.int32) - 1,
        "total": np.array(s if first else max(lengths), np.int32),
        "cos": np.cos(angles).astype(np.float32),
        "sin": np.sin(angles).astype(np.float32),
        "positions": np.array([[p + i for i in range(s)] for p in pasts], np.int64),
    }
    past = [rng.standard_normal((b, kv, cache, d)).astype(np.float32) for _ in range(2)]
    args = (b, s, heads, kv, d, cache, r)
    want = run_attention(attention(tmp_path, "GroupQueryAttention", *args, **attrs), feeds, past, in_place)
    got = {}
    for path in ("plain", "avx2", "avx512"):  # capped at what the host has
        monkeypatch.setenv("STRATUS_KERNELS_ISA", path)
        got[path] = run_attention(attention(tmp_path, "GroupAttention", *args, **attrs), feeds, past, in_place)
    for path, outs in got.items():
        for x, y in zip(outs, got["plain"]):
            np.testing.assert_array_equal(x, y, err_msg=path)
    out, k, v = got["plain"]
    assert k.shape == want[1].shape and v.shape == want[2].shape
    for row, n in enumerate(lengths):
        queries = min(n, s) if first else s  # a right-padded prompt's padding has no output to compare
        np.testing.assert_allclose(out[row, :queries], want[0][row, :queries], rtol=0, atol=2e-6)
        np.testing.assert_allclose(k[row, :, :n], want[1][row, :, :n], rtol=0, atol=1e-6)  # rotated alike
        np.testing.assert_array_equal(v[row, :, :n], want[2][row, :, :n])


def gqa_model(cache_type: int, head: int | str, packed: bool = True, **attrs) -> onnx.ModelProto:
    """A graph of one GroupQueryAttention over a cache input of `cache_type` and head size `head`."""
    names = ["qkv", "", ""] if packed else ["q", "k", "v"]
    node = helper.make_node(
        "GroupQueryAttention",
        [*names, "past_k", "past_v", "seqlens", "total", "cos", "sin", "positions"],
        ["out", "present_k", "present_v"],
        name="attn",
        domain="com.microsoft",
        num_heads=4,
        kv_num_heads=2,
        do_rotary=1,
        **attrs,
    )
    cache = [helper.make_tensor_value_info(n, cache_type, ["b", 2, "p", head]) for n in ("past_k", "past_v")]
    return helper.make_model(helper.make_graph([node], "g", cache, []))


def test_the_rewrite_takes_only_the_attention_group_attention_computes():
    from stratus_model.variants import group_attention

    ops = lambda m: [n.op_type for n in group_attention(m).graph.node]
    assert ops(gqa_model(TensorProto.FLOAT, 64)) == ["GroupAttention"]
    assert ops(gqa_model(TensorProto.FLOAT, 64, packed=False)) == ["Concat", "GroupAttention"]  # packed first
    assert ops(gqa_model(TensorProto.FLOAT, 64, local_window_size=512, softcap=30.0)) == ["GroupAttention"]
    # a float16 cache (a CUDA build), a head size it does not take or the graph does not fix, interleaved rotary
    for model in (
        gqa_model(TensorProto.FLOAT16, 64),
        gqa_model(TensorProto.FLOAT, 40),
        gqa_model(TensorProto.FLOAT, "head"),
        gqa_model(TensorProto.FLOAT, 64, rotary_interleaved=1),
    ):
        assert ops(model) == ["GroupQueryAttention"]


@needs_library
def test_group_attention_refuses_a_head_size_it_does_not_take(tmp_path):
    sess = attention(tmp_path, "GroupAttention", 1, 1, 2, 1, 8, 4, 8)
    feeds = {
        "qkv": np.zeros((1, 1, 32), np.float32),
        "seqlens": np.array([0], np.int32),
        "total": np.array(1, np.int32),
        "cos": np.ones((512, 4), np.float32),
        "sin": np.zeros((512, 4), np.float32),
        "positions": np.zeros((1, 1), np.int64),
    }
    with pytest.raises(Exception, match="head size a multiple of 16"):
        run_attention(sess, feeds, [np.zeros((1, 1, 4, 8), np.float32)] * 2, in_place=False)


@needs_library
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("graph", ["model.fused.onnx", "model.linear.onnx"])
def test_the_fused_graphs_compute_what_the_split_graph_does(tiny, quant, graph):
    # Given the same weights, the fused graph's split is the split graph's bit for bit; its block
    # offsets are summed in another order (and BlockLinear's products too): all within float32
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
    # fused-linear: every linear (Q4_1, the Q8_0 LM head) one BlockLinear over tiles in a file of their own
    linear = [c for c in configurations(tiny.dirs["int4"]) if c.name == "fused-linear"]
    assert len(linear) == 1 and linear[0].kernels and linear[0].graph == "model.linear.onnx"
    assert {"model.linear.onnx", "model.linear.onnx.data"} <= manifest["files"].keys()
    graph = onnx.load(str(tiny.dirs["int4"] / "model.linear.onnx"), load_external_data=False)
    bits = [a.i for n in graph.graph.node if n.op_type == "BlockLinear" for a in n.attribute if a.name == "bits"]
    assert bits.count(4) == ops.count("JoinRows") and bits.count(8) == 1  # the head
    assert not {"MatMulNBits", "SplitRows", "SumHalves", "JoinRows"} & {n.op_type for n in graph.graph.node}
    files = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert files == {"model.onnx.data", "model.linear.onnx.data"}  # the other weights read where they were
    attention = [n.op_type for n in graph.graph.node if "Attention" in n.op_type]
    assert attention == ["GroupAttention"] * tiny.config.num_layers  # attention ours too (a float32 cache)


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
