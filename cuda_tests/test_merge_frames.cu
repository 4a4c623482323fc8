// Standalone test of the Stage-I kernels (csrc/kernels/merge_frames.h):
//   * hand-made videos whose segments and plans are written out below (checked against
//     earlytom_ext/reference.py when they were written), through the ring and the direct band
//     kernels;
//   * random videos against host code of this file: band similarities (double precision), the
//     walk (segments, plan, counts, compaction) by simple_walk, written here from the spec and
//     independent of the header's walk_video, the apply pass (bit-exact fp32 math);
//   * the direct band kernel (bit-identical to the ring kernel), determinism, and the
//     device-side error flags.
// Returns 0 on pass, 1 on failure, 77 when no GPU is present.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/merge_frames.h"

using namespace earlytom::merge;

static int g_failures = 0;

#define CK(call)                                                                                  \
  do {                                                                                            \
    cudaError_t e_ = (call);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);       \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

#define EXPECT(cond, ...)                  \
  do {                                     \
    if (!(cond)) {                         \
      ++g_failures;                        \
      std::printf("  FAIL: " __VA_ARGS__); \
      std::printf("\n");                   \
    }                                      \
  } while (0)

template <typename T>
T h_from(float v);
template <>
float h_from<float>(float v) { return v; }
template <>
__half h_from<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 h_from<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
inline float h_to(float v) { return v; }
inline float h_to(__half v) { return __half2float(v); }
inline float h_to(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
const char* tname();
template <>
const char* tname<float>() { return "fp32"; }
template <>
const char* tname<__half>() { return "fp16"; }
template <>
const char* tname<__nv_bfloat16>() { return "bf16"; }

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) { CK(cudaMalloc(&p, (count > 0 ? count : 1) * sizeof(T))); }
  ~DevBuf() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void put(const std::vector<T>& h) { CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
};

struct Case {
  std::vector<int64_t> counts;
  int64_t S, D;
  double tau;
  int64_t M;
  bool keep;
  int64_t pad;  // extra elements after each position row (strided input)
  int64_t shift;  // elements the base pointer is shifted by (misaligned input)
  bool nan = false;
};

struct Outputs {
  std::vector<float> band;
  std::vector<int64_t> seg, plan, seg_counts, out_counts, status;
  std::vector<float> w;
  int64_t kb = 0, kr = 0;
};

