// BlockLinear: a linear over 4- or 8-bit block weights on split activations, in one pass over the weights.
//
//   y [B, S, N] = x [B, S, K] @ W^T   with, per block of 32 inputs of an output (d, m float16):
//     bits 4:  W[n, 32b + i] = d[n, b] * q[n, 32b + i] + m[n, b]      q 0..15    (GGML Q4_1, Q4_0)
//     bits 8:  W[n, 32b + i] = d[n, b] * (q[n, 32b + i] - 128)          q 0..255   (GGML Q8_0)
//
// Each row of x is split per block of 32 inputs as SplitRows does (hi = s * round(x / s), s = max|x| / 127; lo = x - hi),
// both parts held as int8 (lo on its own grid, s_lo = max|lo| / 127, as MatMulNBits quantizes an input row). A block's
// products are integer dot products of the weights' integers with hi's and lo's, read from one load of the weights
// (MatMulNBits over [hi; lo] reads them for each row). As the graphs of the other configurations do, the products are
// centred on a zero point Z (8 or 128: small integer sums, exact) and a 4-bit block's offset c = m + 8d takes the
// block's sum of x:
//
//   y[n] = sum over blocks b, in order, of:  f = float((q - Z).lo_b) * s_lo_b + float((q - Z).hi_b) * s_hi_b
//                                            acc = fma(f, d[n, b], acc);  (4-bit) acc = fma(8 d + m, sum(x_b), acc)
//
// where (q - Z).v = q.v - Z sum(v): each integer sum starts from -Z sum(v) (Rows::sum_hi, sum_lo), so centring costs
// nothing.
//
// Every lane is one output, so the AVX-512 VNNI, AVX2 and plain C++ paths make the same operations in the same order: the
// same bits on every host (tests/unit/test_kernels.py compares them). The weights come in tiles of 16 outputs (the last
// padded; stratus_model.tiles): [ceil(N/16), K/32, bytes] for each tile and block, 4-bit (320 bytes)
//   bytes   0..255  4 chunks of 64: chunk c, output lane j, byte e = q[16t+j, 32b+4c+e] | q[16t+j, 32b+16+4c+e] << 4
//   bytes 256..319  d[16] then m[16], float16
// 8-bit (544 bytes)
//   bytes   0..511  8 chunks of 64: chunk c, output lane j, byte e = q[16t+j, 32b+4c+e]
//   bytes 512..543  d[16], float16
// so every 64 bytes (a 4-bit chunk's low or high nibbles) are four inputs of the 16 outputs, lane by lane: one VNNI
// instruction multiplies them with four inputs broadcast. 20 and 34 bytes a block of 32 weights, as GGML's Q4_1 and Q8_0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_ps, which -Wmaybe-uninitialized reports
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace stratus {
namespace {

constexpr int64_t kBlock = 32;  // inputs a block
constexpr int64_t kLanes = 16;  // outputs a tile

// A tile block's layout by the weights' bits: bytes, and where its float16 scales d and (4-bit) offsets m sit.
template <int Bits>
struct Layout;
template <>
struct Layout<4> {
  static constexpr int64_t bytes = 320, d = 256, m = 288, zero = 8;
};
template <>
struct Layout<8> {
  static constexpr int64_t bytes = 544, d = 512, m = -1, zero = 128;
};

// The split of a row's blocks: integers [K] (hi then lo) and per block s_hi, s_lo, the sum of x and the sums of the
// integers.
struct Rows {
  const float* in = nullptr;             // x [rows, K]
  std::vector<int8_t> hi, lo;            // [rows, K]
  std::vector<float> s_hi, s_lo, sum;    // [rows, K/32]
  std::vector<int32_t> sum_hi, sum_lo;   // [rows, K/32]
  int64_t rows = 0, k = 0, kb = 0;

  void resize(const float* x, int64_t n, int64_t width) {
    in = x, rows = n, k = width, kb = width / kBlock;
    hi.resize(n * k), lo.resize(n * k), s_hi.resize(n * kb), s_lo.resize(n * kb), sum.resize(n * kb);
    sum_hi.resize(n * kb), sum_lo.resize(n * kb);
  }
};

// A block's 32 values as four vectors of 8 (kernels.h's v8).
typedef int32_t vi8 __attribute__((vector_size(32)));

[[gnu::always_inline]] inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

[[gnu::always_inline]] inline v8 abs8(v8 v) { return (v8)((vi8)v & 0x7fffffff); }
[[gnu::always_inline]] inline v8 max8(v8 a, v8 b) { return a > b ? a : b; }

// -> the block's largest magnitude (exact, whatever the order)
[[gnu::always_inline]] inline float block_peak(const float* x) {
  const v8 m = max8(max8(abs8(load8(x)), abs8(load8(x + 16))), max8(abs8(load8(x + 8)), abs8(load8(x + 24))));
  const v4 a = __builtin_shufflevector(m, m, 0, 1, 2, 3), b = __builtin_shufflevector(m, m, 4, 5, 6, 7);
  const v4 h = a > b ? a : b;
  return std::max(std::max(h[0], h[2]), std::max(h[1], h[3]));
}

// -> the block's sum in one order on every path: lanes (x[l] + x[l + 16]) + (x[l + 8] + x[l + 24]), then halves
[[gnu::always_inline]] inline float block_sum(const float* x) {
  return fold_lanes((load8(x) + load8(x + 16)) + (load8(x + 8) + load8(x + 24)));
}

// One row of x [K] -> its integers and per-block scales and sums. hi's integers are SplitRows's (the same float32
// operations); lo's are round(lo / s_lo). Elementwise IEEE operations, sums in one order: the same bits at every width.
STRATUS_CLONES void split_row(const float* x, int64_t k, int8_t* hi, int8_t* ql, float* s_hi, float* s_lo, float* sums,
                              int32_t* sum_hi, int32_t* sum_lo) {
  float q[kBlock], lo[kBlock];
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    const float peak = block_peak(xb), sum = block_sum(xb);
    const float s = std::max(peak * kInv127, kTiny);
    for (int64_t i = 0; i < kBlock; ++i) q[i] = std::nearbyint(xb[i] / s), lo[i] = xb[i] - q[i] * s;
    const float peak_lo = block_peak(lo);
    const float sl = peak_lo * kInv127, scale_lo = sl > 0.0f ? sl : 1.0f;  // an exact block: lo all zero
    int32_t ints_hi = 0, ints_lo = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      hi[b * kBlock + i] = static_cast<int8_t>(q[i]);
      ql[b * kBlock + i] = static_cast<int8_t>(std::min(std::max(std::nearbyint(lo[i] / scale_lo), -127.0f), 127.0f));
      ints_hi += hi[b * kBlock + i], ints_lo += ql[b * kBlock + i];
    }
    s_hi[b] = s, s_lo[b] = sl, sums[b] = sum, sum_hi[b] = ints_hi, sum_lo[b] = ints_lo;
  }
}

