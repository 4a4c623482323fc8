// select_tokens: the input checks both backends run first (docs/design.md "select_tokens"), the
// CUDA kernel's limits included (messages are built in g++-compiled code: see ops/merge_frames.h).
// Shapes, dtypes, devices and num_out only: the values of frame_keep are checked by the CPU op
// (free there); the CUDA op trusts them (a check would cost a host sync) and stays in bounds
// whatever they are.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace earlytom {
namespace ops {

// feats [N, P, C] float32/float16/bfloat16 with 1 <= P < 2^31 (P <= 8192 and N < 2^31 on CUDA);
// scores float32 [N, P]; frame_keep int64 [N]; frame_static bool [N]; all on the device of
// feats; num_out >= 0, and 0 when N = 0.
void check_select_tokens_inputs(const at::Tensor& feats, const at::Tensor& scores, const at::Tensor& frame_keep,
                                const at::Tensor& frame_static, int64_t num_out);

}  // namespace ops
}  // namespace earlytom