// Video frames: scenes with random lengths, per-frame noise of a few levels (values in float).
static std::vector<float> make_frames(const Case& c, int64_t N, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> len(1, 6);
  const int64_t F = c.S * c.D;
  std::vector<float> x(N * F);
  std::vector<float> scene(F);
  int left = 0;
  float noise = 0.3f;
  for (int64_t f = 0; f < N; ++f) {
    if (left == 0) {
      for (auto& v : scene) v = nd(rng);
      left = len(rng);
      noise = 0.05f + 0.2f * static_cast<float>(left);
    }
    for (int64_t i = 0; i < F; ++i) x[f * F + i] = scene[i] + noise * nd(rng);
    --left;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// The walk of one video written from the spec (docs/algorithm.md "Stage I", as in
// earlytom_ext/reference.py), independent of the header's walk_video. `sim(a, b)`, a < b local
// frame indices, returns the fp32 similarity the device computed.
// ---------------------------------------------------------------------------------------------
struct PlanEntry {
  int64_t src0, src1;
  float w;
};
struct Walk {
  std::vector<std::pair<int64_t, int64_t>> segments;  // local, inclusive
  std::vector<PlanEntry> plan;                        // local
};

template <typename Sim>
static Walk simple_walk(int64_t T, const WalkConfig& cfg, Sim sim) {
  Walk r;
  int64_t start = 0;
  double s_hat = 1.0;
  for (int64_t i = 1; i < T; ++i) {
    // ema * c + (1 - ema) * s_hat, every operation rounded in double as Python does (volatile:
    // no FMA contraction).
    volatile double a = cfg.ema * static_cast<double>(sim(start, i));
    volatile double b = (1.0 - cfg.ema) * s_hat;
    s_hat = a + b;
    if (s_hat < cfg.tau || i - start + 1 >= cfg.max_window) {
      r.segments.push_back({start, i - 1});
      start = i;
      s_hat = 1.0;
    }
  }
  r.segments.push_back({start, T - 1});
  for (const auto& seg : r.segments) {
    const int64_t s = seg.first, e = seg.second;
    if (e - s + 1 <= 2) {  // short segments pass unchanged
      for (int64_t i = s; i <= e; ++i) r.plan.push_back({i, i, 1.0f});
      continue;
    }
    r.plan.push_back({s, s, 1.0f});
    const int64_t first = s + 1, L = e - s - 1;
    if (L == 1) {
      r.plan.push_back({first, first, 1.0f});
    } else {
      const float tau_m = sim(s, e);
      std::vector<float> sigma(L - 1);
      for (int64_t j = 0; j + 1 < L; ++j) sigma[j] = sim(first + j, first + j + 1);
      int64_t j = 0;
      while (j < L - 1) {
        const int64_t a = first + j;
        if (j + 1 < L - 1) {  // merge into the more similar neighbour pair
          if (sigma[j] > tau_m && sigma[j] > sigma[j + 1]) {
            const double den = double(sigma[j]) + double(sigma[j + 1]);
            r.plan.push_back({a, a + 1, static_cast<float>(den != 0.0 ? double(sigma[j]) / den : 0.5)});
            j += 2;
          } else {
            r.plan.push_back({a, a, 1.0f});
            j += 1;
          }
        } else if (sigma[j] > tau_m) {  // the last pair: weight 1 (published) or the average
          r.plan.push_back({a, a + 1, cfg.keep_last_interior ? 0.5f : 1.0f});
          j += 2;
        } else {
          r.plan.push_back({a, a, 1.0f});
          j += 1;
        }
      }
      if (cfg.keep_last_interior && j == L - 1) r.plan.push_back({first + L - 1, first + L - 1, 1.0f});
    }
    r.plan.push_back({e, e, 1.0f});
  }
  return r;
}

template <typename T>
static Outputs run_stage1(const Case& c, const std::vector<T>& xh_padded, int64_t N, bool force_direct,
                          DevBuf<T>& xd) {
  const int64_t B = static_cast<int64_t>(c.counts.size());
  Stage1Args a{};
  a.x = xd.p + c.shift;
  a.N = N;
  a.S = c.S;
  a.D = c.D;
  a.stride_s = c.D + c.pad;
  a.stride_n = c.S * a.stride_s;
  a.B = B;
  a.cfg.tau = c.tau;
  a.cfg.ema = 0.9;
  a.cfg.max_window = c.M;
  a.cfg.keep_last_interior = c.keep;
  a.with_plan = true;
  a.force_direct = force_direct;
  const Stage1Layout L = stage1_layout_for<T>(a, force_direct);
  DevBuf<int64_t> counts(B), offsets(B + 1), vstart(N), seg_scratch(2 * N), plan_scratch(2 * N), seg_off(B),
      out_off(B), seg_counts(B), out_counts(B), seg_out(2 * N), plan_out(2 * N), status(4);
  DevBuf<float> partial(L.partial_elems), band(L.band_elems), w_scratch(N), w_out(N);
  counts.put(c.counts);
  a.counts = counts.p;
  a.offsets = offsets.p;
  a.vstart = vstart.p;
  a.partial = partial.p;
  a.band = band.p;
  a.seg_scratch = seg_scratch.p;
  a.plan_scratch = plan_scratch.p;
  a.w_scratch = w_scratch.p;
  a.seg_off = seg_off.p;
  a.out_off = out_off.p;
  a.seg_counts = seg_counts.p;
  a.out_counts = out_counts.p;
  a.seg_out = seg_out.p;
  a.plan_out = plan_out.p;
  a.w_out = w_out.p;
  a.status = reinterpret_cast<unsigned long long*>(status.p);
  CK(launch_stage1<T>(a, 0));
  CK(cudaDeviceSynchronize());
  Outputs o;
  o.kb = L.kb;
  o.kr = L.kr;
  o.band = band.get();
  o.status = status.get();
  o.seg = seg_out.get();
  o.plan = plan_out.get();
  o.w = w_out.get();
  o.seg_counts = seg_counts.get();
  o.out_counts = out_counts.get();
  (void)xh_padded;
  return o;
}

template <typename T>
static void run_case(const std::string& name, const Case& c, unsigned seed) {
  std::printf("case %s [%s]\n", name.c_str(), tname<T>());
  const int64_t B = static_cast<int64_t>(c.counts.size());
  int64_t N = 0;
  std::vector<int64_t> offsets(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) offsets[b + 1] = offsets[b] + c.counts[b];
  N = offsets[B];
  const int64_t F = c.S * c.D, ss = c.D + c.pad, sn = c.S * ss;
  const std::vector<float> xf = make_frames(c, N, seed);
  // values as the device sees them (rounded to T), padded layout
  std::vector<T> xp(c.shift + N * sn, h_from<T>(0.f));
  std::vector<float> xr(N * F);
  for (int64_t f = 0; f < N; ++f)
    for (int64_t s = 0; s < c.S; ++s)
      for (int64_t d = 0; d < c.D; ++d) {
        const T v = h_from<T>(xf[f * F + s * c.D + d]);
        xp[c.shift + f * sn + s * ss + d] = v;
        xr[f * F + s * c.D + d] = h_to(v);
      }
  if (c.nan) xp[c.shift + (N - 1) * sn + (c.S - 1) * ss + c.D - 1] = h_from<T>(NAN);
  DevBuf<T> xd(xp.size());
  xd.put(xp);

  const Outputs o = run_stage1<T>(c, xp, N, false, xd);
  const uint64_t flags = static_cast<uint64_t>(o.status[2]);
  if (c.nan) {
    EXPECT(flags == kFlagNonFinite, "NaN input: flags %llu, expected %llu", (unsigned long long)flags,
           (unsigned long long)kFlagNonFinite);
    return;
  }
  EXPECT(flags == 0, "flags %llu on valid input", (unsigned long long)flags);

  // 1. band vs host (double)
  const int64_t kb = o.kb;
  double max_err = 0.0;
  std::vector<int64_t> vs(N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t f = offsets[b]; f < offsets[b + 1]; ++f) vs[f] = offsets[b];
  for (int64_t f = 0; f < N; ++f)
    for (int64_t k = 1; k <= kb && f - k >= vs[f]; ++k) {
      double acc = 0.0;
      for (int64_t s = 0; s < c.S; ++s) {
        const float* a = &xr[(f - k) * F + s * c.D];
        const float* bb = &xr[f * F + s * c.D];
        double dot = 0, na = 0, nb = 0;
        for (int64_t d = 0; d < c.D; ++d) {
          dot += double(a[d]) * bb[d];
          na += double(a[d]) * a[d];
          nb += double(bb[d]) * bb[d];
        }
        acc += dot / (std::max(std::sqrt(na), 1e-12) * std::max(std::sqrt(nb), 1e-12));
      }
      max_err = std::max(max_err, std::fabs(acc / c.S - o.band[f * kb + k - 1]));
    }
  EXPECT(max_err < 2e-5, "band max error %.3g", max_err);

  // 2. walk + compaction vs simple_walk on the device band
  WalkConfig cfg;
  cfg.tau = c.tau;
  cfg.ema = 0.9;
  cfg.max_window = c.M;
  cfg.keep_last_interior = c.keep;
  std::vector<int64_t> seg_h, plan_h;
  std::vector<float> w_h;
  bool counts_ok = true, in_band = true;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t0 = offsets[b];
    const Walk wk = simple_walk(c.counts[b], cfg, [&](int64_t a, int64_t bb) {
      if (bb - a < 1 || bb - a > kb) {  // the walk must never need a pair outside the band
        in_band = false;
        return 0.0f;
      }
      return o.band[(t0 + bb) * kb + (bb - a - 1)];
    });
    counts_ok &= o.seg_counts[b] == static_cast<int64_t>(wk.segments.size()) &&
                 o.out_counts[b] == static_cast<int64_t>(wk.plan.size());
    for (const auto& sg : wk.segments) {
      seg_h.push_back(t0 + sg.first);
      seg_h.push_back(t0 + sg.second);
    }
    for (const PlanEntry& pe : wk.plan) {
      plan_h.push_back(t0 + pe.src0);
      plan_h.push_back(t0 + pe.src1);
      w_h.push_back(pe.w);
    }
  }
  const int64_t K = static_cast<int64_t>(seg_h.size() / 2), NO = static_cast<int64_t>(w_h.size());
  EXPECT(in_band, "the walk asked for a similarity outside the band (kb = %lld)", (long long)kb);
  EXPECT(counts_ok, "per-video segment/output counts differ from simple_walk");
  EXPECT(o.status[0] == NO && o.status[1] == K, "totals N'=%lld K=%lld, host %lld %lld", (long long)o.status[0],
         (long long)o.status[1], (long long)NO, (long long)K);
  EXPECT(std::equal(seg_h.begin(), seg_h.end(), o.seg.begin()), "segments differ from simple_walk");
  EXPECT(std::equal(plan_h.begin(), plan_h.end(), o.plan.begin()), "plan sources differ from simple_walk");
  EXPECT(std::memcmp(w_h.data(), o.w.data(), NO * sizeof(float)) == 0, "plan weights differ from simple_walk");
  std::printf("  N=%lld kb=%lld kr=%lld -> N'=%lld K=%lld, band err %.2g\n", (long long)N, (long long)kb,
              (long long)o.kr, (long long)NO, (long long)K, max_err);

  // 3. determinism and the direct band kernel (bit-identical to the ring kernel's band)
  const Outputs o2 = run_stage1<T>(c, xp, N, false, xd);
  EXPECT(std::memcmp(o.band.data(), o2.band.data(), o.band.size() * sizeof(float)) == 0, "band differs between runs");
  const Outputs od = run_stage1<T>(c, xp, N, true, xd);
  int64_t mism = 0;
  for (int64_t f = 0; f < N; ++f)
    for (int64_t k = 1; k <= kb && f - k >= vs[f]; ++k)
      mism += std::memcmp(&o.band[f * kb + k - 1], &od.band[f * kb + k - 1], sizeof(float)) != 0;
  EXPECT(mism == 0, "direct band kernel differs from the ring kernel in %lld entries", (long long)mism);
  EXPECT(od.status[0] == NO && od.status[1] == K, "direct path totals differ");

  // 4. apply (strided rows when padded) vs host fp32 math (bit-exact)
  DevBuf<int64_t> ps(2 * NO > 0 ? 2 * NO : 1);
  DevBuf<float> pw(NO > 0 ? NO : 1);
  if (NO) {
    ps.put(plan_h);
    pw.put(w_h);
  }
  DevBuf<T> out(NO * F);
  ApplyParams ap{};
  ap.x = xd.p + c.shift;
  ap.n_in = N;
  ap.rows = c.pad ? c.S : 1;
  ap.cols = c.pad ? c.D : F;
  ap.stride_n = sn;
  ap.stride_r = ss;
  ap.plan_src = ps.p;
  ap.plan_w = pw.p;
  ap.n_out = NO;
  ap.out = out.p;
  CK(launch_apply<T>(ap, 1 << 30, 0));
  CK(cudaDeviceSynchronize());
  const std::vector<T> oh = out.get();
  int64_t bad = 0;
  for (int64_t q = 0; q < NO; ++q) {
    const float wa = w_h[q], wb = 1.0f - wa;
    for (int64_t i = 0; i < F; ++i) {
      const float va = xr[plan_h[2 * q] * F + i], vb = xr[plan_h[2 * q + 1] * F + i];
      volatile float p1 = wa * va;
      volatile float p2 = wb * vb;
      const T e = wa == 1.0f ? h_from<T>(va) : h_from<T>(p1 + p2);
      bad += std::memcmp(&e, &oh[q * F + i], sizeof(T)) != 0;
    }
  }
  EXPECT(bad == 0, "apply: %lld elements differ from the host", (long long)bad);
}

// ---------------------------------------------------------------------------------------------
// Hand-made videos: frames, segments and plans (global indices) written out; the expected values
// were checked with earlytom_ext.reference when they were written. All values are exact in
// fp16/bf16, and D = 1 (or one-hot / zero) tokens make every cosine exact, so the walk's
// decisions, including exact ties with tau, are known.
// ---------------------------------------------------------------------------------------------
struct HandCase {
  const char* name;
  std::vector<int64_t> counts;
  int64_t S, D;
  std::vector<float> x;  // [N, S, D]
  double tau;
  int64_t M;
  bool keep;
  std::vector<std::pair<int64_t, int64_t>> segments;
  std::vector<PlanEntry> plan;
};

template <typename T>
static void run_hand_case(const HandCase& h, bool force_direct) {
  std::printf("hand case %s [%s%s]\n", h.name, tname<T>(), force_direct ? ", direct band kernel" : "");
  Case c{h.counts, h.S, h.D, h.tau, h.M, h.keep, 0, 0};
  const int64_t B = static_cast<int64_t>(h.counts.size());
  int64_t N = 0;
  for (int64_t n : h.counts) N += n;
  if (static_cast<int64_t>(h.x.size()) != N * h.S * h.D) {
    EXPECT(false, "bad hand case: %zu values for [%lld, %lld, %lld]", h.x.size(), (long long)N, (long long)h.S,
           (long long)h.D);
    return;
  }
  std::vector<T> xp(h.x.size());
  for (size_t i = 0; i < h.x.size(); ++i) xp[i] = h_from<T>(h.x[i]);
  DevBuf<T> xd(xp.size());
  xd.put(xp);
  const Outputs o = run_stage1<T>(c, xp, N, force_direct, xd);
  const int64_t K = static_cast<int64_t>(h.segments.size()), NO = static_cast<int64_t>(h.plan.size());
  EXPECT(o.status[2] == 0, "flags %lld on valid input", (long long)o.status[2]);
  EXPECT(o.status[1] == K && o.status[0] == NO, "K=%lld N'=%lld, expected %lld %lld", (long long)o.status[1],
         (long long)o.status[0], (long long)K, (long long)NO);
  if (o.status[1] != K || o.status[0] != NO) return;
  for (int64_t k = 0; k < K; ++k)
    EXPECT(o.seg[2 * k] == h.segments[k].first && o.seg[2 * k + 1] == h.segments[k].second,
           "segment %lld is (%lld, %lld), expected (%lld, %lld)", (long long)k, (long long)o.seg[2 * k],
           (long long)o.seg[2 * k + 1], (long long)h.segments[k].first, (long long)h.segments[k].second);
  for (int64_t q = 0; q < NO; ++q) {
    const PlanEntry& e = h.plan[q];
    EXPECT(o.plan[2 * q] == e.src0 && o.plan[2 * q + 1] == e.src1 && std::memcmp(&o.w[q], &e.w, sizeof(float)) == 0,
           "plan entry %lld is (%lld, %lld, %.9g), expected (%lld, %lld, %.9g)", (long long)q, (long long)o.plan[2 * q],
           (long long)o.plan[2 * q + 1], o.w[q], (long long)e.src0, (long long)e.src1, e.w);
  }
  // per-video counts: the entries whose first frame lies in the video
  int64_t t0 = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t1 = t0 + h.counts[b];
    int64_t ns = 0, no = 0;
    for (const auto& sg : h.segments) ns += sg.first >= t0 && sg.first < t1;
    for (const PlanEntry& e : h.plan) no += e.src0 >= t0 && e.src0 < t1;
    EXPECT(o.seg_counts[b] == ns && o.out_counts[b] == no, "video %lld: %lld segments / %lld outputs, expected %lld / %lld",
           (long long)b, (long long)o.seg_counts[b], (long long)o.out_counts[b], (long long)ns, (long long)no);
    t0 = t1;
  }
}

