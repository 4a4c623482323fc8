// Stage I (merge_frames, segment_frames, apply_merge_plan): torch-free core shared by the CPU and
// CUDA ops and by the standalone CUDA tests. Semantics: docs/algorithm.md "Stage I" and
// docs/design.md "merge_frames"; earlytom_ext/reference.py is the oracle.
//
// The op is cut into three passes.
//
// Pass 1a, band similarities. The EMA walk of a video only ever compares frame i with the first
// frame of its current segment, and a segment is closed before it reaches M = max_window frames,
// so that reference frame is at most M-1 frames back. The fine-merge compares the two endpoints
// of a segment (at most M-2 apart) and neighbouring frames (1 apart). Every similarity the walk
// can ask for is therefore sim(i-k, i) with 1 <= k <= kb = min(M-1, N-1): the "band", stored as
// band[i * kb + (k-1)] (fp32). The band is computed in parallel over (position blocks, frame
// tiles), reading X about once:
//   * band_ring_kernel: one warp per token position s, walking the frames of its tile (plus a
//     halo of kr frames before it) in order. Each frame's token vector is loaded once (128-bit
//     loads when aligned), parked in a per-warp ring of kr+1 frames in shared memory, and dotted
//     with the kr previous frames held there; the squared norm of every frame comes from the same
//     registers. Each lane only ever touches its own ring entries, so the ring needs no barrier.
//     The next frame is prefetched into registers while the current one is processed. Per-lane
//     fp32 partial sums are reduced with warp shuffles; cosines use per-token norms
//     (max(|x|, 1e-12), as F.normalize). The warps of a block (consecutive positions) are
//     summed in a fixed order and written as per-block partial sums; band_reduce_kernel then sums
//     the partials of each pair with a fixed lane assignment and a fixed shuffle tree. No float
//     atomics anywhere, so the band (and everything after it) is identical from run to run.
//   * Offsets k > kr (only when max_window > kRingMaxK + 1, i.e. a ring would not fit in shared
//     memory) are computed by band_direct_kernel, which reads both frames from global memory and
//     skips pairs that cross a video boundary. It reproduces the ring kernel's arithmetic exactly
//     (same slab chunking, same shuffle trees, same position grouping and summation order), so two
//     pairs of identical frames get bit-identical similarities whichever kernel computed them
//     (exact ties, e.g. duplicated frames, resolve as in the reference).
//   The ring kernel also flags NaN/Inf inputs (integer bit tests, immune to fast-math), so the op
//   validates X without an extra pass or an extra host sync.
//
// Pass 1b, the walk (walk_kernel, one block): a block scan of frame_counts gives the frame offset
// of every video (prep_kernel also validates the counts), one thread per video walks its band
// (staged in shared memory when it fits): EMA segmentation, then the fine-merge plan of every
// segment, written at the video's frame offset into fixed-size (N) scratch buffers (a video of T
// frames has at most T segments and T output frames). Block scans of the per-video counts then
// give the compact offsets, the entries are compacted, and status[0..1] receives N' and K. The
// host reads status once (the single sync of the op) to size the outputs.
//
// Pass 2, apply (apply_plan_kernel): output frame o = w*X[src0] + (1-w)*X[src1] in fp32 (fp64
// for fp64 tensors), each output element written once, frames read once (a pass-through frame,
// w == 1, is a plain copy and never reads src1), 128-bit loads/stores when aligned. Memory bound.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace earlytom {
namespace merge {

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------
constexpr float kNormEps = 1e-12f;     // F.normalize eps
constexpr int kRingMaxK = 32;          // band offsets computed by the ring kernel (kr <= this)
constexpr int kBandWarps = 4;          // positions per block of the ring kernel
constexpr int kBandTile = 16;          // target frames per tile of the ring kernel
constexpr int kSlabMax = 8;            // 32-lane chunks of D per slab (register prefetch depth)
constexpr int kRingBudget = 24 * 1024; // shared-memory bytes per warp aimed at for the ring
constexpr int kKBlock = 8;             // band offsets accumulated in registers at once
constexpr int kScanThreads = 256;      // threads of the one-block prep / walk kernels
constexpr int kReduceThreads = 256;
constexpr int kApplyThreads = 256;
constexpr int kApplyUnroll = 4;
// The walk stages the band in shared memory up to this; its static shared memory (the scan
// scratch) must fit beside it in the 48 KB a block gets without an opt-in.
constexpr int kWalkStageBytes = 47 * 1024;

// status[2] flags (set on the device, read by the host with N' and K)
constexpr unsigned long long kFlagCountBelowOne = 1ull;  // some frame_counts[b] < 1
constexpr unsigned long long kFlagCountSum = 2ull;       // sum(frame_counts) != N, or some count > N
constexpr unsigned long long kFlagNonFinite = 4ull;      // x holds NaN or Inf
constexpr unsigned long long kFlagCountsBad = kFlagCountBelowOne | kFlagCountSum;

// ---------------------------------------------------------------------------------------------
// The walk (host and device): EMA segmentation and the fine-merge plan of one video.
// ---------------------------------------------------------------------------------------------
struct WalkConfig {
  double tau = 0.6;
  double ema = 0.9;
  int64_t max_window = 8;
  bool keep_last_interior = false;
};

// Exactly rounded double ops: the EMA must round like Python's floats (no FMA contraction).
EARLYTOM_HD double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  volatile double r = a * b;
  return r;
#endif
}

