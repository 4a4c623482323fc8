// attention_received: a[n, s] = mean_h mean_q softmax(q k^T * scale)[n, h, q, s]
// (the attention received by key s, averaged over heads and queries), computed without storing
// any S x S map in global memory.
//
// Torch-free core of the CUDA op and the standalone cuda_tests (device part compiled by nvcc only).
// The CPU op (csrc/cpu/attention_received.cpp) computes the same sums from blocks of query rows
// with ATen's GEMM and softmax.
//
// Algorithm, per (frame n, head h):
//   pass 1: lse[q] = log-sum-exp over keys of q.k * scale      (online max / sum over key tiles)
//   pass 2: colsum[s] = sum_q exp(q.k_s * scale - lse[q])      (column sums over query tiles)
//   then   a[n, s] = sum_h colsum[n, h, s] / (H * S)            (fixed order: deterministic)
//
// CUDA:
//   * fp16/bf16 on sm_80+: mma.sync m16n8k16 (fp32 accumulate) for the q k^T tiles of both
//     passes. The head dim is zero-padded in shared memory to the next supported width
//     (32, 64, 80, 96, 128 or 256); S is masked. Pass 2 is pass 1 with the roles of q and k
//     swapped (A operand = 16-row key fragments held in registers, B operand = streamed query
//     tiles), so its column sums are row sums of the transposed tile.
//   * fp32 (exact fp32 arithmetic), fp16/bf16 on older GPUs and head dims > 256: a SIMT path.
//   * Softmax math in fp32 in the base-2 domain: logits are multiplied by scale * log2(e) and
//     exponentiated with exp2f; the lse workspace holds base-2 values.
//   * Determinism: pass 2 writes one partial column-sum row per (n, h); a third small kernel
//     sums them over h in a fixed order. No atomics: results are bitwise reproducible.
//   * Logits must be finite in fp32 (|q.k * scale| < 3.4e38); inputs with NaN/Inf are rejected
//     by the Python wrapper.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace earlytom {
namespace attn_recv {

// ---------------------------------------------------------------------------------------------
// CUDA problem description and launcher (declared for every compiler, defined under nvcc)
// ---------------------------------------------------------------------------------------------

enum class Path { kAuto = 0, kSimt = 1 };

// q, k: element (n, h, s, c) at ptr[n * sn + h * sh + s * ss + c] (element strides; the last
// dim is contiguous). Output a: [N][S] fp32, contiguous.
struct Problem {
  const void* q = nullptr;
  const void* k = nullptr;
  int64_t q_sn = 0, q_sh = 0, q_ss = 0;
  int64_t k_sn = 0, k_sh = 0, k_ss = 0;
  int64_t N = 0;
  int H = 0, S = 0, D = 0;
  float scale = 1.f;
  DType dtype = DType::kFloat32;
};

// Row stride (floats) of the lse workspace: S rounded up to the streamed tile width, the tail
// filled with +inf so that padded queries contribute exp2(-inf) = 0 in pass 2.
constexpr int kTileN = 64;
inline int64_t lse_row_stride(int64_t S) { return (S + kTileN - 1) / kTileN * kTileN; }

// Workspace (floats) needed by launch(): lse [N*H][lse_row_stride(S)] + partial [N*H][S].
inline int64_t workspace_floats(int64_t N, int64_t H, int64_t S) {
  return N * H * lse_row_stride(S) + N * H * S;
}

}  // namespace attn_recv
}  // namespace earlytom

#if defined(__CUDACC__)

