// Stratus's onnxruntime kernels: the onnxruntime API headers as every file of the library includes them, and the
// ops each file defines for split_rows.cc's RegisterCustomOps.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

namespace stratus {
// The widest path the host runs (avx512: AVX-512 F, BW and VNNI; avx2: AVX2 and FMA), capped by STRATUS_KERNELS_ISA
// (avx512, avx2 or plain: tests compare the paths). Read when a kernel is made.
enum class Isa { plain, avx2, avx512 };
Isa widest_isa();  // block_linear.cc
Ort::Custom::OrtLiteCustomOp* block_linear_op();  // block_linear.cc
Ort::Custom::OrtLiteCustomOp* group_attention_op();  // attention.cc
}  // namespace stratus