void split_task(void* p, size_t r) {
  auto& x = *static_cast<Rows*>(p);
  split_row(x.in + r * x.k, x.k, x.hi.data() + r * x.k, x.lo.data() + r * x.k, x.s_hi.data() + r * x.kb,
            x.s_lo.data() + r * x.kb, x.sum.data() + r * x.kb, x.sum_hi.data() + r * x.kb, x.sum_lo.data() + r * x.kb);
}

float half_to_float(uint16_t h) { return Ort::Float16_t::FromBits(h).ToFloat(); }  // IEEE binary16, exactly

// A tile block's weight of output lane j, input i (0..31), unsigned (q, 0..15 or 0..255).
template <int Bits>
inline int32_t weight(const uint8_t* blk, int64_t j, int64_t i) {
  if constexpr (Bits == 4) {
    const uint8_t byte = blk[(i % 16) / 4 * 64 + j * 4 + i % 4];
    return i < 16 ? byte & 0x0F : byte >> 4;
  } else {
    return blk[i / 4 * 64 + j * 4 + i % 4];
  }
}

// One tile's outputs for rows [r0, r1): y[r, 16t + j]. tile: [kb, Layout::bytes]; y: [rows, n].
template <int Bits>
void tile_plain(const uint8_t* tile, const Rows& x, int64_t r0, int64_t r1, float* y, int64_t n, int64_t t) {
  using L = Layout<Bits>;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < kLanes; ++j) {
      float acc = 0.0f;
      for (int64_t b = 0; b < x.kb; ++b) {
        const uint8_t* blk = tile + b * L::bytes;
        const int8_t* hi = x.hi.data() + r * x.k + b * kBlock;
        const int8_t* lo = x.lo.data() + r * x.k + b * kBlock;
        const int64_t s = r * x.kb + b;
        int32_t ih = -L::zero * x.sum_hi[s], il = -L::zero * x.sum_lo[s];
        for (int64_t i = 0; i < kBlock; ++i) {
          const int32_t q = weight<Bits>(blk, j, i);
          ih += q * hi[i], il += q * lo[i];
        }
        uint16_t dh;
        std::memcpy(&dh, blk + L::d + 2 * j, 2);
        const float d = half_to_float(dh), f = std::fma(static_cast<float>(il), x.s_lo[s], static_cast<float>(ih) * x.s_hi[s]);
        acc = std::fma(f, d, acc);
        if constexpr (Bits == 4) {
          uint16_t mh;
          std::memcpy(&mh, blk + L::m + 2 * j, 2);
          acc = std::fma(std::fma(8.0f, d, half_to_float(mh)), x.sum[s], acc);
        }
      }
      if (t * kLanes + j < n) y[r * n + t * kLanes + j] = acc;  // (a last tile's padding lanes: not outputs)
    }
  }
}