namespace earlytom {
namespace attn_recv {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// Operand rows of one (n, h): base pointer and row stride, plus the per-(n, h) strides.
struct Operand {
  const void* ptr;
  int64_t sn, sh, ss;
};

struct KernelArgs {
  Operand a;           // rows held by the block (queries in pass 1, keys in pass 2)
  Operand b;           // streamed rows        (keys in pass 1, queries in pass 2)
  int H, S, D;
  float c2;            // scale * log2(e)
  int64_t lse_stride;  // lse_row_stride(S)
  float* lse;          // [N*H][lse_stride]: written by pass 1, read by pass 2
  float* partial;      // [N*H][S]: written by pass 2
  bool vec;            // 16-byte cp.async loads are legal (mma path)
};

enum Mode { kModeLse = 0, kModeColsum = 1 };

// ---------------------------------------------------------------------------------------------
// Tensor-core path (sm_80+): mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate
// ---------------------------------------------------------------------------------------------

constexpr int kMmaThreads = 128;  // 4 warps

template <int KS>
struct MmaConfig {
  static constexpr int DP = KS * 16;          // padded head dim
  static constexpr int LDS = DP + 8;          // smem row stride (elements): conflict-free ldmatrix
  static constexpr int WM = KS <= 8 ? 2 : 1;  // 16-row m-tiles per warp
  static constexpr int BM = 4 * 16 * WM;      // rows of A per block
  static constexpr int BN = kTileN;           // streamed rows per tile
  static constexpr size_t smem_bytes =
      sizeof(uint16_t) * (size_t(BM) * LDS + 2 * size_t(BN) * LDS) + sizeof(float) * 2 * BN;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define EARLYTOM_ATTN_MMA 1
#endif

#ifdef EARLYTOM_ATTN_MMA
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Block-cooperative load of rows [row0, row0 + ROWS) of one (n, h) operand into smem
// ([ROWS][LDS] 16-bit elements), zero-filling rows >= S and columns >= D (up to DP).
template <int ROWS, int DP, int LDS>
__device__ __forceinline__ void load_rows(uint16_t* smem, const uint16_t* base, int64_t ss,
                                          int row0, int S, int D, bool vec) {
  if (vec) {
    constexpr int CH = DP / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < ROWS * CH; i += kMmaThreads) {
      const int r = i / CH, ch = i - (i / CH) * CH;
      const int row = row0 + r, c0 = ch * 8;
      const int valid = row < S ? min(max(D - c0, 0), 8) : 0;
      const uint16_t* src = valid > 0 ? base + int64_t(row) * ss + c0 : base;
      cp_async16(smem_addr(smem + r * LDS + c0), src, valid * 2);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DP; i += kMmaThreads) {
      const int r = i / DP, c = i - (i / DP) * DP;
      const int row = row0 + r;
      smem[r * LDS + c] = (row < S && c < D) ? base[int64_t(row) * ss + c] : uint16_t(0);
    }
  }
}
#endif  // EARLYTOM_ATTN_MMA

// One block: BM rows of A of one (n, h) against every streamed tile of B.
//   kModeLse:    A = queries, B = keys;    writes lse2[q] = log2 sum_k exp2(q.k * c2).
//   kModeColsum: A = keys,    B = queries; writes partial[k] = sum_q exp2(q.k * c2 - lse2[q]).
template <int KS, bool BF16, int MODE>
__global__ void __launch_bounds__(kMmaThreads) mma_pass_kernel(KernelArgs args) {
#ifdef EARLYTOM_ATTN_MMA
  using Cfg = MmaConfig<KS>;
  constexpr int LDS = Cfg::LDS, WM = Cfg::WM, BM = Cfg::BM, BN = Cfg::BN, DP = Cfg::DP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sB = sA + BM * LDS;
  float* sL = reinterpret_cast<float*>(sB + 2 * BN * LDS);

  const int S = args.S, D = args.D, H = args.H;
  const int tiles_m = (S + BM - 1) / BM;
  const int64_t bid = blockIdx.x;
  const int tile = static_cast<int>(bid % tiles_m);
  const int64_t nh = bid / tiles_m;
  const int64_t n = nh / H, h = nh - (nh / H) * H;
  const uint16_t* A = static_cast<const uint16_t*>(args.a.ptr) + n * args.a.sn + h * args.a.sh;
  const uint16_t* B = static_cast<const uint16_t*>(args.b.ptr) + n * args.b.sn + h * args.b.sh;
  const int64_t ass = args.a.ss, bss = args.b.ss;
  const int row0 = tile * BM;
  const int tiles_n = (S + BN - 1) / BN;
  const float* lse_row = args.lse + nh * args.lse_stride;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // Prologue: A tile and the first B tile (+ its lse values in pass 2).
  load_rows<BM, DP, LDS>(sA, A, ass, row0, S, D, args.vec);
  load_rows<BN, DP, LDS>(sB, B, bss, 0, S, D, args.vec);
  if (MODE == kModeColsum && tid < BN / 4) cp_async16(smem_addr(sL + tid * 4), lse_row + tid * 4, 16);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // A fragments stay in registers for the whole block.
  uint32_t af[WM][KS][4];
#pragma unroll
  for (int mi = 0; mi < WM; ++mi) {
    const int r = warp * 16 * WM + mi * 16 + (lane & 15);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      ldmatrix_x4(af[mi][kk], smem_addr(sA + r * LDS + kk * 16 + (lane >> 4) * 8));
  }

  // Per-lane row state: rows (lane >> 2) and (lane >> 2) + 8 of each m-tile.
  float row_m[WM][2], row_l[WM][2];
#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_m[mi][hf] = -INFINITY;
      row_l[mi][hf] = 0.f;
    }
  const float c2 = args.c2;

