// Stratus's onnxruntime kernels: GroupAttention, attention over the in-place KV cache with grouped query heads, for
// the fused-linear graph (stratus_model.variants) in place of onnxruntime's GroupQueryAttention, whose CPU kernel
// runs two small GEMMs and a softmax per (row, query head): at a decode step of 16 rows that is 16 x 9 heads x 30
// layers of calls of a few thousand multiplies each, and ~a quarter of the step. Here one task is a row's kv head:
// each key and value it reads serves every query head of its group, with the loops in registers.
//
//   qkv [B, S, (H + 2 Hkv) D]  past_key, past_value [B, Hkv, P, D]  seqlens_k [B] int32  total_sequence_length int32
//   cos_cache, sin_cache [M, R/2]  position_ids [B, S] int64
//   -> output [B, S, H D], present_key, present_value [B, Hkv, max(P, total), D] (bound to past's buffer: in place)
//
// The same contract as GroupQueryAttention with packed qkv, do_rotary=1, rotary_interleaved=0 (the graph's use):
// a first prompt (total == S) holds row b's seqlens_k[b] + 1 positions, right-padded; otherwise row b's S new
// positions follow its seqlens_k[b] + 1 - S cached ones. Query s of row b attends to positions [lo, p] where
// p = past_b + s and lo = max(0, p + 1 - local_window_size) (local_window_size > 0: that many keys, the query's own
// included, as GroupQueryAttention keeps): scores = scale q.k (softcap c > 0: c tanh(score / c)), their softmax,
// times V. Rotary rotates q and k's first R dims by position_ids' angle (pairs i, i + R/2).
//
// Sums run in 16 lanes folded in a fixed order, and exp is a fixed polynomial, so every path (AVX-512, AVX2, the
// baseline's SSE; STRATUS_KERNELS_ISA caps it) gives the same bits; against
// GroupQueryAttention's MLAS GEMMs and softmax they differ by float32 rounding (tests/unit/test_kernels.py).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace stratus {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kQueriesPerTask = 16;  // a prompt's queries go 16 at a time

// 16 floats as one value, held in the host's registers: W = 16 (one AVX-512 register), 8 (two AVX2 ones) or 4 (four
// SSE ones). Every operation is lane-wise IEEE float arithmetic and a fold adds lanes l and l + 8, then l and l + 4,
// ... whatever W is, so every path computes the same bits.
template <int W>
struct Lanes {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(W * sizeof(float))));
  static constexpr int kParts = kLanes / W;
  V p[kParts];

  typedef float U __attribute__((vector_size(W * sizeof(float)), aligned(sizeof(float)), may_alias));  // unaligned

  [[gnu::always_inline]] static Lanes load(const float* x) {
    Lanes out;
    for (int i = 0; i < kParts; ++i) out.p[i] = *reinterpret_cast<const U*>(x + i * W);
    return out;
  }
  [[gnu::always_inline]] static Lanes all(float x) {
    Lanes out;
    for (auto& v : out.p) v = V{} + x;
    return out;
  }
  [[gnu::always_inline]] void store(float* x) const {
    for (int i = 0; i < kParts; ++i) *reinterpret_cast<U*>(x + i * W) = p[i];
  }
  [[gnu::always_inline]] Lanes operator*(const Lanes& o) const {
    Lanes out;
    for (int i = 0; i < kParts; ++i) out.p[i] = p[i] * o.p[i];
    return out;
  }
  [[gnu::always_inline]] Lanes& operator+=(const Lanes& o) {
    for (int i = 0; i < kParts; ++i) p[i] += o.p[i];
    return *this;
  }
  [[gnu::always_inline]] Lanes max(const Lanes& o) const {
    Lanes out;
    for (int i = 0; i < kParts; ++i) out.p[i] = o.p[i] > p[i] ? o.p[i] : p[i];
    return out;
  }
  [[gnu::always_inline]] float fold() const {  // the 16 lanes' sum: lanes l and l + 8 added, then l and l + 4, ...
    if constexpr (kParts == 4) return fold_lanes((p[0] + p[2]) + (p[1] + p[3]));
    if constexpr (kParts == 2) return fold_lanes(p[0] + p[1]);
    return fold_lanes(p[0]);
  }
};

