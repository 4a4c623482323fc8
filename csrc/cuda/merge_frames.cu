// merge_frames / apply_merge_plan / segment_frames, CUDA (docs/design.md "merge_frames").
// Kernels and the pass structure: csrc/kernels/merge_frames.h; input checks: csrc/ops/merge_frames.h.
//
// Host syncs: merge_frames and segment_frames read a 4-entry status (N', K, error flags) once,
// after the walk, to size their outputs and to report bad frame_counts or NaN/Inf in x (both
// detected on the device). segment_frames_deferred never syncs: it returns the [N, 2] buffer and
// (K, flags) for the caller to read later. apply_merge_plan never syncs; a plan index outside
// [0, N) produces a NaN row instead of a fault (the CPU implementation raises).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>
#include <vector>

#include "cuda/dtype.h"
#include "kernels/merge_frames.h"
#include "ops/merge_frames.h"

namespace earlytom {
namespace {

namespace mg = earlytom::merge;

struct Stage1Cuda {
  at::Tensor segments, segment_counts, plan_src, plan_weight, out_counts, status;
};

// read_status = false (segment_frames_deferred only): no host sync; r.segments is the whole
// zero-filled [N, 2] buffer and r.status the device's (K, flags).
Stage1Cuda stage1_cuda(const char* op, const at::Tensor& x, const at::Tensor& frame_counts, double tau,
                       int64_t max_window, double ema, bool keep_last_interior, bool with_plan,
                       bool read_status = true) {
  const int64_t N = x.size(0), S = x.size(1), D = x.size(2);
  const int64_t B = frame_counts.size(0);
  const at::Tensor counts = frame_counts.contiguous();
  const auto i64 = x.options().dtype(at::kLong);
  const auto f32 = x.options().dtype(at::kFloat);

  Stage1Cuda r;
  r.segment_counts = at::empty({B}, i64);
  at::Tensor seg_out = read_status ? at::empty({N, 2}, i64) : at::zeros({N, 2}, i64);
  at::Tensor plan_out, w_out;
  if (with_plan) {
    r.out_counts = at::empty({B}, i64);
    plan_out = at::empty({N, 2}, i64);
    w_out = at::empty({N}, f32);
  }
  at::Tensor status = at::empty({4}, i64);

  mg::Stage1Args a{};
  a.x = x.const_data_ptr();
  a.N = N;
  a.S = S;
  a.D = D;
  a.stride_n = x.stride(0);
  a.stride_s = x.stride(1);
  a.counts = counts.const_data_ptr<int64_t>();
  a.B = B;
  a.cfg.tau = tau;
  a.cfg.ema = ema;
  a.cfg.max_window = max_window;
  a.cfg.keep_last_interior = keep_last_interior;
  a.with_plan = with_plan;
  a.force_direct = false;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const mg::Stage1Layout L = mg::stage1_layout_for<T>(a, false);
    // int64 scratch: offsets [B+1], seg_off [B], out_off [B], seg [2N], plan [2N], vstart [N]
    const int64_t n_i64 = (B + 1) + 2 * B + 2 * N + (with_plan ? 2 * N : 0) + (L.need_vstart ? N : 0);
    at::Tensor ws_i = at::empty({n_i64}, i64);
    int64_t* pi = ws_i.data_ptr<int64_t>();
    a.offsets = pi;
    pi += B + 1;
    a.seg_off = pi;
    pi += B;
    a.out_off = pi;
    pi += B;
    a.seg_scratch = pi;
    pi += 2 * N;
    a.plan_scratch = with_plan ? pi : nullptr;
    pi += with_plan ? 2 * N : 0;
    a.vstart = L.need_vstart ? pi : nullptr;
    // float scratch: partial, band, w
    const int64_t n_f = L.partial_elems + L.band_elems + (with_plan ? N : 0);
    at::Tensor ws_f = at::empty({n_f > 0 ? n_f : 1}, f32);
    float* pf = ws_f.data_ptr<float>();
    a.partial = L.partial_elems > 0 ? pf : nullptr;
    pf += L.partial_elems;
    a.band = pf;
    pf += L.band_elems;
    a.w_scratch = with_plan ? pf : nullptr;
    a.seg_counts = r.segment_counts.data_ptr<int64_t>();
    a.out_counts = with_plan ? r.out_counts.data_ptr<int64_t>() : nullptr;
    a.seg_out = seg_out.data_ptr<int64_t>();
    a.plan_out = with_plan ? plan_out.data_ptr<int64_t>() : nullptr;
    a.w_out = with_plan ? w_out.data_ptr<float>() : nullptr;
    a.status = reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>());
    return mg::launch_stage1<T>(a, stream);
  };
  C10_CUDA_CHECK(dispatch_dtype(kernel_dtype(x.scalar_type()), run));
  if (!read_status) {
    r.segments = seg_out;
    r.status = status.narrow(0, 1, 2);
    return r;
  }

