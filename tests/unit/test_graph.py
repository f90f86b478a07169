"""The built ONNX graph against a plain numpy Llama (tests/support/llama_ref.py)."""

import numpy as np
import onnxruntime as ort
import pytest

from support.graphs import PROMPT, empty_past, run
from support.llama_ref import forward


@pytest.fixture(scope="module")
def fp32(tiny):
    return ort.InferenceSession(str(tiny.dirs["fp32"] / "model.onnx"))


def test_prefill_matches_reference(tiny, fp32):
    s = len(PROMPT)
    logits, _ = run(fp32, [PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(tiny.config, 1))
    ref = forward(tiny.weights, tiny.config, PROMPT)
    np.testing.assert_allclose(logits[0], ref, atol=1e-3 * np.abs(ref).max())


def test_decoding_with_cache_matches_full_recompute(tiny, fp32):
    # Given a 4-token prefill, when the rest arrives as a chunk and then one more token,
    # then each step's logits equal a from-scratch forward over the whole sequence.
    _, past = run(fp32, [PROMPT[:4]], np.ones((1, 4)), [np.arange(4)], empty_past(tiny.config, 1))
    s = len(PROMPT)
    logits, past = run(fp32, [PROMPT[4:]], np.ones((1, s)), [np.arange(4, s)], past)
    ref = forward(tiny.weights, tiny.config, PROMPT)
    np.testing.assert_allclose(logits[0], ref[4:], atol=1e-3 * np.abs(ref).max())
    logits, _ = run(fp32, [[7]], np.ones((1, s + 1)), [[s]], past)
    ref = forward(tiny.weights, tiny.config, PROMPT + [7])
    np.testing.assert_allclose(logits[0, -1], ref[-1], atol=1e-3 * np.abs(ref).max())


def test_right_padded_rows_of_different_lengths(tiny, fp32):
    short = [1, 33, 44]
    s = len(PROMPT)
    ids = np.zeros((2, s))
    ids[0] = PROMPT
    ids[1, :3] = short
    mask = np.zeros((2, s))
    mask[0] = 1
    mask[1, :3] = 1
    logits, past = run(fp32, ids, mask, np.tile(np.arange(s), (2, 1)), empty_past(tiny.config, 2))
    np.testing.assert_allclose(logits[1, :3], forward(tiny.weights, tiny.config, short), atol=1e-3 * 60)
    # one decode step: each row appends at its own length
    mask = np.zeros((2, s + 1))
    mask[0] = 1
    mask[1, :4] = 1
    logits, _ = run(fp32, [[5], [6]], mask, [[s], [3]], past)
    np.testing.assert_allclose(logits[0, -1], forward(tiny.weights, tiny.config, PROMPT + [5])[-1], atol=0.06)
    np.testing.assert_allclose(logits[1, -1], forward(tiny.weights, tiny.config, short + [6])[-1], atol=0.06)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_graphs_compute_their_weights(tiny, quant):
    # Both keep the GGUF's Q4_1 blocks exactly (int8 a nibble a byte), so the reference is the
    # GGUF's own values. The only error left is int8 activations (accuracy_level 4; the
    # split-activation default graph removes that too: test_numerics).
    sess = ort.InferenceSession(str(tiny.dirs[quant] / "model.int8act.onnx"))
    s = len(PROMPT)
    got, _ = run(sess, [PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(tiny.config, 1))
    ref = forward(tiny.weights, tiny.config, PROMPT)
    assert np.abs(got[0] - ref).max() < 0.05 * np.abs(ref).max()
    assert (got[0].argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_fused_graph_is_small(tiny):
    import onnx

    nodes = onnx.load(str(tiny.dirs["int4"] / "model.int8act.onnx"), load_external_data=False).graph.node
    ops = {n.op_type for n in nodes}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"} <= ops
    assert "RotaryEmbedding" not in ops  # rotary runs inside GroupQueryAttention
    assert len(nodes) <= 16 + 27 * tiny.config.num_layers  # 11 nodes a layer, +4 per exact Q4_1 linear
    split = onnx.load(str(tiny.dirs["int4"] / "model.onnx"), load_external_data=False).graph.node
    linears = sum(n.op_type == "MatMulNBits" for n in nodes)
    assert sum(n.op_type == "MatMulNBits" for n in split) == linears  # same weights, same count
    assert len(split) == len(nodes) + 13 * linears  # 13 nodes split each linear's rows and add them


def test_num_logits_to_keep_returns_the_last_positions(tiny, fp32):
    s = len(PROMPT)
    args = ([PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(tiny.config, 1))
    full, _ = run(fp32, *args)
    feed = {
        "input_ids": np.asarray([PROMPT], np.int64),
        "attention_mask": np.ones((1, s), np.int64),
        "position_ids": np.arange(s)[None],
        "num_logits_to_keep": np.array([3]),
        **empty_past(tiny.config, 1),
    }
    kept = fp32.run(["logits"], feed)[0]
    assert kept.shape == (1, 3, full.shape[-1])
    np.testing.assert_array_equal(kept, full[:, -3:])
