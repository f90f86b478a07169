"""GGML block types read exactly: each decoder turns a tensor's raw blocks into integers, a scale
and (for the affine types) an offset per block, so that scale * q + offset, computed in float32 in
that order, is bit for bit what gguf-py's dequantize gives. quant.exact_nbits then hands the
integers to MatMulNBits unchanged.

  type   block   q                    w                          MatMulNBits
  Q4_0   32      -8..7                d * q                      4-bit (zero point 8)
  Q5_0   32      -16..15              d * q                      8-bit (zero point 128)
  Q5_1   32      0..31                d * q + m                  8-bit + block offsets
  Q8_0   32      -128..127            d * q                      8-bit (zero point 128)
  Q4_K   32      0..15                (d*sc) * q - (dmin*m)      4-bit (zero point 0) + offsets
  Q5_K   32      0..31                (d*sc) * q - (dmin*m)      8-bit + block offsets
  Q6_K   16      -32..31              (d*sc) * q                 8-bit, 16-weight blocks
(K types: 256-weight super-blocks holding the 32- or 16-weight blocks and their 6- or 8-bit scales.)
So an int4 build keeps each type's own width: 4-bit types in 4 bits, wider ones in 8 (a Q8_0 or Q6_K
tensor is not squeezed into 4 bits). Q4_1 keeps its own split (quant.q4_1_split). Q2_K, Q3_K and the
IQ types are not decoded here: they are widened to float32 and quantized again (not bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256  # a K type's super-block


@dataclass(frozen=True)
class Blocks:
    """A weight [rows, cols] as blocks of `size` weights: w = scale * q (+ offset), float32."""

    q: np.ndarray  # int16 [rows, n_blocks, size]
    scale: np.ndarray  # float32 [rows, n_blocks]
    offset: np.ndarray | None  # float32 [rows, n_blocks], or None

    @property
    def size(self) -> int:
        return self.q.shape[-1]

    def values(self) -> np.ndarray:  # -> float32 [rows, cols], as gguf-py computes them
        w = self.scale[..., None] * self.q.astype(np.float32)
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(self.q.shape[0], -1)

    def finer(self, size: int) -> Blocks:
        """The same weights in blocks of `size` (a divisor of this size): each block's scale and
        offset repeated over its parts, so the values stay bit for bit."""
        k = self.size // size
        rows = self.q.shape[0]
        again = lambda a: None if a is None else np.repeat(a, k, axis=1)  # noqa: E731
        return Blocks(self.q.reshape(rows, -1, size), again(self.scale), again(self.offset))


def packed(parts: list[Blocks]) -> Blocks:
    """Weights of different block types stacked along rows (q, k and v of a Q4_K_M file: Q4_K and
    Q6_K): the finest block size, and a zero offset for the parts that have none (adding 0.0 is exact)."""
    size = min(b.size for b in parts)
    parts = [b.finer(size) for b in parts]
    affine = any(b.offset is not None for b in parts)
    offsets = [b.offset if b.offset is not None else np.zeros_like(b.scale) for b in parts] if affine else None
    return Blocks(
        np.concatenate([b.q for b in parts]),
        np.concatenate([b.scale for b in parts]),
        None if offsets is None else np.concatenate(offsets),
    )


def _f16(b: np.ndarray) -> np.ndarray:  # [..., 2] uint8 -> [...] float32
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """[..., g * group] bytes -> [..., g, 2 * group]: each group's low nibbles, then its high ones."""
    qs = qs.reshape(*qs.shape[:-1], -1, group)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:  # [rows, n * bytes] -> [rows, n, bytes]
    return raw.reshape(raw.shape[0], -1, block_bytes)


def q4_0(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 18)
    q = _nibbles(b[..., 2:], 16)[..., 0, :].astype(np.int16) - 8
    return Blocks(q, _f16(b[..., 0:2]), None)


def _q5_high(qh: np.ndarray) -> np.ndarray:  # [..., 4] bytes -> [..., 32] bits 0/1
    bits = np.ascontiguousarray(qh).view(np.uint32)  # [..., 1]
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)


def q5_0(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 22)
    low = _nibbles(b[..., 6:], 16)[..., 0, :].astype(np.int16)
    return Blocks((low | (_q5_high(b[..., 2:6]) << 4)) - 16, _f16(b[..., 0:2]), None)


def q5_1(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 24)
    low = _nibbles(b[..., 8:], 16)[..., 0, :].astype(np.int16)
    return Blocks(low | (_q5_high(b[..., 4:8]) << 4), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def q4_1(raw: np.ndarray) -> Blocks:  # (packs beside other types; alone, Q4_1 has quant.q4_1_split)
    b = _blocks(raw, 20)
    return Blocks(_nibbles(b[..., 4:], 16)[..., 0, :].astype(np.int16), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def q8_0(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 34)
    return Blocks(b[..., 2:].view(np.int8).astype(np.int16), _f16(b[..., 0:2]), None)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_K/Q5_K super-block's 12 scale bytes -> its 8 blocks' 6-bit scales and mins."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_affine(b: np.ndarray, rows: int, q: np.ndarray) -> Blocks:
    """Q4_K/Q5_K: super-blocks b [rows, n, bytes], q [rows, n, 8, 32] -> 32-weight blocks."""
    sc, mn = _k_scales(b[..., 4:16])
    scale = _f16(b[..., 0:2])[..., None] * sc  # [rows, n, 8], as gguf-py: d * sc
    offset = -(_f16(b[..., 2:4])[..., None] * mn)  # w = d*sc*q - dmin*m
    return Blocks(q.reshape(rows, -1, 32), scale.reshape(rows, -1), offset.reshape(rows, -1))


def q4_k(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 144)
    rows, n = b.shape[:2]
    q = _nibbles(b[..., 16:], 32).reshape(rows, n, 8, 32).astype(np.int16)
    return _k_affine(b, rows, q)


def q5_k(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 176)
    rows, n = b.shape[:2]
    low = _nibbles(b[..., 48:], 32).reshape(rows, n, 8, 32).astype(np.int16)
    qh = b[..., 16:48]  # bit j of byte i: the fifth bit of weight i of block j
    high = ((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).astype(np.int16)
    return _k_affine(b, rows, low | (high << 4))


def q6_k(raw: np.ndarray) -> Blocks:
    b = _blocks(raw, 210)
    rows, n = b.shape[:2]
    ql = _nibbles(b[..., 0:128], 64).reshape(rows, n, 8, 32)  # halves of 64 bytes: low, high nibbles
    qh = b[..., 128:192].reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    q = (ql.astype(np.int16) | ((qh & 0x03).reshape(rows, n, 8, 32).astype(np.int16) << 4)) - 32
    scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)  # [rows, n, 16]
    return Blocks(q.reshape(rows, -1, 16), scale.reshape(rows, -1), None)


DECODERS: dict[str, Callable[[np.ndarray], Blocks]] = {  # (Q4_1: PACKABLE only)
    "Q4_0": q4_0,
    "Q5_0": q5_0,
    "Q5_1": q5_1,
    "Q8_0": q8_0,
    "Q4_K": q4_k,
    "Q5_K": q5_k,
    "Q6_K": q6_k,
}
PACKABLE = {**DECODERS, "Q4_1": q4_1}  # the types a mixed q/k/v or gate/up pack keeps exactly
