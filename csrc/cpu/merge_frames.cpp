// merge_frames / apply_merge_plan / segment_frames, CPU (docs/design.md "merge_frames").
// The same three passes as the CUDA path (see csrc/kernels/merge_frames.h):
//   1a. band similarities sim(i-k, i), 1 <= k <= kb, inside each video (at::parallel_for over
//       frame tiles; per tile a ring of the last kb+1 token rows of one position in fp32);
//   1b. the walk of every video (the shared walk_video), then compaction;
//   2.  the plan applied to the frames (at::parallel_for over output rows, fp32 math).
// The frame counts are on the host here, so the band width is min(M-1, longest video - 1) and
// pairs crossing a video boundary are never computed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "kernels/merge_frames.h"
#include "ops/merge_frames.h"

namespace earlytom {
namespace {

namespace mg = earlytom::merge;
constexpr int64_t kCpuTile = 8;

inline float dot8(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

// Pass 1a. band[f*kb + k-1] = mean_s cos(x[f-k, s], x[f, s]) for f-k inside f's video (0 outside).
// Returns false when x holds NaN/Inf. Every pair is computed with the same sequence of float
// operations, so pairs of identical frames get identical similarities.
template <typename scalar_t>
bool band_cpu(const scalar_t* x, int64_t S, int64_t D, int64_t sn, int64_t ss, int64_t kb,
              const std::vector<int64_t>& offsets, std::vector<float>& band) {
  const int64_t B = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // [i0, i1) inside one video
  std::vector<int64_t> tile_vstart;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i0 = offsets[b]; i0 < offsets[b + 1]; i0 += kCpuTile) {
      tiles.emplace_back(i0, std::min(i0 + kCpuTile, offsets[b + 1]));
      tile_vstart.push_back(offsets[b]);
    }
  std::atomic<bool> bad{false};
  // A tile costs about kCpuTile * S * D * (kb + 1) multiply-adds; do not fork for tiny inputs.
  const int64_t tile_work = std::max<int64_t>(1, kCpuTile * S * D * (kb + 1));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / tile_work);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t tb, int64_t te) {
    std::vector<float> ring(static_cast<size_t>((kb + 1) * D));
    std::vector<float> nrm(static_cast<size_t>(kCpuTile + kb));
    std::vector<double> acc(static_cast<size_t>(kCpuTile * kb));
    bool lbad = false;
    for (int64_t t = tb; t < te; ++t) {
      const int64_t i0 = tiles[t].first, i1 = tiles[t].second;
      const int64_t h0 = std::max(i0 - kb, tile_vstart[t]);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t f = h0; f < i1; ++f) {
          const int64_t wf = f - h0;
          float* r = ring.data() + (wf % (kb + 1)) * D;
          const scalar_t* src = x + f * sn + s * ss;
          for (int64_t d = 0; d < D; ++d) r[d] = static_cast<float>(src[d]);
          const float nn = dot8(r, r, D);
          if (!std::isfinite(nn)) {
            for (int64_t d = 0; d < D; ++d) lbad |= !std::isfinite(r[d]);
          }
          nrm[wf] = std::max(std::sqrt(nn), mg::kNormEps);
          if (f < i0) continue;
          const int64_t kmax = std::min(kb, wf);
          double* a = acc.data() + (f - i0) * kb;
          for (int64_t k = 1; k <= kmax; ++k) {
            const float* o = ring.data() + ((wf - k) % (kb + 1)) * D;
            // dot / (|a| |b|), one rounding: exactly +-1 for D = 1, as F.normalize gives.
            a[k - 1] += static_cast<double>(dot8(r, o, D) / (nrm[wf] * nrm[wf - k]));
          }
        }
      }
      for (int64_t f = i0; f < i1; ++f)
        for (int64_t k = 1; k <= kb; ++k)
          band[f * kb + k - 1] =
              f - k >= h0 ? static_cast<float>(acc[(f - i0) * kb + k - 1]) / static_cast<float>(S) : 0.0f;
    }
    if (lbad) bad = true;
  });
  return !bad.load();
}