  // The one host sync: N', K and the error flags.
  const at::Tensor st = status.to(at::kCPU);
  const int64_t* h = st.const_data_ptr<int64_t>();
  const uint64_t flags = static_cast<uint64_t>(h[2]);
  if (flags & mg::kFlagCountsBad) {  // bad counts: read them (error path only) to say what is wrong
    const at::Tensor c = counts.to(at::kCPU);
    ops::check_frame_counts_values(op, c.const_data_ptr<int64_t>(), B, N);
    TORCH_CHECK_VALUE(false, op, ": frame_counts are not valid");  // not reached: the host check agrees
  }
  TORCH_CHECK_VALUE(!(flags & mg::kFlagNonFinite), op, ": x contains NaN or Inf values");
  const int64_t n_out = h[0], K = h[1];
  r.segments = seg_out.narrow(0, 0, K);
  if (with_plan) {
    r.plan_src = plan_out.narrow(0, 0, n_out);
    r.plan_weight = w_out.narrow(0, 0, n_out);
  }
  return r;
}

// out = plan applied to x viewed as [n_in, rows, cols] (cols contiguous; rows * cols < 2^31, checked
// by the ops' input checks).
void apply_rows_cuda(const at::Tensor& x, int64_t rows, int64_t cols, int64_t sn, int64_t sr, const at::Tensor& plan_src,
                     const at::Tensor& plan_weight, at::Tensor& out) {
  const int64_t n_out = plan_src.size(0);
  if (n_out == 0 || rows == 0 || cols == 0) return;
  const at::Tensor ps = plan_src.contiguous();
  const at::Tensor pw = plan_weight.contiguous();
  mg::ApplyParams p{};
  p.x = x.const_data_ptr();
  p.n_in = x.size(0);
  p.rows = rows;
  p.cols = cols;
  p.stride_n = sn;
  p.stride_r = sr;
  p.plan_src = ps.const_data_ptr<int64_t>();
  p.plan_w = pw.const_data_ptr<float>();
  p.n_out = n_out;
  p.out = out.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(dispatch_dtype</*kWithDouble=*/true>(
      kernel_dtype(x.scalar_type()), [&](auto t) { return mg::launch_apply<decltype(t)>(p, INT_MAX, stream); }));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_frames_cuda(
    const at::Tensor& x_in, const at::Tensor& frame_counts, double tau, int64_t max_window, double ema,
    bool keep_last_interior) {
  ops::check_merge_frames_inputs("merge_frames", x_in, frame_counts, tau, max_window, ema);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = (x_in.stride(2) == 1 || x_in.size(2) == 1) ? x_in : x_in.contiguous();
  Stage1Cuda r = stage1_cuda("merge_frames", x, frame_counts, tau, max_window, ema, keep_last_interior, true);
  const int64_t S = x.size(1), D = x.size(2);
  at::Tensor out = at::empty({r.plan_src.size(0), S, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.is_contiguous())
    apply_rows_cuda(x, 1, S * D, S * D, S * D, r.plan_src, r.plan_weight, out);
  else
    apply_rows_cuda(x, S, D, x.stride(0), x.stride(1), r.plan_src, r.plan_weight, out);
  return {out, r.out_counts, r.plan_src, r.plan_weight, r.segments, r.segment_counts};
}

std::tuple<at::Tensor, at::Tensor> segment_frames_cuda(const at::Tensor& x_in, const at::Tensor& frame_counts,
                                                       double tau, int64_t max_window, double ema) {
  ops::check_merge_frames_inputs("segment_frames", x_in, frame_counts, tau, max_window, ema);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = (x_in.stride(2) == 1 || x_in.size(2) == 1) ? x_in : x_in.contiguous();
  Stage1Cuda r = stage1_cuda("segment_frames", x, frame_counts, tau, max_window, ema, false, false);
  return {r.segments, r.segment_counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_frames_deferred_cuda(const at::Tensor& x_in,
                                                                          const at::Tensor& frame_counts, double tau,
                                                                          int64_t max_window, double ema) {
  ops::check_merge_frames_inputs("segment_frames", x_in, frame_counts, tau, max_window, ema);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = (x_in.stride(2) == 1 || x_in.size(2) == 1) ? x_in : x_in.contiguous();
  Stage1Cuda r = stage1_cuda("segment_frames", x, frame_counts, tau, max_window, ema, false, false, false);
  return {r.segments, r.segment_counts, r.status};
}

at::Tensor apply_merge_plan_cuda(const at::Tensor& x_in, const at::Tensor& plan_src, const at::Tensor& plan_weight) {
  ops::check_apply_merge_plan_inputs(x_in, plan_src, plan_weight);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n_out = plan_src.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n_out;
  at::Tensor out = at::empty(shape, x.options());
  int64_t cols = 1;
  for (int64_t d = 1; d < x.dim(); ++d) cols *= x.size(d);
  apply_rows_cuda(x, 1, cols, cols, cols, plan_src, plan_weight, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(earlytom, CUDA, m) {
  m.impl("merge_frames", &merge_frames_cuda);
  m.impl("apply_merge_plan", &apply_merge_plan_cuda);
  m.impl("segment_frames", &segment_frames_cuda);
  m.impl("segment_frames_deferred", &segment_frames_deferred_cuda);
}

}  // namespace earlytom
