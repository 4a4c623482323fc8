// Standalone test of csrc/kernels/select_tokens.h against a plain host implementation.
// Returns 0 on pass, 1 on failure, 77 when no CUDA device is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/select_tokens.h"

namespace sel = earlytom::select;

#define CUDA_OK(expr)                                                                       \
  do {                                                                                      \
    cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, \
                  cudaGetErrorString(e_));                                                  \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

// Host oracle, written independently of the kernel's helpers: NaN is the largest score, -0 == +0,
// ties go to the lowest index (a stable sort by descending score).
static bool greater_score(float a, float b) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na && !nb;
  return a > b;
}

static std::vector<int> host_select(const float* s, int P, int keep, bool is_static) {
  std::vector<int> out;
  if (is_static) {
    const int base = P / keep, rem = P % keep;
    int start = 0;
    for (int w = 0; w < keep; ++w) {
      const int stop = start + base + (w < rem ? 1 : 0);
      int best = start;
      for (int i = start + 1; i < stop; ++i)
        if (greater_score(s[i], s[best])) best = i;
      out.push_back(best);
      start = stop;
    }
    return out;
  }
  std::vector<int> order(P);
  for (int i = 0; i < P; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return greater_score(s[a], s[b]); });
  out.assign(order.begin(), order.begin() + keep);
  std::sort(out.begin(), out.end());
  return out;
}

struct Case {
  const char* name;
  int frames;
  int P;
  int C;            // elements per row
  int elem;         // element size in bytes (2 or 4)
  int pos_pad;      // extra elements between rows (stride_pos = C + pos_pad)
  int base_off;     // elements of offset of the feats base pointer
  int score_kind;   // 0 random, 1 constant, 2 few values, 3 zeros/infs/NaN
  bool force_scan;
  int frame_pad = 3;   // extra elements between frames (stride_frame = stride_pos * P + frame_pad)
  int want_width = 0;  // expected copy width in bytes (0: any)
};

