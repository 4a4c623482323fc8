"""merge_frames / apply_merge_plan / segment_frames (Stage I) against earlytom_ext.reference.

Grids over batch layouts, frame counts, positions, channels and dtypes; structured videos
(static, cuts, slow drift, alternating, all-identical, all-orthogonal, random) whose Stage-I
decisions are checked to lie away from their thresholds (so segments and plans must be
identical, not just close); non-contiguous inputs; both keep_last_interior settings; batch
independence; extras; bad inputs; opcheck; CUDA == CPU == reference when a GPU is present.
"""

import math

import numpy as np
import pytest
import torch

from earlytom_ext import EarlyTomConfig
from earlytom_ext import reference as R
from earlytom_ext.ops import has_cuda_kernels
from earlytom_ext.ops.merge import (
    MergeResult,
    apply_merge_plan,
    merge_frames,
    resolve_deferred_segments,
    segment_frames,
    segment_frames_deferred,
    segments_per_video,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.cuda.is_available() and has_cuda_kernels()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA kernels")

# Output tolerances: the merge weights come from fp32 similarities that differ from the
# reference's in the last bits, so merged values may differ by about one rounding of the dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float64: dict(rtol=1e-6, atol=1e-6),
}
# CPU results (op and reference both on this machine) are compared tighter: a 16-bit output is the
# rounding of two fp32 values that differ far less than one ulp of the dtype, so it may differ by
# at most one ulp (rtol = eps); a merge done in 16-bit math is several ulps off and fails. float64
# tensors are merged in float64 and are compared against a float64 oracle.
TOL_CPU = {
    torch.float32: dict(rtol=4e-6, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def tol(dtype, device="cpu"):
    return TOL_CPU[dtype] if torch.device(device).type == "cpu" else TOL[dtype]


MARGIN = 3e-5  # decisions closer than this to their threshold are fragile (fp32 sums differ ~1e-6)
EXACT_KINDS = ("identical", "orthogonal")  # ties there are exact in every implementation


# ------------------------------------------------------------------------------ inputs
def structured_video(kind, T, S, D, gen, dtype=torch.float32):
    """A video [T, S, D] of a given structure (float32 values, cast to dtype at the end).

    Noise levels are drawn per frame from a wide range, so the similarities of different frame
    pairs differ clearly (well-separated decisions) even when they are averaged over many
    positions.
    """
    rnd = lambda *shape: torch.randn(*shape, generator=gen)
    lvl = lambda lo, hi: lo + (hi - lo) * torch.rand(T, 1, 1, generator=gen)
    if kind == "random":
        x = rnd(T, S, D)
    elif kind == "static":
        x = rnd(1, S, D) + lvl(0.05, 0.8) * rnd(T, S, D)
    elif kind == "cuts":  # scenes of random length, noise of random level inside a scene
        frames, cur, left = [], None, 0
        for _ in range(T):
            if left == 0:
                cur, left = rnd(S, D), int(torch.randint(1, 6, (1,), generator=gen))
            frames.append(cur)
            left -= 1
        x = torch.stack(frames) + lvl(0.1, 1.0) * rnd(T, S, D)
    elif kind == "drift":  # rotation from A towards B at an irregular speed
        a, b = rnd(S, D), rnd(S, D)
        steps = torch.rand(T, generator=gen) + 0.2
        t = (torch.cumsum(steps, 0) - steps[0]) / steps.sum()
        t = t.view(T, 1, 1)
        x = torch.cos(t * math.pi / 2) * a + torch.sin(t * math.pi / 2) * b + lvl(0.02, 0.5) * rnd(T, S, D)
    elif kind == "alternating":
        a, b = rnd(S, D), rnd(S, D)
        x = torch.stack([a if i % 2 == 0 else b for i in range(T)]) + lvl(0.05, 0.6) * rnd(T, S, D)
    elif kind == "identical":
        x = rnd(1, S, D).expand(T, S, D).clone()
    elif kind == "orthogonal":  # frame t is e_{t mod D} (scaled) at every position
        x = torch.zeros(T, S, D)
        for t in range(T):
            x[t, :, t % D] = 1.0 + t
    else:
        raise ValueError(kind)
    return x.to(dtype)


def decision_margin(xv, cfg):
    """Smallest distance of a Stage-I decision of the reference walk from its threshold."""
    T = xv.shape[0]
    xn = torch.nn.functional.normalize(xv.float(), dim=-1, eps=1e-12)
    sim = lambda a, b: float((xn[a] * xn[b]).sum(-1).mean())
    m = math.inf
    start, s_hat, segs = 0, 1.0, []
    for i in range(1, T):
        s_hat = cfg.ema * sim(start, i) + (1.0 - cfg.ema) * s_hat
        m = min(m, abs(s_hat - cfg.tau))
        if s_hat < cfg.tau or (i - start + 1) >= cfg.max_window:
            segs.append((start, i - 1))
            start, s_hat = i, 1.0
    segs.append((start, T - 1))
    for s, e in segs:
        if e - s - 1 >= 2:
            tau_m = sim(s, e)
            sig = [sim(j, j + 1) for j in range(s + 1, e - 1)]
            for j, v in enumerate(sig):
                m = min(m, abs(v - tau_m))
                if j + 1 < len(sig):
                    m = min(m, abs(v - sig[j + 1]))
                    m = min(m, abs(v + sig[j + 1]))  # the weight's denominator
    return m


def make_batch(kinds, counts, S, D, dtype, cfg, seed, check_margin=True):
    """Videos of the given kinds concatenated; re-draws a video (up to 8 times) whose decisions
    are fragile. Returns x [N, S, D]."""
    vids = []
    for v, (kind, T) in enumerate(zip(kinds, counts)):
        for attempt in range(8):
            g = torch.Generator().manual_seed(seed * 1000 + v * 37 + attempt)
            xv = structured_video(kind, T, S, D, g, dtype)
            # D == 1: every cosine is exactly +-1, similarities are exact multiples of 1/S and
            # ties are exact in every implementation (no margin needed).
            exact = kind in EXACT_KINDS or D == 1
            if not check_margin or exact or decision_margin(xv, cfg) > MARGIN:
                break
        else:
            pytest.skip(f"could not draw a robust {kind} video (T={T}, S={S}, D={D})")
        vids.append(xv)
    return torch.cat(vids)


def global_plan(plans, counts):
    out, off = [], 0
    for plan, T in zip(plans, counts):
        out.extend((a + off, b + off, w) for a, b, w in plan)
        off += T
    return out


def apply_plan64(t, plan_src, plan_weight):
    """``w*t[src0] + (1-w)*t[src1]`` in float64 (the op's contract for float64 tensors; the
    reference merges in float32)."""
    src = plan_src.cpu()
    w = plan_weight.cpu().double().view(-1, *([1] * (t.dim() - 1)))
    t = t.cpu().double()
    return w * t[src[:, 0]] + (1.0 - w) * t[src[:, 1]]


def assert_matches_reference(x, counts, cfg, extras=None, fc=None):
    """Everything merge_frames returns against reference.merge_frames_batched (``fc``: the
    frame_counts argument given to the ops, default ``counts``)."""
    fc = counts if fc is None else fc
    res = merge_frames(x, fc, cfg, extras=extras)
    assert isinstance(res, MergeResult)
    ref_extras = extras if isinstance(extras, torch.Tensor) else None
    ref_in = None if ref_extras is None else ref_extras.cpu()
    xr, er, cr, sr, pr = R.merge_frames_batched(x.cpu(), counts, cfg, extras=ref_in)
    dev = x.device
    for t in (res.x, res.frame_counts, res.segments, res.segment_counts, res.plan_src, res.plan_weight):
        assert t.device == dev
    assert res.frame_counts.dtype == torch.int64 and res.frame_counts.tolist() == cr
    assert res.segments.dtype == torch.int64 and res.segment_counts.dtype == torch.int64
    assert segments_per_video(res.segments, res.segment_counts, counts) == sr
    gp = global_plan(pr, counts)
    assert res.plan_src.dtype == torch.int64 and res.plan_src.shape == (len(gp), 2)
    assert res.plan_src.tolist() == [[a, b] for a, b, _ in gp]
    assert res.plan_weight.dtype == torch.float32
    torch.testing.assert_close(
        res.plan_weight.cpu(), torch.tensor([w for *_, w in gp], dtype=torch.float32), rtol=1e-5, atol=1e-6
    )
    assert res.x.dtype == x.dtype and res.x.shape == (len(gp), x.shape[1], x.shape[2])
    torch.testing.assert_close(res.x.cpu(), xr, **tol(x.dtype, dev))
    if ref_extras is not None:
        assert res.extras.dtype == ref_extras.dtype
        torch.testing.assert_close(res.extras.cpu(), er, **tol(ref_extras.dtype, dev))
    segs, seg_counts = segment_frames(x, fc, cfg)
    assert torch.equal(segs, res.segments) and torch.equal(seg_counts, res.segment_counts)
    check_deferred(x, fc, cfg, segs, seg_counts)
    return res


def check_deferred(x, fc, cfg, segs, seg_counts):
    """segment_frames_deferred: the same segments in the first K rows of a zero-filled [N, 2]
    buffer, status (K, no flags); resolved from host copies to segment_frames' output."""
    d = segment_frames_deferred(x, fc, cfg)
    K = segs.shape[0]
    assert d.segments.device == x.device and d.status.device == x.device
    assert d.segments.dtype == d.segment_counts.dtype == d.status.dtype == torch.int64
    assert d.segments.shape == (x.shape[0], 2) and d.status.tolist() == [K, 0]
    assert torch.equal(d.segments[:K], segs) and not d.segments[K:].any()
    assert torch.equal(d.segment_counts, seg_counts)
    rs, rc = resolve_deferred_segments(d.segments.cpu(), d.segment_counts.cpu(), d.status.cpu())
    assert torch.equal(rs, segs.cpu()) and torch.equal(rc, seg_counts.cpu())


# ------------------------------------------------------------------------------ parity grids
SMALL_T = [1, 2, 3, 5, 8, 32, 33]
LAYOUTS = [("B1", lambda T: [T]), ("B3", lambda T: [T, 1, max(1, T // 2 + 3)])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,D", [(1, 1), (1, 64), (7, 1), (7, 64)])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout[0])
@pytest.mark.parametrize("T", SMALL_T)
def test_grid_small(T, layout, S, D, dtype):
    counts = layout[1](T)
    kinds = ["cuts", "drift", "random"][: len(counts)]
    cfg = EarlyTomConfig(tau=0.5, max_window=6)
    x = make_batch(kinds, counts, S, D, dtype, cfg, seed=T * 7 + S + D)
    assert_matches_reference(x, counts, cfg)


F32, F16, BF16 = DTYPES


@pytest.mark.parametrize(
    "counts,S,D,dtype",
    [
        ([32], 729, 1152, F32),
        ([32], 729, 1152, BF16),
        ([8, 1, 5], 729, 1152, F16),
        ([8, 1, 5], 729, 1152, BF16),
        ([33], 7, 1152, F32),
        ([33], 7, 1152, F16),
        ([33], 7, 1152, BF16),
        ([3, 32], 729, 64, F32),
        ([3, 32], 729, 64, F16),
        ([3, 32], 729, 64, BF16),
        ([5, 2], 729, 1, F32),
        ([5, 2], 729, 1, BF16),
        ([2, 1], 1, 1152, F16),
        ([1, 3], 7, 1152, F32),
    ],
    ids=str,
)
def test_grid_large(counts, S, D, dtype):
    cfg = EarlyTomConfig(tau=0.6, max_window=8)
    kinds = ["cuts", "drift", "static"][: len(counts)]
    x = make_batch(kinds, counts, S, D, dtype, cfg, seed=sum(counts) + S)
    assert_matches_reference(x, counts, cfg)


KINDS = ["static", "cuts", "drift", "alternating", "identical", "orthogonal", "random"]


@pytest.mark.parametrize("keep_last", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau,max_window", [(0.6, 8), (0.3, 6), (-1.0, 5), (0.95, 3), (0.0, 2)])
def test_structured(kind, tau, max_window, keep_last):
    cfg = EarlyTomConfig(tau=tau, max_window=max_window, keep_last_interior=keep_last)
    T = 23
    x = make_batch([kind], [T], 5, 48, torch.float32, cfg, seed=len(kind) + max_window)
    assert_matches_reference(x, [T], cfg)


def test_structured_segments_by_hand():
    """Known structures, expected segmentations derived from the algorithm text."""
    # All-identical frames: similarity 1 everywhere, cuts only by the window (M-1 frames each);
    # the interior pairs tie with tau_m (exactly equal similarities), so nothing merges.
    cfg = EarlyTomConfig(tau=0.6, max_window=4)
    x = structured_video("identical", 10, 3, 16, torch.Generator().manual_seed(0))
    segs, counts = segment_frames(x, [10], cfg)
    assert segs.tolist() == [[0, 2], [3, 5], [6, 8], [9, 9]] and counts.tolist() == [4]
    res = merge_frames(x, [10], cfg)
    # published defect: the single interior frame of a 3-frame segment passes unchanged
    assert res.frame_counts.tolist() == [10]
    # All-orthogonal frames: c = 0, s_hat = 0.1 < tau: every frame is its own segment.
    x = structured_video("orthogonal", 6, 2, 8, torch.Generator().manual_seed(0))
    segs, _ = segment_frames(x, [6], cfg)
    assert segs.tolist() == [[i, i] for i in range(6)]
    # tau = -1 never cuts on similarity: segments of M-1 frames.
    cfg = EarlyTomConfig(tau=-1.0, max_window=3)
    segs, _ = segment_frames(x, [6], cfg)
    assert segs.tolist() == [[0, 1], [2, 3], [4, 5]]


def test_keep_last_interior_changes_output():
    """A long static segment: the published walk drops the last interior frame."""
    g = torch.Generator().manual_seed(3)
    x = structured_video("static", 7, 4, 32, g)
    for keep in (False, True):
        cfg = EarlyTomConfig(tau=0.1, max_window=8, keep_last_interior=keep)
        res = assert_matches_reference(x, [7], cfg)
        assert res.segments.tolist() == [[0, 6]]
        src = {tuple(p) for p in res.plan_src.tolist()}
        # frame 5 is the last interior frame of the segment: emitted only with keep_last_interior
        assert any(5 in p for p in src) == keep


def test_long_window_direct_band():
    """max_window far above the frame count (no window cut) and a band wider than the ring."""
    cfg = EarlyTomConfig(tau=0.2, max_window=100)
    counts = [40, 3, 45]
    x = make_batch(["static", "cuts", "drift"], counts, 3, 16, torch.float32, cfg, seed=11)
    assert_matches_reference(x, counts, cfg)
    cfg = EarlyTomConfig(tau=-1.0, max_window=60)
    x = make_batch(["identical", "static"], [70, 50], 2, 8, torch.float32, cfg, seed=12)
    assert_matches_reference(x, [70, 50], cfg)


# ------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(dtype):
    cfg = EarlyTomConfig(tau=0.5, max_window=6)
    base = make_batch(["cuts", "drift"], [9, 12], 6, 40, dtype, cfg, seed=5)
    variants = [
        base.transpose(1, 2).contiguous().transpose(1, 2),  # channels strided
        torch.stack([base, base], dim=3).flatten(2)[:, :, ::2],  # channels strided by 2
        torch.cat([base, base], dim=1)[:, :6],  # frame stride != S*D
        torch.cat([base, base], dim=2)[:, :, :40],  # position stride != D
    ]
    ref = merge_frames(base, [9, 12], cfg)
    for v in variants:
        assert torch.equal(v, base)
        res = assert_matches_reference(v, [9, 12], cfg)
        assert torch.equal(res.plan_src, ref.plan_src)
        assert torch.equal(res.x, ref.x)


def test_video_alone_equals_video_in_batch():
    cfg = EarlyTomConfig(tau=0.55, max_window=7)
    a = make_batch(["cuts"], [17], 9, 24, torch.float32, cfg, seed=21)
    b = make_batch(["static"], [11], 9, 24, torch.float32, cfg, seed=22)
    c = make_batch(["drift"], [4], 9, 24, torch.float32, cfg, seed=23)
    alone = merge_frames(a, [17], cfg)
    batch = merge_frames(torch.cat([b, a, c]), [11, 17, 4], cfg)
    n_b = batch.frame_counts[0].item()
    n_a = alone.frame_counts[0].item()
    assert batch.frame_counts[1].item() == n_a
    assert torch.equal(batch.x[n_b : n_b + n_a], alone.x)
    assert torch.equal(batch.plan_src[n_b : n_b + n_a] - 11, alone.plan_src)
    assert torch.equal(batch.plan_weight[n_b : n_b + n_a], alone.plan_weight)
    k_b = batch.segment_counts[0].item()
    assert torch.equal(batch.segments[k_b : k_b + alone.segments.shape[0]] - 11, alone.segments)


def test_deterministic_and_counts_forms():
    cfg = EarlyTomConfig(tau=0.5, max_window=6)
    x = make_batch(["cuts", "random"], [10, 6], 5, 32, torch.float16, cfg, seed=2)
    r1 = merge_frames(x, [10, 6], cfg)
    r2 = merge_frames(x, torch.tensor([10, 6], dtype=torch.int32), cfg)
    r3 = merge_frames(x, torch.tensor([10, 6]), cfg)
    for r in (r2, r3):
        for a, b in zip(r1, r):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extras(dtype):
    cfg = EarlyTomConfig(tau=0.5, max_window=6)
    counts = [12, 7]
    x = make_batch(["cuts", "static"], counts, 6, 32, dtype, cfg, seed=9)
    N = x.shape[0]
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(N, 6, generator=g)
    pos = torch.arange(N, dtype=torch.float64)
    feats = torch.randn(N, 2, 3, 4, generator=g).to(dtype)
    res = assert_matches_reference(x, counts, cfg, extras=scores)
    assert res.extras.shape == (res.x.shape[0], 6)
    res_t = merge_frames(x, counts, cfg, extras=(scores, pos, feats))
    assert isinstance(res_t.extras, tuple) and len(res_t.extras) == 3
    res_l = merge_frames(x, counts, cfg, extras=[scores])
    assert isinstance(res_l.extras, list)
    for t, m in zip((scores, pos, feats), res_t.extras):
        _, er, *_ = R.merge_frames_batched(x, counts, cfg, extras=t)
        assert m.dtype == t.dtype and m.shape == er.shape
        if t.dtype == torch.float64:  # float64 math (the reference merges in float32)
            torch.testing.assert_close(
                er, apply_plan64(t, res_t.plan_src, res_t.plan_weight).to(er.dtype), rtol=1e-6, atol=1e-6
            )
            er = apply_plan64(t, res_t.plan_src, res_t.plan_weight)
        torch.testing.assert_close(m, er, **tol(t.dtype))
    torch.testing.assert_close(res_l.extras[0], res.extras)
    assert merge_frames(x, counts, cfg).extras is None


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_apply_merge_plan_other_tensors(dtype):
    g = torch.Generator().manual_seed(4)
    N = 9
    t = torch.randn(N, 5, 7, generator=g).to(dtype)
    plan = [(0, 0, 1.0), (1, 2, 0.625), (3, 4, 0.5), (5, 5, 1.0), (6, 7, 1.0), (8, 1, 0.3)]
    ps = torch.tensor([[a, b] for a, b, _ in plan])
    pw = torch.tensor([w for *_, w in plan], dtype=torch.float32)
    expect = (lambda u: apply_plan64(u, ps, pw)) if dtype == torch.float64 else (lambda u: R.apply_plan(u, plan))
    out = apply_merge_plan(t, ps, pw)
    torch.testing.assert_close(out, expect(t), **tol(dtype))
    # strided input, 1-D input, empty plan
    tt = t.transpose(1, 2)
    torch.testing.assert_close(apply_merge_plan(tt, ps, pw), expect(tt), **tol(dtype))
    v = torch.randn(N, generator=g).to(dtype)
    torch.testing.assert_close(apply_merge_plan(v, ps, pw), expect(v), **tol(dtype))
    empty = apply_merge_plan(t, ps[:0], pw[:0])
    assert empty.shape == (0, 5, 7) and empty.dtype == dtype


def test_apply_matches_merge_output():
    cfg = EarlyTomConfig(tau=0.4, max_window=6)
    x = make_batch(["cuts", "drift"], [14, 9], 4, 16, torch.bfloat16, cfg, seed=31)
    res = merge_frames(x, [14, 9], cfg)
    assert torch.equal(apply_merge_plan(x, res.plan_src, res.plan_weight), res.x)


def test_segments_per_video():
    segs = torch.tensor([[0, 1], [2, 4], [5, 5], [6, 8]])
    assert segments_per_video(segs, torch.tensor([2, 1, 1]), [5, 1, 3]) == [[(0, 1), (2, 4)], [(0, 0)], [(0, 2)]]
    with pytest.raises(ValueError, match="segment_counts"):
        segments_per_video(segs, [2, 1], [5, 4])
    with pytest.raises(ValueError, match="outside"):
        segments_per_video(segs, [3, 1], [5, 4])
    # A segmentation partitions each video's frames in order: overlaps, gaps, uncovered frames fail.
    for bad, counts, frames in [
        ([[0, 2], [1, 1], [3, 4]], [3], [5]),  # overlap
        ([[0, 1], [3, 4]], [2], [5]),  # gap
        ([[1, 4]], [1], [5]),  # frame 0 uncovered
        ([[0, 3], [4, 5]], [1, 1], [4, 500]),  # the second video's frames 2..499 uncovered
    ]:
        with pytest.raises(ValueError, match=r"video \d \(local: .* cover the frames 0\.\.\d+ in order without gaps"):
            segments_per_video(torch.tensor(bad), counts, frames)


# ------------------------------------------------------------------------------ bad inputs
CFG = EarlyTomConfig()


@pytest.mark.parametrize("fn", ["merge", "segment"])
def test_bad_inputs(fn):
    call = (lambda *a: merge_frames(*a)) if fn == "merge" else (lambda *a: segment_frames(*a))
    x = torch.randn(6, 4, 8)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        call(x[0], [4], CFG)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(x.numpy(), [6], CFG)
    with pytest.raises(TypeError, match="x must have dtype"):
        call(x.double(), [6], CFG)
    with pytest.raises(TypeError, match="x must have dtype"):
        call(x.int(), [6], CFG)
    with pytest.raises(ValueError, match="sum to the number of frames N = 6"):
        call(x, [2, 3], CFG)
    with pytest.raises(ValueError, match=">= 1"):
        call(x, [7, -1], CFG)
    with pytest.raises(ValueError, match=">= 1"):
        call(x, [6, 0], CFG)
    with pytest.raises(ValueError, match="at least one video"):
        call(x, [], CFG)
    with pytest.raises(TypeError, match="frame_counts"):
        call(x, torch.tensor([6.0]), CFG)
    with pytest.raises(ValueError, match="frame_counts must be 1-D"):
        call(x, torch.tensor([[6]]), CFG)
    with pytest.raises(ValueError, match="S >= 1"):
        call(torch.randn(3, 0, 4), [3], CFG)
    with pytest.raises(TypeError, match="cfg"):
        call(x, [6], {"tau": 0.5})
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[4, 2, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(y, [3, 3], CFG)
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(y[4:5], [1], CFG)  # a single frame is checked too


def test_bad_extras_and_plans():
    x = torch.randn(6, 4, 8)
    with pytest.raises(ValueError, match="extras must have leading dim N = 6"):
        merge_frames(x, [6], CFG, extras=torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"extras\[1\] must have leading dim"):
        merge_frames(x, [6], CFG, extras=(torch.randn(6), torch.randn(2)))
    with pytest.raises(TypeError, match="extras"):
        merge_frames(x, [6], CFG, extras=torch.zeros(6, dtype=torch.int64))
    with pytest.raises(TypeError, match="extras must be None"):
        merge_frames(x, [6], CFG, extras={"a": torch.randn(6)})
    ps, pw = torch.tensor([[0, 1], [2, 2]]), torch.tensor([0.5, 1.0])
    with pytest.raises(ValueError, match="plan_src must hold frame indices"):
        apply_merge_plan(x, torch.tensor([[0, 6]]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="plan_src must hold frame indices"):
        apply_merge_plan(x, torch.tensor([[-1, 0]]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="plan_weight must have shape"):
        apply_merge_plan(x, ps, pw[:1])
    with pytest.raises(TypeError, match="plan_weight must have dtype"):
        apply_merge_plan(x, ps, pw.double())
    with pytest.raises(TypeError, match="plan_src must have dtype"):
        apply_merge_plan(x, ps.int(), pw)
    with pytest.raises(ValueError, match=r"plan_src must have shape \[N', 2\]"):
        apply_merge_plan(x, torch.tensor([[0, 1, 2]]), torch.tensor([0.5]))
    with pytest.raises(TypeError, match="t must have dtype"):
        apply_merge_plan(x.int(), ps, pw)


BAD_COUNTS = [  # (frame_counts for 6 frames, exception, message)
    ([3.7, 3.2], TypeError, r"frame_counts\[0\] must be an int, got float"),  # used to truncate to [3, 3]
    ([3.0, 3.0], TypeError, r"frame_counts\[0\] must be an int, got float"),
    ([True, 5], TypeError, r"frame_counts\[0\] must be an int, got bool"),
    ("33", TypeError, "frame_counts must be a 1-D int tensor or a list of ints, got str"),  # used to read [3, 3]
    (np.array([3.0, 3.0]), TypeError, r"frame_counts\[0\] must be an int, got float64"),
    ([torch.tensor(3.0), torch.tensor(3.0)], TypeError, r"frame_counts\[0\] must be an int, got Tensor"),
    ([[3, 3]], TypeError, r"frame_counts\[0\] must be an int, got list"),
    ([[3], [3]], TypeError, r"frame_counts\[0\] must be an int, got list"),
    (6, TypeError, "frame_counts must be a 1-D int tensor or a list of ints, got int"),
    (None, TypeError, "frame_counts must be a 1-D int tensor or a list of ints, got NoneType"),
    (torch.tensor([3.0, 3.0]), TypeError, "frame_counts must be an int32/int64 tensor"),
    (torch.tensor([True, True]), TypeError, "frame_counts must be an int32/int64 tensor"),
    (torch.tensor([3, 3], dtype=torch.uint8), TypeError, "frame_counts must be an int32/int64 tensor"),
    (torch.tensor(6), ValueError, r"frame_counts must be 1-D \[B\]"),
    (torch.tensor([[3, 3]]), ValueError, r"frame_counts must be 1-D \[B\]"),
    (torch.tensor([], dtype=torch.int64), ValueError, "at least one video"),
]


BAD_COUNTS_IDS = [
    "floats",
    "whole_floats",
    "bool",
    "str",
    "np_floats",
    "float_scalar_tensors",
    "nested",
    "nested2",
    "int",
    "None",
    "float_tensor",
    "bool_tensor",
    "uint8_tensor",
    "0d_tensor",
    "2d_tensor",
    "empty_tensor",
]


CALLS = {"merge": merge_frames, "segment": segment_frames, "deferred": segment_frames_deferred}


@pytest.mark.parametrize("fn", list(CALLS))
@pytest.mark.parametrize("counts,exc,match", BAD_COUNTS, ids=BAD_COUNTS_IDS)
def test_bad_frame_counts(fn, counts, exc, match):
    call = CALLS[fn]
    with pytest.raises(exc, match=match):
        call(torch.randn(6, 4, 8), counts, CFG)


@pytest.mark.parametrize(
    "counts",
    [
        (3, 3),
        np.array([3, 3]),
        [np.int64(3), 3],
        [torch.tensor(3), torch.tensor(3)],
        torch.tensor([3, 3], dtype=torch.int32),
    ],
    ids=["tuple", "np_int", "np_int_scalar", "int_scalar_tensors", "int32_tensor"],
)
def test_frame_counts_int_forms(counts):
    x = make_batch(["cuts", "drift"], [3, 3], 4, 8, torch.float32, CFG, seed=1)
    ref = merge_frames(x, [3, 3], CFG)
    res = merge_frames(x, counts, CFG)
    assert torch.equal(res.x, ref.x) and torch.equal(res.plan_src, ref.plan_src)
    assert torch.equal(segment_frames(x, counts, CFG)[0], ref.segments)


@pytest.mark.parametrize("fn", list(CALLS))
def test_bad_x_empty_and_dtypes(fn):
    call = CALLS[fn]
    with pytest.raises(ValueError, match=r"x must hold at least one frame \[N >= 1, S, D\], got shape \[0, 4, 8\]"):
        call(torch.randn(0, 4, 8), [1], CFG)
    with pytest.raises(ValueError, match=r"D >= 1 channels, got shape \[3, 4, 0\]"):
        call(torch.randn(3, 4, 0), [3], CFG)
    with pytest.raises(ValueError, match=r"S >= 1 positions"):
        call(torch.randn(3, 0, 0), [3], CFG)
    with pytest.raises(TypeError, match=r"x must have dtype in \(float32, float16, bfloat16\), got bool"):
        call(torch.ones(3, 4, 8, dtype=torch.bool), [3], CFG)
    with pytest.raises(TypeError, match=r"x must have dtype in \(float32, float16, bfloat16\), got float64"):
        call(torch.randn(3, 4, 8, dtype=torch.float64), [3], CFG)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        call(torch.randn(1, 3, 4, 8), [1], CFG)


@pytest.mark.parametrize(
    "cfg", [None, EarlyTomConfig, {"tau": 0.5}, (0.1, 0.6, 8, 0.9, (6,), False)], ids=["None", "class", "dict", "tuple"]
)
def test_bad_cfg_type(cfg):
    x = torch.randn(6, 4, 8)
    for call in CALLS.values():
        with pytest.raises(TypeError, match="cfg must be an earlytom_ext.EarlyTomConfig"):
            call(x, [6], cfg)


def test_bad_extras_forms():
    x = torch.randn(6, 4, 8)
    with pytest.raises(ValueError, match=r"extras must have leading dim N = 6 .* got shape \(\)"):
        merge_frames(x, [6], CFG, extras=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"extras\[0\] must have leading dim N = 6"):
        merge_frames(x, [6], CFG, extras=[torch.randn(7, 2)])
    with pytest.raises(TypeError, match="extras must have dtype .* got bool"):
        merge_frames(x, [6], CFG, extras=torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"extras\[1\] must be a torch.Tensor, got int"):
        merge_frames(x, [6], CFG, extras=(torch.randn(6), 3))
    assert merge_frames(x, [6], CFG, extras=()).extras == ()


def test_extras_keep_their_structure_named_tuples_too():
    from typing import NamedTuple

    class Extras(NamedTuple):
        scores: torch.Tensor
        pos: torch.Tensor

    cfg = EarlyTomConfig(tau=0.9, max_window=4, prune_layers=(1,))
    x = torch.randn(6, 4, 8)
    x[1] = x[0]  # a merge happens
    extras = Extras(torch.randn(6, 4), torch.arange(6.0))
    res = merge_frames(x, [6], cfg, extras=extras)
    assert type(res.extras) is Extras
    for name in Extras._fields:
        assert torch.equal(getattr(res.extras, name), merge_frames(x, [6], cfg, extras=getattr(extras, name)).extras)
    assert type(merge_frames(x, [6], cfg, extras=list(extras)).extras) is list


def test_count_lists_stay_on_the_host_under_a_default_device():
    """A list of frame counts becomes a CPU tensor even under torch.set_default_device / a device
    context (the caller's tensors decide the device)."""
    x = torch.randn(6, 4, 8)
    plain = merge_frames(x, [3, 3], CFG)
    with torch.device("meta"):
        res = merge_frames(x, [3, 3], CFG)
        seg = segment_frames(x, [3, 3], CFG)
    assert torch.equal(res.x, plain.x) and torch.equal(res.frame_counts, plain.frame_counts)
    assert torch.equal(seg[0], segment_frames(x, [3, 3], CFG)[0])


def test_resolve_deferred_segments_bad_forms():
    d = segment_frames_deferred(torch.randn(6, 4, 8), [3, 3], CFG)
    with pytest.raises(TypeError, match="segments must hold integers, got dtype torch.float32"):
        resolve_deferred_segments(d.segments.float(), d.segment_counts, d.status)
    with pytest.raises(ValueError, match=r"segments must be \[K, 2\] \(start, end\) pairs, got shape \(12,\)"):
        resolve_deferred_segments(d.segments.reshape(-1), d.segment_counts, d.status)
    with pytest.raises(TypeError, match="segment_counts must hold integers, got dtype torch.float32"):
        resolve_deferred_segments(d.segments, d.segment_counts.float() + 0.25, d.status)
    with pytest.raises(ValueError, match=r"segment_counts must be 1-D \[B\], got shape \(1, 2\)"):
        resolve_deferred_segments(d.segments, d.segment_counts[None], d.status)


def test_apply_merge_plan_rejects_non_finite_weights():
    """NaN/Inf weights used to give NaN/Inf rows silently (checked on the CPU, where it is free)."""
    x = torch.randn(6, 4, 8)
    ps = torch.tensor([[0, 1], [2, 2]])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="plan_weight contains NaN or Inf"):
            apply_merge_plan(x, ps, torch.tensor([bad, 1.0]))
    # weights outside [0, 1] are legitimate (sigma_j / (sigma_j + sigma_j+1) with signed sigmas)
    out = apply_merge_plan(x, ps, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(out[0], 1.5 * x[0] - 0.5 * x[1])


def test_apply_merge_plan_bad_forms():
    x = torch.randn(6, 4, 8)
    ps, pw = torch.tensor([[0, 1], [2, 2]]), torch.tensor([0.5, 1.0])
    with pytest.raises(ValueError, match="t must have a leading frame dimension"):
        apply_merge_plan(torch.tensor(1.0), ps, pw)
    with pytest.raises(TypeError, match="t must have dtype .* got bool"):
        apply_merge_plan(x > 0, ps, pw)
    with pytest.raises(TypeError, match="plan_src must be a torch.Tensor, got list"):
        apply_merge_plan(x, [[0, 1]], pw[:1])
    with pytest.raises(TypeError, match="plan_weight must be a torch.Tensor, got list"):
        apply_merge_plan(x, ps, [0.5, 1.0])
    with pytest.raises(ValueError, match=r"plan_src must have shape \[N', 2\], got \[2\]"):
        apply_merge_plan(x, torch.tensor([0, 1]), pw)
    with pytest.raises(ValueError, match=r"plan_src must hold frame indices in \[0, 0\)"):
        apply_merge_plan(torch.randn(0, 3), ps, pw)
    assert apply_merge_plan(torch.randn(0, 3), ps[:0], pw[:0]).shape == (0, 3)


def test_segments_per_video_bad_inputs():
    segs = torch.tensor([[0, 1], [2, 4], [5, 5], [6, 8]])
    with pytest.raises(TypeError, match="segments must hold integer frame indices, got dtype torch.float32"):
        segments_per_video(segs.float() + 0.5, [2, 1, 1], [5, 1, 3])  # used to truncate
    with pytest.raises(ValueError, match=r"segments must be a list of \(start, end\) pairs or a \[K, 2\] tensor"):
        segments_per_video(torch.tensor([[0, 1, 2]]), [1], [3])
    with pytest.raises(TypeError, match=r"segments\[0\] must be a \(start, end\) pair, got \(0,\)"):
        segments_per_video([(0,)], [1], [1])
    with pytest.raises(TypeError, match=r"segments\[0\]\[1\] must be an int, got float"):
        segments_per_video([(0, 1.0)], [1], [2])
    with pytest.raises(TypeError, match="segments must be a list of .* got NoneType"):
        segments_per_video(None, [1], [3])
    with pytest.raises(ValueError, match=r"frame_counts must all be >= 1 \(no empty videos\), got \[2, 0\]"):
        segments_per_video(segs[:1], [1, 0], [2, 0])  # used to return an empty second video
    with pytest.raises(ValueError, match=r"frame_counts must all be >= 1"):
        segments_per_video(segs[:1], [1, 0], [3, -1])
    with pytest.raises(ValueError, match=r"segment_counts must all be >= 1 .* got \[-1, 3, 2\]"):
        segments_per_video(segs, [-1, 3, 2], [5, 1, 3])
    with pytest.raises(TypeError, match="segment_counts must hold integers"):
        segments_per_video(segs, torch.tensor([2.0, 1, 1]), [5, 1, 3])
    with pytest.raises(TypeError, match=r"frame_counts\[0\] must be an int"):
        segments_per_video(segs, [2, 1, 1], [5.0, 1, 3])


def test_cpu_tolerance_catches_low_precision_math():
    """The CPU tolerances reject a merge computed in the input's 16-bit dtype instead of fp32."""
    g = torch.Generator().manual_seed(0)
    plan = [(2 * i, 2 * i + 1, 0.3 + 0.05 * i) for i in range(8)]
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.randn(16, 64, generator=g).to(dtype)
        low = torch.stack([w * t[a] + (1 - w) * t[b] for a, b, w in plan])
        with pytest.raises(AssertionError):
            torch.testing.assert_close(low, R.apply_plan(t, plan), **tol(dtype))


def test_op_level_checks():
    """The C++ ops check their inputs themselves (no wrapper in between)."""
    op = torch.ops.earlytom
    x = torch.randn(5, 3, 4)
    with pytest.raises(ValueError, match="sum to the number of frames N = 5"):
        op.merge_frames(x, torch.tensor([2, 2]), 0.5, 6, 0.9, False)
    with pytest.raises(ValueError, match=">= 1"):
        op.segment_frames(x, torch.tensor([6, -1]), 0.5, 6, 0.9)
    with pytest.raises(ValueError, match="max_window must be >= 2"):
        op.merge_frames(x, torch.tensor([5]), 0.5, 1, 0.9, False)
    with pytest.raises(TypeError, match="frame_counts must have dtype int64"):
        op.merge_frames(x, torch.tensor([5], dtype=torch.int32), 0.5, 6, 0.9, False)
    with pytest.raises(TypeError, match=r"x must have dtype in \(float32, float16, bfloat16\), got float64"):
        op.merge_frames(x.double(), torch.tensor([5]), 0.5, 6, 0.9, False)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        op.segment_frames(x[0], torch.tensor([3]), 0.5, 6, 0.9)
    with pytest.raises(ValueError, match="plan_src must hold frame indices"):
        op.apply_merge_plan(x, torch.tensor([[0, 5]]), torch.tensor([0.5]))
    # counts whose int64 sum wraps around to N
    with pytest.raises(ValueError, match="sum to the number of frames N = 5"):
        op.merge_frames(x, torch.tensor([2**62] * 4 + [5]), 0.5, 6, 0.9, False)


def test_deferred_cpu_raises_at_once_and_resolve_reads_the_flags():
    x = torch.randn(6, 4, 8)
    y = x.clone()
    y[2, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="segment_frames: x contains NaN or Inf values"):
        segment_frames_deferred(y, [6], CFG)
    # Flags as the device sets them (csrc/kernels/merge_frames.h): 1, 2 bad counts, 4 NaN/Inf.
    segs, counts = torch.zeros(6, 2, dtype=torch.int64), torch.tensor([1])
    for flags, match in [(1, "frame_counts are not valid"), (2, "frame_counts are not valid"), (4, "NaN or Inf")]:
        with pytest.raises(ValueError, match=match):
            resolve_deferred_segments(segs, counts, torch.tensor([1, flags]))
    with pytest.raises(ValueError, match=r"status must hold 2 entries \(K, flags\), got shape \(3,\)"):
        resolve_deferred_segments(segs, counts, torch.tensor([1, 0, 0]))
    s, c = resolve_deferred_segments(torch.tensor([[0, 2], [3, 5], [0, 0]]), torch.tensor([2]), torch.tensor([2, 0]))
    assert s.tolist() == [[0, 2], [3, 5]] and c.tolist() == [2]
    # A status the op cannot have written: K outside [0, rows], unknown flags, K not the counts' sum.
    for status in ([-1, 0], [7, 0], [1, 8], [1, -1]):
        with pytest.raises(ValueError, match=r"status must be \(K, flags\) as segment_frames_deferred returns it"):
            resolve_deferred_segments(segs, counts, torch.tensor(status))
    with pytest.raises(ValueError, match=r"segment_counts must sum to K = 2 \(status\[0\]\), got 1"):
        resolve_deferred_segments(segs, counts, torch.tensor([2, 0]))
    with pytest.raises(TypeError, match="status must hold integers"):
        resolve_deferred_segments(segs, counts, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="segments must be a torch.Tensor"):
        resolve_deferred_segments(None, counts, torch.tensor([1, 0]))


@needs_cuda
def test_deferred_cuda_flags_instead_of_raising():
    x = torch.randn(6, 4, 8, device="cuda")
    d = segment_frames_deferred(x, torch.tensor([7, -1], device="cuda"), CFG)  # no sync, no raise
    with pytest.raises(ValueError, match="frame_counts are not valid"):
        resolve_deferred_segments(*(t.cpu() for t in d))
    d = segment_frames_deferred(x, torch.tensor([2, 3], device="cuda"), CFG)
    with pytest.raises(ValueError, match="frame_counts are not valid"):
        resolve_deferred_segments(*(t.cpu() for t in d))
    y = x.clone()
    y[4, 1, 1] = float("nan")
    d = segment_frames_deferred(y, torch.tensor([6], device="cuda"), CFG)
    with pytest.raises(ValueError, match="NaN or Inf"):
        resolve_deferred_segments(*(t.cpu() for t in d))
    with pytest.raises(ValueError, match="frame_counts must be on the device of x"):
        segment_frames_deferred(x, torch.tensor([6]), CFG)


@needs_cuda
def test_device_mix_more():
    x = torch.randn(6, 4, 8, device="cuda")
    with pytest.raises(ValueError, match=r"frame_counts must be on the device of x \(cpu\)"):
        merge_frames(x.cpu(), torch.tensor([6], device="cuda"), CFG)
    with pytest.raises(ValueError, match="frame_counts must be on the device of x"):
        segment_frames(x, torch.tensor([6]), CFG)
    with pytest.raises(ValueError, match=r"extras\[1\] must be on"):
        merge_frames(x, [6], CFG, extras=(torch.randn(6, device="cuda"), torch.randn(6)))
    ps, pw = torch.tensor([[0, 1]], device="cuda"), torch.tensor([0.5], device="cuda")
    with pytest.raises(ValueError, match="plan_weight must be on"):
        apply_merge_plan(x, ps, pw.cpu())
    with pytest.raises(ValueError, match="plan_src must be on"):
        apply_merge_plan(x.cpu(), ps, pw)


@needs_cuda
def test_device_mix():
    x = torch.randn(6, 4, 8, device="cuda")
    with pytest.raises(ValueError, match="frame_counts must be on the device of x"):
        merge_frames(x, torch.tensor([6]), CFG)
    with pytest.raises(ValueError, match="extras must be on"):
        merge_frames(x, [6], CFG, extras=torch.randn(6))
    with pytest.raises(ValueError, match="plan_src must be on"):
        apply_merge_plan(x, torch.tensor([[0, 1]]), torch.tensor([0.5], device="cuda"))
    with pytest.raises(ValueError, match="frame_counts must be on the device of x"):
        torch.ops.earlytom.merge_frames(x, torch.tensor([6]), 0.5, 6, 0.9, False)
    # device-side count checks (counts given as a CUDA tensor)
    with pytest.raises(ValueError, match="sum to the number of frames N = 6"):
        merge_frames(x, torch.tensor([2, 3], device="cuda"), CFG)
    with pytest.raises(ValueError, match=">= 1"):
        segment_frames(x, torch.tensor([7, -1], device="cuda"), CFG)
    with pytest.raises(ValueError, match="sum to the number of frames N = 6"):  # int64 sum wraps to N
        merge_frames(x, torch.tensor([2**62] * 4 + [6], device="cuda"), CFG)
    y = x.clone()
    y[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_frames(y, torch.tensor([6], device="cuda"), CFG)


# ------------------------------------------------------------------------------ opcheck
def test_opcheck_cpu():
    cfg = EarlyTomConfig(tau=0.5, max_window=6)
    x = make_batch(["cuts", "static"], [9, 5], 4, 16, torch.float32, cfg, seed=3)
    counts = torch.tensor([9, 5])
    torch.library.opcheck(torch.ops.earlytom.merge_frames.default, (x, counts, 0.5, 6, 0.9, False))
    torch.library.opcheck(torch.ops.earlytom.merge_frames.default, (x.half(), counts, 0.3, 4, 0.9, True))
    torch.library.opcheck(torch.ops.earlytom.segment_frames.default, (x, counts, 0.5, 6, 0.9))
    torch.library.opcheck(torch.ops.earlytom.segment_frames_deferred.default, (x, counts, 0.5, 6, 0.9))
    ps = torch.tensor([[0, 1], [2, 2], [3, 5]])
    pw = torch.tensor([0.6, 1.0, 0.5])
    torch.library.opcheck(torch.ops.earlytom.apply_merge_plan.default, (x, ps, pw))
    torch.library.opcheck(torch.ops.earlytom.apply_merge_plan.default, (x[:, 0, 0].double(), ps, pw))


# ------------------------------------------------------------------------------ CUDA parity
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "counts,S,D",
    [
        ([1], 1, 1),
        ([2], 7, 64),
        ([3, 1, 5], 7, 1),
        ([32], 729, 1152),
        ([8, 1, 5], 729, 1152),
        ([33], 7, 1152),
        ([5, 32], 729, 64),
        ([3], 729, 1),
        ([12], 13, 100),
        ([9], 5, 36),
    ],
)
@pytest.mark.parametrize("keep_last", [False, True])
def test_cuda_parity(counts, S, D, dtype, keep_last):
    cfg = EarlyTomConfig(tau=0.5, max_window=6, keep_last_interior=keep_last)
    kinds = (["cuts", "drift", "identical", "static"] * 3)[: len(counts)]
    x = make_batch(kinds, counts, S, D, dtype, cfg, seed=len(counts) + S + D)
    cpu = merge_frames(x, counts, cfg)
    for fc in (counts, torch.tensor(counts, device="cuda")):
        gpu = assert_matches_reference(x.cuda(), counts, cfg, fc=fc)
        assert torch.equal(gpu.plan_src.cpu(), cpu.plan_src)
        assert torch.equal(gpu.segments.cpu(), cpu.segments)
        assert torch.equal(gpu.frame_counts.cpu(), cpu.frame_counts)
        torch.testing.assert_close(gpu.plan_weight.cpu(), cpu.plan_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gpu.x.cpu(), cpu.x, **TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_strided_unaligned_and_deterministic(dtype):
    cfg = EarlyTomConfig(tau=0.5, max_window=8)
    base = make_batch(["cuts", "static"], [11, 20], 9, 72, dtype, cfg, seed=77).cuda()
    variants = [
        base,
        torch.cat([base, base], dim=1)[:, :9],  # frame stride != S*D
        torch.cat([base[:, :, :1], base], dim=2)[:, :, 1:],  # misaligned rows (scalar path)
        base.transpose(1, 2).contiguous().transpose(1, 2),  # channels strided
    ]
    ref = merge_frames(base, [11, 20], cfg)
    for i, v in enumerate(variants):
        r = assert_matches_reference(v, [11, 20], cfg)
        assert torch.equal(r.plan_src, ref.plan_src) and torch.equal(r.segments, ref.segments)
        if i == 2:  # scalar loads: another fp32 summation order, last-bit differences
            torch.testing.assert_close(r.x, ref.x, **TOL[dtype])
        else:  # same vector width: bit-identical
            assert torch.equal(r.x, ref.x)
    # run-to-run identical (no float atomics)
    for _ in range(3):
        r = merge_frames(base, [11, 20], cfg)
        assert torch.equal(r.plan_weight, ref.plan_weight) and torch.equal(r.x, ref.x)


@needs_cuda
def test_cuda_long_window_and_extras():
    cfg = EarlyTomConfig(tau=0.2, max_window=100, keep_last_interior=True)
    counts = [40, 3, 45]
    x = make_batch(["static", "cuts", "drift"], counts, 9, 40, torch.float32, cfg, seed=11).cuda()
    scores = torch.rand(x.shape[0], 9, device="cuda")
    res = assert_matches_reference(x, counts, cfg, extras=scores)
    cpu = merge_frames(x.cpu(), counts, cfg, extras=scores.cpu())
    assert torch.equal(res.plan_src.cpu(), cpu.plan_src)
    torch.testing.assert_close(res.extras.cpu(), cpu.extras)
    cfg = EarlyTomConfig(tau=-1.0, max_window=60)
    x = make_batch(["identical", "static"], [70, 50], 2, 8, torch.float32, cfg, seed=12).cuda()
    assert_matches_reference(x, [70, 50], cfg)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("counts", [[1700], [1750], [2000, 1000]], ids=str)
def test_many_frames_band_sizes(counts, device):
    """N * (M - 1) band entries around the 48 KB the CUDA walk stages in shared memory (its
    static scratch must fit beside them). D = 1: exact similarities, no margin needed."""
    cfg = EarlyTomConfig(tau=0.5, max_window=8, keep_last_interior=len(counts) > 1)
    x = make_batch(["cuts", "random"][: len(counts)], counts, 3, 1, torch.float32, cfg, seed=sum(counts))
    assert_matches_reference(x.to(device), counts, cfg)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_cuda_apply(dtype):
    g = torch.Generator().manual_seed(4)
    t = torch.randn(9, 5, 8, generator=g).to(dtype)
    plan = [(0, 0, 1.0), (1, 2, 0.625), (3, 4, 0.5), (8, 1, 0.3)]
    ps = torch.tensor([[a, b] for a, b, _ in plan])
    pw = torch.tensor([w for *_, w in plan], dtype=torch.float32)
    out = apply_merge_plan(t.cuda(), ps.cuda(), pw.cuda())
    torch.testing.assert_close(out.cpu(), R.apply_plan(t, plan), **TOL[dtype])
    if dtype == torch.float64:
        torch.testing.assert_close(out.cpu(), apply_plan64(t, ps, pw), **TOL_CPU[dtype])
    torch.testing.assert_close(out.cpu(), apply_merge_plan(t, ps, pw), **TOL[dtype])
    bad = apply_merge_plan(t.cuda(), torch.tensor([[0, 9]], device="cuda"), torch.tensor([0.5], device="cuda"))
    assert torch.isnan(bad.float()).all()


def test_apply_merge_plan_check_weights():
    """``check_weights=False`` skips the host read of the weights (so fullgraph compile traces the
    call); the default rejects a NaN weight on the CPU."""
    x = torch.arange(24, dtype=torch.float32).view(4, 3, 2)
    src = torch.tensor([[0, 1], [2, 2], [3, 3]])
    w = torch.tensor([0.25, 1.0, 1.0])
    expect = torch.stack([0.25 * x[0] + 0.75 * x[1], x[2], x[3]])
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: apply_merge_plan(t, src, w, check_weights=False), fullgraph=True)
    assert torch.equal(compiled(x), expect)
    bad = torch.tensor([float("nan"), 1.0, 1.0])
    with pytest.raises(ValueError, match="plan_weight contains NaN or Inf"):
        apply_merge_plan(x, src, bad)
    assert torch.isnan(apply_merge_plan(x, src, bad, check_weights=False)[0]).all()
    with pytest.raises(TypeError, match="check_weights must be a bool"):
        apply_merge_plan(x, src, w, check_weights=1)
