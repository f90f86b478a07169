// Stratus's onnxruntime kernels (BlockLinear: block_linear.cc; GroupAttention: attention.cc): the split-activations linear (stratus_model.variants) in two
// nodes of ours instead of twelve to sixteen small ones, around onnxruntime's own MatMulNBits.
//
//   x [B, S, K] ─SplitRows(block_size)─▶ [2B, S, K] = [hi; lo] ─MatMulNBits─▶ [2B, S, N]
//                                                              ─SumHalves──▶ y = y_hi + y_lo [B, S, N]
//   (an affine block type's linear: ─JoinRows(x, offsets)─▶ y = y_hi + y_lo + block_sums(x) @ offsets)
//
// Per block of `block_size` inputs of a row: s = max(max|x| * (1/127), 1e-30), hi = round(x / s) * s
// (round half to even, as ONNX Round), lo = x - hi: the same float32 operations in the same order as
// the unfused graph, so the same bits (tests/unit/test_kernels.py). JoinRows sums the offsets'
// product in its own order: float32 rounding apart from the unfused graph's MatMul.
// Built with `make kernels` against the onnxruntime C API headers (ORT_API_VERSION 21: the runtime
// serves older API versions, so a newer onnxruntime loads it).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"

namespace {

constexpr const char* kDomain = "ai.stratus";
using stratus::kInv127, stratus::kTiny;

// One row's blocks -> its hi and lo parts. x, hi, lo: [k]; k % block == 0.
STRATUS_CLONES void split_row(const float* x, float* hi, float* lo, int64_t k, int64_t block) {
  for (int64_t b = 0; b < k; b += block) {
    float peak = 0.0f;
    for (int64_t i = b; i < b + block; ++i) peak = std::max(peak, std::fabs(x[i]));
    const float s = std::max(peak * kInv127, kTiny);
    for (int64_t i = b; i < b + block; ++i) {
      const float h = std::nearbyint(x[i] / s) * s;  // nearbyint: the current mode, to nearest even
      hi[i] = h;
      lo[i] = x[i] - h;
    }
  }
}

// Run task(args, row) for every row: on onnxruntime's intra-op threads when there are several
// (a prefill, a wide batch), inline for one (a lone decode step, where a hand-off costs more).
template <typename Args>
Ort::Status for_each_row(OrtKernelContext* ctx, void (*task)(void*, size_t), int64_t rows, Args& args) {
  if (rows == 1) {
    task(&args, 0);
    return Ort::Status{nullptr};
  }
  return Ort::Status{Ort::GetApi().KernelContext_ParallelFor(ctx, task, static_cast<size_t>(rows), 0, &args)};
}

struct SplitArgs {
  const float* x;
  float* y;
  int64_t rows, k, block;
};

void split_task(void* p, size_t r) {
  const auto& a = *static_cast<const SplitArgs*>(p);
  split_row(a.x + r * a.k, a.y + r * a.k, a.y + (a.rows + r) * a.k, a.k, a.block);
}

struct SplitRows {
  SplitRows(const OrtApi*, const OrtKernelInfo* info) {
    block_ = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("block_size");
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& x, Ort::Custom::Tensor<float>& out) {
    std::vector<int64_t> shape = x.Shape();  // [B, S, K]
    if (shape.size() != 3 || block_ <= 0 || shape[2] % block_ != 0) {
      return Ort::Status("SplitRows: x must be [B, S, K] with K a multiple of block_size", ORT_INVALID_ARGUMENT);
    }
    const int64_t k = shape[2], rows = shape[0] * shape[1];
    shape[0] *= 2;
    SplitArgs args{x.Data(), out.Allocate(shape), rows, k, block_};
    return for_each_row(ctx, split_task, rows, args);
  }

  int64_t block_ = 32;
};

STRATUS_CLONES void add_rows(const float* a, const float* b, float* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] + b[i];
}

