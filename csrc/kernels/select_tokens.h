// Stage II token selection (select_tokens): torch-free core shared by the CPU and CUDA ops and
// by the standalone CUDA tests.
//
// Per frame f with P positions and keep = frame_keep[f]:
//   dynamic frame: the `keep` highest-score positions, output in raster order; ties: lowest index
//                  wins (rank by (score desc, index asc));
//   static frame:  `keep` contiguous windows over the P positions (the first P mod keep windows one
//                  longer), the top-1 of each window (lowest index on ties), windows in order.
// Output rows of frame f start at the exclusive prefix sum of frame_keep.
//
// Scores are ranked through an order-preserving 32-bit key (score_key): -0.0 and +0.0 tie, and a
// NaN ranks above every number, as in torch.sort / torch.argmax (NaN inputs are rejected by the
// Python wrapper; the key only makes the kernels deterministic and identical across backends).
//
// The CUDA path is two launches:
//   1. select_index_kernel: one block per frame; the frame's keys in shared memory; ranking by
//      counting (early exit once `keep` better positions are seen); a block scan of the kept flags
//      gives the raster-order output rows; writes index[row] = (frame, position).
//   2. gather_rows_kernel: a flat, vectorised (up to 128-bit) byte copy of the selected feature
//      rows, driven by the index written in 1 (bit-exact for every dtype).
// Frame offsets are computed inside launch 1 (a block reduction over frame_keep[0..f)); for very
// many frames a one-block exclusive scan (exclusive_scan_kernel) runs first instead.
#pragma once

#include <cstdint>

#include "common.h"