  for (int t = 0; t < tiles_n; ++t) {
    const int buf = t & 1;
    if (t + 1 < tiles_n) {
      load_rows<BN, DP, LDS>(sB + (buf ^ 1) * BN * LDS, B, bss, (t + 1) * BN, S, D, args.vec);
      if (MODE == kModeColsum && tid < BN / 4)
        cp_async16(smem_addr(sL + (buf ^ 1) * BN + tid * 4), lse_row + (t + 1) * BN + tid * 4, 16);
    }
    cp_async_commit();

    float acc[WM][8][4];
#pragma unroll
    for (int mi = 0; mi < WM; ++mi)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][j][e] = 0.f;

    const uint16_t* sb = sB + buf * BN * LDS;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        uint32_t bf[4];
        const int r = jp * 16 + (lane >> 4) * 8 + (lane & 7);
        ldmatrix_x4(bf, smem_addr(sb + r * LDS + kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mi = 0; mi < WM; ++mi) {
          mma_16816<BF16>(acc[mi][2 * jp], af[mi][kk], bf[0], bf[1]);
          mma_16816<BF16>(acc[mi][2 * jp + 1], af[mi][kk], bf[2], bf[3]);
        }
      }
    }

    if (MODE == kModeLse) {
      // Online log-sum-exp over the columns (keys) of this tile.
      const int col0 = t * BN + (lane & 3) * 2;
      const bool mask = (t + 1) * BN > S;
#pragma unroll
      for (int mi = 0; mi < WM; ++mi) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = -INFINITY;
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float v = acc[mi][j][hf * 2 + e] * c2;
              if (mask && col0 + j * 8 + e >= S) v = -INFINITY;
              acc[mi][j][hf * 2 + e] = v;
              mx = fmaxf(mx, v);
            }
          mx = quad_max(mx);
          const float m_new = fmaxf(row_m[mi][hf], mx);  // finite: every tile has a valid key
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) sum += exp2f(acc[mi][j][hf * 2 + e] - m_new);
          row_l[mi][hf] = row_l[mi][hf] * exp2f(row_m[mi][hf] - m_new) + sum;
          row_m[mi][hf] = m_new;
        }
      }
    } else {
      // Row sums (over queries) of exp2(k.q * c2 - lse2[q]); padded queries have lse2 = +inf.
      const float* sl = sL + buf * BN + (lane & 3) * 2;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 L = *reinterpret_cast<const float2*>(sl + j * 8);
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            row_l[mi][hf] += exp2f(fmaf(acc[mi][j][hf * 2], c2, -L.x)) +
                             exp2f(fmaf(acc[mi][j][hf * 2 + 1], c2, -L.y));
      }
    }

    cp_async_wait_all();
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = quad_sum(row_l[mi][hf]);
      const int row = row0 + warp * 16 * WM + mi * 16 + hf * 8 + (lane >> 2);
      if ((lane & 3) == 0) {
        if (MODE == kModeLse) {
          if (row < args.lse_stride)
            args.lse[nh * args.lse_stride + row] = row < S ? row_m[mi][hf] + log2f(l) : INFINITY;
        } else {
          if (row < S) args.partial[nh * S + row] = l;
        }
      }
    }
