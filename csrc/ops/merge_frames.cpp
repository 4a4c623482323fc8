#include "ops/merge_frames.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace earlytom {
namespace ops {

namespace {
constexpr int64_t kMaxCudaFrameElems = int64_t(1) << 31;  // 32-bit element offsets in the apply kernel
}  // namespace

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
  TORCH_CHECK_VALUE(!x.is_cuda() || x.size(1) * x.size(2) < kMaxCudaFrameElems, op,
                    ": the CUDA kernels take fewer than 2^31 elements per frame (S * D), got shape ", x.sizes());
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

void check_frame_counts_values(const char* op, const int64_t* counts, int64_t B, int64_t N) {
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(counts[b] >= 1, op, ": frame_counts must all be >= 1 (no empty videos), got ", counts[b],
                      " for video ", b);
  int64_t sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    // sum <= N here, so the running sum cannot overflow.
    TORCH_CHECK_VALUE(counts[b] <= N - sum, op, ": frame_counts must sum to the number of frames N = ", N,
                      ", got a larger sum (", sum, " + ", counts[b], " at video ", b, ")");
    sum += counts[b];
  }
  TORCH_CHECK_VALUE(sum == N, op, ": frame_counts must sum to the number of frames N = ", N, ", got sum ", sum);
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
  if (x.is_cuda() && plan_src.size(0) > 0) {
    int64_t per_frame = 1;
    for (int64_t d = 1; d < x.dim(); ++d) per_frame *= x.size(d);
    TORCH_CHECK_VALUE(per_frame < kMaxCudaFrameElems,
                      "apply_merge_plan: the CUDA kernel takes fewer than 2^31 elements per frame, got shape ",
                      x.sizes());
  }
}

}  // namespace ops
}  // namespace earlytom