static std::vector<HandCase> hand_cases() {
  std::vector<HandCase> cases;
  // D = 1: every cosine is exactly 1; with tau = 1.0 the EMA stays at 1.0 (0.9 * 1 + 0.1 * 1 rounds
  // to 1 in double), so nothing is cut on similarity. Interior 1..3: no pair beats tau_m = 1; the
  // published walk never emits the last interior frame (3).
  cases.push_back({"D=1 one segment", {5}, 1, 1, {1, 2, 3, 4, 5}, 1.0, 8, false, {{0, 4}},
                   {{0, 0, 1.f}, {1, 1, 1.f}, {2, 2, 1.f}, {4, 4, 1.f}}});
  // The same with max_window = 4: a segment is cut before it reaches 4 frames.
  cases.push_back({"D=1 max_window cuts", {10}, 1, 1, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 1.0, 4, false,
                   {{0, 2}, {3, 5}, {6, 8}, {9, 9}},
                   {{0, 0, 1.f}, {1, 1, 1.f}, {2, 2, 1.f}, {3, 3, 1.f}, {4, 4, 1.f}, {5, 5, 1.f}, {6, 6, 1.f},
                    {7, 7, 1.f}, {8, 8, 1.f}, {9, 9, 1.f}}});
  // Orthogonal frames (frame i = e_i at both positions): every similarity is 0, the EMA falls to
  // 0.1 < tau after one frame: one segment per frame.
  {
    HandCase h{"orthogonal frames", {5}, 2, 5, {}, 0.6, 8, false, {}, {}};
    for (int f = 0; f < 5; ++f)
      for (int s = 0; s < 2; ++s)
        for (int d = 0; d < 5; ++d) h.x.push_back(d == f ? 1.f : 0.f);
    for (int64_t f = 0; f < 5; ++f) {
      h.segments.push_back({f, f});
      h.plan.push_back({f, f, 1.f});
    }
    cases.push_back(h);
  }
  // Frames 0-2 equal, 3-5 all zero (cosine 0 with anything, themselves included: F.normalize
  // leaves them zero), 6-8 equal (2x frame 0).
  {
    const float v[3][4] = {{1, 2, -1, 0.5f}, {0.25f, 0, 1, 1}, {2, 1, 1, -3}};
    HandCase h{"all-zero frames", {9}, 3, 4, {}, 0.6, 8, false, {{0, 2}, {3, 3}, {4, 4}, {5, 5}, {6, 8}}, {}};
    for (int f = 0; f < 9; ++f)
      for (int s = 0; s < 3; ++s)
        for (int d = 0; d < 4; ++d) h.x.push_back(f < 3 ? v[s][d] : f < 6 ? 0.f : 2.f * v[s][d]);
    for (int64_t f = 0; f < 9; ++f) h.plan.push_back({f, f, 1.f});
    cases.push_back(h);
  }
  // A batch of four videos, S = 4 positions of D = 1 (+-1 signs: similarities are exact
  // multiples of 0.25), tau = -1 (cuts by max_window = 8 only). Video 0 fine-merges: tau_m =
  // sim(0, 6) = 0, sigma = (0.5, 1, 0.5, 0.5): frames 2+3 merge with weight 1 / (1 + 0.5), the
  // last pair 4+5 with weight 1 (published) or 0.5 (keep_last_interior). Video 2 (10 equal
  // frames) is cut at 7 frames.
  for (bool keep : {false, true}) {
    const float E[7][4] = {{1, 1, 1, 1},   {1, 1, -1, 1},   {1, -1, -1, 1}, {1, -1, -1, 1},
                           {-1, -1, -1, 1}, {1, -1, -1, 1}, {1, -1, 1, -1}};
    HandCase h{keep ? "batch, keep_last_interior" : "batch", {7, 5, 10, 1}, 4, 1, {}, -1.0, 8, keep,
               {{0, 6}, {7, 11}, {12, 18}, {19, 21}, {22, 22}}, {}};
    for (const auto& f : E) h.x.insert(h.x.end(), f, f + 4);
    for (int f = 0; f < 15; ++f) h.x.insert(h.x.end(), {1, 1, 1, 1});
    h.x.insert(h.x.end(), {-1, 1, -1, 1});
    const float w23 = static_cast<float>(1.0 / 1.5);
    h.plan = {{0, 0, 1.f}, {1, 1, 1.f}, {2, 3, w23}, {4, 5, keep ? 0.5f : 1.f}, {6, 6, 1.f}};
    for (int64_t f = 7; f <= 22; ++f) {
      const bool dropped = f == 10 || f == 17;  // last interior frames of (7, 11) and (12, 18)
      if (keep || !dropped) h.plan.push_back({f, f, 1.f});
    }
    cases.push_back(h);
  }
  return cases;
}