// Tiles [t0, t1) for rows [r0, r1) (tile t at tiles + t * tile_bytes), one at a time.
template <void (*Tile)(const uint8_t*, const Rows&, int64_t, int64_t, float*, int64_t, int64_t)>
void each_tile(const uint8_t* tiles, int64_t tile_bytes, const Rows& x, int64_t r0, int64_t r1, float* y, int64_t n,
               int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) Tile(tiles + t * tile_bytes, x, r0, r1, y, n, t);
}

#if defined(__x86_64__)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni,f16c,fma")))
#define AVX2 __attribute__((target("avx2,f16c,fma")))

// Two groups of four inputs of a block's 16 outputs, as unsigned bytes lane by lane: groups g and g + 4 of a 4-bit
// chunk g (its low and high nibbles), groups 2g and 2g + 1 of the 8-bit chunks 2g and 2g + 1. g: 0..3.
template <int Bits>
AVX512 inline void groups512(const uint8_t* blk, int g, __m512i& a, __m512i& b) {
  if constexpr (Bits == 4) {
    const __m512i nibble = _mm512_set1_epi8(0x0F), v = _mm512_loadu_si512(blk + 64 * g);
    a = _mm512_and_si512(v, nibble), b = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  } else {
    a = _mm512_loadu_si512(blk + 128 * g), b = _mm512_loadu_si512(blk + 128 * g + 64);
  }
}

template <int Bits>
constexpr int group_a(int g) { return Bits == 4 ? g : 2 * g; }  // the input groups groups512 gives
template <int Bits>
constexpr int group_b(int g) { return Bits == 4 ? g + 4 : 2 * g + 1; }

