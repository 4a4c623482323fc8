// merge_frames / segment_frames / apply_merge_plan: the input checks both backends run first
// (docs/design.md "merge_frames"). They read shapes, dtypes, devices and scalars only, never
// tensor data: the CPU op checks the values of frame_counts / plan_src on the host itself, the
// CUDA op checks frame_counts on the device, within its one host sync.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace earlytom {
namespace ops {

// x [N, S, D] float32/float16/bfloat16 with N, S, D >= 1; frame_counts int64 [B], B >= 1, on the
// device of x; max_window >= 2; tau finite; ema in [0, 1]. `op` names the caller in messages
// (merge_frames or segment_frames, which takes the same inputs).
void check_merge_frames_inputs(const char* op, const at::Tensor& x, const at::Tensor& frame_counts, double tau,
                               int64_t max_window, double ema);

// x [N, ...] float32/float16/bfloat16/float64; plan_src int64 [N', 2]; plan_weight float32 [N'];
// all on one device.
void check_apply_merge_plan_inputs(const at::Tensor& x, const at::Tensor& plan_src, const at::Tensor& plan_weight);

}  // namespace ops
}  // namespace earlytom