static int run_case(const Case& c, std::mt19937& rng) {
  const int N = c.frames, P = c.P;
  std::uniform_real_distribution<float> U(0.f, 1.f);
  std::vector<float> scores(static_cast<size_t>(N) * P);
  for (auto& v : scores) {
    switch (c.score_kind) {
      case 0: v = U(rng); break;
      case 1: v = 0.5f; break;
      case 2: v = static_cast<float>(static_cast<int>(U(rng) * 3.f)); break;
      default: {
        const float table[5] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN};
        v = table[static_cast<int>(U(rng) * 5.f) % 5];
      }
    }
  }
  std::vector<int64_t> keep(N);
  std::vector<uint8_t> is_static(N);
  std::vector<int64_t> offsets(N);
  int64_t num_out = 0;
  for (int f = 0; f < N; ++f) {
    is_static[f] = U(rng) < 0.5f;
    keep[f] = 1 + static_cast<int64_t>(U(rng) * P) % P;
    if (U(rng) < 0.1f) keep[f] = P;
    if (U(rng) < 0.1f) keep[f] = 1;
    offsets[f] = num_out;
    num_out += keep[f];
  }
  const int64_t stride_pos = c.C + c.pos_pad;
  const int64_t stride_frame = stride_pos * P + c.frame_pad;  // frames not packed
  const size_t feat_bytes = static_cast<size_t>(c.base_off + stride_frame * N) * c.elem;
  std::vector<uint8_t> feats(feat_bytes);
  for (auto& b : feats) b = static_cast<uint8_t>(rng());

  // Expected output.
  const int64_t row_bytes = static_cast<int64_t>(c.C) * c.elem;
  std::vector<int64_t> exp_index(2 * num_out);
  std::vector<uint8_t> exp_tokens(num_out * row_bytes);
  for (int f = 0; f < N; ++f) {
    const auto pos = host_select(&scores[static_cast<size_t>(f) * P], P, static_cast<int>(keep[f]), is_static[f]);
    for (size_t j = 0; j < pos.size(); ++j) {
      const int64_t row = offsets[f] + static_cast<int64_t>(j);
      exp_index[2 * row] = f;
      exp_index[2 * row + 1] = pos[j];
      const uint8_t* src = feats.data() + (c.base_off + f * stride_frame + pos[j] * stride_pos) * c.elem;
      std::memcpy(&exp_tokens[row * row_bytes], src, row_bytes);
    }
  }

  float* d_scores;
  int64_t *d_keep, *d_index, *d_off;
  bool* d_static;
  uint8_t *d_feats, *d_out;
  CUDA_OK(cudaMalloc(&d_scores, scores.size() * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_keep, N * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&d_off, N * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&d_static, N * sizeof(bool)));
  CUDA_OK(cudaMalloc(&d_index, 2 * num_out * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&d_feats, feat_bytes));
  CUDA_OK(cudaMalloc(&d_out, num_out * row_bytes + 16));
  std::vector<char> st(N);
  for (int f = 0; f < N; ++f) st[f] = is_static[f] ? 1 : 0;
  CUDA_OK(cudaMemcpy(d_scores, scores.data(), scores.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_keep, keep.data(), N * sizeof(int64_t), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_static, st.data(), N, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_feats, feats.data(), feat_bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_index, 0xFF, 2 * num_out * sizeof(int64_t)));
  CUDA_OK(cudaMemset(d_out, 0xAB, num_out * row_bytes + 16));

  sel::SelectIndexParams sp{};
  sp.scores = d_scores;
  sp.score_stride = P;
  sp.frame_keep = d_keep;
  sp.frame_static = d_static;
  sp.index = d_index;
  sp.num_frames = N;
  sp.num_out = num_out;
  sp.P = P;
  sel::GatherParams gp{};
  gp.feats = reinterpret_cast<const char*>(d_feats) + static_cast<int64_t>(c.base_off) * c.elem;
  gp.stride_frame = stride_frame * c.elem;
  gp.stride_pos = stride_pos * c.elem;
  gp.row_bytes = row_bytes;
  gp.out = reinterpret_cast<char*>(d_out);
  gp.index = d_index;
  gp.num_out = num_out;
  gp.num_frames = N;
  gp.P = P;
  const int width = sel::gather_vector_bytes(gp);
  int bad = 0;
  if (c.want_width != 0 && width != c.want_width) {
    std::printf("  [%s] copy width %d B, expected %d B\n", c.name, width, c.want_width);
    ++bad;
  }
  CUDA_OK(sel::launch_select_tokens(sp, gp, d_off, 132 * 16, 0, c.force_scan));
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<int64_t> got_index(2 * num_out);
  std::vector<uint8_t> got_tokens(num_out * row_bytes + 16);
  CUDA_OK(cudaMemcpy(got_index.data(), d_index, 2 * num_out * sizeof(int64_t), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(got_tokens.data(), d_out, num_out * row_bytes + 16, cudaMemcpyDeviceToHost));
  for (int64_t r = 0; r < num_out && bad < 5; ++r) {
    if (got_index[2 * r] != exp_index[2 * r] || got_index[2 * r + 1] != exp_index[2 * r + 1]) {
      std::printf("  [%s] row %lld: index (%lld, %lld), expected (%lld, %lld)\n", c.name, (long long)r,
                  (long long)got_index[2 * r], (long long)got_index[2 * r + 1], (long long)exp_index[2 * r],
                  (long long)exp_index[2 * r + 1]);
      ++bad;
    } else if (std::memcmp(&got_tokens[r * row_bytes], &exp_tokens[r * row_bytes], row_bytes) != 0) {
      std::printf("  [%s] row %lld: token bytes differ\n", c.name, (long long)r);
      ++bad;
    }
  }
  for (int i = 0; i < 16; ++i)
    if (got_tokens[num_out * row_bytes + i] != 0xAB) {
      std::printf("  [%s] write past the end of the output\n", c.name);
      ++bad;
      break;
    }
  std::printf("%-28s N=%5d P=%4d C=%4d elem=%d copy=%2dB num_out=%7lld %s\n", c.name, N, P, c.C, c.elem, width,
              (long long)num_out, bad ? "FAIL" : "ok");
  cudaFree(d_scores);
  cudaFree(d_keep);
  cudaFree(d_off);
  cudaFree(d_static);
  cudaFree(d_index);
  cudaFree(d_feats);
  cudaFree(d_out);
  return bad ? 1 : 0;
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(1234);
  const Case cases[] = {
      {"p1", 7, 1, 8, 2, 0, 0, 0, false},
      {"p5_random", 40, 5, 3, 2, 0, 1, 0, false},
      {"p196_bf16_aligned", 32, 196, 256, 2, 0, 0, 0, false, 8, 16},
      {"p196_fp32_vec16", 32, 196, 64, 4, 4, 4, 0, false, 4, 16},
      {"p196_fp32_vec8", 17, 196, 6, 4, 0, 2, 0, false, 2, 8},
      {"p196_fp32_vec4", 17, 196, 6, 4, 0, 2, 0, false, 3, 4},
      {"p196_odd_rows", 9, 196, 37, 2, 1, 1, 0, false},
      {"p196_constant", 12, 196, 16, 2, 0, 0, 1, false},
      {"p196_few_values", 12, 196, 16, 2, 0, 0, 2, false},
      {"p196_zeros_infs_nan", 12, 196, 16, 4, 0, 0, 3, false},
      {"p729_random", 10, 729, 32, 2, 0, 0, 0, false},
      {"p729_few_values", 10, 729, 8, 4, 0, 0, 2, false},
      {"p729_forced_scan", 10, 729, 8, 4, 0, 0, 0, true},
      {"p4096", 3, 4096, 4, 4, 0, 0, 2, false},
      {"p8192_max_positions", 2, 8192, 4, 4, 0, 0, 2, false},
      {"inline_offsets_4096", 4096, 3, 2, 4, 0, 0, 0, false},
      {"many_frames_scan", 5000, 5, 4, 2, 0, 0, 0, false},
      {"p196_qwen_width", 32, 196, 3584, 2, 0, 0, 0, false, 8, 16},
      {"p196_qwen_width_unaligned", 32, 196, 3584, 2, 0, 0, 0, false, 3, 2},
  };
  int failed = 0;
  for (const auto& c : cases) failed += run_case(c, rng);
  std::printf(failed ? "FAILED (%d cases)\n" : "all passed\n", failed);
  return failed ? 1 : 0;
}
