// Primitives shared by the torch-free kernel cores (merge_frames.h, select_tokens.h,
// attention_received.h). Compiled by g++ (host part only) and by nvcc; no torch header here, so
// the cores and the standalone cuda_tests build without torch.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define EARLYTOM_HD __host__ __device__ __forceinline__
#else
#define EARLYTOM_HD inline
#endif

namespace earlytom {

// Element types of the kernels (the torch side maps at::ScalarType onto it: csrc/cuda/dtype.h).
enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// The bits of a float: integer tests on them survive fast-math (unlike isnan/isinf).
EARLYTOM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

#if defined(__CUDACC__)

// Calls f(T()) with the device element type T of `t` and returns its result; fp64 only when
// kWithDouble (the similarity kernels have no fp64 instance).
template <bool kWithDouble = false, typename F>
inline cudaError_t dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(float());
    case DType::kFloat16: return f(__half());
    case DType::kBFloat16: return f(__nv_bfloat16());
    case DType::kFloat64:
      if constexpr (kWithDouble) return f(double());
      break;
  }
  return cudaErrorInvalidValue;
}

// Opts a kernel into more than the default 48 KB of dynamic shared memory when it needs it.
inline cudaError_t set_max_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ---------------------------------------------------------------------------------------------
// Vector packs and conversions: every element type is computed in AccOf<T> (fp32, fp64 for fp64).
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zero_pack() {
  Pack<T, VEC> p;
#pragma unroll
  for (int i = 0; i < VEC; ++i) p.v[i] = from_acc<T>(0.0f);
  return p;
}

// NaN/Inf tests on the bit patterns (fast-math cannot fold them away).
__device__ __forceinline__ bool nonfinite(float v) { return (float_bits(v) & 0x7f800000u) == 0x7f800000u; }
__device__ __forceinline__ bool nonfinite(__half v) { return (__half_as_ushort(v) & 0x7c00u) == 0x7c00u; }
__device__ __forceinline__ bool nonfinite(__nv_bfloat16 v) {
  return (__bfloat16_as_ushort(v) & 0x7f80u) == 0x7f80u;
}

// ---------------------------------------------------------------------------------------------
// Block scan (integers: exact, so every algorithm gives the same sums)
// ---------------------------------------------------------------------------------------------

// Exclusive prefix sum of one value per thread over the block (blockDim.x == THREADS). Returns
// the thread's prefix and stores the block's total in *total (every thread). `sh`: shared scratch
// of THREADS / 32 int64, free again on return. Every thread of the block must call it.
template <int THREADS>
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* total, int64_t* sh) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "one warp-sum per lane of warp 0");
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t x = v;  // inclusive scan within the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {  // inclusive scan of the warp totals
    int64_t w = lane < kWarps ? sh[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kWarps) sh[lane] = w;
  }
  __syncthreads();
  const int64_t before = warp > 0 ? sh[warp - 1] : 0;
  *total = sh[kWarps - 1];
  __syncthreads();  // sh may be rewritten by the next call
  return before + x - v;
}

// Exclusive prefix sum of in[0..n) into out[0..n) by the whole block (blockDim.x == THREADS);
// returns the total to every thread.
template <int THREADS>
__device__ inline int64_t block_exclusive_scan(const int64_t* in, int64_t* out, int64_t n, int64_t* sh) {
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += THREADS) {
    const int64_t i = base + threadIdx.x;
    int64_t total;
    const int64_t before = block_exclusive_scan<THREADS>(i < n ? in[i] : 0, &total, sh);
    if (i < n) out[i] = carry + before;
    carry += total;
  }
  return carry;
}

#endif  // __CUDACC__

}  // namespace earlytom