template <typename scalar_t>
void apply_cpu(const scalar_t* x, int64_t n_in, int64_t rows, int64_t cols, int64_t sn, int64_t sr,
               const int64_t* src, const float* w, int64_t n_out, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, n_out * rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t o = idx / rows, r = idx % rows;
      const scalar_t* xa = x + src[2 * o] * sn + r * sr;
      const scalar_t* xb = x + src[2 * o + 1] * sn + r * sr;
      scalar_t* dst = out + idx * cols;
      const float wt = w[o];
      if (wt == 1.0f) {
        for (int64_t c = 0; c < cols; ++c) dst[c] = xa[c];
      } else {
        const acc_t wa = static_cast<acc_t>(wt);
        const acc_t wb = static_cast<acc_t>(1) - wa;
        for (int64_t c = 0; c < cols; ++c) {
          const acc_t p = wa * static_cast<acc_t>(xa[c]);
          const acc_t q = wb * static_cast<acc_t>(xb[c]);
          dst[c] = static_cast<scalar_t>(p + q);
        }
      }
    }
  });
}

struct Stage1Cpu {
  at::Tensor segments, segment_counts, plan_src, plan_weight, out_counts;
};

Stage1Cpu stage1_cpu(const char* op, const at::Tensor& x, const at::Tensor& frame_counts, double tau,
                     int64_t max_window, double ema, bool keep_last_interior, bool with_plan) {
  ops::check_merge_frames_inputs(op, x, frame_counts, tau, max_window, ema);
  const int64_t N = x.size(0), S = x.size(1), D = x.size(2);
  const at::Tensor fc = frame_counts.contiguous();
  const int64_t* cnt = fc.data_ptr<int64_t>();
  const int64_t B = fc.size(0);
  ops::check_frame_counts_values(op, cnt, B, N);
  std::vector<int64_t> offsets(static_cast<size_t>(B + 1), 0);
  int64_t max_t = 0;
  for (int64_t b = 0; b < B; ++b) {
    offsets[b + 1] = offsets[b] + cnt[b];
    max_t = std::max(max_t, cnt[b]);
  }

  const at::Tensor xc = (x.stride(2) == 1 || D == 1) ? x : x.contiguous();
  const int64_t kb = std::max<int64_t>(0, std::min(max_window - 1, max_t - 1));
  std::vector<float> band(static_cast<size_t>(N * kb), 0.0f);
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "merge_frames_band_cpu", [&] {
    finite = band_cpu<scalar_t>(xc.const_data_ptr<scalar_t>(), S, D, xc.stride(0), xc.stride(1), kb, offsets, band);
  });
  TORCH_CHECK_VALUE(finite, op, ": x contains NaN or Inf values");

  mg::WalkConfig cfg;
  cfg.tau = tau;
  cfg.ema = ema;
  cfg.max_window = max_window;
  cfg.keep_last_interior = keep_last_interior;
  std::vector<int64_t> seg_scratch(static_cast<size_t>(2 * N)), plan_scratch(with_plan ? static_cast<size_t>(2 * N) : 0);
  std::vector<float> w_scratch(with_plan ? static_cast<size_t>(N) : 0);
  std::vector<int64_t> nseg(static_cast<size_t>(B)), nout(static_cast<size_t>(B));
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {  // O(T) scalar work per video
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = offsets[b];
      mg::walk_video(band.data(), kb, t0, cnt[b], cfg, seg_scratch.data() + 2 * t0,
                     with_plan ? plan_scratch.data() + 2 * t0 : nullptr, with_plan ? w_scratch.data() + t0 : nullptr,
                     &nseg[b], &nout[b]);
    }
  });

  int64_t K = 0, NO = 0;
  for (int64_t b = 0; b < B; ++b) {
    K += nseg[b];
    NO += nout[b];
  }
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  Stage1Cpu r;
  r.segments = at::empty({K, 2}, i64);
  r.segment_counts = at::empty({B}, i64);
  int64_t* so = r.segments.data_ptr<int64_t>();
  int64_t* sc = r.segment_counts.data_ptr<int64_t>();
  int64_t* po = nullptr;
  float* wo = nullptr;
  int64_t* oc = nullptr;
  if (with_plan) {
    r.plan_src = at::empty({NO, 2}, i64);
    r.plan_weight = at::empty({NO}, at::TensorOptions().dtype(at::kFloat));
    r.out_counts = at::empty({B}, i64);
    po = r.plan_src.data_ptr<int64_t>();
    wo = r.plan_weight.data_ptr<float>();
    oc = r.out_counts.data_ptr<int64_t>();
  }
  int64_t ks = 0, ko = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t0 = offsets[b];
    std::memcpy(so + 2 * ks, seg_scratch.data() + 2 * t0, sizeof(int64_t) * 2 * nseg[b]);
    sc[b] = nseg[b];
    ks += nseg[b];
    if (with_plan) {
      std::memcpy(po + 2 * ko, plan_scratch.data() + 2 * t0, sizeof(int64_t) * 2 * nout[b]);
      std::memcpy(wo + ko, w_scratch.data() + t0, sizeof(float) * nout[b]);
      oc[b] = nout[b];
      ko += nout[b];
    }
  }
  return r;
}

