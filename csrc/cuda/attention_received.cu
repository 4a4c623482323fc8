// CUDA implementation of earlytom::attention_received (kernels in
// csrc/kernels/attention_received.h): row log-sum-exp pass, column-sum pass with per-(n, h)
// partial rows, deterministic reduction over heads. Workspace: one fp32 buffer of
// N*H*(roundup(S, 64) + S) floats from the caching allocator; no S x S map is stored.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/dtype.h"
#include "kernels/attention_received.h"
#include "ops/attention_received.h"

namespace earlytom {
namespace {

at::Tensor attention_received_cuda(const at::Tensor& q_in, const at::Tensor& k_in, double scale) {
  ops::check_attention_received_inputs(q_in, k_in, scale);

  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const int64_t N = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({N, S}, q.options().dtype(at::kFloat));
  if (N == 0 || S == 0) return out;
  at::Tensor ws = at::empty({attn_recv::workspace_floats(N, H, S)}, q.options().dtype(at::kFloat));

  attn_recv::Problem p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.q_sn = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_ss = q.stride(2);
  p.k_sn = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_ss = k.stride(2);
  p.N = N;
  p.H = static_cast<int>(H);
  p.S = static_cast<int>(S);
  p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.dtype = kernel_dtype(q.scalar_type());

  // c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream (ATen/cuda/CUDAContext.h
  // pulls in cuSPARSE/cuBLAS headers that a bare toolkit may lack).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(attn_recv::launch(p, ws.data_ptr<float>(), out.data_ptr<float>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(earlytom, CUDA, m) {
  m.impl("attention_received", &attention_received_cuda);
}

}  // namespace earlytom
