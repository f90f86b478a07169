"""BlockLinear's weights (infra/worker/kernels/block_linear.cc): a block linear in tiles of 16
outputs, from the MatMulNBits operands a build already holds.

  4-bit  W[n, 32b + i] = d[n, b] * q[n, 32b + i] + m[n, b]     q 0..15, d and m float16
         tiles [ceil(N/16), K/32, 320] uint8 (the last tile padded with zeros), for tile t and block b:
           bytes   0..255  chunk c (0..3), lane j (0..15), byte e (0..3):
                           q[16t+j, 32b+4c+e] | q[16t+j, 32b+16+4c+e] << 4
           bytes 256..319  d[16t..16t+15, b], then m[16t..16t+15, b], float16
  8-bit  W[n, 32b + i] = d[n, b] * (q[n, 32b + i] - 128)         q 0..255, d float16
         tiles [ceil(N/16), K/32, 544] uint8: bytes 0..511 chunk c (0..7), lane j, byte e: q[16t+j, 32b+4c+e];
           bytes 512..543  d[16t..16t+15, b]

A linear becomes tiles only where they hold it exactly: 4-bit where every block's integers fit
0..15 after one shift, its scale is a float16 and its offset (the graph's block offset less the
shift's share) is one too, so d*q + m is the same real number as the MatMulNBits weight plus its
offset: GGML Q4_1 (d, m float16) and Q4_0 (also in an int8 build's bytes). 8-bit where the
weights are symmetric 8-bit blocks with float16 scales: GGML Q8_0 (an LM head). Q4_K's sub-block
scales (a float16 times a 6-bit integer) mostly are not float16s, and those linears keep their
MatMulNBits.
"""

from __future__ import annotations

import numpy as np

TILE = 16  # outputs a tile: one AVX-512 register of int32 sums
BLOCK = 32  # inputs a block
BYTES = {4: 320, 8: 544}  # a tile's block


def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """4-bit: q [N, K] 0..15, d and m [N, K/32] float16 -> tiles [ceil(N/16), K/32, 320] uint8;
    8-bit (m None): q [N, K] 0..255, d [N, K/32] float16 -> tiles [ceil(N/16), K/32, 544] uint8.
    A last tile of fewer than 16 outputs is padded with zero weights (the kernel writes N outputs)."""
    q, d, m = (None if a is None else _padded(a) for a in (q, d, m))
    n, k = q.shape
    t, kb = n // TILE, k // BLOCK
    if m is None:
        chunks = q.astype(np.uint8).reshape(t, TILE, kb, 8, 4).transpose(0, 2, 3, 1, 4).reshape(t, kb, 512)
    else:
        blocks = q.astype(np.uint8).reshape(t, TILE, kb, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)  # [t, kb, half, c, j, e]
        chunks = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(t, kb, 256)
    scales = [
        np.ascontiguousarray(a.astype(np.float16).reshape(t, TILE, kb).transpose(0, 2, 1))
        for a in (d, m)
        if a is not None
    ]
    out = np.concatenate([chunks, *(s.view(np.uint8).reshape(t, kb, 32) for s in scales)], axis=-1)
    return np.ascontiguousarray(out)


def _padded(a: np.ndarray) -> np.ndarray:  # [N, ...] -> [16 * ceil(N / 16), ...], zeros after
    return np.concatenate([a, np.zeros((-len(a) % TILE, *a.shape[1:]), a.dtype)]) if len(a) % TILE else a


def unpack(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """pack's inverse: tiles -> q [16 * tiles, K] uint8, d and m [16 * tiles, K/32] float16 (m None: 8-bit)."""
    t, kb, size = tiles.shape
    if size == BYTES[8]:
        q = tiles[:, :, :512].reshape(t, kb, 8, TILE, 4).transpose(0, 3, 1, 2, 4).reshape(t * TILE, kb * BLOCK)
        return q, _scales(tiles, 512), None
    nibbles = tiles[:, :, :256].reshape(t, kb, 4, TILE, 4)
    blocks = np.stack([nibbles & 0x0F, nibbles >> 4], axis=2)  # [t, kb, half, c, j, e]
    q = blocks.transpose(0, 4, 1, 2, 3, 5).reshape(t * TILE, kb * BLOCK)
    return q, _scales(tiles, 256), _scales(tiles, 288)


def _scales(tiles: np.ndarray, at: int) -> np.ndarray:  # the float16 [16] of every tile block at byte `at` -> [N, K/32]
    t, kb, _ = tiles.shape
    return (
        np.ascontiguousarray(tiles[:, :, at : at + 32])
        .view(np.float16)
        .reshape(t, kb, TILE)
        .transpose(0, 2, 1)
        .reshape(-1, kb)
    )


def from_nbits(
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    offsets: np.ndarray | None,
    bits: int,
    n: int,
    k: int,
    block: int,
) -> tuple[int, np.ndarray] | None:
    """A MatMulNBits linear's operands (+ its block offsets [K/32, N], graph.add_block_offsets) ->
    (4 or 8, its tiles), or None where they cannot hold it exactly (see the module's docstring)."""
    if block != BLOCK or k % BLOCK or bits not in (4, 8):
        return None
    kb = k // BLOCK
    stored = B.reshape(n, kb, -1).astype(np.int16)
    if bits == 4:
        stored = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(n, kb, BLOCK)
    q = stored - _zero_points(zero_points, bits, n, kb)[:, :, None]
    d = scales.reshape(n, kb).astype(np.float64)
    d16 = d.astype(np.float16)
    if not np.array_equal(d16.astype(np.float64), d):
        return None
    shift = next((s for s in (8, 0) if q.min() + s >= 0 and q.max() + s <= 15), None)
    if shift is not None:
        c = np.zeros((n, kb)) if offsets is None else offsets.T.astype(np.float64)
        m16 = (c - shift * d).astype(np.float16)
        if np.array_equal(m16 + shift * d16.astype(np.float64), c):
            return 4, pack((q + shift).reshape(n, k), d16, m16)
    if offsets is None and q.min() >= -128 and q.max() <= 127:
        return 8, pack((q + 128).reshape(n, k), d16)
    return None


def _zero_points(zero_points: np.ndarray | None, bits: int, n: int, kb: int) -> np.ndarray:
    """MatMulNBits' zero points [N, K/32] (absent: 2^(bits - 1); 4-bit: two a byte, the first block low)."""
    if zero_points is None:
        return np.full((n, kb), 1 << (bits - 1), np.int16)
    z = zero_points.reshape(n, -1).astype(np.int16)
    if bits == 4:
        z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)
    return z[:, :kb]