#endif  // EARLYTOM_ATTN_MMA
}

// ---------------------------------------------------------------------------------------------
// SIMT path: exact fp32 arithmetic (any input dtype, any head dim)
// ---------------------------------------------------------------------------------------------

constexpr int kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kSimtBM = 64;
constexpr int kSimtBN = kTileN;
constexpr int kSimtDC = 16;  // head-dim chunk

template <typename T, int ROWS>
__device__ __forceinline__ void simt_load_chunk(float (*dst)[ROWS + 1], const T* base, int64_t ss,
                                                int row0, int c0, int S, int D) {
  for (int i = threadIdx.x; i < ROWS * kSimtDC; i += kSimtThreads) {
    const int r = i / kSimtDC, c = i - (i / kSimtDC) * kSimtDC;
    const int row = row0 + r, col = c0 + c;
    dst[c][r] = (row < S && col < D) ? to_acc(base[int64_t(row) * ss + col]) : 0.f;
  }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kSimtThreads) simt_pass_kernel(KernelArgs args) {
  __shared__ float sA[kSimtDC][kSimtBM + 1];
  __shared__ float sB[kSimtDC][kSimtBN + 1];
  const int S = args.S, D = args.D, H = args.H;
  const int tiles_m = (S + kSimtBM - 1) / kSimtBM;
  const int64_t bid = blockIdx.x;
  const int tile = static_cast<int>(bid % tiles_m);
  const int64_t nh = bid / tiles_m;
  const int64_t n = nh / H, h = nh - (nh / H) * H;
  const T* A = static_cast<const T*>(args.a.ptr) + n * args.a.sn + h * args.a.sh;
  const T* B = static_cast<const T*>(args.b.ptr) + n * args.b.sn + h * args.b.sh;
  const int row0 = tile * kSimtBM;
  const int tiles_n = (S + kSimtBN - 1) / kSimtBN;
  const float* lse_row = args.lse + nh * args.lse_stride;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const float c2 = args.c2;

  float row_m[4], row_l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    row_m[i] = -INFINITY;
    row_l[i] = 0.f;
  }

  for (int t = 0; t < tiles_n; ++t) {
    const int col0 = t * kSimtBN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int c0 = 0; c0 < D; c0 += kSimtDC) {
      simt_load_chunk<T, kSimtBM>(sA, A, args.a.ss, row0, c0, S, D);
      simt_load_chunk<T, kSimtBN>(sB, B, args.b.ss, col0, c0, S, D);
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kSimtDC; ++c) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = sA[c][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = sB[c][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }

    if (MODE == kModeLse) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float v = acc[i][j] * c2;
          if (col0 + tx + 16 * j >= S) v = -INFINITY;
          acc[i][j] = v;
          mx = fmaxf(mx, v);
        }
#pragma unroll
        for (int o = 1; o < 16; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_new = fmaxf(row_m[i], mx);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) sum += exp2f(acc[i][j] - m_new);
        row_l[i] = row_l[i] * exp2f(row_m[i] - m_new) + sum;
        row_m[i] = m_new;
      }
    } else {
      float L[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) L[j] = lse_row[col0 + tx + 16 * j];  // +inf past S
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) row_l[i] += exp2f(fmaf(acc[i][j], c2, -L[j]));
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float l = row_l[i];
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    const int row = row0 + ty + 16 * i;
    if (tx == 0) {
      if (MODE == kModeLse) {
        if (row < args.lse_stride)
          args.lse[nh * args.lse_stride + row] = row < S ? row_m[i] + log2f(l) : INFINITY;
      } else {
        if (row < S) args.partial[nh * S + row] = l;
      }
    }
  }
}