EARLYTOM_HD double dadd_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  volatile double r = a + b;
  return r;
#endif
}

// sim(a, b) of local frames a < b (b - a <= kb) of the video starting at global frame t0.
EARLYTOM_HD float band_sim(const float* band, int64_t kb, int64_t t0, int64_t a, int64_t b) {
  return band[(t0 + b) * kb + (b - a - 1)];
}

EARLYTOM_HD void put_plan(int64_t* src, float* w, int64_t& n, int64_t g0, int64_t g1, float wt) {
  src[2 * n] = g0;
  src[2 * n + 1] = g1;
  w[n] = wt;
  ++n;
}

// Plan entries of segment [s, e] (local indices) appended at src/w[n...] with global indices.
// Mirrors reference.merge_plan / _interior_plan: comparisons on the fp32 similarities, the
// weight sigma_j / (sigma_j + sigma_{j+1}) in double (0.5 when the sum is 0), stored as fp32.
EARLYTOM_HD void plan_segment(const float* band, int64_t kb, int64_t t0, int64_t s, int64_t e,
                            bool keep_last_interior, int64_t* src, float* w, int64_t& n) {
  if (e - s + 1 <= 2) {
    for (int64_t i = s; i <= e; ++i) put_plan(src, w, n, t0 + i, t0 + i, 1.0f);
    return;
  }
  put_plan(src, w, n, t0 + s, t0 + s, 1.0f);
  const int64_t first = s + 1;
  const int64_t L = e - s - 1;  // interior frames
  if (L == 1) {
    put_plan(src, w, n, t0 + first, t0 + first, 1.0f);
  } else {
    const float tau_m = band_sim(band, kb, t0, s, e);
    int64_t j = 0;
    while (j < L - 1) {
      const int64_t a = first + j;
      const int64_t b = a + 1;
      const float sj = band_sim(band, kb, t0, a, b);
      if (j + 1 < L - 1) {  // not the last pair
        const float sn = band_sim(band, kb, t0, b, b + 1);
        if (sj > tau_m && sj > sn) {
          const double den = static_cast<double>(sj) + static_cast<double>(sn);
          const double wt = den != 0.0 ? static_cast<double>(sj) / den : 0.5;
          put_plan(src, w, n, t0 + a, t0 + b, static_cast<float>(wt));
          j += 2;
        } else {
          put_plan(src, w, n, t0 + a, t0 + a, 1.0f);
          j += 1;
        }
      } else {  // the last pair: published weight 1 (drops b); corrected: plain average
        if (sj > tau_m) {
          put_plan(src, w, n, t0 + a, t0 + b, keep_last_interior ? 0.5f : 1.0f);
          j += 2;
        } else {
          put_plan(src, w, n, t0 + a, t0 + a, 1.0f);
          j += 1;
        }
      }
    }
    // Published defect: the last interior frame is never emitted on its own.
    if (keep_last_interior && j == L - 1) put_plan(src, w, n, t0 + first + L - 1, t0 + first + L - 1, 1.0f);
  }
  put_plan(src, w, n, t0 + e, t0 + e, 1.0f);
}

// Walks one video of T frames starting at global frame t0. Writes its segments (global,
// inclusive) to seg[0..2*n_seg) and, when plan_src is not null, its plan to plan_src[0..2*n_out)
// / plan_w[0..n_out). Both counts are <= T.
EARLYTOM_HD void walk_video(const float* band, int64_t kb, int64_t t0, int64_t T, const WalkConfig& cfg,
                          int64_t* seg, int64_t* plan_src, float* plan_w, int64_t* n_seg, int64_t* n_out) {
  int64_t ns = 0, no = 0, start = 0;
  const double keep = 1.0 - cfg.ema;
  double s_hat = 1.0;
  for (int64_t i = 1; i < T; ++i) {
    const float c = band_sim(band, kb, t0, start, i);  // reference frame: the segment's first
    s_hat = dadd_rn(dmul_rn(cfg.ema, static_cast<double>(c)), dmul_rn(keep, s_hat));
    if (s_hat < cfg.tau || (i - start + 1) >= cfg.max_window) {
      seg[2 * ns] = t0 + start;
      seg[2 * ns + 1] = t0 + i - 1;
      ++ns;
      if (plan_src != nullptr) plan_segment(band, kb, t0, start, i - 1, cfg.keep_last_interior, plan_src, plan_w, no);
      start = i;
      s_hat = 1.0;
    }
  }
  seg[2 * ns] = t0 + start;
  seg[2 * ns + 1] = t0 + T - 1;
  ++ns;
  if (plan_src != nullptr) plan_segment(band, kb, t0, start, T - 1, cfg.keep_last_interior, plan_src, plan_w, no);
  *n_seg = ns;
  *n_out = no;
}

// Band width for N frames in all and a window of M frames.
EARLYTOM_HD int64_t band_width(int64_t N, int64_t max_window) {
  const int64_t a = max_window - 1, b = N - 1;
  return a < b ? a : b;
}

#if defined(__CUDACC__)

// ---------------------------------------------------------------------------------------------
// Device helpers (packs, conversions, NaN tests and the block scan: common.h)
// ---------------------------------------------------------------------------------------------