// Rows [r, r + R) of tiles t .. t + T - 1 (tile u at tiles + u * tile_bytes). Per block, each row's hi and lo integers
// four at a time broadcast feed 2RT independent VNNI sums, started at -Z sum(ints) and reset per block (their scales
// are the block's).
template <int Bits, int R, int T>
AVX512 void rows_avx512(const uint8_t* tiles, int64_t tile_bytes, const Rows& x, int64_t r, float* y, int64_t n,
                        int64_t t) {
  using L = Layout<Bits>;
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int u = 0; u < T; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.kb; ++b) {
    __m512i ih[R][T], il[R][T];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t s = (r + i) * x.kb + b;
#pragma GCC unroll 4
      for (int u = 0; u < T; ++u) {
        ih[i][u] = _mm512_set1_epi32(-L::zero * x.sum_hi[s]), il[i][u] = _mm512_set1_epi32(-L::zero * x.sum_lo[s]);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      __m512i wa[T], wb[T];
#pragma GCC unroll 4
      for (int u = 0; u < T; ++u) groups512<Bits>(tiles + u * tile_bytes + b * L::bytes, g, wa[u], wb[u]);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int8_t* hi = x.hi.data() + (r + i) * x.k + b * kBlock;
        const int8_t* lo = x.lo.data() + (r + i) * x.k + b * kBlock;
        const __m512i ha = _mm512_broadcastd_epi32(_mm_loadu_si32(hi + 4 * group_a<Bits>(g)));
        const __m512i hb = _mm512_broadcastd_epi32(_mm_loadu_si32(hi + 4 * group_b<Bits>(g)));
        const __m512i la = _mm512_broadcastd_epi32(_mm_loadu_si32(lo + 4 * group_a<Bits>(g)));
        const __m512i lb = _mm512_broadcastd_epi32(_mm_loadu_si32(lo + 4 * group_b<Bits>(g)));
#pragma GCC unroll 4
        for (int u = 0; u < T; ++u) {
          ih[i][u] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ih[i][u], wa[u], ha), wb[u], hb);
          il[i][u] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(il[i][u], wa[u], la), wb[u], lb);
        }
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < T; ++u) {
      const uint8_t* blk = tiles + u * tile_bytes + b * L::bytes;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::d)));
      __m512 c = _mm512_setzero_ps();
      if constexpr (Bits == 4) {
        c = _mm512_fmadd_ps(_mm512_set1_ps(8.0f), d,
                            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::m))));
      }
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const int64_t s = (r + i) * x.kb + b;
        const __m512 fh = _mm512_mul_ps(_mm512_cvtepi32_ps(ih[i][u]), _mm512_set1_ps(x.s_hi[s]));
        const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il[i][u]), _mm512_set1_ps(x.s_lo[s]), fh);
        acc[i][u] = _mm512_fmadd_ps(f, d, acc[i][u]);
        if constexpr (Bits == 4) acc[i][u] = _mm512_fmadd_ps(c, _mm512_set1_ps(x.sum[s]), acc[i][u]);
      }
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < T; ++u) {
    const int64_t left = n - (t + u) * kLanes;  // a last tile's padding lanes are not outputs
    const __mmask16 lanes = left >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + (r + i) * n + (t + u) * kLanes, lanes, acc[i][u]);
  }
}

// Tiles [t0, t1) for rows [r0, r1): eight rows a pass, then four (one tile at a time), then each last row four
// tiles at a time (a lone decode row: 8 sums in flight instead of 2).
template <int Bits>
AVX512 void tiles_avx512(const uint8_t* tiles, int64_t tile_bytes, const Rows& x, int64_t r0, int64_t r1, float* y,
                         int64_t n, int64_t t0, int64_t t1) {
  int64_t r = r0;
  for (; r + 8 <= r1; r += 8)
    for (int64_t t = t0; t < t1; ++t) rows_avx512<Bits, 8, 1>(tiles + t * tile_bytes, tile_bytes, x, r, y, n, t);
  for (; r + 4 <= r1; r += 4)
    for (int64_t t = t0; t < t1; ++t) rows_avx512<Bits, 4, 1>(tiles + t * tile_bytes, tile_bytes, x, r, y, n, t);
  for (; r < r1; ++r) {
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) rows_avx512<Bits, 1, 4>(tiles + t * tile_bytes, tile_bytes, x, r, y, n, t);
    for (; t < t1; ++t) rows_avx512<Bits, 1, 1>(tiles + t * tile_bytes, tile_bytes, x, r, y, n, t);
  }
}

// AVX2 has no VNNI. 4-bit: u8 x s8 pairs (vpmaddubsw: int16, at most 2 * 15 * 127) summed over a block's four chunks in
// int16 (16 products, at most 30,480: no overflow), then pairs of those into int32 (vpmaddwd with ones). 8-bit: a pair
// of 255 * 127 would saturate int16, so the weights go in signed (q - 128), as |q - 128| against x with its sign
// (at most 2 * 128 * 127 a pair), widened to int32 at once; their sums need no centring. Rows [r, r + R) of one half of
// a tile's lanes (8 outputs: half 0 or 1).
// signed bytes w . v, four at a time into int32: |w| (-128 reads 128 unsigned) against v with w's sign
AVX2 inline __m256i dot_signed(__m256i w, __m256i v) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w)), _mm256_set1_epi16(1));
}