// a[n, s] = sum_h partial[n, h, s] * inv, summed in head order.
__global__ void reduce_heads_kernel(const float* __restrict__ partial, float* __restrict__ out,
                                    int64_t N, int H, int S, float inv) {
  const int64_t total = N * S;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / S, s = i - (i / S) * S;
    const float* p = partial + n * H * S + s;
    float acc = 0.f;
    for (int h = 0; h < H; ++h) acc += p[int64_t(h) * S];
    out[i] = acc * inv;
  }
}

// ---------------------------------------------------------------------------------------------
// Host launcher
// ---------------------------------------------------------------------------------------------

inline bool aligned16(const void* p, int64_t sn, int64_t sh, int64_t ss) {
  // 16-bit elements: 16-byte chunks need the base aligned and every stride a multiple of 8.
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && sn % 8 == 0 && sh % 8 == 0 && ss % 8 == 0;
}

template <int KS, bool BF16>
inline cudaError_t launch_mma(const KernelArgs& pass1, const KernelArgs& pass2, int64_t NH,
                              cudaStream_t stream) {
  using Cfg = MmaConfig<KS>;
  const size_t smem = Cfg::smem_bytes;
  auto k1 = mma_pass_kernel<KS, BF16, kModeLse>;
  auto k2 = mma_pass_kernel<KS, BF16, kModeColsum>;
  cudaError_t e = set_max_dynamic_smem(reinterpret_cast<const void*>(k1), smem);
  if (e != cudaSuccess) return e;
  e = set_max_dynamic_smem(reinterpret_cast<const void*>(k2), smem);
  if (e != cudaSuccess) return e;
  const int64_t blocks = NH * ((pass1.S + Cfg::BM - 1) / Cfg::BM);
  k1<<<dim3(static_cast<unsigned>(blocks)), kMmaThreads, smem, stream>>>(pass1);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  k2<<<dim3(static_cast<unsigned>(blocks)), kMmaThreads, smem, stream>>>(pass2);
  return cudaGetLastError();
}

template <typename T>
inline cudaError_t launch_simt(const KernelArgs& pass1, const KernelArgs& pass2, int64_t NH,
                               cudaStream_t stream) {
  const int64_t blocks = NH * ((pass1.S + kSimtBM - 1) / kSimtBM);
  simt_pass_kernel<T, kModeLse><<<dim3(static_cast<unsigned>(blocks)), kSimtThreads, 0, stream>>>(pass1);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  simt_pass_kernel<T, kModeColsum><<<dim3(static_cast<unsigned>(blocks)), kSimtThreads, 0, stream>>>(pass2);
  return cudaGetLastError();
}

// Padded head-dim bucket (in 16-wide k-steps) of the tensor-core path; 0 = not supported.
inline int mma_ksteps(int D) {
  const int ks = (D + 15) / 16;
  if (ks <= 2) return 2;
  if (ks <= 4) return 4;
  if (ks <= 5) return 5;
  if (ks <= 6) return 6;
  if (ks <= 8) return 8;
  if (ks <= 16) return 16;
  return 0;
}

inline size_t mma_smem_bytes(int ks) {
  switch (ks) {
    case 2: return MmaConfig<2>::smem_bytes;
    case 4: return MmaConfig<4>::smem_bytes;
    case 5: return MmaConfig<5>::smem_bytes;
    case 6: return MmaConfig<6>::smem_bytes;
    case 8: return MmaConfig<8>::smem_bytes;
    case 16: return MmaConfig<16>::smem_bytes;
    default: return 0;
  }
}

