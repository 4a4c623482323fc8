#include "ops/attention_received.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace earlytom {
namespace ops {

void check_attention_received_inputs(const at::Tensor& q, const at::Tensor& k, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "attention_received: q must be [N, H, S, d], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "attention_received: k must have the shape of q [N, H, S, d] = ",
                    q.sizes(), ", got ", k.sizes());
  const auto qt = q.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kFloat || qt == at::kHalf || qt == at::kBFloat16,
                   "attention_received: q must have dtype in (float32, float16, bfloat16), got ",
                   c10::getDtypeNames(qt).first);
  TORCH_CHECK_TYPE(k.scalar_type() == qt, "attention_received: k must have the dtype of q (",
                   c10::getDtypeNames(qt).first, "), got ", c10::getDtypeNames(k.scalar_type()).first);
  TORCH_CHECK_VALUE(k.device() == q.device(), "attention_received: k must be on the device of q (", q.device(),
                    "), got ", k.device());
  TORCH_CHECK_VALUE(q.size(1) >= 1, "attention_received: q must have at least one head (H >= 1), got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(q.size(3) >= 1, "attention_received: the head dim d must be >= 1, got shape ", q.sizes());
  TORCH_CHECK_VALUE(q.size(1) <= INT32_MAX && q.size(2) <= INT32_MAX && q.size(3) <= INT32_MAX,
                    "attention_received: H, S and d must each be below 2^31, got shape ", q.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention_received: scale must be a finite real number, got ", scale);
}

}  // namespace ops
}  // namespace earlytom
