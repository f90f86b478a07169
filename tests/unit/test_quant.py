import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from stratus_model.quant import dequantize_nbits, q4_1_split, q8_0_to_nbits, quantize_blocks, to_nbits
from stratus_model.source import SourceTensor

Q = gguf.GGMLQuantizationType


def test_q8_0_blocks_map_exactly_onto_8bit_matmulnbits():
    w = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    raw = quantize(w, Q.Q8_0)
    n = q8_0_to_nbits(raw, 6, 96)
    np.testing.assert_array_equal(dequantize_nbits(n, 6, 96), dequantize(raw, Q.Q8_0))


@pytest.mark.parametrize("bits,cols", [(4, 64), (4, 96), (8, 64)])  # 96 -> odd block count (zero-point packing)
def test_blockwise_quantization_error_is_within_half_a_step(bits, cols):
    w = np.random.default_rng(2).standard_normal((5, cols)).astype(np.float32)
    n = quantize_blocks(w, bits)
    err = np.abs(dequantize_nbits(n, 5, cols) - w).reshape(5, -1, 32)
    step = n.scales.reshape(5, -1, 1)
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_q4_1_split_is_exact(bits):
    # Given Q4_1 blocks (w = d*q + m), when split into d*(q - 8) + c,
    # then the 4- or 8-bit part plus the per-block offset reproduces the GGUF's values.
    w = np.random.default_rng(3).standard_normal((4, 96)).astype(np.float32)
    raw = quantize(w, Q.Q4_1)
    n, c = q4_1_split(raw, 4, 96, bits)
    assert n.bits == bits and n.zero_points is None
    rebuilt = dequantize_nbits(n, 4, 96) + np.repeat(c.T, 32, axis=1)
    np.testing.assert_allclose(rebuilt, dequantize(raw, Q.Q4_1), atol=1e-6)


def test_other_sources_are_requantized():
    w = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    n = to_nbits(SourceTensor("x", "F32", w, (4, 64)), 4)
    assert n.zero_points is not None and n.zero_points.dtype == np.uint8
    assert np.abs(dequantize_nbits(n, 4, 64) - w).max() <= n.scales.max() / 2 + 1e-6
