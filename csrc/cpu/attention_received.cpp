// CPU implementation of earlytom::attention_received (see csrc/kernels/attention_received.h).
//
// Parallel over (n, h): each task converts the head's q to fp32 [S][D] and k to fp32 [D][Sp]
// (transposed, zero-padded), then runs the blocked core, which holds kCpuRowBlock query rows x S
// logits at a time and writes the head's column sums to a per-(n, h) partial row. The partial
// rows are then summed over h in head order (deterministic, independent of the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "kernels/attention_received.h"
#include "ops/attention_received.h"

namespace earlytom {
namespace {

at::Tensor attention_received_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale) {
  ops::check_attention_received_inputs(q_in, k_in, scale);
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const int64_t N = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({N, S}, q.options().dtype(at::kFloat));
  if (N == 0 || S == 0) return out;
  at::Tensor partial = at::empty({N * H, S}, q.options().dtype(at::kFloat));
  float* part = partial.data_ptr<float>();
  const int64_t Sp = attn_recv::cpu_padded_keys(S);
  const float fscale = static_cast<float>(scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_received_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const int64_t qsn = q.stride(0), qsh = q.stride(1), qss = q.stride(2);
    const int64_t ksn = k.stride(0), ksh = k.stride(1), kss = k.stride(2);
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qbuf(S * D), kT(D * Sp, 0.f), logits(attn_recv::kCpuRowBlock * Sp);
      for (int64_t nh = begin; nh < end; ++nh) {
        const int64_t n = nh / H, h = nh % H;
        const scalar_t* qh = qp + n * qsn + h * qsh;
        const scalar_t* kh = kp + n * ksn + h * ksh;
        for (int64_t s = 0; s < S; ++s) {
          const scalar_t* qr = qh + s * qss;
          const scalar_t* kr = kh + s * kss;
          for (int64_t c = 0; c < D; ++c) {
            qbuf[s * D + c] = static_cast<float>(qr[c]);
            kT[c * Sp + s] = static_cast<float>(kr[c]);
          }
        }
        attn_recv::cpu_head_colsum(qbuf.data(), kT.data(), S, Sp, D, fscale, part + nh * S,
                                   logits.data());
      }
    });
  });

  float* o = out.data_ptr<float>();
  const float inv = static_cast<float>(1.0 / (double(H) * double(S)));
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        float acc = 0.f;
        for (int64_t h = 0; h < H; ++h) acc += part[(n * H + h) * S + s];
        o[n * S + s] = acc * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(earlytom, CPU, m) {
  m.impl("attention_received", &attention_received_cpu);
}

}  // namespace earlytom
