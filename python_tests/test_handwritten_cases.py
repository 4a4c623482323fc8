"""Hand-written Stage I / Stage II cases with exactly known answers.

Every expected segment list, merge plan and kept (frame, position) list below is written by hand
from docs/algorithm.md (the working is in the comments), never computed by the code under test.
Each case runs against the reference (``earlytom_ext.reference``), the CPU op and, when a GPU and
the CUDA kernels are present, the CUDA op.

The frames are built so that every similarity is exact in binary floating point: tokens are
basis vectors ``e_k`` (or D = 1 scalars), so every per-token cosine is exactly 1, 0 or -1 and a
frame similarity is a multiple of 1/S. That makes decisions *at* the threshold testable: a
walk that cuts on ``s_hat <= tau`` instead of ``s_hat < tau``, a merge on ``sigma >= tau_m``,
or a tie broken towards the higher index gives a different, hand-known answer.
"""

from collections.abc import Sequence

import pytest
import torch

import earlytom_ext
from earlytom_ext import EarlyTomConfig, ops
from earlytom_ext import reference as R

CUDA = torch.cuda.is_available() and earlytom_ext._ext.has_cuda_kernels()
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not earlytom_ext._ext.has_cuda_kernels(),
    reason="needs a CUDA device and the CUDA kernels",
)
# "reference" runs earlytom_ext.reference; "cpu" / "cuda" run the fused ops on that device.
BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=needs_cuda)]
OP_DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

Segments = list[tuple[int, int]]
Plan = list[tuple[int, int, float]]


def cfg(**kw) -> EarlyTomConfig:
    base = dict(tau=0.6, max_window=8, ema=0.9, prune_layers=(0,))
    base.update(kw)
    return EarlyTomConfig(**base)


def basis_frames(rows: Sequence[Sequence[int]], D: int = 4, scale: bool = True) -> torch.Tensor:
    """Frames ``[T, S, D]``: token (t, s) is the basis vector ``e_{rows[t][s]}`` (``None``: zero).

    With ``scale`` every token gets its own positive length (1 + t + 2 s): cosines, hence every
    decision, must not depend on token norms.
    """
    T, S = len(rows), len(rows[0])
    x = torch.zeros(T, S, D)
    for t, row in enumerate(rows):
        for s, k in enumerate(row):
            if k is not None:
                x[t, s, k] = float(1 + t + 2 * s) if scale else 1.0
    return x


# ------------------------------------------------------------------------------ runners
def run_stage1(backend: str, x: torch.Tensor, c: EarlyTomConfig, counts=None):
    """Stage I of ``x`` (one or several videos): ``(segments, plan, merged x, segment-only segments)``.

    Segments and plans use GLOBAL frame indices (videos concatenated) for every backend.
    """
    counts = [x.shape[0]] if counts is None else list(counts)
    if backend == "reference":
        xm, _, _, segs, plans = R.merge_frames_batched(x, counts, c)
        seg_only = R.segment_batched(x, counts, c)
        g_segs, g_plan, g_seg_only, off = [], [], [], 0
        for n, sv, pv, so in zip(counts, segs, plans, seg_only):
            g_segs += [(s + off, e + off) for s, e in sv]
            g_seg_only += [(s + off, e + off) for s, e in so]
            g_plan += [(a + off, b + off, float(w)) for a, b, w in pv]
            off += n
        return g_segs, g_plan, xm, g_seg_only
    xd = x.to(backend)
    res = ops.merge_frames(xd, counts, c)
    segs = [tuple(s) for s in res.segments.cpu().tolist()]
    plan = [(a, b, w) for (a, b), w in zip(res.plan_src.cpu().tolist(), res.plan_weight.cpu().tolist())]
    so, so_counts = ops.segment_frames(xd, counts, c)
    # Per-video counts must agree with the segment list (hand-checked per case through `segs`).
    assert sum(res.segment_counts.cpu().tolist()) == len(segs) == sum(so_counts.cpu().tolist())
    assert sum(res.frame_counts.cpu().tolist()) == len(plan)
    return segs, plan, res.x.cpu(), [tuple(s) for s in so.cpu().tolist()]