template <int Bits, int R>
AVX2 void rows_avx2(const uint8_t* tile, const Rows& x, int64_t r, float* y, int64_t n, int64_t t, int half) {
  using L = Layout<Bits>;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
  __m256 acc[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.kb; ++b) {
    const uint8_t* blk = tile + b * L::bytes;
    __m256i ph[R], pl[R];  // 4-bit: int16 pair sums; 8-bit: int32 sums
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) ph[i] = _mm256_setzero_si256(), pl[i] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int g = 0; g < 8; g += 2) {  // input groups ga and gb (as groups512)
      const int ga = Bits == 4 ? g / 2 : g, gb = Bits == 4 ? g / 2 + 4 : g + 1;
      __m256i wa, wb;
      if constexpr (Bits == 4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * (g / 2) + 32 * half));
        wa = _mm256_and_si256(v, nibble), wb = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      } else {
        wa = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * g + 32 * half)), flip);
        wb = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * g + 64 + 32 * half)), flip);
      }
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const int64_t at = (r + i) * x.k + b * kBlock;
        const __m256i xs[4] = {
            _mm256_broadcastd_epi32(_mm_loadu_si32(x.hi.data() + at + 4 * ga)),
            _mm256_broadcastd_epi32(_mm_loadu_si32(x.hi.data() + at + 4 * gb)),
            _mm256_broadcastd_epi32(_mm_loadu_si32(x.lo.data() + at + 4 * ga)),
            _mm256_broadcastd_epi32(_mm_loadu_si32(x.lo.data() + at + 4 * gb)),
        };
        if constexpr (Bits == 4) {
          ph[i] = _mm256_add_epi16(ph[i], _mm256_add_epi16(_mm256_maddubs_epi16(wa, xs[0]), _mm256_maddubs_epi16(wb, xs[1])));
          pl[i] = _mm256_add_epi16(pl[i], _mm256_add_epi16(_mm256_maddubs_epi16(wa, xs[2]), _mm256_maddubs_epi16(wb, xs[3])));
        } else {
          ph[i] = _mm256_add_epi32(ph[i], _mm256_add_epi32(dot_signed(wa, xs[0]), dot_signed(wb, xs[1])));
          pl[i] = _mm256_add_epi32(pl[i], _mm256_add_epi32(dot_signed(wa, xs[2]), dot_signed(wb, xs[3])));
        }
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + L::d + 16 * half)));
    __m256 c = _mm256_setzero_ps();
    if constexpr (Bits == 4) {
      c = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), d,
                          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + L::m + 16 * half))));
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int64_t s = (r + i) * x.kb + b;
      __m256i ih = ph[i], il = pl[i];
      if constexpr (Bits == 4) {
        ih = _mm256_add_epi32(_mm256_madd_epi16(ph[i], ones), _mm256_set1_epi32(-L::zero * x.sum_hi[s]));
        il = _mm256_add_epi32(_mm256_madd_epi16(pl[i], ones), _mm256_set1_epi32(-L::zero * x.sum_lo[s]));
      }
      const __m256 fh = _mm256_mul_ps(_mm256_cvtepi32_ps(ih), _mm256_set1_ps(x.s_hi[s]));
      const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(il), _mm256_set1_ps(x.s_lo[s]), fh);
      acc[i] = _mm256_fmadd_ps(f, d, acc[i]);
      if constexpr (Bits == 4) acc[i] = _mm256_fmadd_ps(c, _mm256_set1_ps(x.sum[s]), acc[i]);
    }
  }
  const int64_t left = std::min<int64_t>(n - t * kLanes - 8 * half, 8);  // a last tile's padding lanes are not outputs
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    float out[8];
    _mm256_storeu_ps(out, acc[i]);
    std::copy(out, out + std::max<int64_t>(left, 0), y + (r + i) * n + t * kLanes + 8 * half);
  }
}

template <int Bits>
AVX2 void tile_avx2(const uint8_t* tile, const Rows& x, int64_t r0, int64_t r1, float* y, int64_t n, int64_t t) {
  for (int half = 0; half < 2; ++half) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) rows_avx2<Bits, 4>(tile, x, r, y, n, t, half);
    for (; r < r1; ++r) rows_avx2<Bits, 1>(tile, x, r, y, n, t, half);
  }
}
#endif

using TilesFn = void (*)(const uint8_t*, int64_t, const Rows&, int64_t, int64_t, float*, int64_t, int64_t, int64_t);

}  // namespace

