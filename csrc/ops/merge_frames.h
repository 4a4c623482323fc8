// merge_frames / segment_frames / apply_merge_plan: the input checks of both backends
// (docs/design.md "merge_frames"). Messages with numbers in them are built here, in g++-compiled
// code: a ValueError formatting integers, raised from nvcc-compiled host code, was seen to crash
// the process (torch 2.11, CUDA 13.0), so the CUDA files raise only string-only messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace earlytom {
namespace ops {

// Run first by both backends; shapes, dtypes, devices and scalars only (no tensor data):
// x [N, S, D] float32/float16/bfloat16 with N, S, D >= 1 (S * D < 2^31 on CUDA); frame_counts
// int64 [B], B >= 1, on the device of x; max_window >= 2; tau finite; ema in [0, 1]. `op` names
// the caller in messages (merge_frames or segment_frames, which takes the same inputs).
void check_merge_frames_inputs(const char* op, const at::Tensor& x, const at::Tensor& frame_counts, double tau,
                               int64_t max_window, double ema);

// The values of frame_counts (B entries in host memory): each >= 1, summing to N. The CPU op runs
// it on the counts; the CUDA op checks them on the device and runs it on a host copy only when
// the device found them wrong (to say what is wrong).
void check_frame_counts_values(const char* op, const int64_t* counts, int64_t B, int64_t N);

// x [N, ...] float32/float16/bfloat16/float64 (under 2^31 elements per frame on CUDA);
// plan_src int64 [N', 2]; plan_weight float32 [N']; all on one device.
void check_apply_merge_plan_inputs(const at::Tensor& x, const at::Tensor& plan_src, const at::Tensor& plan_weight);

}  // namespace ops
}  // namespace earlytom
