// select_tokens, CPU: Stage II per-frame token selection (docs/design.md "select_tokens").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

#include "kernels/select_tokens.h"
#include "ops/select_tokens.h"

namespace earlytom {
namespace {

namespace sel = earlytom::select;

// Writes the selected positions of one frame (raster order for dynamic frames, window order for
// static ones) into `out`; `keys` and `order` are scratch buffers of at least P entries.
void select_frame(const float* srow, int P, int keep, bool is_static, std::vector<uint32_t>& keys,
                  std::vector<int>& order, int* out) {
  for (int i = 0; i < P; ++i) keys[i] = sel::score_key(srow[i]);
  if (is_static) {
    for (int w = 0; w < keep; ++w) {
      int start, stop;
      sel::window_bounds(P, keep, w, &start, &stop);
      out[w] = sel::window_argmax(keys.data(), start, stop);
    }
    return;
  }
  if (keep == P) {
    for (int i = 0; i < P; ++i) out[i] = i;
    return;
  }
  std::iota(order.begin(), order.begin() + P, 0);
  const uint32_t* k = keys.data();
  auto better = [k](int a, int b) { return sel::outranks(k[a], a, k[b], b); };
  std::nth_element(order.begin(), order.begin() + keep, order.begin() + P, better);
  std::sort(order.begin(), order.begin() + keep);
  std::copy(order.begin(), order.begin() + keep, out);
}

std::tuple<at::Tensor, at::Tensor> select_tokens_cpu(const at::Tensor& feats, const at::Tensor& scores,
                                                     const at::Tensor& frame_keep, const at::Tensor& frame_static,
                                                     int64_t num_out) {
  ops::check_select_tokens_inputs(feats, scores, frame_keep, frame_static, num_out);
  const int64_t N = feats.size(0);
  const int P = static_cast<int>(feats.size(1));
  const int64_t C = feats.size(2);

  // Host-side plan checks (free on CPU): 1 <= keep <= P, sum == num_out.
  const at::Tensor keep_c = frame_keep.contiguous();
  const at::Tensor static_c = frame_static.contiguous();
  const int64_t* keep_p = keep_c.data_ptr<int64_t>();
  const bool* static_p = static_c.data_ptr<bool>();
  std::vector<int64_t> offsets(static_cast<size_t>(N));
  int64_t total = 0;
  for (int64_t f = 0; f < N; ++f) {
    TORCH_CHECK_VALUE(keep_p[f] >= 1 && keep_p[f] <= P, "select_tokens: frame_keep[", f, "] must be in [1, ", P,
                      "] (P positions per frame), got ", keep_p[f]);
    offsets[f] = total;
    total += keep_p[f];
  }
  TORCH_CHECK_VALUE(total == num_out, "select_tokens: num_out must equal sum(frame_keep) = ", total, ", got ",
                    num_out);

  at::Tensor tokens = at::empty({num_out, C}, feats.options());
  at::Tensor index = at::empty({num_out, 2}, feats.options().dtype(at::kLong));
  if (num_out == 0) return {tokens, index};

  const at::Tensor scores_c = scores.contiguous();
  const float* scores_p = scores_c.data_ptr<float>();
  int64_t* index_p = index.data_ptr<int64_t>();
  const char* feats_p = static_cast<const char*>(feats.data_ptr());
  char* tokens_p = static_cast<char*>(tokens.data_ptr());
  const int64_t es = feats.element_size();
  const int64_t s_frame = feats.stride(0) * es, s_pos = feats.stride(1) * es, s_chan = feats.stride(2) * es;
  const int64_t row_bytes = C * es;
  const bool chan_contig = (s_chan == es) || C <= 1;

  // Frames per task: small problems run inline (a parallel region costs more than they do).
  constexpr int64_t kGrainCost = 256 * 1024;
  const int64_t frame_cost = static_cast<int64_t>(P) * 8 + (num_out / std::max<int64_t>(N, 1) + 1) * row_bytes;
  const int64_t grain = std::max<int64_t>(1, kGrainCost / std::max<int64_t>(frame_cost, 1));

  at::parallel_for(0, N, grain, [&](int64_t f0, int64_t f1) {
    std::vector<uint32_t> keys(static_cast<size_t>(P));
    std::vector<int> order(static_cast<size_t>(P));
    std::vector<int> picked(static_cast<size_t>(P));
    for (int64_t f = f0; f < f1; ++f) {
      const int keep = static_cast<int>(keep_p[f]);
      select_frame(scores_p + f * P, P, keep, static_p[f], keys, order, picked.data());
      for (int j = 0; j < keep; ++j) {
        const int64_t row = offsets[f] + j;
        const int pos = picked[j];
        index_p[2 * row] = f;
        index_p[2 * row + 1] = pos;
        const char* src = feats_p + f * s_frame + pos * s_pos;
        char* dst = tokens_p + row * row_bytes;
        if (chan_contig) {
          std::memcpy(dst, src, static_cast<size_t>(row_bytes));
        } else {
          for (int64_t c = 0; c < C; ++c) std::memcpy(dst + c * es, src + c * s_chan, static_cast<size_t>(es));
        }
      }
    }
  });
  return {tokens, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(earlytom, CPU, m) {
  m.impl("select_tokens", &select_tokens_cpu);
}

}  // namespace earlytom
