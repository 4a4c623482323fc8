// at::ScalarType -> the kernels' element type (DType, csrc/kernels/common.h) for the CUDA launch
// glue; the kernels then dispatch on DType with dispatch_dtype().
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels/common.h"

namespace earlytom {

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: break;
  }
  // Text only: messages with formatted values are built in g++-compiled code (docs/design.md).
  TORCH_CHECK_TYPE(false, "no CUDA kernel for this dtype");  // the ops' input checks exclude it
  return DType::kFloat32;
}

}  // namespace earlytom