def assert_plan(got: Plan, expected: Plan) -> None:
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in expected]
    for (_, _, w), (_, _, we) in zip(got, expected):
        # The ops store float32 weights; a pass-through is exactly 1.
        assert w == pytest.approx(we, abs=1e-7)


def check_stage1(backend, x, c, segments: Segments, plan: Plan, counts=None):
    segs, got_plan, xm, seg_only = run_stage1(backend, x, c, counts)
    assert segs == segments
    assert seg_only == segments
    assert_plan(got_plan, plan)
    return xm


# ------------------------------------------------------------------------------ s_hat == tau
@pytest.mark.parametrize("backend", BACKENDS)
def test_d1_tokens_similarity_exactly_tau_does_not_cut(backend):
    # D = 1 tokens of one sign: every cosine is exactly 1, so c = 1 and s_hat = 0.9 + 0.1 = 1.0
    # (exactly, in double). tau = 1.0: `1.0 < 1.0` is false, the video stays one segment.
    # Interior F = 1, 2, 3: sigma = [1, 1] and tau_m = sim(0, 4) = 1; `1 > 1` is false, so no
    # merge: F0 alone (j = 0), F1 alone at the last pair (j = 1); the published walk never emits
    # F2 = frame 3.
    x = torch.tensor([0.5, 2.0, 3.0, 0.25, 7.0]).view(5, 1, 1) * torch.tensor([1.0, 3.0, 0.125]).view(1, 3, 1)
    c = cfg(tau=1.0, ema=0.9, max_window=8)
    xm = check_stage1(backend, x, c, [(0, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0)])
    torch.testing.assert_close(xm, x[[0, 1, 2, 4]], rtol=0, atol=0)
    # keep_last_interior emits frame 3 as well.
    check_stage1(backend, x, c.replace(keep_last_interior=True), [(0, 4)], [(i, i, 1.0) for i in range(5)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_d1_tokens_opposite_signs_at_tau_minus_one(backend):
    # Signs + - + -: c(0, i) = -1, +1, -1. With ema = 1, s_hat = c exactly; tau = -1:
    # `-1 < -1` is false, never a cut. Interior F = 1, 2: sigma_0 = sim(1, 2) = -1 and
    # tau_m = sim(0, 3) = -1: `-1 > -1` is false, F0 (frame 1) alone; frame 2 is dropped.
    x = torch.tensor([1.0, -2.0, 3.0, -0.5]).view(4, 1, 1).repeat(1, 2, 1)
    c = cfg(tau=-1.0, ema=1.0, max_window=8)
    check_stage1(backend, x, c, [(0, 3)], [(0, 0, 1.0), (1, 1, 1.0), (3, 3, 1.0)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthogonal_frames_with_ema_one_and_tau_zero(backend):
    # Frame t is e_t at every position: c = 0 exactly; ema = 1 gives s_hat = 0 = tau: no cut.
    # Interior F = 1, 2, 3: sigma = [0, 0], tau_m = 0: no merge anywhere, frame 3 dropped.
    x = basis_frames([[t] * 3 for t in range(5)], D=5)
    c = cfg(tau=0.0, ema=1.0, max_window=8)
    xm = check_stage1(backend, x, c, [(0, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0)])
    torch.testing.assert_close(xm, x[[0, 1, 2, 4]], rtol=0, atol=0)
    # The same frames with ema = 0.9: s_hat = 0.1 > 0 -> still no cut; with tau = 0.2 every
    # frame is cut off (0.1 < 0.2).
    check_stage1(backend, x, c.replace(ema=0.9), [(0, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0)])
    check_stage1(backend, x, c.replace(ema=0.9, tau=0.2), [(i, i) for i in range(5)], [(i, i, 1.0) for i in range(5)])


# ------------------------------------------------------------------------------ zero frames / tokens
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_frames(backend):
    # Frames 3, 4, 5 are all zero: a zero token normalises to zero, its cosine with anything is 0.
    # i = 1, 2: c = 1, s_hat = 1. i = 3: c(0, 3) = 0 -> s_hat = 0.1 < 0.6: cut [0, 2].
    # i = 4: reference frame 3 is zero, c = 0 -> cut [3, 3]; i = 5: cut [4, 4]; i = 6: cut [5, 5].
    # i = 7, 8: c(6, i) = 1. Segments of 3 frames pass (L = 1), so nothing is merged.
    rows = [[0, 1, 2]] * 3 + [[None, None, None]] * 3 + [[0, 1, 2]] * 3
    x = basis_frames(rows)
    c = cfg(tau=0.6, ema=0.9, max_window=8)
    xm = check_stage1(backend, x, c, [(0, 2), (3, 3), (4, 4), (5, 5), (6, 8)], [(i, i, 1.0) for i in range(9)])
    torch.testing.assert_close(xm, x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_video(backend):
    # Every similarity is 0: s_hat = 0.1 < 0.6 at every step, one segment per frame.
    x = torch.zeros(5, 3, 4)
    check_stage1(backend, x, cfg(), [(i, i) for i in range(5)], [(i, i, 1.0) for i in range(5)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_tokens_count_as_zero_cosine(backend):
    # S = 4 positions, ema = 1 (s_hat = c), tau = 0.6.
    # Frame 1 has zero tokens at positions 0, 1: c(0, 1) = (0 + 0 + 1 + 1) / 4 = 0.5 < 0.6: cut.
    # Frame 2 is frame 0 again; against the new reference frame 1: c = 0.5: cut.
    # Frame 3 has one zero token (position 3): c(2, 3) = 0.75 >= 0.6: stays.
    rows = [[0, 1, 2, 3], [None, None, 2, 3], [0, 1, 2, 3], [0, 1, 2, None]]
    x = basis_frames(rows)
    c = cfg(tau=0.6, ema=1.0, max_window=8)
    check_stage1(backend, x, c, [(0, 0), (1, 1), (2, 3)], [(i, i, 1.0) for i in range(4)])


# ------------------------------------------------------------------------------ EMA history and reset
@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_reset_after_a_cut_changes_the_outcome(backend):
    # ema = 0.5, tau = 0.6, S = 2 positions.
    #   frame 0 = [e0, e0], 1 = [e1, e1], 2 = [e1, e0], 3 = 4 = [e1, e1].
    # i = 1: c(0, 1) = 0 -> s_hat = 0.5 < 0.6: cut [0, 0]; reset: ref = 1, s_hat = 1.
    # i = 2: c(1, 2) = 0.5 -> s_hat = 0.25 + 0.5 = 0.75: stays.
    # i = 3: c(1, 3) = 1 -> s_hat = 0.5 + 0.375 = 0.875; i = 4: c = 1 -> 0.9375: stays.
    # Segment [1, 4]: F = 2, 3, tau_m = sim(1, 4) = 1, sigma_0 = sim(2, 3) = 0.5: no merge, frame 3
    # dropped (published).
    # Without the reset, s_hat would stay 0.5 after the first cut: i = 2 gives 0.25 + 0.25 = 0.5
    # (cut), i = 3: c(2, 3) = 0.5 -> 0.5 (cut), i = 4: c(3, 4) = 1 -> 0.75:
    # [(0, 0), (1, 1), (2, 2), (3, 4)].
    x = basis_frames([[0, 0], [1, 1], [1, 0], [1, 1], [1, 1]])
    c = cfg(tau=0.6, ema=0.5, max_window=8)
    check_stage1(backend, x, c, [(0, 0), (1, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_history_weights(backend):
    # ema = 0.75, tau = 0.6, S = 4. Frame 1 and frame 2 each share half their tokens with frame 0.
    # i = 1: c = 0.5 -> s_hat = 0.375 + 0.25 = 0.625 >= 0.6: stays.
    # i = 2: c = 0.5 -> s_hat = 0.375 + 0.15625 = 0.53125 < 0.6: cut [0, 1] (the history decides:
    # the same c stayed one step earlier). Reset at 2; frame 3 = frame 2: c = 1, stays.
    # With the weights swapped (s_hat = 0.25 c + 0.75 s_hat) it would never cut: one segment.
    x = basis_frames([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]])
    c = cfg(tau=0.6, ema=0.75, max_window=8)
    check_stage1(backend, x, c, [(0, 1), (2, 3)], [(i, i, 1.0) for i in range(4)])


# ------------------------------------------------------------------------------ max_window
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "M,segments",
    [
        (2, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]),
        (3, [(0, 1), (2, 3), (4, 5), (6, 6)]),
        (4, [(0, 2), (3, 5), (6, 6)]),
        (8, [(0, 6)]),  # 7 frames: i - start + 1 reaches 7 < 8 at most
    ],
)
def test_identical_frames_cut_by_max_window(backend, M, segments):
    # c = 1 always (s_hat = 1): only the window cuts, when i - start + 1 reaches M, so a segment
    # holds M - 1 frames.
    x = basis_frames([[0, 1, 2]] * 7)
    segs, plan, _, seg_only = run_stage1(backend, x, cfg(max_window=M))
    assert segs == segments and seg_only == segments


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_window_of_identical_frames_plan(backend):
    # M = 6, 7 identical frames: [0, 4] (5 frames) and [5, 6]. Interior of [0, 4]: F = 1, 2, 3,
    # sigma = [1, 1], tau_m = 1: no merge (1 > 1 is false); frame 3 dropped.
    x = basis_frames([[0, 1, 2]] * 7)
    check_stage1(
        backend,
        x,
        cfg(max_window=6),
        [(0, 4), (5, 6)],
        [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0), (5, 5, 1.0), (6, 6, 1.0)],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_reset_after_a_window_cut(backend):
    # ema = 0.5, tau = 0.6, M = 3, S = 4.
    #   frame 0 = [e0]*4, frame 1 = [e0, e0, e1, e1], frame 2 = [e2]*4, frame 3 = [e2, e3, e3, e3],
    #   frame 4 = frame 3.
    # i = 1: c = 0.5 -> s_hat = 0.75 (stays). i = 2: window (2 - 0 + 1 = 3 >= 3): cut [0, 1],
    # reset s_hat = 1, ref = 2. i = 3: c(2, 3) = 0.25 -> 0.125 + 0.5 = 0.625 >= 0.6: stays.
    # i = 4: window again: cut [2, 3]; last segment [4, 4].
    # Without the reset i = 3 gives 0.125 + 0.375 = 0.5 < 0.6: [(0, 1), (2, 2), (3, 4)].
    x = basis_frames([[0, 0, 0, 0], [0, 0, 1, 1], [2, 2, 2, 2], [2, 3, 3, 3], [2, 3, 3, 3]])
    c = cfg(tau=0.6, ema=0.5, max_window=3)
    check_stage1(backend, x, c, [(0, 1), (2, 3), (4, 4)], [(i, i, 1.0) for i in range(5)])


# ------------------------------------------------------------------------------ fine merge
@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_merge_weight_and_values(backend):
    # tau = -1 (no similarity cut), one segment [0, 4]. S = 4.
    #   frame 0 = [e0]*4, frame 4 = [e1]*4        -> tau_m = 0
    #   frame 1 = [e2]*4, frame 2 = 2 * frame 1   -> sigma_0 = 1
    #   frame 3 = [e2, e2, e3, e3]                -> sigma_1 = 0.5
    # j = 0 is not the last pair: 1 > 0 and 1 > 0.5: merge (1, 2) with w = 1 / 1.5 = 2/3, j = 2 =
    # L - 1: the walk stops (published: frame 3 never emitted).
    x = basis_frames([[0] * 4, [2] * 4, [2] * 4, [2, 2, 3, 3], [1] * 4], scale=False)
    x[2] *= 2.0
    c = cfg(tau=-1.0, max_window=8)
    xm = check_stage1(backend, x, c, [(0, 4)], [(0, 0, 1.0), (1, 2, 2.0 / 3.0), (4, 4, 1.0)])
    # merged frame 1: every token is (2/3 * 1 + 1/3 * 2) e2 = 4/3 e2
    expected = torch.zeros(3, 4, 4)
    expected[0, :, 0] = 1.0
    expected[1, :, 2] = 4.0 / 3.0
    expected[2, :, 1] = 1.0
    torch.testing.assert_close(xm, expected, rtol=1e-6, atol=1e-6)
    # Corrected walk: frame 3 is emitted on its own after the merged pair.
    check_stage1(
        backend,
        x,
        c.replace(keep_last_interior=True),
        [(0, 4)],
        [(0, 0, 1.0), (1, 2, 2.0 / 3.0), (3, 3, 1.0), (4, 4, 1.0)],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_merge_tie_between_neighbour_pairs(backend):
    # As above but frame 3 = frame 1: sigma = [1, 1]. j = 0: `1 > 1` (sigma_0 > sigma_1) is false:
    # frame 1 alone. j = 1 is the last pair: 1 > tau_m = 0: merge (2, 3) with the published
    # weight 1 (frame 3 dropped) or 0.5 (keep_last_interior).
    x = basis_frames([[0] * 4, [2] * 4, [2] * 4, [2] * 4, [1] * 4], scale=False)
    c = cfg(tau=-1.0, max_window=8)
    check_stage1(backend, x, c, [(0, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 3, 1.0), (4, 4, 1.0)])
    check_stage1(
        backend, x, c.replace(keep_last_interior=True), [(0, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 3, 0.5), (4, 4, 1.0)]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_merge_sigma_equal_to_tau_m_does_not_merge(backend):
    # Endpoints identical (tau_m = 1) and all interior frames identical (sigma = [1, 1, 1]):
    # no pair is strictly above tau_m. F = 1..4: j = 0, 1 alone, j = 2 (last pair) alone, frame 4
    # dropped.
    x = basis_frames([[0, 1]] * 6)
    c = cfg(tau=-1.0, max_window=8)
    check_stage1(backend, x, c, [(0, 5)], [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (3, 3, 1.0), (5, 5, 1.0)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fine_merge_first_pair_sigma_equal_to_tau_m(backend):
    # Endpoints identical (tau_m = 1); frames 1, 2 identical (sigma_0 = 1), frame 3 shares half its
    # tokens with frame 2 (sigma_1 = 0.5). j = 0: sigma_0 > sigma_1 but `1 > tau_m = 1` is false:
    # frame 1 alone; j = 1 (last pair): 0.5 > 1 is false: frame 2 alone; frame 3 dropped.
    x = basis_frames([[0] * 4, [2] * 4, [2] * 4, [2, 2, 3, 3], [0] * 4])
    c = cfg(tau=-1.0, max_window=8)
    check_stage1(backend, x, c, [(0, 4)], [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0)])
    check_stage1(backend, x, c.replace(keep_last_interior=True), [(0, 4)], [(i, i, 1.0) for i in range(5)])


# ------------------------------------------------------------------------------ batch
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_hand_videos(backend):
    # Video 0: the EMA-reset video (S = 2, D = 4), video 1: three identical frames, video 2: one
    # frame. Each video is walked alone: video 1 is not cut by video 0's last frame, and the
    # frame-index offsets are 0, 5 and 8.
    v0 = basis_frames([[0, 0], [1, 1], [1, 0], [1, 1], [1, 1]])
    v1 = basis_frames([[1, 1]] * 3)  # equal to v0's last frame: a cross-video walk would not cut
    v2 = basis_frames([[3, 2]])
    x = torch.cat([v0, v1, v2])
    c = cfg(tau=0.6, ema=0.5, max_window=8)
    check_stage1(
        backend,
        x,
        c,
        [(0, 0), (1, 4), (5, 7), (8, 8)],
        [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (4, 4, 1.0), (5, 5, 1.0), (6, 6, 1.0), (7, 7, 1.0), (8, 8, 1.0)],
        counts=[5, 3, 1],
    )


# ------------------------------------------------------------------------------ Stage II
def run_stage2(backend: str, feats, scores, segments: Segments, frames_before: int, retain_ratio: float, r_adj: float):
    """Stage II of one video: ``(index list, tokens)``; ``r_adj`` is the hand-computed r'."""
    if backend == "reference":
        tokens, index = R.select_tokens(feats, scores, segments, r_adj)
        return [tuple(p) for p in index.tolist()], tokens
    plan = ops.stage2_plan([segments], [frames_before], retain_ratio, tokens_per_frame=feats.shape[1])
    assert plan.ratios == [r_adj]
    tokens, index = ops.select_tokens(feats.to(backend), scores.to(backend), plan)
    return [tuple(p) for p in index.cpu().tolist()], tokens.cpu()


def position_feats(T: int, P: int) -> torch.Tensor:
    """feats[f, p] = (f, p): the kept tokens must equal their own index."""
    f = torch.arange(T, dtype=torch.float32).view(T, 1).expand(T, P)
    p = torch.arange(P, dtype=torch.float32).view(1, P).expand(T, P)
    return torch.stack([f, p], dim=-1).contiguous()


def rows(frame: int, positions: Sequence[int]) -> list[tuple[int, int]]:
    return [(frame, p) for p in positions]


def test_stage2_plan_counts_by_hand():
    # P = 11, r = 0.25, T = T' = 5 (r' = r): k = ceil(2.75) = 3, n = round(2.75) = 3.
    plan = ops.stage2_plan([[(0, 0), (1, 4)]], [5], 0.25, tokens_per_frame=11)
    assert plan.frame_keep == [3, 3, 3, 3, 3]
    assert plan.frame_static == [False, False, True, True, False]
    assert plan.tokens_per_video == [15] and plan.num_out == 15
    # P = 10, r = 0.25: 196 -> 10 positions, P r' = 2.5: k = ceil = 3, n = round half to even = 2.
    plan = ops.stage2_plan([[(0, 2)]], [3], 0.25, tokens_per_frame=10)
    assert plan.frame_keep == [3, 2, 3] and plan.frame_static == [False, True, False] and plan.num_out == 8
    # P = 196, T = 10 -> T' = 8, r = 0.1: r' = 0.1 * 10 / 8 = 0.125, 196 r' = 24.5: k = 25, n = 24.
    plan = ops.stage2_plan([[(0, 0), (1, 1), (2, 6), (7, 7)]], [10], 0.1)
    assert plan.ratios == [0.125]
    assert plan.frame_keep == [25, 25, 25, 24, 24, 24, 25, 25]
    assert plan.tokens_per_video == [197]
    # T = 8 -> T' = 4, r = 0.1: r' = 0.2, 196 r' = 39.2: k = 40, n = 39; two videos at once.
    plan = ops.stage2_plan([[(0, 2), (3, 3)], [(0, 0)]], [8, 1], [0.1, 1.0])
    assert plan.frame_keep == [40, 39, 40, 40, 196]
    assert plan.tokens_per_video == [159, 196] and plan.num_out == 355


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage2_ties_and_windows_small(backend):
    # P = 11, r' = 0.25: k = 3 (dynamic), n = 3 windows (static) of 4, 4, 3 positions:
    # [0, 4), [4, 8), [8, 11). Segments [(0, 0), (1, 4)]: frames 2, 3 static.
    P = 11
    scores = torch.tensor(
        [
            # frame 0 (dynamic): all tied -> the three lowest positions
            [1.0] * 11,
            # frame 1 (dynamic): 5 at 1, then a three-way tie of 3 at 3, 6, 9: the two lowest win
            [0, 5, 0, 3, 0, 0, 3, 0, 0, 3, 0],
            # frame 2 (static): window 0 tie 2 at {0, 1} -> 0; window 1 max 7 at 7; window 2 tie 9 at
            # {9, 10} -> 9
            [2, 2, 1, 0, 0, 0, 0, 7, 1, 9, 9],
            # frame 3 (static): increasing -> the last position of each window: 3, 7, 10
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            # frame 4 (dynamic): 2 at 5, 1 at 7, 0.5 at 2 (signed zeros and negatives below)
            [-1, -5, 0.5, -0.0, 0.0, 2, -3, 1, -2, 0.25, -4],
        ],
        dtype=torch.float32,
    )
    expected = rows(0, [0, 1, 2]) + rows(1, [1, 3, 6]) + rows(2, [0, 7, 9]) + rows(3, [3, 7, 10]) + rows(4, [2, 5, 7])
    index, tokens = run_stage2(backend, position_feats(5, P), scores, [(0, 0), (1, 4)], 5, 0.25, 0.25)
    assert index == expected
    torch.testing.assert_close(tokens, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage2_round_half_to_even_windows(backend):
    # P = 10, r' = 0.25: k = ceil(2.5) = 3, n = round(2.5) = 2 windows [0, 5), [5, 10).
    scores = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 1, 1, 1],  # dynamic: the three 1s
            [9, 0, 0, 0, 9, 4, 4, 0, 0, 4],  # static: window 0 tie at {0, 4} -> 0; window 1 tie -> 5
            [3, 2, 1, 0, 0, 0, 0, 0, 0, 0],  # dynamic: 3 at 0, 2 at 1, 1 at 2
        ],
        dtype=torch.float32,
    )
    expected = rows(0, [7, 8, 9]) + rows(1, [0, 5]) + rows(2, [0, 1, 2])
    index, _ = run_stage2(backend, position_feats(3, 10), scores, [(0, 2)], 3, 0.25, 0.25)
    assert index == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage2_llava_grid_adjusted_ratio(backend):
    # P = 196, T = 10 frames merged to T' = 8: r' = 0.125, k = ceil(24.5) = 25 tokens per dynamic
    # frame, n = round(24.5) = 24 windows per static frame: 196 = 24 * 8 + 4, so windows 0..3 hold 9
    # positions ([0, 9), [9, 18), [18, 27), [27, 36)) and windows 4..23 hold 8 ([36, 44), ...,
    # [188, 196)). Segments [(0, 0), (1, 1), (2, 6), (7, 7)]: frames 3, 4, 5 static.
    P = 196
    up = torch.arange(P, dtype=torch.float32)
    window_last = [8, 17, 26, 35] + list(range(43, 196, 8))  # last position of each window
    window_first = [0, 9, 18, 27] + list(range(36, 196, 8))  # first position of each window
    f2 = torch.zeros(P)
    f2[100:124] = 2.0  # 24 clear winners
    f2[[50, 60, 190]] = 1.0  # a three-way tie for the 25th place: position 50 wins
    f7 = torch.zeros(P)
    f7[:10] = -0.0  # -0.0 and +0.0 tie: the lowest positions win
    scores = torch.stack(
        [
            torch.ones(P),  # 0 dynamic, all tied: 0..24
            up,  # 1 dynamic, increasing: 171..195
            f2,  # 2 dynamic
            up,  # 3 static, increasing: the last position of each window
            torch.ones(P),  # 4 static, all tied: the first position of each window
            -up,  # 5 static, decreasing: the first position of each window
            -up,  # 6 dynamic, decreasing: 0..24
            f7,  # 7 dynamic
        ]
    )
    expected = (
        rows(0, range(25))
        + rows(1, range(171, 196))
        + rows(2, [50] + list(range(100, 124)))
        + rows(3, window_last)
        + rows(4, window_first)
        + rows(5, window_first)
        + rows(6, range(25))
        + rows(7, range(25))
    )
    assert len(expected) == 197
    index, tokens = run_stage2(backend, position_feats(8, P), scores, [(0, 0), (1, 1), (2, 6), (7, 7)], 10, 0.1, 0.125)
    assert index == expected
    torch.testing.assert_close(tokens, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stage2_half_precision_feats_are_copied_exactly(device, dtype):
    # Same small case as above with 16-bit features: the kept tokens are bit-exact copies.
    P = 10
    scores = torch.tensor(
        [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [9, 0, 0, 0, 9, 4, 4, 0, 0, 4], [3, 2, 1, 0, 0, 0, 0, 0, 0, 0]],
        dtype=torch.float32,
    )
    feats = (position_feats(3, P) + 0.5).to(dtype)  # x.5 values are exact in both dtypes here
    plan = ops.stage2_plan([[(0, 2)]], [3], 0.25, tokens_per_frame=P)
    tokens, index = ops.select_tokens(feats.to(device), scores.to(device), plan)
    expected = rows(0, [7, 8, 9]) + rows(1, [0, 5]) + rows(2, [0, 1, 2])
    assert [tuple(p) for p in index.cpu().tolist()] == expected
    assert tokens.dtype == dtype
    assert torch.equal(tokens.cpu(), (torch.tensor(expected, dtype=torch.float32) + 0.5).to(dtype))