namespace earlytom {
namespace select {

// Largest P the CUDA kernel accepts (keys of one frame live in shared memory).
constexpr int kMaxPositionsCuda = 8192;
// Above this many frames the CUDA path scans frame_keep in a separate one-block launch.
constexpr int64_t kInlineOffsetMaxFrames = 4096;
constexpr int kSelectThreads = 256;
constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 4;
constexpr int kScanThreads = 1024;

// Order-preserving key of a score: a > b (as floats) <=> key(a) > key(b); -0.0 == +0.0; every NaN
// gets the largest key (above +inf).
EARLYTOM_HD uint32_t score_key(float x) {
  uint32_t u = float_bits(x);  // integer tests only: fast-math cannot fold them away
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0xFFFFFFFFu;  // NaN
  if (mag == 0u) u = 0u;             // -0.0 -> +0.0
  // Negative floats: flip all bits (larger magnitude -> smaller key); positive: set the sign bit.
  // +inf maps to 0xFF800000, below the NaN key.
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// True when position j outranks position i: (key desc, index asc).
EARLYTOM_HD bool outranks(uint32_t kj, int j, uint32_t ki, int i) {
  return kj > ki || (kj == ki && j < i);
}

// Window w of P positions split into n contiguous windows, the first P mod n one longer.
EARLYTOM_HD void window_bounds(int P, int n, int w, int* start, int* stop) {
  const int base = P / n;
  const int rem = P % n;
  const int s = w * base + (w < rem ? w : rem);
  *start = s;
  *stop = s + base + (w < rem ? 1 : 0);
}

// Argmax of keys[start..stop) (lowest index on ties).
EARLYTOM_HD int window_argmax(const uint32_t* keys, int start, int stop) {
  int best = start;
  uint32_t bk = keys[start];
  for (int i = start + 1; i < stop; ++i) {
    const uint32_t k = keys[i];
    if (k > bk) {
      bk = k;
      best = i;
    }
  }
  return best;
}

struct SelectIndexParams {
  const float* scores;        // [num_frames, P], row stride score_stride (elements)
  int64_t score_stride;
  const int64_t* frame_keep;  // [num_frames]
  const bool* frame_static;   // [num_frames]
  const int64_t* offsets;     // optional [num_frames] exclusive prefix of frame_keep (nullptr: inline)
  int64_t* index;             // [num_out, 2] (frame, position)
  int64_t num_frames;
  int64_t num_out;
  int P;
};

struct GatherParams {
  const char* feats;          // base of feats [num_frames, P, C] (channels contiguous)
  int64_t stride_frame;       // bytes
  int64_t stride_pos;         // bytes
  int64_t row_bytes;          // C * element size
  char* out;                  // [num_out, row_bytes] contiguous
  const int64_t* index;       // [num_out, 2]
  int64_t num_out;
  int64_t num_frames;
  int P;
};

// Largest copy width (16, 8, 4, 2 or 1 bytes) that divides every address and stride in `g`.
inline int gather_vector_bytes(const GatherParams& g) {
  const uint64_t bits = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(g.feats)) |
                        static_cast<uint64_t>(reinterpret_cast<uintptr_t>(g.out)) |
                        static_cast<uint64_t>(g.stride_frame) | static_cast<uint64_t>(g.stride_pos) |
                        static_cast<uint64_t>(g.row_bytes);
  for (int w = 16; w > 1; w >>= 1)
    if ((bits & static_cast<uint64_t>(w - 1)) == 0) return w;
  return 1;
}

#if defined(__CUDACC__)

// Exclusive prefix sum of frame_keep into offsets, one block (used only for very many frames).
static __global__ void __launch_bounds__(kScanThreads)
    exclusive_scan_kernel(const int64_t* __restrict__ in, int64_t* __restrict__ out, int64_t n) {
  __shared__ int64_t sh[kScanThreads / 32];
  block_exclusive_scan<kScanThreads>(in, out, n, sh);
}

// One block per frame: writes index rows (frame, position) of the frame's kept tokens.
// Dynamic shared memory: P uint32 keys.
static __global__ void select_index_kernel(SelectIndexParams p) {
  extern __shared__ uint32_t keys[];
  __shared__ int64_t red_s[kSelectThreads / 32];
  __shared__ int64_t scan_s[kSelectThreads / 32];

  const int64_t f = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const int P = p.P;

  // Output offset of this frame.
  int64_t off;
  if (p.offsets != nullptr) {
    off = p.offsets[f];
  } else {
    int64_t s = 0;
    for (int64_t g = tid; g < f; g += blockDim.x) s += p.frame_keep[g];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
    if (lane == 0) red_s[warp] = s;
    __syncthreads();
    off = 0;
    for (int w = 0; w < nwarps; ++w) off += red_s[w];
  }

  int64_t keep64 = p.frame_keep[f];
  if (keep64 < 0) keep64 = 0;
  if (keep64 > P) keep64 = P;
  const int keep = static_cast<int>(keep64);
  const bool is_static = p.frame_static[f];

  const float* srow = p.scores + f * p.score_stride;
  for (int i = tid; i < P; i += blockDim.x) keys[i] = score_key(srow[i]);
  __syncthreads();
  if (keep == 0) return;

  int64_t* index = p.index;
  const int64_t num_out = p.num_out;

  if (is_static) {
    for (int w = tid; w < keep; w += blockDim.x) {
      int start, stop;
      window_bounds(P, keep, w, &start, &stop);
      const int best = window_argmax(keys, start, stop);
      const int64_t row = off + w;
      if (row >= 0 && row < num_out) {
        index[2 * row] = f;
        index[2 * row + 1] = best;
      }
    }
    return;
  }

  if (keep == P) {
    for (int i = tid; i < P; i += blockDim.x) {
      const int64_t row = off + i;
      if (row >= 0 && row < num_out) {
        index[2 * row] = f;
        index[2 * row + 1] = i;
      }
    }
    return;
  }

  // Dynamic frame: rank by counting, then a block scan of the kept flags (raster order).
  int64_t carry = 0;
  for (int base = 0; base < P; base += kSelectThreads) {
    const int i = base + tid;
    bool kept = false;
    if (i < P) {
      const uint32_t ki = keys[i];
      int cnt = 0;
      for (int j = 0; j < P; ++j) {
        cnt += outranks(keys[j], j, ki, i) ? 1 : 0;
        if (cnt >= keep) break;
      }
      kept = cnt < keep;
    }
    int64_t chunk_kept;
    const int64_t before = block_exclusive_scan<kSelectThreads>(kept ? 1 : 0, &chunk_kept, scan_s);
    if (kept) {
      const int64_t row = off + carry + before;
      if (row >= 0 && row < num_out) {
        index[2 * row] = f;
        index[2 * row + 1] = i;
      }
    }
    carry += chunk_kept;
  }
}

// Copies the selected rows: element e of the flat [num_out, row_bytes / sizeof(V)] output.
// Rows whose index entry is out of range (never the case for a consistent frame_keep/num_out)
// are zero-filled instead of reading out of bounds.
template <typename V, typename Idx>
__global__ void __launch_bounds__(kGatherThreads) gather_rows_kernel(GatherParams g) {
  const Idx vpr = static_cast<Idx>(g.row_bytes / static_cast<int64_t>(sizeof(V)));
  const Idx total = static_cast<Idx>(g.num_out) * vpr;
  const Idx stride = static_cast<Idx>(gridDim.x) * blockDim.x;
  V* __restrict__ out = reinterpret_cast<V*>(g.out);
  for (Idx e0 = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; e0 < total;
       e0 += stride * kGatherUnroll) {
    V vals[kGatherUnroll];
    Idx es[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const Idx e = e0 + static_cast<Idx>(u) * stride;
      es[u] = e;
      if (e < total) {
        const Idx row = e / vpr;
        const Idx v = e - row * vpr;
        const int64_t fr = g.index[2 * static_cast<int64_t>(row)];
        const int64_t pos = g.index[2 * static_cast<int64_t>(row) + 1];
        if (fr >= 0 && fr < g.num_frames && pos >= 0 && pos < g.P) {
          const V* src = reinterpret_cast<const V*>(g.feats + fr * g.stride_frame + pos * g.stride_pos);
          vals[u] = __ldg(src + v);
        } else {
          vals[u] = V{};
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u)
      if (es[u] < total) out[es[u]] = vals[u];
  }
}

template <typename V>
inline cudaError_t launch_gather_v(const GatherParams& g, int num_blocks_cap, cudaStream_t stream) {
  const int64_t total = g.num_out * (g.row_bytes / static_cast<int64_t>(sizeof(V)));
  if (total == 0) return cudaSuccess;
  int64_t blocks = (total + static_cast<int64_t>(kGatherThreads) * kGatherUnroll - 1) /
                   (static_cast<int64_t>(kGatherThreads) * kGatherUnroll);
  if (blocks > num_blocks_cap) blocks = num_blocks_cap;
  if (blocks < 1) blocks = 1;
  // 32-bit element arithmetic when the whole grid-stride range fits.
  const int64_t span = total + static_cast<int64_t>(kGatherThreads) * blocks * (kGatherUnroll + 1);
  if (span < (int64_t(1) << 31))
    gather_rows_kernel<V, uint32_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(g);
  else
    gather_rows_kernel<V, int64_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(g);
  return cudaGetLastError();
}

// Launches the gather with the widest copy the alignment allows.
inline cudaError_t launch_gather(const GatherParams& g, int num_blocks_cap, cudaStream_t stream) {
  switch (gather_vector_bytes(g)) {
    case 16: return launch_gather_v<uint4>(g, num_blocks_cap, stream);
    case 8: return launch_gather_v<uint2>(g, num_blocks_cap, stream);
    case 4: return launch_gather_v<unsigned int>(g, num_blocks_cap, stream);
    case 2: return launch_gather_v<unsigned short>(g, num_blocks_cap, stream);
    default: return launch_gather_v<unsigned char>(g, num_blocks_cap, stream);
  }
}

// Full select pipeline. `offsets_scratch` (num_frames int64, or null) receives the frame offsets
// from a separate scan launch when num_frames > kInlineOffsetMaxFrames or force_scan is set;
// when it is null the offsets are always computed inline (correct, O(num_frames) per block).
// `gather.index` must equal `sel.index`. P must be in [1, kMaxPositionsCuda].
inline cudaError_t launch_select_tokens(SelectIndexParams sel, const GatherParams& gather,
                                        int64_t* offsets_scratch, int num_blocks_cap,
                                        cudaStream_t stream, bool force_scan = false) {
  if (sel.num_frames == 0 || sel.num_out == 0) return cudaSuccess;
  if (sel.num_frames > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;  // one block per frame (grid.x)
  sel.offsets = nullptr;
  if (offsets_scratch != nullptr && (force_scan || sel.num_frames > kInlineOffsetMaxFrames)) {
    exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(sel.frame_keep, offsets_scratch, sel.num_frames);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    sel.offsets = offsets_scratch;
  }
  const size_t smem = static_cast<size_t>(sel.P) * sizeof(uint32_t);
  select_index_kernel<<<static_cast<unsigned>(sel.num_frames), kSelectThreads, smem, stream>>>(sel);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_gather(gather, num_blocks_cap, stream);
}

#endif  // __CUDACC__

}  // namespace select
}  // namespace earlytom