// y [2B, S, N] -> y[:B] + y[B:] [B, S, N]
Ort::Status SumHalves(const Ort::Custom::Tensor<float>& y, Ort::Custom::Tensor<float>& out) {
  std::vector<int64_t> shape = y.Shape();
  if (shape.empty() || shape[0] % 2 != 0) {
    return Ort::Status("SumHalves: the first axis must be even", ORT_INVALID_ARGUMENT);
  }
  shape[0] /= 2;
  const int64_t half = y.NumberOfElement() / 2;
  float* o = out.Allocate(shape);
  const float* a = y.Data();
  const float* b = a + half;
  add_rows(a, b, o, half);
  return Ort::Status{nullptr};
}

// y2 [2B, S, N], x [B, S, K], offsets [K/block, N] -> y [B, S, N] = (y2[:B] + y2[B:]) + block_sums(x) @ offsets:
// SumHalves and the per-block float offsets of an affine block type (graph.add_block_offsets) in one node.
// one row of JoinRows: o [n] = (hi + lo) + sum_b (sum of x's block b) * c[b, :]; corr: [n] scratch
STRATUS_CLONES void join_row(const float* hi, const float* lo, const float* x, const float* c, float* corr, float* o,
                             int64_t n, int64_t kb, int64_t block) {
  std::fill(corr, corr + n, 0.0f);
  for (int64_t b = 0; b < kb; ++b) {
    float sum = 0.0f;
    for (int64_t i = 0; i < block; ++i) sum += x[b * block + i];
    const float* cb = c + b * n;
    for (int64_t j = 0; j < n; ++j) corr[j] += sum * cb[j];
  }
  for (int64_t j = 0; j < n; ++j) o[j] = (hi[j] + lo[j]) + corr[j];
}

struct JoinArgs {
  const float *y, *x, *c;
  float* o;
  int64_t rows, n, k, kb, block;
};

void join_task(void* p, size_t r) {
  const auto& a = *static_cast<const JoinArgs*>(p);
  thread_local std::vector<float> corr;
  corr.resize(a.n);
  join_row(a.y + r * a.n, a.y + (a.rows + r) * a.n, a.x + r * a.k, a.c, corr.data(), a.o + r * a.n, a.n, a.kb, a.block);
}

Ort::Status JoinRows(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& y2, const Ort::Custom::Tensor<float>& x,
                     const Ort::Custom::Tensor<float>& offsets, Ort::Custom::Tensor<float>& out) {
  std::vector<int64_t> shape = y2.Shape();
  const std::vector<int64_t> x_shape = x.Shape(), o_shape = offsets.Shape();
  if (shape.empty() || shape[0] % 2 != 0 || x_shape.empty() || o_shape.size() != 2) {
    return Ort::Status("JoinRows: y2 [2B, .., N], x [B, .., K], offsets [K/block, N]", ORT_INVALID_ARGUMENT);
  }
  const int64_t n = shape.back(), k = x_shape.back(), kb = o_shape[0];
  const int64_t rows = y2.NumberOfElement() / 2 / n;
  if (o_shape[1] != n || kb <= 0 || k % kb != 0 || x.NumberOfElement() != rows * k) {
    return Ort::Status("JoinRows: y2 [2B, .., N], x [B, .., K], offsets [K/block, N]", ORT_INVALID_ARGUMENT);
  }
  shape[0] /= 2;
  JoinArgs args{y2.Data(), x.Data(), offsets.Data(), out.Allocate(shape), rows, n, k, kb, k / kb};
  return for_each_row(ctx, join_task, rows, args);
}

}  // namespace

// onnxruntime looks this symbol up when a session registers the library (register_custom_ops_library)
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // one domain and its ops for the life of the process: sessions keep pointers to them
  static Ort::CustomOpDomain domain{kDomain};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> split{Ort::Custom::CreateLiteCustomOp<SplitRows>("SplitRows", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> sum{Ort::Custom::CreateLiteCustomOp("SumHalves", "CPUExecutionProvider", SumHalves)};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> join{Ort::Custom::CreateLiteCustomOp("JoinRows", "CPUExecutionProvider", JoinRows)};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> linear{stratus::block_linear_op()};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> attention{stratus::group_attention_op()};
  static const bool added = (domain.Add(split.get()), domain.Add(sum.get()), domain.Add(join.get()), domain.Add(linear.get()),
                             domain.Add(attention.get()), true);
  (void)added;
  Ort::UnownedSessionOptions session{options};
  try {
    session.Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
