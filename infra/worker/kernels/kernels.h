// Stratus's onnxruntime kernels: the onnxruntime API headers as every file of the library includes them, what the
// files share (the split's constants, the paths' clones, vectors and their fold), and the ops each file defines for
// split_rows.cc's RegisterCustomOps.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

namespace stratus {
constexpr float kInv127 = 1.0f / 127.0f;  // the split graph's /split/inv127 (float32 of 1/127)
constexpr float kTiny = 1e-30f;           // an all-zero block's scale: 0 would give 0/0

// On x86-64 a loop so marked is compiled for AVX-512, AVX2 and the baseline, and the widest the host has is picked at
// load time (GCC's target_clones); elsewhere once, for the target. Every build computes the same bits: elementwise
// IEEE operations, sums in a fixed order (no reassociation, no FMA contraction).
#if defined(__x86_64__)
#define STRATUS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STRATUS_CLONES
#endif

// Vectors of floats, lane-wise IEEE arithmetic at whatever width the compiling path has (GCC lowers 8 floats to one
// AVX register or two SSE ones). The helpers are inlined into each path, so no vector crosses a call and GCC's warning
// that AVX changes the ABI for passing them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

// a vector's lanes -> their sum in one order: lanes l and l + half added, then their halves, ...
[[gnu::always_inline]] inline float fold_lanes(v4 b) { return (b[0] + b[2]) + (b[1] + b[3]); }
[[gnu::always_inline]] inline float fold_lanes(v8 a) {
  return fold_lanes(__builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7));
}
[[gnu::always_inline]] inline float fold_lanes(v16 x) {
  return fold_lanes(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
}

// The widest path the host runs (avx512: AVX-512 F, BW and VNNI; avx2: AVX2 and FMA), capped by STRATUS_KERNELS_ISA
// (avx512, avx2 or plain: tests compare the paths). Read when a kernel is made.
enum class Isa { plain, avx2, avx512 };
Isa widest_isa();  // block_linear.cc
Ort::Custom::OrtLiteCustomOp* block_linear_op();  // block_linear.cc
Ort::Custom::OrtLiteCustomOp* group_attention_op();  // attention.cc
}  // namespace stratus
