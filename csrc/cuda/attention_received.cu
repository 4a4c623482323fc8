// CUDA implementation of earlytom::attention_received (kernels in
// csrc/kernels/attention_received.cuh): row log-sum-exp pass, column-sum pass with per-(n, h)
// partial rows, deterministic reduction over heads. Workspace: one fp32 buffer of
// N*H*(roundup(S, 64) + S) floats from the caching allocator; no S x S map is stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "kernels/attention_received.cuh"

namespace earlytom {
namespace {

at::Tensor attention_received_cuda(const at::Tensor& q_in, const at::Tensor& k_in, double scale) {
  TORCH_CHECK_VALUE(q_in.dim() == 4, "attention_received: q must be [N, H, S, d], got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(k_in.sizes() == q_in.sizes(), "attention_received: k must have the shape of q ",
              q_in.sizes(), ", got ", k_in.sizes());
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type(),
              "attention_received: q and k must have the same dtype, got ", q_in.scalar_type(),
              " and ", k_in.scalar_type());
  TORCH_CHECK_VALUE(q_in.is_cuda() && k_in.is_cuda() && q_in.device() == k_in.device(),
              "attention_received (CUDA): q and k must be on the same CUDA device");
  const auto st = q_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "attention_received: dtype must be float32, float16 or bfloat16, got ", st);
  // (double inputs are rejected: the kernels read 16- or 32-bit elements.)
  TORCH_CHECK_VALUE(q_in.size(1) >= 1, "attention_received: H (dim 1) must be >= 1");
  TORCH_CHECK_VALUE(q_in.size(3) >= 1, "attention_received: d (dim 3) must be >= 1");
  TORCH_CHECK_VALUE(q_in.size(1) <= INT32_MAX && q_in.size(2) <= INT32_MAX && q_in.size(3) <= INT32_MAX,
              "attention_received: H, S and d must fit in int32");
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention_received: scale must be finite, got ", scale);

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "attention_received_cuda", [&] {
    p.dtype = std::is_same_v<scalar_t, at::Half>       ? attn_recv::DType::kFloat16
              : std::is_same_v<scalar_t, at::BFloat16> ? attn_recv::DType::kBFloat16
                                                       : attn_recv::DType::kFloat32;
  });

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