// Merge arithmetic without FMA contraction: w*a + (1-w)*b rounds like the reference's
// separate torch multiplications and addition.
__device__ __forceinline__ float merge_rn(float w, float a, float wb, float b) {
  return __fadd_rn(__fmul_rn(w, a), __fmul_rn(wb, b));
}
__device__ __forceinline__ double merge_rn(double w, double a, double wb, double b) {
  return __dadd_rn(__dmul_rn(w, a), __dmul_rn(wb, b));
}
__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Cosine of one token pair from its dot product and squared norms:
// dot / (max(|a|, eps) * max(|b|, eps)), correctly rounded (so it is exactly +-1 for D = 1, as
// F.normalize gives, and exact ties stay ties).
__device__ __forceinline__ float cosine(float dot, float sumsq_a, float sumsq_b) {
  const float na = fmaxf(__fsqrt_rn(sumsq_a), kNormEps);
  const float nb = fmaxf(__fsqrt_rn(sumsq_b), kNormEps);
  return __fdiv_rn(dot, __fmul_rn(na, nb));
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters
// ---------------------------------------------------------------------------------------------
struct PrepParams {
  const int64_t* counts;  // [B]
  int64_t B;
  int64_t N;
  int64_t* offsets;       // [B + 1] frame offset of every video (out)
  int64_t* vstart;        // [N] first frame of the video of every frame (out), or null
  unsigned long long* status;  // [4]: N', K, flags (zeroed here), spare
};

struct BandParams {
  const void* x;          // [N, S, D], last dim contiguous
  int64_t N, S, D;
  int64_t stride_n, stride_s;  // elements
  int64_t kb;             // band row stride (= band width)
  int kr;                 // offsets 1..kr by the ring kernel
  int ftile;              // target frames per tile (ring kernel)
  int slab;               // 32-lane chunks per slab (<= kSlabMax)
  int64_t npb;            // position blocks = ceil(S / kBandWarps)
  float* partial;         // [N * kr][npb] per-block cosine sums (ring kernel)
  float* band;            // [N * kb] (reduce + direct kernels)
  const int64_t* vstart;  // [N] (direct kernel)
  unsigned long long* status;
};

struct WalkParams {
  const float* band;
  int64_t kb;
  int64_t N;
  const int64_t* counts;   // [B]
  const int64_t* offsets;  // [B + 1]
  int64_t B;
  WalkConfig cfg;
  int with_plan;
  int stage_band;          // copy the band into shared memory first (N*kb*4 <= kWalkStageBytes)
  int64_t* seg_scratch;    // [N][2]
  int64_t* plan_scratch;   // [N][2]
  float* w_scratch;        // [N]
  int64_t* seg_counts;     // [B] (out)
  int64_t* out_counts;     // [B] (out; with_plan only)
  int64_t* seg_off;        // [B] scratch
  int64_t* out_off;        // [B] scratch
  int64_t* seg_out;        // [N][2] compact (out)
  int64_t* plan_out;       // [N][2] compact (out)
  float* w_out;            // [N] compact (out)
  unsigned long long* status;
};

struct ApplyParams {
  const void* x;          // [n_in, rows, cols], cols contiguous
  int64_t n_in;
  int64_t rows, cols;
  int64_t stride_n, stride_r;  // elements
  const int64_t* plan_src;     // [n_out][2]
  const float* plan_w;         // [n_out]
  int64_t n_out;
  void* out;              // [n_out, rows, cols] contiguous
};

// ---------------------------------------------------------------------------------------------
// Pass 0: frame offsets of the videos, count checks, per-frame video start.
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kScanThreads) prep_kernel(PrepParams p) {
  __shared__ int64_t sh[32];
  __shared__ unsigned int bad_count;  // bit 0: some count < 1, bit 1: some count > N
  __shared__ unsigned long long flags;
  if (threadIdx.x == 0) bad_count = 0u;
  __syncthreads();
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    const int64_t c = p.counts[b];
    if (c < 1) atomicOr(&bad_count, 1u);
    if (c > p.N) atomicOr(&bad_count, 2u);  // huge counts could wrap the sum back to N
  }
  const int64_t total = block_exclusive_scan<kScanThreads>(p.counts, p.offsets, p.B, sh);
  if (threadIdx.x == 0) {
    p.offsets[p.B] = total;
    unsigned long long f = 0;
    if (bad_count & 1u) f |= kFlagCountBelowOne;
    if ((bad_count & 2u) || total != p.N) f |= kFlagCountSum;
    flags = f;
    p.status[0] = 0;
    p.status[1] = 0;
    p.status[2] = f;
    p.status[3] = 0;
  }
  __syncthreads();
  if (p.vstart == nullptr) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (flags != 0) {  // offsets are meaningless: every pair counts as in-video (bounds stay safe)
    for (int64_t f = threadIdx.x; f < p.N; f += blockDim.x) p.vstart[f] = 0;
    return;
  }
  for (int64_t b = warp; b < p.B; b += kScanThreads / 32)
    for (int64_t f = p.offsets[b] + lane; f < p.offsets[b + 1]; f += 32) p.vstart[f] = p.offsets[b];
}

