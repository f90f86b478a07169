// Stratus's onnxruntime kernels: the onnxruntime API headers as every file of the library includes them, and the
// ops each file defines for split_rows.cc's RegisterCustomOps.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

namespace stratus {
Ort::Custom::OrtLiteCustomOp* block_linear_op();  // block_linear.cc
}  // namespace stratus