// e^x for x <= 0 (softmax's shifted scores), lane by lane: Cephes' expf polynomial on x - n ln 2, times 2^n. V: float
// or a vector of floats and I its int32 lanes: the same operations either way.
template <typename V, typename I>
[[gnu::always_inline]] inline V exp_neg(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (to nearest even)
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * (r * r) + r) + 1.0f;
  I bits;
  if constexpr (sizeof(V) == sizeof(float)) {
    bits = (static_cast<int32_t>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// q [d], keys [n, d] -> scores [n] = scale q.key, each dot product in 16 lanes (d % 16 == 0) folded. C: d / 16 when
// the compiler is to know it (q then stays in registers), else 0.
template <int W, int C>
[[gnu::always_inline]] inline void score(const float* q, const float* keys, int64_t n, int64_t d, float scale,
                                         float* out) {
  using L = Lanes<W>;
  const int64_t chunks = C > 0 ? C : d / kLanes;
  L qv[C > 0 ? C : 1];
  if (C > 0)
    for (int c = 0; c < C; ++c) qv[c] = L::load(q + c * kLanes);
  for (int64_t t = 0; t < n; ++t) {
    const float* k = keys + t * d;
    L acc = (C > 0 ? qv[0] : L::load(q)) * L::load(k);
    for (int64_t c = 1; c < chunks; ++c) acc += (C > 0 ? qv[c] : L::load(q + c * kLanes)) * L::load(k + c * kLanes);
    out[t] = acc.fold() * scale;
  }
}

template <int W>
[[gnu::always_inline]] inline void score(const float* q, const float* keys, int64_t n, int64_t d, float scale,
                                         float* out) {
  switch (d) {  // the head sizes of the models Stratus builds, unrolled
    case 64: return score<W, 4>(q, keys, n, d, scale, out);
    case 128: return score<W, 8>(q, keys, n, d, scale, out);
    case 256: return score<W, 16>(q, keys, n, d, scale, out);
    default: return score<W, 0>(q, keys, n, d, scale, out);
  }
}

// scores [n] -> their softmax, in place (softcap c > 0: c tanh(score / c) first)
template <int W>
[[gnu::always_inline]] inline void softmax(float* sc, int64_t n, float softcap) {
  using L = Lanes<W>;
  if (softcap > 0.0f)
    for (int64_t t = 0; t < n; ++t) sc[t] = softcap * std::tanh(sc[t] / softcap);
  int64_t t = 0;
  float m = -INFINITY;
  if (n >= kLanes) {
    L top = L::load(sc);
    for (t = kLanes; t + kLanes <= n; t += kLanes) top = top.max(L::load(sc + t));
    float lanes[kLanes];
    top.store(lanes);
    m = *std::max_element(lanes, lanes + kLanes);
  }
  for (; t < n; ++t) m = std::max(m, sc[t]);
  L sums = L::all(0.0f);
  for (t = 0; t + kLanes <= n; t += kLanes) {
    L e = L::load(sc + t);
    for (auto& v : e.p) v = exp_neg<typename L::V, typename L::I>(v - m);
    e.store(sc + t);
    sums += e;
  }
  float sum = sums.fold();
  for (; t < n; ++t) sum += sc[t] = exp_neg<float, int32_t>(sc[t] - m);
  const float inv = 1.0f / sum;
  for (t = 0; t < n; ++t) sc[t] *= inv;
}

// weights [n], values [n, d] -> out [d] = sum over t of weights[t] values[t], in t's order. Four accumulators (64
// dims) a pass over the values, kept in registers: four independent sums hide each addition's latency.
template <int W>
[[gnu::always_inline]] inline void weigh(const float* w, const float* values, int64_t n, int64_t d, float* out) {
  using L = Lanes<W>;
  int64_t e = 0;
  for (; e + 4 * kLanes <= d; e += 4 * kLanes) {
    const float* v = values + e;
    L s[4];
    for (int c = 0; c < 4; ++c) s[c] = L::all(w[0]) * L::load(v + c * kLanes);
    for (int64_t t = 1; t < n; ++t) {
      const L wt = L::all(w[t]);
      v = values + t * d + e;
      for (int c = 0; c < 4; ++c) s[c] += wt * L::load(v + c * kLanes);
    }
    for (int c = 0; c < 4; ++c) s[c].store(out + e + c * kLanes);
  }
  for (; e < d; e += kLanes) {
    L s0 = L::all(w[0]) * L::load(values + e);
    for (int64_t t = 1; t < n; ++t) s0 += L::all(w[t]) * L::load(values + t * d + e);
    s0.store(out + e);
  }
}

// x [D] -> y [D]: the first r dims rotated by (cos, sin) [r/2] (pairs i, i + r/2), the rest copied.
[[gnu::always_inline]] inline void rotate(const float* x, float* y, const float* cos, const float* sin, int64_t r,
                                          int64_t d) {
  const int64_t half = r / 2;
  for (int64_t i = 0; i < half; ++i) {
    y[i] = x[i] * cos[i] - x[i + half] * sin[i];
    y[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
  }
  for (int64_t i = r; i < d; ++i) y[i] = x[i];
}

struct Args {
  const float* qkv;
  const float *past_k, *past_v;
  float *k, *v, *out;
  const int32_t* seqlens;
  const int64_t* positions;
  const float *cos, *sin;
  int64_t batch, seq, heads, kv_heads, dim, past_len, cap, rotary, chunks, window;
  bool first, shared;
  float scale, softcap;

  int64_t past_of(int64_t b) const { return first ? 0 : seqlens[b] + 1 - seq; }
  const float* row(int64_t b, int64_t s) const { return qkv + (b * seq + s) * (heads + 2 * kv_heads) * dim; }
  int64_t at(int64_t b, int64_t g, int64_t p) const { return ((b * kv_heads + g) * cap + p) * dim; }
};

// task (b, g): row b's kv head g gets its new keys (rotated) and values, after its past when that is another buffer
void write_task(void* p, size_t i) {
  const auto& a = *static_cast<const Args*>(p);
  const int64_t b = static_cast<int64_t>(i) / a.kv_heads, g = static_cast<int64_t>(i) % a.kv_heads;
  if (!a.shared) {
    const int64_t n = a.past_len * a.dim, from = (b * a.kv_heads + g) * n, to = a.at(b, g, 0);
    std::memcpy(a.k + to, a.past_k + from, n * sizeof(float));
    std::memcpy(a.v + to, a.past_v + from, n * sizeof(float));
    std::fill(a.k + to + n, a.k + a.at(b, g, a.cap), 0.0f);
    std::fill(a.v + to + n, a.v + a.at(b, g, a.cap), 0.0f);
  }
  const int64_t past = a.past_of(b), half = a.rotary / 2;
  for (int64_t s = 0; s < a.seq; ++s) {
    const float* x = a.row(b, s) + (a.heads + g) * a.dim;
    const int64_t pos = a.positions[b * a.seq + s];
    rotate(x, a.k + a.at(b, g, past + s), a.cos + pos * half, a.sin + pos * half, a.rotary, a.dim);
    std::memcpy(a.v + a.at(b, g, past + s), x + a.kv_heads * a.dim, a.dim * sizeof(float));
  }
}

// task (b, g, chunk c): the outputs of row b's query heads in group g for the chunk's queries
template <int W>
[[gnu::always_inline]] inline void attend(void* p, size_t i) {
  const auto& a = *static_cast<const Args*>(p);
  const int64_t per_b = a.kv_heads * a.chunks, b = static_cast<int64_t>(i) / per_b;
  const int64_t g = static_cast<int64_t>(i) % per_b / a.chunks, c = static_cast<int64_t>(i) % a.chunks;
  const int64_t group = a.heads / a.kv_heads, d = a.dim, half = a.rotary / 2;
  const int64_t past = a.past_of(b), length = a.seqlens[b] + 1;
  const float* keys = a.k + a.at(b, g, 0);
  const float* values = a.v + a.at(b, g, 0);
  thread_local std::vector<float> q, scores;
  q.resize(group * d);
  for (int64_t s = c * kQueriesPerTask; s < std::min(a.seq, (c + 1) * kQueriesPerTask); ++s) {
    float* out = a.out + (b * a.seq + s) * a.heads * d + g * group * d;
    if (a.first && s >= length) {  // a right-padded prompt's padding: no query
      std::fill(out, out + group * d, 0.0f);
      continue;
    }
    const int64_t last = past + s, lo = a.window > 0 ? std::max<int64_t>(0, last - a.window + 1) : 0, n = last - lo + 1;
    const int64_t pos = a.positions[b * a.seq + s];
    float* qs = q.data();
    for (int64_t j = 0; j < group; ++j)
      rotate(a.row(b, s) + (g * group + j) * d, qs + j * d, a.cos + pos * half, a.sin + pos * half, a.rotary, d);
    scores.resize(group * n);
    float* sc = scores.data();
    for (int64_t j = 0; j < group; ++j) score<W>(qs + j * d, keys + lo * d, n, d, a.scale, sc + j * n);
    for (int64_t j = 0; j < group; ++j) softmax<W>(sc + j * n, n, a.softcap);
    for (int64_t j = 0; j < group; ++j) weigh<W>(sc + j * n, values + lo * d, n, d, out + j * d);
  }
}

// attend, compiled for each ISA; the widest the host runs is picked (stratus::widest_isa)
#if defined(__x86_64__)
__attribute__((target("avx512f"))) void attend_avx512(void* p, size_t i) { attend<16>(p, i); }
__attribute__((target("avx2"))) void attend_avx2(void* p, size_t i) { attend<8>(p, i); }
#endif
void attend_plain(void* p, size_t i) { attend<4>(p, i); }

using Task = void (*)(void*, size_t);

Task pick_path() {
#if defined(__x86_64__)
  switch (widest_isa()) {
    case Isa::avx512: return attend_avx512;
    case Isa::avx2: return attend_avx2;
    case Isa::plain: break;
  }
#endif
  return attend_plain;
}

Ort::Status invalid(const char* what) {
  return Ort::Status((std::string("GroupAttention: ") + what).c_str(), ORT_INVALID_ARGUMENT);
}

struct GroupAttention {
  GroupAttention(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    heads_ = ki.GetAttribute<int64_t>("num_heads");
    kv_heads_ = ki.GetAttribute<int64_t>("kv_num_heads");
    scale_ = attribute(ki, "scale", 0.0f);
    softcap_ = attribute(ki, "softcap", 0.0f);
    window_ = attribute<int64_t>(ki, "local_window_size", 0);
    attend_ = pick_path();
  }

  template <typename T>
  static T attribute(const Ort::ConstKernelInfo& ki, const char* name, T fallback) {
    try {
      return ki.GetAttribute<T>(name);
    } catch (const Ort::Exception&) {
      return fallback;
    }
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& qkv,
                      const Ort::Custom::Tensor<float>& past_k, const Ort::Custom::Tensor<float>& past_v,
                      const Ort::Custom::Tensor<int32_t>& seqlens, const Ort::Custom::Tensor<int32_t>& total,
                      const Ort::Custom::Tensor<float>& cos, const Ort::Custom::Tensor<float>& sin,
                      const Ort::Custom::Tensor<int64_t>& positions, Ort::Custom::Tensor<float>& out,
                      Ort::Custom::Tensor<float>& present_k, Ort::Custom::Tensor<float>& present_v) {
    const std::vector<int64_t> xs = qkv.Shape(), ps = past_k.Shape(), cs = cos.Shape();
    if (heads_ <= 0 || kv_heads_ <= 0 || heads_ % kv_heads_ != 0)
      return invalid("num_heads a multiple of kv_num_heads");
    if (xs.size() != 3 || ps.size() != 4 || past_v.Shape() != ps || cs.size() != 2 || sin.Shape() != cs)
      return invalid("qkv [B, S, (H + 2 Hkv) D], past [B, Hkv, P, D], cos and sin [M, R/2]");
    Args a{};
    a.batch = xs[0], a.seq = xs[1], a.heads = heads_, a.kv_heads = kv_heads_, a.dim = ps[3], a.past_len = ps[2];
    a.rotary = 2 * cs[1];
    if (a.dim % kLanes != 0) return invalid("head size a multiple of 16");
    if (ps[0] != a.batch || ps[1] != kv_heads_ || xs[2] != (heads_ + 2 * kv_heads_) * a.dim || a.rotary > a.dim ||
        seqlens.NumberOfElement() != a.batch || total.NumberOfElement() != 1 ||
        positions.NumberOfElement() != a.batch * a.seq)
      return invalid("shapes: qkv [B, S, (H + 2 Hkv) D], past [B, Hkv, P, D], seqlens_k [B], position_ids [B, S]");
    const int32_t total_len = total.Data()[0];
    a.first = total_len == a.seq;
    a.cap = std::max<int64_t>(a.past_len, total_len);
    a.seqlens = seqlens.Data(), a.positions = positions.Data();
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t length = a.seqlens[b] + 1, past = a.past_of(b);
      if (length > total_len || past < 0 || (a.first && length > a.seq) || past + a.seq > a.cap)
        return invalid("seqlens_k out of range for total_sequence_length and the new tokens");
    }
    for (int64_t i = 0; i < a.batch * a.seq; ++i)
      if (a.positions[i] < 0 || a.positions[i] >= cs[0]) return invalid("position_ids beyond the cos and sin caches");
    a.qkv = qkv.Data(), a.past_k = past_k.Data(), a.past_v = past_v.Data(), a.cos = cos.Data(), a.sin = sin.Data();
    a.out = out.Allocate({a.batch, a.seq, heads_ * a.dim});
    a.k = present_k.Allocate({a.batch, kv_heads_, a.cap, a.dim});
    a.v = present_v.Allocate({a.batch, kv_heads_, a.cap, a.dim});
    a.shared = a.k == a.past_k && a.v == a.past_v;  // bound to one buffer (the engine's InPlaceCache)
    if (!a.shared && (a.k == a.past_k || a.v == a.past_v))
      return invalid("present_key and present_value both in place or neither");
    a.chunks = (a.seq + kQueriesPerTask - 1) / kQueriesPerTask;
    a.window = window_;
    a.scale = scale_ > 0.0f ? scale_ : 1.0f / std::sqrt(static_cast<float>(a.dim));
    a.softcap = softcap_;
    if (a.batch * a.seq == 0) return Ort::Status{nullptr};
    const OrtApi& api = Ort::GetApi();
    Ort::Status wrote{api.KernelContext_ParallelFor(ctx, write_task, static_cast<size_t>(a.batch * kv_heads_), 0, &a)};
    if (!wrote.IsOK()) return wrote;
    return Ort::Status{api.KernelContext_ParallelFor(ctx, attend_, static_cast<size_t>(a.batch * kv_heads_ * a.chunks), 0, &a)};
  }

  Task attend_ = nullptr;
  int64_t heads_ = 0, kv_heads_ = 0, window_ = 0;
  float scale_ = 0.0f, softcap_ = 0.0f;
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* group_attention_op() {
  return Ort::Custom::CreateLiteCustomOp<GroupAttention>("GroupAttention", "CPUExecutionProvider");
}

}  // namespace stratus
