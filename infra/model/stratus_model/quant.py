"""Linear-layer encodings: how a weight [out, in] becomes ONNX nodes computing x @ W.T.

A registry maps the `--quant` name to a scheme. Quantized linears are onnxruntime's MatMulNBits
(block-wise, 32 weights a block, uint8 zero points), the layout its fast int8-activation kernels
(accuracy_level 4) take. GGML Q8_0 blocks (w = d*q) map onto 8-bit MatMulNBits exactly (implicit
zero point 128), so the tied LM head keeps the published embedding bit for bit. Everything else
is quantized here, asymmetric per block.

Q4_1 (w = d*q + m) maps onto 4-bit MatMulNBits directly only with a float zero point (-m/d),
which onnxruntime runs ~20x slower (no int8 kernel). Instead we split each block as
w = d*(q - 8) + c with c = m + 8*d: the first term is 4-bit MatMulNBits with the default zero
point 8 (the fast kernel, published nibbles unchanged), the second a small float MatMul of the
input's per-block sums with c (see graph.linear_q4_1). Exact, and it keeps the weights
bit for bit. The int8 build holds the same nibbles a byte each (q + 120 against the 8-bit default
zero point 128): the same weights for onnxruntime's 8-bit kernels.

The other GGML block types (stratus_model.ggml) go in as their integers too (exact_nbits): 4-bit
where the type's are 4-bit and the scheme allows, else 8-bit, with the type's block size (Q6_K:
16) and, for the affine types, a float offset per block computed beside (w = s*q + offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stratus.errors import ModelBuildError
from stratus_model import ggml
from stratus_model.ggml import Blocks
from stratus_model.source import SourceTensor

BLOCK = 32
_GGML_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class NBits:
    """MatMulNBits operands. B: [N, k_blocks, blob] uint8; scales: [N * k_blocks] float32."""

    bits: int
    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None  # uint8 (4-bit: two a byte), or None (= 2^(bits-1))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:  # [..., 32] uint8 0..15 -> [..., 16]
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def q8_0_to_nbits(raw: np.ndarray, rows: int, cols: int) -> NBits:
    """GGML Q8_0 blocks [rows, k_blocks*34] -> 8-bit MatMulNBits, implicit zero point 128."""
    return exact_nbits(ggml.q8_0(raw.reshape(rows, -1)), 8)[0]


def q4_1_split(raw: np.ndarray, rows: int, cols: int, bits: int = 4) -> tuple[NBits, np.ndarray]:
    """GGML Q4_1 [rows, k_blocks*20] -> (NBits computing d*(q - 8), c [k_blocks, rows] float32).

    bits=4 packs the nibbles (default zero point 8); bits=8 stores q + 120 a byte (default zero
    point 128), the same values for the 8-bit kernels."""
    b = ggml.q4_1(raw.reshape(rows, -1))  # q 0..15, scale d, offset m
    q = b.q.astype(np.uint8)
    packed = _pack_nibbles(q) if bits == 4 else (q + 120).astype(np.uint8)
    return NBits(bits, packed, b.scale.reshape(-1), None), np.ascontiguousarray((b.offset + 8 * b.scale).T)


def quantize_blocks(w: np.ndarray, bits: int) -> NBits:
    """Asymmetric block-wise quantization of W [rows, cols] (cols % 32 == 0)."""
    rows, cols = w.shape
    levels = (1 << bits) - 1
    blocks = w.reshape(rows, cols // BLOCK, BLOCK)
    lo, hi = blocks.min(-1), blocks.max(-1)  # [rows, kb]
    lo = np.where(lo > 0, 0.0, lo)  # a block must reach 0 so the zero point stays in range
    hi = np.where(hi < 0, 0.0, hi)
    scale = (hi - lo) / levels
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, levels).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
    if bits == 4:
        B = _pack_nibbles(q)
        # 4-bit zero points pack two a byte per row: [N, ceil(kb/2)]
        kb = cols // BLOCK
        zrow = zp.reshape(rows, kb)
        if kb % 2:
            zrow = np.concatenate([zrow, np.zeros((rows, 1), np.uint8)], axis=1)
        zpacked = (zrow[:, 0::2] | (zrow[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        return NBits(4, B, scale.reshape(-1), zpacked)
    return NBits(8, q, scale.reshape(-1), zp.reshape(-1))


def to_nbits(w: SourceTensor, bits: int) -> NBits:
    rows, cols = w.shape
    if cols % BLOCK:
        raise ModelBuildError(
            f"tensor {w.name}: {cols} inputs is not a multiple of the {BLOCK}-weight quantization "
            "block; build fp32 instead"
        )
    if bits == 8 and w.qtype == "Q8_0":
        return q8_0_to_nbits(w.raw, rows, cols)
    return quantize_blocks(w.dense(), bits)


FOUR_BIT_TYPES = ("Q4_0", "Q4_K")  # GGML types whose integers fit 4-bit MatMulNBits


def exact_nbits(b: Blocks, bits: int) -> tuple[NBits, np.ndarray | None]:
    """A GGML tensor's blocks (ggml.DECODERS) -> (MatMulNBits operands computing scale * q exactly,
    the per-block offsets [k_blocks, rows] the graph adds beside, or None). bits: 4 or 8, the
    caller's choice (4 only for FOUR_BIT_TYPES). Signed integers sit on the default zero point
    (2^(bits-1)); an affine type's unsigned ones on zero point 0 in 4 bits, 128 in 8."""
    rows, kb = b.scale.shape
    affine = b.offset is not None
    zero_points = None
    if bits == 4:
        q = b.q if affine else b.q + 8
        B = _pack_nibbles(q.astype(np.uint8))
        if affine:  # an explicit zero point 0 for every block, two a byte: [rows, ceil(kb/2)]
            zero_points = np.zeros(rows * -(-kb // 2), np.uint8)
    else:
        B = (b.q + 128).astype(np.uint8)
    offsets = np.ascontiguousarray(b.offset.T) if affine else None
    return NBits(bits, B, np.ascontiguousarray(b.scale.reshape(-1), np.float32), zero_points), offsets


def dequantize_nbits(n: NBits, rows: int, cols: int, block: int = BLOCK) -> np.ndarray:
    """Inverse of the encodings above (tests and error reports): -> W [rows, cols] float32."""
    kb = cols // block
    if n.bits == 4:
        packed = n.B.reshape(rows, kb, block // 2)
        q = np.empty((rows, kb, block), np.float32)
        q[..., 0::2] = packed & 0x0F
        q[..., 1::2] = packed >> 4
    else:
        q = n.B.reshape(rows, kb, block).astype(np.float32)
    if n.zero_points is None:
        zp = np.full((rows, kb), 1 << (n.bits - 1), np.float32)
    elif n.bits == 4:
        zb = n.zero_points.reshape(rows, -1)
        zp = np.stack([zb & 0x0F, zb >> 4], axis=-1).reshape(rows, -1)[:, :kb].astype(np.float32)
    else:
        zp = n.zero_points.reshape(rows, kb).astype(np.float32)
    return ((q - zp[..., None]) * n.scales.reshape(rows, kb)[..., None]).reshape(rows, cols)


@dataclass(frozen=True)
class QuantScheme:
    name: str
    linear_bits: int | None  # None = float32 MatMul
    lm_head_bits: int | None
    description: str


QUANT_SCHEMES: dict[str, QuantScheme] = {
    "fp32": QuantScheme("fp32", None, None, "float32 weights, MatMul"),
    "int8": QuantScheme(
        "int8",
        8,
        8,
        "8-bit block-wise MatMulNBits holding the GGUF's Q4_1, Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K "
        "values exactly (float and other types quantized); LM head from GGUF Q8_0 exactly",
    ),
    "int4": QuantScheme(
        "int4",
        4,
        8,
        "4-bit block-wise MatMulNBits where the GGUF's blocks are 4-bit (Q4_1, Q4_0, Q4_K: exactly), 8-bit "
        "for its wider types (exactly), float and other types quantized to 4 bits; LM head 8-bit",
    ),
}
