// attention_received: the input checks both backends run first (docs/design.md
// "attention_received"). NaN/Inf in q and k are not looked for (that reads the data): the op
// then computes NaN/Inf, and the Python wrapper's check_finite reports it.
#pragma once

#include <ATen/core/Tensor.h>

namespace earlytom {
namespace ops {

// q, k [N, H, S, d] of one shape, dtype (float32/float16/bfloat16) and device; H, d >= 1;
// H, S, d < 2^31; scale finite.
void check_attention_received_inputs(const at::Tensor& q, const at::Tensor& k, double scale);

}  // namespace ops
}  // namespace earlytom
