// CPU implementation of earlytom::attention_received (the algorithm: csrc/kernels/attention_received.h).
//
// Parallel over (n, h). Each task takes blocks of query rows: one GEMM gives the block's scaled
// logits [rows, S] (BLAS), ATen's softmax normalises the rows and their column sums are added to a
// per-(n, h) partial row. Both steps are ATen's runtime-dispatched (AVX2/AVX-512) kernels, which run
// single-threaded inside this parallel loop. The partial rows are then summed over h in head order,
// so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/attention_received.h"

namespace earlytom {
namespace {

// Query rows per block: a [rows, S] fp32 block of about 1 MiB (logits and probabilities each).
int64_t row_block(int64_t S) { return std::min<int64_t>(S, std::max<int64_t>((int64_t{1} << 18) / S, 16)); }

at::Tensor attention_received_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale) {
  ops::check_attention_received_inputs(q_in, k_in, scale);
  // Detached: the ATen calls below (some in worker threads) are internals, and their out= variants
  // refuse inputs that require grad.
  const at::Tensor q = q_in.detach(), k = k_in.detach();
  const int64_t N = q.size(0), H = q.size(1), S = q.size(2);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({N, S}, f32);
  if (N == 0 || S == 0) return out;
  at::Tensor partial = at::empty({N * H, S}, f32);
  const int64_t rb = row_block(S);

  // Worker threads do not inherit the caller's thread-local state (inference mode: its tensors
  // may only be updated in place under it).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor logits = at::empty({rb, S}, f32), probs = at::empty({rb, S}, f32), col = at::empty({S}, f32);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      // fp32 [S, d] operands; a float32 input with a contiguous last dim is used as it is.
      const at::Tensor qh = q.select(0, n).select(0, h).to(at::kFloat);
      const at::Tensor kT = k.select(0, n).select(0, h).to(at::kFloat).t();
      at::Tensor acc = partial.select(0, nh);
      for (int64_t r0 = 0; r0 < S; r0 += rb) {
        const int64_t rows = std::min(rb, S - r0);
        at::Tensor lg = logits.narrow(0, 0, rows), pr = probs.narrow(0, 0, rows);
        // mm, then the scale: addmm's alpha takes a path whose rounding depends on the thread count.
        at::mm_out(lg, qh.narrow(0, r0, rows), kT).mul_(scale);
        at::_softmax_out(pr, lg, 1, false);
        if (r0 == 0) {
          at::sum_out(acc, pr, {0});
        } else {
          at::sum_out(col, pr, {0});
          acc.add_(col);
        }
      }
    }
  });

  const float* part = partial.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float inv = static_cast<float>(1.0 / (double(H) * double(S)));
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t s = 0; s < S; ++s) {
        float a = 0.f;
        for (int64_t h = 0; h < H; ++h) a += part[(n * H + h) * S + s];
        o[n * S + s] = a * inv;
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