// out[o] = w*x[src0] + (1-w)*x[src1] for x viewed as [n_in, rows, cols] (cols contiguous).
at::Tensor apply_rows_cpu(const at::Tensor& x, int64_t rows, int64_t cols, int64_t sn, int64_t sr,
                          const at::Tensor& plan_src, const at::Tensor& plan_weight, at::IntArrayRef out_shape) {
  const int64_t n_out = plan_src.size(0);
  at::Tensor out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (n_out == 0 || rows == 0 || cols == 0) return out;
  const at::Tensor ps = plan_src.contiguous();
  const at::Tensor pw = plan_weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_merge_plan_cpu", [&] {
    apply_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), x.size(0), rows, cols, sn, sr, ps.const_data_ptr<int64_t>(),
                        pw.const_data_ptr<float>(), n_out, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_frames_cpu(
    const at::Tensor& x, const at::Tensor& frame_counts, double tau, int64_t max_window, double ema,
    bool keep_last_interior) {
  Stage1Cpu r = stage1_cpu("merge_frames", x, frame_counts, tau, max_window, ema, keep_last_interior, true);
  const at::Tensor xc = (x.stride(2) == 1 || x.size(2) == 1) ? x : x.contiguous();
  const int64_t S = x.size(1), D = x.size(2);
  at::Tensor out = apply_rows_cpu(xc, S, D, xc.stride(0), xc.stride(1), r.plan_src, r.plan_weight,
                                  {r.plan_src.size(0), S, D});
  return {out, r.out_counts, r.plan_src, r.plan_weight, r.segments, r.segment_counts};
}

std::tuple<at::Tensor, at::Tensor> segment_frames_cpu(const at::Tensor& x, const at::Tensor& frame_counts, double tau,
                                                      int64_t max_window, double ema) {
  Stage1Cpu r = stage1_cpu("segment_frames", x, frame_counts, tau, max_window, ema, false, false);
  return {r.segments, r.segment_counts};
}

// The CPU raises on bad inputs right away (its checks cost nothing); the outputs have the CUDA
// layout: segments in the first K rows of a zero-filled [N, 2] buffer, status = (K, 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_frames_deferred_cpu(const at::Tensor& x,
                                                                         const at::Tensor& frame_counts, double tau,
                                                                         int64_t max_window, double ema) {
  Stage1Cpu r = stage1_cpu("segment_frames", x, frame_counts, tau, max_window, ema, false, false);
  const int64_t K = r.segments.size(0);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor buf = at::zeros({x.size(0), 2}, i64);
  buf.narrow(0, 0, K).copy_(r.segments);
  at::Tensor status = at::zeros({2}, i64);
  status.data_ptr<int64_t>()[0] = K;
  return {buf, r.segment_counts, status};
}

at::Tensor apply_merge_plan_cpu(const at::Tensor& x, const at::Tensor& plan_src, const at::Tensor& plan_weight) {
  ops::check_apply_merge_plan_inputs(x, plan_src, plan_weight);
  const int64_t n_in = x.size(0), n_out = plan_src.size(0);
  const at::Tensor ps = plan_src.contiguous();
  const int64_t* src = ps.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * n_out; ++i)
    TORCH_CHECK_VALUE(src[i] >= 0 && src[i] < n_in, "apply_merge_plan: plan_src must hold frame indices in [0, ",
                      n_in, "), got ", src[i], " in row ", i / 2);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n_out;
  const at::Tensor xc = x.contiguous();
  int64_t cols = 1;
  for (int64_t d = 1; d < xc.dim(); ++d) cols *= xc.size(d);
  return apply_rows_cpu(xc, 1, cols, cols, cols, ps, plan_weight, shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(earlytom, CPU, m) {
  m.impl("merge_frames", &merge_frames_cpu);
  m.impl("apply_merge_plan", &apply_merge_plan_cpu);
  m.impl("segment_frames", &segment_frames_cpu);
  m.impl("segment_frames_deferred", &segment_frames_deferred_cpu);
}

}  // namespace earlytom
