// Standalone test of the Stage-I kernels (csrc/kernels/merge_frames.cuh) against a host
// implementation: band similarities (double precision on the host), the walk (segments, plan,
// counts, compaction), the apply pass (bit-exact fp32 math on the host), the direct band kernel
// (bit-identical to the ring kernel), determinism, and the device-side error flags.
// Returns 0 on pass, 1 on failure, 77 when no GPU is present.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/merge_frames.cuh"

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

  // 2. walk + compaction vs the host walk on the device band
  WalkConfig cfg;
  cfg.tau = c.tau;
  cfg.ema = 0.9;
  cfg.max_window = c.M;
  cfg.keep_last_interior = c.keep;
  std::vector<int64_t> seg_h, plan_h;
  std::vector<float> w_h;
  bool counts_ok = true;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nf = c.counts[b];
    std::vector<int64_t> seg(2 * nf), plan(2 * nf);
    std::vector<float> w(nf);
    int64_t ns = 0, no = 0;
    walk_video(o.band.data(), kb, offsets[b], nf, cfg, seg.data(), plan.data(), w.data(), &ns, &no);
    counts_ok &= o.seg_counts[b] == ns && o.out_counts[b] == no;
    seg_h.insert(seg_h.end(), seg.begin(), seg.begin() + 2 * ns);
    plan_h.insert(plan_h.end(), plan.begin(), plan.begin() + 2 * no);
    w_h.insert(w_h.end(), w.begin(), w.begin() + no);
  }
  const int64_t K = static_cast<int64_t>(seg_h.size() / 2), NO = static_cast<int64_t>(w_h.size());
  EXPECT(counts_ok, "per-video segment/output counts differ from the host walk");
  EXPECT(o.status[0] == NO && o.status[1] == K, "totals N'=%lld K=%lld, host %lld %lld", (long long)o.status[0],
         (long long)o.status[1], (long long)NO, (long long)K);
  EXPECT(std::equal(seg_h.begin(), seg_h.end(), o.seg.begin()), "segments differ from the host walk");
  EXPECT(std::equal(plan_h.begin(), plan_h.end(), o.plan.begin()), "plan sources differ from the host walk");
  EXPECT(std::memcmp(w_h.data(), o.w.data(), NO * sizeof(float)) == 0, "plan weights differ from the host walk");
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