// ---------------------------------------------------------------------------------------------
// Pass 1a: band similarities
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ __forceinline__ void load_slab(Pack<T, VEC>* reg, const T* row, int64_t c0, int nc, int lane, int64_t D) {
#pragma unroll
  for (int c = 0; c < kSlabMax; ++c) {
    if (c < nc) {
      const int64_t d = ((c0 + c) * 32 + lane) * VEC;
      reg[c] = d < D ? *reinterpret_cast<const Pack<T, VEC>*>(row + d) : zero_pack<T, VEC>();
    }
  }
}

// Shared-memory bytes of one warp of the ring kernel (ring + dot sums + norms).
inline size_t ring_warp_bytes(int kr, int slab, int ftile, size_t pack_bytes) {
  return static_cast<size_t>(kr + 1) * slab * 32 * pack_bytes +
         static_cast<size_t>(ftile * kr + ftile + kr) * sizeof(float);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBandWarps * 32) band_ring_kernel(BandParams p) {
  using P = Pack<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int kr = p.kr, FT = p.ftile, SC = p.slab;
  const int nslot = kr + 1;
  const size_t ring_elems = static_cast<size_t>(nslot) * SC * 32;
  P* ring = reinterpret_cast<P*>(smem) + warp * ring_elems + lane;  // entry (slot, c) at [(slot*SC + c)*32]
  const int ws_floats = FT * kr + FT + kr;
  float* fws = reinterpret_cast<float*>(smem + kBandWarps * ring_elems * sizeof(P));
  float* sd = fws + warp * ws_floats;  // [FT][kr]: dot sums, then cosines
  float* sn = sd + FT * kr;            // [FT + kr]: squared norms of the window frames
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kBandWarps + warp;
  const bool active = s < p.S;         // warp-uniform
  const int64_t D = p.D;
  const int64_t nchunks = (D + 32 * VEC - 1) / (32 * VEC);
  const T* xs = static_cast<const T*>(p.x) + (active ? s : 0) * p.stride_s;
  const int64_t ntiles = (p.N + FT - 1) / FT;
  bool bad = false;

  for (int64_t tile = blockIdx.y; tile < ntiles; tile += gridDim.y) {
    const int64_t i0 = tile * FT;
    const int64_t i1 = i0 + FT < p.N ? i0 + FT : p.N;
    const int64_t h0 = i0 - kr > 0 ? i0 - kr : 0;
    const int nt = static_cast<int>(i1 - i0);
    const int hoff = static_cast<int>(i0 - h0);  // window index of the first target frame
    for (int idx = lane; idx < ws_floats; idx += 32) sd[idx] = 0.0f;
    __syncwarp();
    if (active) {
      for (int64_t c0 = 0; c0 < nchunks; c0 += SC) {
        const int nc = static_cast<int>(nchunks - c0 < SC ? nchunks - c0 : SC);
        P reg[kSlabMax];
        load_slab<T, VEC>(reg, xs + h0 * p.stride_n, c0, nc, lane, D);
        for (int64_t f = h0; f < i1; ++f) {
          const int wf = static_cast<int>(f - h0);
          P* own = ring + static_cast<size_t>(wf % nslot) * SC * 32;
          float nrm = 0.0f;
#pragma unroll
          for (int c = 0; c < kSlabMax; ++c) {
            if (c < nc) {
              own[c * 32] = reg[c];
#pragma unroll
              for (int v = 0; v < VEC; ++v) {
                const float a = to_acc(reg[c].v[v]);
                nrm = fmaf(a, a, nrm);
                bad |= nonfinite(reg[c].v[v]);
              }
            }
          }
          // Prefetch the next frame while this one is dotted with the ring.
          if (f + 1 < i1) load_slab<T, VEC>(reg, xs + (f + 1) * p.stride_n, c0, nc, lane, D);
          nrm = warp_sum(nrm);
          if (lane == 0) sn[wf] += nrm;
          if (f >= i0) {
            const int kmax = wf < kr ? wf : kr;  // f - k must stay inside the window
            for (int kb0 = 1; kb0 <= kmax; kb0 += kKBlock) {
              float acc[kKBlock];
              const P* oth[kKBlock];
#pragma unroll
              for (int j = 0; j < kKBlock; ++j) {
                acc[j] = 0.0f;
                const int k = kb0 + j <= kmax ? kb0 + j : kmax;
                oth[j] = ring + static_cast<size_t>((wf - k) % nslot) * SC * 32;
              }
              for (int c = 0; c < nc; ++c) {
                const P a = own[c * 32];
                float af[VEC];
#pragma unroll
                for (int v = 0; v < VEC; ++v) af[v] = to_acc(a.v[v]);
#pragma unroll
                for (int j = 0; j < kKBlock; ++j) {
                  if (kb0 + j <= kmax) {
                    const P b = oth[j][c * 32];
#pragma unroll
                    for (int v = 0; v < VEC; ++v) acc[j] = fmaf(af[v], to_acc(b.v[v]), acc[j]);
                  }
                }
              }
#pragma unroll
              for (int j = 0; j < kKBlock; ++j) {
                if (kb0 + j <= kmax) {
                  const float t = warp_sum(acc[j]);
                  if (lane == 0) sd[(f - i0) * kr + kb0 + j - 1] += t;
                }
              }
            }
          }
        }
      }
    }
    __syncwarp();
    // Cosines of this warp's position (0 for pairs outside the window or an inactive warp).
    for (int idx = lane; idx < nt * kr; idx += 32) {
      const int t = idx / kr, k = idx % kr + 1;
      const int wf = hoff + t;
      float cv = 0.0f;
      if (active && k <= wf) cv = cosine(sd[idx], sn[wf], sn[wf - k]);
      sd[idx] = cv;
    }
    __syncthreads();
    // The block's positions, summed in warp order: one partial per (pair, position block).
    for (int idx = threadIdx.x; idx < nt * kr; idx += blockDim.x) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kBandWarps; ++w) sum += fws[w * ws_floats + idx];
      p.partial[(i0 * kr + idx) * p.npb + blockIdx.x] = sum;
    }
    __syncthreads();  // sd is reused by the next tile
  }
  if (__any_sync(0xffffffffu, bad) && lane == 0) atomicOr(p.status + 2, kFlagNonFinite);
}

