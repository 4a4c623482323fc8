#include "ops/merge_frames.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace earlytom {
namespace ops {

// Messages name the argument and what was expected; dtypes are spelled as in Python (float32).
void check_merge_frames_inputs(const char* op, const at::Tensor& x, const at::Tensor& frame_counts, double tau,
                               int64_t max_window, double ema) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have 3 dimensions [N, S, D] (frames, positions, channels), got shape ",
                    x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16, op,
                   ": x must have dtype in (float32, float16, bfloat16), got ", c10::getDtypeNames(xt).first);
  TORCH_CHECK_VALUE(x.size(0) >= 1, op, ": x must hold at least one frame [N >= 1, S, D], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1, op,
                    ": x must have S >= 1 positions and D >= 1 channels, got shape ", x.sizes());
  TORCH_CHECK_TYPE(frame_counts.scalar_type() == at::kLong, op, ": frame_counts must have dtype int64, got ",
                   c10::getDtypeNames(frame_counts.scalar_type()).first);
  TORCH_CHECK_VALUE(frame_counts.dim() == 1 && frame_counts.size(0) >= 1, op,
                    ": frame_counts must be 1-D [B] holding at least one video (B >= 1), got shape ",
                    frame_counts.sizes());
  TORCH_CHECK_VALUE(frame_counts.device() == x.device(), op, ": frame_counts must be on the device of x (",
                    x.device(), "), got ", frame_counts.device());
  TORCH_CHECK_VALUE(max_window >= 2, op, ": max_window must be >= 2, got ", max_window);
  TORCH_CHECK_VALUE(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  TORCH_CHECK_VALUE(std::isfinite(ema) && ema >= 0.0 && ema <= 1.0, op, ": ema must be in [0, 1], got ", ema);
}

void check_apply_merge_plan_inputs(const at::Tensor& x, const at::Tensor& plan_src, const at::Tensor& plan_weight) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "apply_merge_plan: x must have a leading frame dimension, got a 0-d tensor");
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 || xt == at::kDouble,
                   "apply_merge_plan: x must have dtype in (float32, float16, bfloat16, float64), got ",
                   c10::getDtypeNames(xt).first);
  TORCH_CHECK_TYPE(plan_src.scalar_type() == at::kLong, "apply_merge_plan: plan_src must have dtype int64, got ",
                   c10::getDtypeNames(plan_src.scalar_type()).first);
  TORCH_CHECK_VALUE(plan_src.dim() == 2 && plan_src.size(1) == 2,
                    "apply_merge_plan: plan_src must have shape [N', 2], got ", plan_src.sizes());
  TORCH_CHECK_TYPE(plan_weight.scalar_type() == at::kFloat, "apply_merge_plan: plan_weight must have dtype float32, got ",
                   c10::getDtypeNames(plan_weight.scalar_type()).first);
  TORCH_CHECK_VALUE(plan_weight.dim() == 1 && plan_weight.size(0) == plan_src.size(0),
                    "apply_merge_plan: plan_weight must have shape [", plan_src.size(0),
                    "] (one weight per row of plan_src), got ", plan_weight.sizes());
  TORCH_CHECK_VALUE(plan_src.device() == x.device(), "apply_merge_plan: plan_src must be on the device of x (",
                    x.device(), "), got ", plan_src.device());
  TORCH_CHECK_VALUE(plan_weight.device() == x.device(), "apply_merge_plan: plan_weight must be on the device of x (",
                    x.device(), "), got ", plan_weight.device());
}

}  // namespace ops
}  // namespace earlytom
