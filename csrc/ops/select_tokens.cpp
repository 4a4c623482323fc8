#include "ops/select_tokens.h"

#include <c10/util/Exception.h>

#include <limits>

#include "kernels/select_tokens.h"

namespace earlytom {
namespace ops {

namespace {
void check_on_device_of_feats(const char* name, const at::Tensor& t, const at::Tensor& feats) {
  TORCH_CHECK_VALUE(t.device() == feats.device(), "select_tokens: ", name, " must be on the device of feats (",
                    feats.device(), "), got ", t.device());
}
}  // namespace

void check_select_tokens_inputs(const at::Tensor& feats, const at::Tensor& scores, const at::Tensor& frame_keep,
                                const at::Tensor& frame_static, int64_t num_out) {
  TORCH_CHECK_VALUE(feats.dim() == 3, "select_tokens: feats must have 3 dimensions [N, P, C], got shape ",
                    feats.sizes());
  const auto ft = feats.scalar_type();
  TORCH_CHECK_TYPE(ft == at::kFloat || ft == at::kHalf || ft == at::kBFloat16,
                   "select_tokens: feats must have dtype in (float32, float16, bfloat16), got ",
                   c10::getDtypeNames(ft).first);
  const int64_t N = feats.size(0), P = feats.size(1);
  TORCH_CHECK_VALUE(P >= 1, "select_tokens: feats must have P >= 1 positions per frame [N, P, C], got shape ",
                    feats.sizes());
  TORCH_CHECK_VALUE(P <= std::numeric_limits<int>::max(), "select_tokens: feats must have fewer than 2^31 positions ",
                    "per frame, got P = ", P);
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat, "select_tokens: scores must have dtype float32, got ",
                   c10::getDtypeNames(scores.scalar_type()).first);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == N && scores.size(1) == P,
                    "select_tokens: scores must have shape [", N, ", ", P, "] (feats' first two dims), got ",
                    scores.sizes());
  TORCH_CHECK_TYPE(frame_keep.scalar_type() == at::kLong, "select_tokens: frame_keep must have dtype int64, got ",
                   c10::getDtypeNames(frame_keep.scalar_type()).first);
  TORCH_CHECK_VALUE(frame_keep.dim() == 1 && frame_keep.size(0) == N, "select_tokens: frame_keep must have shape [",
                    N, "] (one entry per frame of feats), got ", frame_keep.sizes());
  TORCH_CHECK_TYPE(frame_static.scalar_type() == at::kBool, "select_tokens: frame_static must have dtype bool, got ",
                   c10::getDtypeNames(frame_static.scalar_type()).first);
  TORCH_CHECK_VALUE(frame_static.dim() == 1 && frame_static.size(0) == N,
                    "select_tokens: frame_static must have shape [", N, "] (one entry per frame of feats), got ",
                    frame_static.sizes());
  check_on_device_of_feats("scores", scores, feats);
  check_on_device_of_feats("frame_keep", frame_keep, feats);
  check_on_device_of_feats("frame_static", frame_static, feats);
  TORCH_CHECK_VALUE(num_out >= 0, "select_tokens: num_out must be >= 0, got ", num_out);
  TORCH_CHECK_VALUE(N > 0 || num_out == 0, "select_tokens: num_out must be 0 when there are no frames, got ",
                    num_out);
  if (feats.is_cuda()) {
    TORCH_CHECK_VALUE(P <= select::kMaxPositionsCuda, "select_tokens: the CUDA kernel supports at most ",
                      select::kMaxPositionsCuda, " positions per frame, got P = ", P);
    TORCH_CHECK_VALUE(N <= std::numeric_limits<int>::max(), "select_tokens: the CUDA kernel supports at most ",
                      std::numeric_limits<int>::max(), " frames (one block per frame), got ", N);
  }
}

}  // namespace ops
}  // namespace earlytom