template <bool BF16>
inline cudaError_t launch_mma_dispatch(int ks, const KernelArgs& p1, const KernelArgs& p2,
                                       int64_t NH, cudaStream_t stream) {
  switch (ks) {
    case 2: return launch_mma<2, BF16>(p1, p2, NH, stream);
    case 4: return launch_mma<4, BF16>(p1, p2, NH, stream);
    case 5: return launch_mma<5, BF16>(p1, p2, NH, stream);
    case 6: return launch_mma<6, BF16>(p1, p2, NH, stream);
    case 8: return launch_mma<8, BF16>(p1, p2, NH, stream);
    case 16: return launch_mma<16, BF16>(p1, p2, NH, stream);
    default: return cudaErrorInvalidValue;
  }
}

// True when launch() takes the tensor-core path for this problem on the current device.
inline bool uses_tensor_cores(const Problem& p, Path path = Path::kAuto) {
  if (path != Path::kAuto || p.dtype == DType::kFloat32) return false;
  const int ks = mma_ksteps(p.D);
  if (ks == 0) return false;
  int dev = 0, major = 0, smem_optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return false;
  if (major < 8 || mma_smem_bytes(ks) > size_t(smem_optin)) return false;
  // The tensor-core kernels have an empty body when compiled for a virtual architecture below
  // sm_80 (e.g. a compute_75 PTX image JIT-compiled for this device): use the SIMT path then.
  cudaFuncAttributes fa;
  if (cudaFuncGetAttributes(&fa, mma_pass_kernel<2, false, kModeLse>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return fa.ptxVersion >= 80;
}

// Runs the three kernels on `stream`. workspace: workspace_floats(N, H, S) floats; out: [N][S]
// fp32. Returns the first CUDA error (launch errors only: kernels run asynchronously).
inline cudaError_t launch(const Problem& p, float* workspace, float* out, cudaStream_t stream,
                          Path path = Path::kAuto) {
  if (p.N < 0 || p.H <= 0 || p.S < 0 || p.D <= 0 || p.dtype == DType::kFloat64) return cudaErrorInvalidValue;
  if (p.N == 0 || p.S == 0) return cudaSuccess;
  const int64_t NH = p.N * p.H;
  const int64_t ls = lse_row_stride(p.S);
  KernelArgs p1{};
  p1.a = Operand{p.q, p.q_sn, p.q_sh, p.q_ss};
  p1.b = Operand{p.k, p.k_sn, p.k_sh, p.k_ss};
  p1.H = p.H;
  p1.S = p.S;
  p1.D = p.D;
  p1.c2 = p.scale * kLog2e;
  p1.lse_stride = ls;
  p1.lse = workspace;
  p1.partial = workspace + NH * ls;
  p1.vec = p.dtype != DType::kFloat32 && aligned16(p.q, p.q_sn, p.q_sh, p.q_ss) &&
           aligned16(p.k, p.k_sn, p.k_sh, p.k_ss);
  KernelArgs p2 = p1;
  p2.a = p1.b;
  p2.b = p1.a;

  cudaError_t e = cudaSuccess;
  if (uses_tensor_cores(p, path)) {
    const int ks = mma_ksteps(p.D);
    e = p.dtype == DType::kBFloat16 ? launch_mma_dispatch<true>(ks, p1, p2, NH, stream)
                                    : launch_mma_dispatch<false>(ks, p1, p2, NH, stream);
  } else {
    e = dispatch_dtype(p.dtype, [&](auto t) { return launch_simt<decltype(t)>(p1, p2, NH, stream); });
  }
  if (e != cudaSuccess) return e;
  const int threads = 256;
  const int64_t total = p.N * p.S;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  reduce_heads_kernel<<<dim3(static_cast<unsigned>(blocks)), threads, 0, stream>>>(
      p1.partial, out, p.N, p.H, p.S, 1.f / (float(p.H) * float(p.S)));
  return cudaGetLastError();
}

}  // namespace attn_recv
}  // namespace earlytom
#endif  // __CUDACC__
