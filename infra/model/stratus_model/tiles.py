"""Q4Linear's weights (infra/worker/kernels/q4_linear.cc): a 4-bit affine block linear in tiles of
16 outputs, from the MatMulNBits operands a build already holds.

  W[n, 32b + i] = d[n, b] * q[n, 32b + i] + m[n, b]      q 0..15, d and m float16

  tiles [N/16, K/32, 320] uint8, for tile t and block b:
    bytes   0..255  chunk c (0..3), lane j (0..15), byte e (0..3): q[16t+j, 32b+4c+e] | q[16t+j, 32b+16+4c+e] << 4
    bytes 256..319  d[16t..16t+15, b], then m[16t..16t+15, b], float16

A linear becomes tiles only when that is exact: every block's integers fit 0..15 after one shift,
its scale is a float16 and its offset (the graph's block offset less the shift's share) is one
too, so d*q + m is the same real number as the MatMulNBits weight plus its offset. GGML Q4_1 (d, m
float16) and Q4_0 always are; Q4_K's sub-block scales (a float16 times a 6-bit integer) mostly are
not, and those linears keep their MatMulNBits.
"""

from __future__ import annotations

import numpy as np

TILE = 16  # outputs a tile: one AVX-512 register of int32 sums
BLOCK = 32  # inputs a block
TILE_BLOCK_BYTES = 320


def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q [N, K] 0..15, d and m [N, K/32] float16 -> tiles [N/16, K/32, 320] uint8."""
    n, k = q.shape
    t, kb = n // TILE, k // BLOCK
    blocks = q.astype(np.uint8).reshape(t, TILE, kb, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)  # [t, kb, half, c, j, e]
    nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(t, kb, 256)
    scales = [np.ascontiguousarray(a.astype(np.float16).reshape(t, TILE, kb).transpose(0, 2, 1)) for a in (d, m)]
    out = np.concatenate([nibbles, *(s.view(np.uint8).reshape(t, kb, 32) for s in scales)], axis=-1)
    return np.ascontiguousarray(out)


def unpack(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pack's inverse: tiles -> q [N, K] uint8, d and m [N, K/32] float16 (tests read the tiles back)."""
    t, kb, _ = tiles.shape
    nibbles = tiles[:, :, :256].reshape(t, kb, 4, TILE, 4)
    blocks = np.stack([nibbles & 0x0F, nibbles >> 4], axis=2)  # [t, kb, half, c, j, e]
    q = blocks.transpose(0, 4, 1, 2, 3, 5).reshape(t * TILE, kb * BLOCK)
    d, m = (
        np.ascontiguousarray(tiles[:, :, lo : lo + 32]).view(np.float16).reshape(t, kb, TILE).transpose(0, 2, 1)
        for lo in (256, 288)
    )
    return q, d.reshape(t * TILE, kb), m.reshape(t * TILE, kb)


def from_nbits(
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    offsets: np.ndarray | None,
    bits: int,
    n: int,
    k: int,
    block: int,
) -> np.ndarray | None:
    """A MatMulNBits linear's operands (+ its block offsets [K/32, N], graph.add_block_offsets) ->
    its tiles, or None where they cannot hold it exactly (see the module's docstring)."""
    if block != BLOCK or n % TILE or k % BLOCK or bits not in (4, 8):
        return None
    kb = k // BLOCK
    stored = B.reshape(n, kb, -1).astype(np.int16)
    if bits == 4:
        stored = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(n, kb, BLOCK)
    zp = _zero_points(zero_points, bits, n, kb)
    q = stored - zp[:, :, None]
    shift = next((s for s in (8, 0) if q.min() + s >= 0 and q.max() + s <= 15), None)
    if shift is None:
        return None
    d = scales.reshape(n, kb).astype(np.float64)
    c = np.zeros((n, kb)) if offsets is None else offsets.T.astype(np.float64)
    d16, m16 = d.astype(np.float16), (c - shift * d).astype(np.float16)
    if not (np.array_equal(d16.astype(np.float64), d) and np.array_equal(m16 + shift * d16.astype(np.float64), c)):
        return None
    return pack((q + shift).reshape(n, k), d16, m16)


def _zero_points(zero_points: np.ndarray | None, bits: int, n: int, kb: int) -> np.ndarray:
    """MatMulNBits' zero points [N, K/32] (absent: 2^(bits - 1); 4-bit: two a byte, the first block low)."""
    if zero_points is None:
        return np.full((n, kb), 1 << (bits - 1), np.int16)
    z = zero_points.reshape(n, -1).astype(np.int16)
    if bits == 4:
        z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)
    return z[:, :kb]
