// select_tokens, CUDA: Stage II per-frame token selection (docs/design.md "select_tokens").
// No host sync: frame_keep is trusted to satisfy 1 <= keep <= P and sum == num_out (the Python
// wrapper checks host values before the launch; a frame_keep tensor already on the GPU is not
// checked); the kernels never write or read out of bounds when it does not hold.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "kernels/select_tokens.h"
#include "ops/select_tokens.h"

namespace earlytom {

namespace {

namespace sel = earlytom::select;

// Streaming multiprocessors of a device (queried once per device; no sync).
int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (sms < 1) sms = 1;
  if (device >= 0 && device < kMaxDevices) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

std::tuple<at::Tensor, at::Tensor> select_tokens_cuda(const at::Tensor& feats_in, const at::Tensor& scores,
                                                      const at::Tensor& frame_keep, const at::Tensor& frame_static,
                                                      int64_t num_out) {
  ops::check_select_tokens_inputs(feats_in, scores, frame_keep, frame_static, num_out);
  const int64_t N = feats_in.size(0);
  const int64_t P = feats_in.size(1);
  const int64_t C = feats_in.size(2);

  c10::cuda::CUDAGuard guard(feats_in.device());
  at::Tensor tokens = at::empty({num_out, C}, feats_in.options());
  at::Tensor index = at::empty({num_out, 2}, feats_in.options().dtype(at::kLong));
  if (num_out == 0 || N == 0) return {tokens, index};

  // Channels must be contiguous for the row copy; frame/position strides are arbitrary.
  const at::Tensor feats = (feats_in.stride(2) == 1 || C <= 1) ? feats_in : feats_in.contiguous();
  const at::Tensor scores_c = scores.contiguous();
  const at::Tensor keep_c = frame_keep.contiguous();
  const at::Tensor static_c = frame_static.contiguous();

  sel::SelectIndexParams sp{};
  sp.scores = scores_c.data_ptr<float>();
  sp.score_stride = P;
  sp.frame_keep = keep_c.data_ptr<int64_t>();
  sp.frame_static = static_c.data_ptr<bool>();
  sp.offsets = nullptr;
  sp.index = index.data_ptr<int64_t>();
  sp.num_frames = N;
  sp.num_out = num_out;
  sp.P = static_cast<int>(P);

  const int64_t es = feats.element_size();
  sel::GatherParams gp{};
  gp.feats = static_cast<const char*>(feats.data_ptr());
  gp.stride_frame = feats.stride(0) * es;
  gp.stride_pos = feats.stride(1) * es;
  gp.row_bytes = C * es;
  gp.out = static_cast<char*>(tokens.data_ptr());
  gp.index = sp.index;
  gp.num_out = num_out;
  gp.num_frames = N;
  gp.P = static_cast<int>(P);

  at::Tensor offsets;
  if (N > sel::kInlineOffsetMaxFrames) offsets = at::empty({N}, keep_c.options());

  const int sms = sm_count(feats.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(feats.get_device()).stream();
  const cudaError_t err = sel::launch_select_tokens(sp, gp, offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr,
                                                    sms * 16, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(earlytom, CUDA, m) {
  m.impl("select_tokens", &select_tokens_cuda);
}

}  // namespace earlytom