// band[f*kb + k-1] = mean over positions, for k <= kr: a fixed lane assignment over the position
// blocks and a fixed shuffle tree (deterministic).
__global__ void __launch_bounds__(kReduceThreads) band_reduce_kernel(BandParams p) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (pair >= p.N * p.kr) return;  // warp-uniform
  const float* row = p.partial + pair * p.npb;
  float s = 0.0f;
  for (int64_t j = lane; j < p.npb; j += 32) s += row[j];
  s = warp_sum(s);
  if (lane == 0) p.band[(pair / p.kr) * p.kb + pair % p.kr] = __fdiv_rn(s, static_cast<float>(p.S));
}

// Offsets kr < k <= kb, inside videos only. One block (kBandWarps warps, warp w <-> position
// pb*kBandWarps + w as in the ring kernel) per (frame f, group of kKBlock offsets); every
// quantity is accumulated in the ring/reduce kernels' order, so the results are bit-identical.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBandWarps * 32) band_direct_kernel(BandParams p) {
  using P = Pack<T, VEC>;
  __shared__ float cosw[kBandWarps][kKBlock];
  __shared__ float lane_acc[kKBlock][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int SC = p.slab;
  const int64_t D = p.D;
  const int64_t nchunks = (D + 32 * VEC - 1) / (32 * VEC);
  const int64_t ngroups = (p.kb - p.kr + kKBlock - 1) / kKBlock;
  const T* x = static_cast<const T*>(p.x);
  for (int64_t f = blockIdx.x; f < p.N; f += gridDim.x) {
    int64_t lo = p.vstart[f];
    if (lo < 0) lo = 0;
    for (int64_t g = blockIdx.y; g < ngroups; g += gridDim.y) {
      const int64_t k0 = p.kr + 1 + g * kKBlock;
      int64_t kcap = p.kb - k0 + 1;                 // offsets of this group inside the band
      if (kcap > kKBlock) kcap = kKBlock;
      int64_t nk = f - lo - k0 + 1;                 // offsets reaching inside the video
      if (nk > kcap) nk = kcap;
      if (nk <= 0) {
        if (threadIdx.x < kcap) p.band[f * p.kb + k0 - 1 + threadIdx.x] = 0.0f;
        continue;  // block-uniform
      }
      for (int i = threadIdx.x; i < kKBlock * 32; i += blockDim.x) lane_acc[i / 32][i % 32] = 0.0f;
      __syncthreads();
      for (int64_t pb = 0; pb < p.npb; ++pb) {
        const int64_t s = pb * kBandWarps + warp;
        float cs[kKBlock];
#pragma unroll
        for (int j = 0; j < kKBlock; ++j) cs[j] = 0.0f;
        if (s < p.S) {  // warp-uniform
          const T* own = x + f * p.stride_n + s * p.stride_s;
          float dsum[kKBlock], osum[kKBlock], nown = 0.0f;
#pragma unroll
          for (int j = 0; j < kKBlock; ++j) dsum[j] = osum[j] = 0.0f;
          for (int64_t c0 = 0; c0 < nchunks; c0 += SC) {
            const int nc = static_cast<int>(nchunks - c0 < SC ? nchunks - c0 : SC);
            float pn = 0.0f, pd[kKBlock], po[kKBlock];
#pragma unroll
            for (int j = 0; j < kKBlock; ++j) pd[j] = po[j] = 0.0f;
            for (int c = 0; c < nc; ++c) {
              const int64_t d = ((c0 + c) * 32 + lane) * VEC;
              const P a = d < D ? *reinterpret_cast<const P*>(own + d) : zero_pack<T, VEC>();
              float af[VEC];
#pragma unroll
              for (int v = 0; v < VEC; ++v) {
                af[v] = to_acc(a.v[v]);
                pn = fmaf(af[v], af[v], pn);
              }
#pragma unroll
              for (int j = 0; j < kKBlock; ++j) {
                if (j < nk) {
                  const T* oth = x + (f - k0 - j) * p.stride_n + s * p.stride_s;
                  const P b = d < D ? *reinterpret_cast<const P*>(oth + d) : zero_pack<T, VEC>();
#pragma unroll
                  for (int v = 0; v < VEC; ++v) {
                    const float bf = to_acc(b.v[v]);
                    pd[j] = fmaf(af[v], bf, pd[j]);
                    po[j] = fmaf(bf, bf, po[j]);
                  }
                }
              }
            }
            nown += warp_sum(pn);
#pragma unroll
            for (int j = 0; j < kKBlock; ++j) {
              if (j < nk) {
                dsum[j] += warp_sum(pd[j]);
                osum[j] += warp_sum(po[j]);
              }
            }
          }
#pragma unroll
          for (int j = 0; j < kKBlock; ++j)
            if (j < nk) cs[j] = cosine(dsum[j], nown, osum[j]);
        }
        if (lane == 0) {
#pragma unroll
          for (int j = 0; j < kKBlock; ++j) cosw[warp][j] = cs[j];
        }
        __syncthreads();
        if (threadIdx.x < kKBlock) {
          float sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kBandWarps; ++w) sum += cosw[w][threadIdx.x];
          lane_acc[threadIdx.x][pb % 32] += sum;
        }
        __syncthreads();
      }
      if (warp == 0) {
        for (int j = 0; j < kcap; ++j) {
          const float t = warp_sum(lane_acc[j][lane]);
          if (lane == 0) p.band[f * p.kb + k0 - 1 + j] = j < nk ? __fdiv_rn(t, static_cast<float>(p.S)) : 0.0f;
        }
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 1b: the walk (one block)
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kScanThreads) walk_kernel(WalkParams p) {
  extern __shared__ float sband[];
  __shared__ int64_t sh[32];
  if ((p.status[2] & kFlagCountsBad) != 0) return;  // block-uniform: the offsets are unusable
  const float* band = p.band;
  if (p.stage_band) {
    const int64_t n = p.N * p.kb;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sband[i] = p.band[i];
    __syncthreads();
    band = sband;
  }
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    const int64_t t0 = p.offsets[b];
    int64_t ns = 0, no = 0;
    walk_video(band, p.kb, t0, p.counts[b], p.cfg, p.seg_scratch + 2 * t0,
               p.with_plan ? p.plan_scratch + 2 * t0 : nullptr, p.with_plan ? p.w_scratch + t0 : nullptr, &ns,
               &no);
    p.seg_counts[b] = ns;
    if (p.with_plan) p.out_counts[b] = no;
  }
  __syncthreads();
  const int64_t K = block_exclusive_scan<kScanThreads>(p.seg_counts, p.seg_off, p.B, sh);
  const int64_t NO = p.with_plan ? block_exclusive_scan<kScanThreads>(p.out_counts, p.out_off, p.B, sh) : 0;
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    const int64_t t0 = p.offsets[b];
    const int64_t so = p.seg_off[b], ns = p.seg_counts[b];
    for (int64_t j = 0; j < ns; ++j) {
      p.seg_out[2 * (so + j)] = p.seg_scratch[2 * (t0 + j)];
      p.seg_out[2 * (so + j) + 1] = p.seg_scratch[2 * (t0 + j) + 1];
    }
    if (p.with_plan) {
      const int64_t oo = p.out_off[b], no = p.out_counts[b];
      for (int64_t j = 0; j < no; ++j) {
        p.plan_out[2 * (oo + j)] = p.plan_scratch[2 * (t0 + j)];
        p.plan_out[2 * (oo + j) + 1] = p.plan_scratch[2 * (t0 + j) + 1];
        p.w_out[oo + j] = p.w_scratch[t0 + j];
      }
    }
  }
  if (threadIdx.x == 0) {
    p.status[0] = static_cast<unsigned long long>(NO);
    p.status[1] = static_cast<unsigned long long>(K);
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: apply the plan
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void __launch_bounds__(kApplyThreads) apply_plan_kernel(ApplyParams p) {
  using P = Pack<T, VEC>;
  using A = typename AccOf<T>::type;
  const uint32_t cpr = static_cast<uint32_t>(p.cols / VEC);  // packs per row
  const uint32_t ppf = static_cast<uint32_t>(p.rows) * cpr;   // packs per frame (< 2^31, host-checked)
  const T* x = static_cast<const T*>(p.x);
  P* out = static_cast<P*>(p.out);
  const uint32_t step = gridDim.x * kApplyThreads * kApplyUnroll;
  for (int64_t o = blockIdx.y; o < p.n_out; o += gridDim.y) {
    const int64_t a = p.plan_src[2 * o], b = p.plan_src[2 * o + 1];
    const float w = p.plan_w[o];
    const bool ok = a >= 0 && a < p.n_in && b >= 0 && b < p.n_in;
    const bool two = w != 1.0f;
    const T* xa = x + (ok ? a : 0) * p.stride_n;
    const T* xb = x + (ok ? b : 0) * p.stride_n;
    P* orow = out + static_cast<int64_t>(o) * ppf;
    const A wa = static_cast<A>(w);
    const A wb = static_cast<A>(1) - wa;
    for (uint32_t base = blockIdx.x * kApplyThreads * kApplyUnroll; base < ppf; base += step) {
      P va[kApplyUnroll], vb[kApplyUnroll];
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const uint32_t i = base + u * kApplyThreads + threadIdx.x;
        if (i < ppf && ok) {
          uint32_t r = 0, c = i;
          if (p.rows != 1) {
            r = i / cpr;
            c = i - r * cpr;
          }
          const int64_t off = static_cast<int64_t>(r) * p.stride_r + static_cast<int64_t>(c) * VEC;
          va[u] = *reinterpret_cast<const P*>(xa + off);
          if (two) vb[u] = *reinterpret_cast<const P*>(xb + off);
        }
      }
#pragma unroll
      for (int u = 0; u < kApplyUnroll; ++u) {
        const uint32_t i = base + u * kApplyThreads + threadIdx.x;
        if (i < ppf) {
          P r;
          if (!ok) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) r.v[v] = from_acc<T>(quiet_nan(A()));
          } else if (!two) {
            r = va[u];
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) r.v[v] = from_acc<T>(merge_rn(wa, to_acc(va[u].v[v]), wb, to_acc(vb[u].v[v])));
          }
          orow[i] = r;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: sizing and launches
// ---------------------------------------------------------------------------------------------

// Sizes of the Stage-I pipeline for x [N, S, D] with `pack_bytes`-byte loads of `vec` elements.
struct Stage1Layout {
  int64_t kb = 0;       // band width
  int kr = 0;           // ring band width
  int ftile = 1;
  int slab = 1;
  int64_t npb = 1;
  int64_t ntiles = 1;
  size_t ring_smem = 0; // dynamic shared memory of the ring kernel
  int64_t partial_elems = 0;
  int64_t band_elems = 0;
  bool need_vstart = false;
  bool stage_band = false;
};

inline Stage1Layout stage1_layout(int64_t N, int64_t S, int64_t D, int64_t max_window, int vec, size_t pack_bytes) {
  Stage1Layout L;
  L.kb = band_width(N, max_window);
  if (L.kb < 0) L.kb = 0;
  L.kr = static_cast<int>(L.kb < kRingMaxK ? L.kb : kRingMaxK);
  L.ftile = static_cast<int>(N < kBandTile ? N : kBandTile);
  if (L.ftile < 1) L.ftile = 1;
  const int64_t nchunks = (D + 32 * vec - 1) / (32 * vec);
  int64_t slab = kRingBudget / static_cast<int64_t>((L.kr + 1) * 32 * pack_bytes);
  if (slab > kSlabMax) slab = kSlabMax;
  if (slab > nchunks) slab = nchunks;
  if (slab < 1) slab = 1;
  L.slab = static_cast<int>(slab);
  L.npb = (S + kBandWarps - 1) / kBandWarps;
  L.ntiles = (N + L.ftile - 1) / L.ftile;
  L.ring_smem = kBandWarps * ring_warp_bytes(L.kr, L.slab, L.ftile, pack_bytes);
  L.partial_elems = N * L.kr * L.npb;
  L.band_elems = N * L.kb;
  L.need_vstart = L.kb > L.kr;
  L.stage_band = L.band_elems * static_cast<int64_t>(sizeof(float)) <= kWalkStageBytes;
  return L;
}

template <typename T>
inline int band_vec(const void* x, int64_t D, int64_t stride_n, int64_t stride_s) {
  constexpr int V = 16 / sizeof(T);
  const uint64_t bits = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(x)) |
                        static_cast<uint64_t>(stride_n * sizeof(T)) | static_cast<uint64_t>(stride_s * sizeof(T));
  return (V > 1 && D % V == 0 && (bits & 15u) == 0) ? V : 1;
}

// Everything the Stage-I launches need (device pointers; `x` as in BandParams).
struct Stage1Args {
  const void* x;
  int64_t N, S, D, stride_n, stride_s;
  const int64_t* counts;
  int64_t B;
  WalkConfig cfg;
  bool with_plan;
  bool force_direct;            // testing: compute every offset with the direct kernel
  // device buffers (sizes from stage1_layout)
  int64_t* offsets;             // [B + 1]
  int64_t* vstart;              // [N] (only read when kb > kr)
  float* partial;               // [partial_elems]
  float* band;                  // [band_elems]
  int64_t* seg_scratch;         // [2N]
  int64_t* plan_scratch;        // [2N]
  float* w_scratch;             // [N]
  int64_t* seg_off;             // [B]
  int64_t* out_off;             // [B]
  int64_t* seg_counts;          // [B] out
  int64_t* out_counts;          // [B] out (with_plan)
  int64_t* seg_out;             // [2N] out
  int64_t* plan_out;            // [2N] out (with_plan)
  float* w_out;                 // [N] out (with_plan)
  unsigned long long* status;   // [4] out: N', K, flags
};

// Layout for Stage1Args `a` (the caller allocates from it).
template <typename T>
inline Stage1Layout stage1_layout_for(const Stage1Args& a, bool force_direct = false) {
  const int vec = band_vec<T>(a.x, a.D, a.stride_n, a.stride_s);
  Stage1Layout L = stage1_layout(a.N, a.S, a.D, a.cfg.max_window, vec, sizeof(T) * vec);
  if (force_direct) {
    L.kr = 0;
    L.ring_smem = kBandWarps * ring_warp_bytes(0, L.slab, L.ftile, sizeof(T) * vec);
    L.partial_elems = 0;
    L.need_vstart = L.kb > 0;
  }
  return L;
}

template <typename T, int VEC>
inline cudaError_t launch_band(const Stage1Args& a, const Stage1Layout& L, cudaStream_t stream) {
  BandParams bp{};
  bp.x = a.x;
  bp.N = a.N;
  bp.S = a.S;
  bp.D = a.D;
  bp.stride_n = a.stride_n;
  bp.stride_s = a.stride_s;
  bp.kb = L.kb;
  bp.kr = L.kr;
  bp.ftile = L.ftile;
  bp.slab = L.slab;
  bp.npb = L.npb;
  bp.partial = a.partial;
  bp.band = a.band;
  bp.vstart = a.vstart;
  bp.status = a.status;
  cudaError_t err;
  // The ring kernel always runs: with kr == 0 it only checks the values (NaN/Inf).
  {
    auto fn = band_ring_kernel<T, VEC>;
    err = set_max_dynamic_smem(reinterpret_cast<const void*>(fn), L.ring_smem);
    if (err != cudaSuccess) return err;
    const unsigned gy = static_cast<unsigned>(L.ntiles < 65535 ? L.ntiles : 65535);
    fn<<<dim3(static_cast<unsigned>(L.npb), gy), kBandWarps * 32, L.ring_smem, stream>>>(bp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (L.kr > 0) {
    const int64_t threads = a.N * L.kr * 32;
    const int64_t blocks = (threads + kReduceThreads - 1) / kReduceThreads;
    band_reduce_kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(bp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (L.kb > L.kr) {
    const int64_t ngroups = (L.kb - L.kr + kKBlock - 1) / kKBlock;
    const unsigned gx = static_cast<unsigned>(a.N < 2147483647 ? a.N : 2147483647);
    const unsigned gy = static_cast<unsigned>(ngroups < 65535 ? ngroups : 65535);
    band_direct_kernel<T, VEC><<<dim3(gx, gy), kBandWarps * 32, 0, stream>>>(bp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Prep + band + walk. Afterwards status[0..2] (N', K, flags) tell the host how to size the outputs.
// Requirements: N, S, D, B >= 1; the buffers sized from the layout returned by
// stage1_layout_for<T>(a, a.force_direct).
template <typename T>
inline cudaError_t launch_stage1(const Stage1Args& a, cudaStream_t stream) {
  const Stage1Layout L = stage1_layout_for<T>(a, a.force_direct);
  PrepParams pp{};
  pp.counts = a.counts;
  pp.B = a.B;
  pp.N = a.N;
  pp.offsets = a.offsets;
  pp.vstart = L.need_vstart ? a.vstart : nullptr;
  pp.status = a.status;
  prep_kernel<<<1, kScanThreads, 0, stream>>>(pp);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int vec = band_vec<T>(a.x, a.D, a.stride_n, a.stride_s);
  constexpr int V = 16 / sizeof(T);
  err = vec == V ? launch_band<T, V>(a, L, stream) : launch_band<T, 1>(a, L, stream);
  if (err != cudaSuccess) return err;

  WalkParams wp{};
  wp.band = a.band;
  wp.kb = L.kb;
  wp.N = a.N;
  wp.counts = a.counts;
  wp.offsets = a.offsets;
  wp.B = a.B;
  wp.cfg = a.cfg;
  wp.with_plan = a.with_plan ? 1 : 0;
  wp.stage_band = L.stage_band ? 1 : 0;
  wp.seg_scratch = a.seg_scratch;
  wp.plan_scratch = a.plan_scratch;
  wp.w_scratch = a.w_scratch;
  wp.seg_counts = a.seg_counts;
  wp.out_counts = a.out_counts;
  wp.seg_off = a.seg_off;
  wp.out_off = a.out_off;
  wp.seg_out = a.seg_out;
  wp.plan_out = a.plan_out;
  wp.w_out = a.w_out;
  wp.status = a.status;
  const size_t smem = L.stage_band ? static_cast<size_t>(L.band_elems) * sizeof(float) : 0;
  walk_kernel<<<1, kScanThreads, smem, stream>>>(wp);
  return cudaGetLastError();
}

template <typename T>
inline int apply_vec(const ApplyParams& p) {
  constexpr int V = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
  const uint64_t bits = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p.x)) |
                        static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p.out)) |
                        static_cast<uint64_t>(p.stride_n * sizeof(T)) |
                        static_cast<uint64_t>(p.rows > 1 ? p.stride_r * sizeof(T) : 0);
  return (V > 1 && p.cols % V == 0 && (bits & 15u) == 0) ? V : 1;
}

// Launches pass 2. Requirements: rows * cols < 2^31, out contiguous [n_out, rows, cols].
template <typename T>
inline cudaError_t launch_apply(const ApplyParams& p, int max_blocks_x, cudaStream_t stream) {
  if (p.n_out == 0 || p.rows == 0 || p.cols == 0) return cudaSuccess;
  const int vec = apply_vec<T>(p);
  const int64_t ppf = p.rows * (p.cols / vec);
  int64_t bx = (ppf + kApplyThreads * kApplyUnroll - 1) / (kApplyThreads * kApplyUnroll);
  if (bx > max_blocks_x) bx = max_blocks_x;
  if (bx < 1) bx = 1;
  const unsigned gy = static_cast<unsigned>(p.n_out < 65535 ? p.n_out : 65535);
  constexpr int V = 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
  if (vec == V)
    apply_plan_kernel<T, V><<<dim3(static_cast<unsigned>(bx), gy), kApplyThreads, 0, stream>>>(p);
  else
    apply_plan_kernel<T, 1><<<dim3(static_cast<unsigned>(bx), gy), kApplyThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace merge
}  // namespace earlytom