template <typename T>
static void run_error_flags() {
  std::printf("case error flags [%s]\n", tname<T>());
  for (int which = 0; which < 3; ++which) {
    Case c{{4, 3}, 3, 8, 0.5, 6, false, 0, 0};
    const int64_t N = 7;
    const int64_t huge = int64_t(1) << 62;  // four of them wrap the int64 sum back to N
    std::vector<int64_t> bad_counts = which == 0   ? std::vector<int64_t>{4, 2}
                                      : which == 1 ? std::vector<int64_t>{8, -1}
                                                   : std::vector<int64_t>{huge, huge, huge, huge, 7};
    std::vector<T> xp(N * 24, h_from<T>(1.0f));
    DevBuf<T> xd(xp.size());
    xd.put(xp);
    c.counts = bad_counts;
    const Outputs o = run_stage1<T>(c, xp, N, false, xd);
    const uint64_t want = which == 1 ? kFlagCountBelowOne : kFlagCountSum;
    EXPECT((static_cast<uint64_t>(o.status[2]) & want) != 0, "bad counts not flagged (flags %llu)",
           (unsigned long long)o.status[2]);
  }
}

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  const std::vector<Case> cases = {
      {{1}, 1, 1, 0.5, 6, false, 0, 0},
      {{2}, 7, 64, 0.5, 6, false, 0, 0},
      {{32}, 729, 1152, 0.6, 8, false, 0, 0},
      {{8, 1, 5}, 729, 1152, 0.3, 6, true, 0, 0},
      {{33, 3}, 7, 1152, 0.6, 8, true, 0, 0},
      {{13, 20}, 9, 72, 0.5, 8, false, 8, 0},   // strided positions (vector path)
      {{11, 4}, 5, 36, 0.5, 6, true, 3, 1},      // strided and misaligned (scalar path)
      {{40, 3, 45}, 5, 40, 0.2, 100, true, 0, 0},  // band wider than the ring: direct kernel
      {{17}, 3, 4096, 0.4, 5, false, 0, 0},      // several slabs
      {{1700}, 2, 8, 0.5, 8, false, 0, 0},       // band staged in the walk's shared memory (47.6 KB)
      {{1750}, 2, 8, 0.5, 8, true, 0, 0},        // band of 49000 bytes: no room beside the static scratch
      {{2000, 1000}, 2, 8, 0.5, 8, true, 0, 0},  // band read from global memory
  };
  for (const HandCase& h : hand_cases())
    for (bool direct : {false, true}) {
      run_hand_case<float>(h, direct);
      run_hand_case<__half>(h, direct);
      run_hand_case<__nv_bfloat16>(h, direct);
    }
  unsigned seed = 1;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string name = "#" + std::to_string(i);
    run_case<float>(name, cases[i], seed++);
    run_case<__half>(name, cases[i], seed++);
    run_case<__nv_bfloat16>(name, cases[i], seed++);
  }
  Case nan_case{{6, 5}, 7, 64, 0.5, 6, false, 0, 0};
  nan_case.nan = true;
  run_case<float>("nan", nan_case, 99);
  run_case<__nv_bfloat16>("nan", nan_case, 100);
  Case nan_one{{1}, 4, 16, 0.5, 6, false, 0, 0};
  nan_one.nan = true;
  run_case<__half>("nan single frame", nan_one, 101);
  run_error_flags<float>();
  run_error_flags<__half>();
  if (g_failures) {
    std::printf("FAILED: %d check(s)\n", g_failures);
    return 1;
  }
  std::printf("all merge_frames kernel checks passed\n");
  return 0;
}