Isa widest_isa() {
  const char* cap = std::getenv("STRATUS_KERNELS_ISA");
  const std::string limit = cap ? cap : "avx512";
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vnni");
  if (avx512 && limit == "avx512") return Isa::avx512;
  if (avx2 && (limit == "avx512" || limit == "avx2")) return Isa::avx2;
#endif
  return Isa::plain;
}

namespace {

// The widest path the host runs for `bits`-bit weights (widest_isa).
template <int Bits>
TilesFn pick_path() {
#if defined(__x86_64__)
  switch (widest_isa()) {
    case Isa::avx512: return tiles_avx512<Bits>;
    case Isa::avx2: return each_tile<tile_avx2<Bits>>;
    case Isa::plain: break;
  }
#endif
  return each_tile<tile_plain<Bits>>;
}

struct Args {
  TilesFn fn;
  const uint8_t* tiles;
  const Rows* x;
  float* y;
  int64_t n, tiles_n, chunks, rows, tile_bytes;
};

constexpr int64_t kTileGroup = 4;     // tiles a task
constexpr int64_t kRowsPerTask = 16;  // rows a task: a prefill's rows go 16 at a time

// task i: tile group i / chunks, rows of chunk i % chunks (consecutive tasks share a group's weights)
void task(void* p, size_t i) {
  const auto& a = *static_cast<const Args*>(p);
  const int64_t g = static_cast<int64_t>(i) / a.chunks, c = static_cast<int64_t>(i) % a.chunks;
  const int64_t r0 = c * kRowsPerTask, r1 = std::min(a.rows, r0 + kRowsPerTask);
  const int64_t t0 = g * kTileGroup, t1 = std::min(a.tiles_n, t0 + kTileGroup);
  a.fn(a.tiles, a.tile_bytes, *a.x, r0, r1, a.y, a.n, t0, t1);
}

struct BlockLinear {
  BlockLinear(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    k_ = ki.GetAttribute<int64_t>("K");
    n_ = ki.GetAttribute<int64_t>("N");
    bits_ = ki.GetAttribute<int64_t>("bits");
    fn_ = bits_ == 8 ? pick_path<8>() : pick_path<4>();
    block_bytes_ = bits_ == 8 ? Layout<8>::bytes : Layout<4>::bytes;
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& tiles,
                      Ort::Custom::Tensor<float>& out) {
    std::vector<int64_t> shape = x.Shape();
    const int64_t tiles_n = (n_ + kLanes - 1) / kLanes, kb = k_ / kBlock;
    if ((bits_ != 4 && bits_ != 8) || shape.empty() || shape.back() != k_ || k_ % kBlock != 0 ||
        tiles.NumberOfElement() != tiles_n * kb * block_bytes_) {
      return Ort::Status("BlockLinear: bits 4 or 8, x [.., K], tiles [ceil(N/16), K/32, 320 or 544], K % 32 == 0",
                         ORT_INVALID_ARGUMENT);
    }
    const int64_t rows = x.NumberOfElement() / k_;
    shape.back() = n_;
    float* y = out.Allocate(shape);
    if (rows == 0) return Ort::Status{nullptr};
    thread_local Rows split_rows;
    split_rows.resize(x.Data(), rows, k_);
    Ort::Status split{Ort::GetApi().KernelContext_ParallelFor(ctx, split_task, static_cast<size_t>(rows), 0, &split_rows)};
    if (!split.IsOK()) return split;
    const int64_t chunks = (rows + kRowsPerTask - 1) / kRowsPerTask, groups = (tiles_n + kTileGroup - 1) / kTileGroup;
    Args args{fn_, tiles.Data(), &split_rows, y, n_, tiles_n, chunks, rows, kb * block_bytes_};
    return Ort::Status{Ort::GetApi().KernelContext_ParallelFor(ctx, task, static_cast<size_t>(groups * chunks), 0, &args)};
  }

  TilesFn fn_ = nullptr;
  int64_t k_ = 0, n_ = 0, bits_ = 4, block_bytes_ = 0;
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* block_linear_op() {
  return Ort::Custom::CreateLiteCustomOp<BlockLinear>("BlockLinear", "CPUExecutionProvider");
}

}  // namespace stratus
