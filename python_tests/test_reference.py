"""The reference must be right by construction.

Frames are built from unit vectors whose cosines are known in closed form: every token of frame
i is the same unit vector ``v_i`` (optionally scaled per position, which leaves cosines
unchanged), so the frame similarity is exactly ``v_i · v_j``. Expected segments, merge plans and
kept indices below are derived by hand from docs/algorithm.md, never read off the code.
"""

import math

import pytest
import torch

from earlytom_ext import EarlyTomConfig
from earlytom_ext import reference as R

S, D = 5, 8


def frames_from_angles(angles, S=S, D=D, scale_tokens=True):
    """Frames whose tokens all point at angle phi in the (e0, e1) plane: sim(i, j) = cos(phi_i - phi_j)."""
    T = len(angles)
    x = torch.zeros(T, S, D, dtype=torch.float64)
    for i, phi in enumerate(angles):
        x[i, :, 0] = math.cos(phi)
        x[i, :, 1] = math.sin(phi)
    if scale_tokens:  # different norms per position: cosines must not depend on them
        x = x * torch.linspace(0.5, 3.0, S, dtype=torch.float64).view(1, S, 1)
    return x.float()


def frames_from_vectors(vectors, S=S):
    v = torch.as_tensor(vectors, dtype=torch.float64)
    return v[:, None, :].expand(v.shape[0], S, v.shape[1]).float().contiguous()


def cfg(**kw):
    base = dict(tau=0.6, max_window=8, ema=0.9, prune_layers=(0,))
    base.update(kw)
    return EarlyTomConfig(**base)


# ------------------------------------------------------------------------------ similarity
def test_frame_similarity_is_mean_of_positionwise_cosines():
    a = torch.randn(7, 16, dtype=torch.float64)
    b = torch.randn(7, 16, dtype=torch.float64)
    expected = sum(float(a[s] @ b[s] / (a[s].norm() * b[s].norm())) for s in range(7)) / 7
    assert R.frame_similarity(a.float(), b.float()) == pytest.approx(expected, abs=1e-6)


def test_frame_similarity_zero_tokens_count_as_zero_cosine():
    a = torch.ones(4, 3)
    b = torch.ones(4, 3)
    b[0] = 0  # F.normalize maps a zero vector to zero: its cosine is 0
    assert R.frame_similarity(a, b) == pytest.approx(3 / 4, abs=1e-6)


# ------------------------------------------------------------------------------ segmentation
def test_one_frame():
    assert R.segment(frames_from_angles([0.0]), cfg()) == [(0, 0)]
    plan, segs = R.merge_plan(frames_from_angles([0.0]), cfg())
    assert plan == [(0, 0, 1.0)] and segs == [(0, 0)]


@pytest.mark.parametrize("c,expected", [(0.9, [(0, 1)]), (0.3, [(0, 0), (1, 1)])])
def test_two_frames(c, expected):
    # s_hat = 0.9 c + 0.1: 0.91 (stay) or 0.37 (< 0.6: cut)
    x = frames_from_angles([0.0, math.acos(c)])
    assert R.segment(x, cfg()) == expected
    plan, _ = R.merge_plan(x, cfg())
    assert plan == [(0, 0, 1.0), (1, 1, 1.0)]  # segments of <= 2 frames pass unchanged


@pytest.mark.parametrize(
    "M,T,expected",
    [
        (8, 20, [(0, 6), (7, 13), (14, 19)]),
        (6, 32, [(0, 4), (5, 9), (10, 14), (15, 19), (20, 24), (25, 29), (30, 31)]),
        (2, 5, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]),
        (3, 7, [(0, 1), (2, 3), (4, 5), (6, 6)]),
        (8, 7, [(0, 6)]),  # i - start + 1 reaches 7 < M at most: never cut
    ],
)
def test_all_identical_video_is_cut_by_max_window(M, T, expected):
    x = frames_from_angles([0.3] * T)
    # c = 1 always; a cut happens when i - start + 1 reaches M: segments of M - 1 frames.
    assert R.segment(x, cfg(max_window=M)) == expected


def test_all_orthogonal_video_every_frame_its_own_segment():
    T = 8
    x = frames_from_vectors(torch.eye(T))  # c = 0: s_hat = 0.1 < tau at every step
    assert R.segment(x, cfg()) == [(i, i) for i in range(T)]
    plan, _ = R.merge_plan(x, cfg())
    assert plan == [(i, i, 1.0) for i in range(T)]


def test_ema_walk_uses_segment_first_frame_and_resets():
    # Angles 0, .5, 1.0, 1.95, .8, 2.5 (sim = cos of the angle difference), ema .9, tau .6:
    # i=1: c(0,1) = cos .5 = .8776 -> s = .8898
    # i=2: c(0,2) = cos 1.0 = .5403 -> s = .5753 < .6: cut [0,1]; ref = 2, s = 1 (reset)
    # i=3: c(2,3) = cos .95 = .5817 -> s = .5235 + .1 = .6235: stays
    #      (without the reset: .5235 + .0575 = .5810 < .6 would cut here)
    # i=4: c(2,4) = cos .2 = .9801 -> s = .9444: stays
    #      (against the previous frame 3 instead: cos 1.15 = .4085 -> s = .4300 would cut here)
    # i=5: c(2,5) = cos 1.5 = .0707 -> s = .1581: cut [2,4]
    x = frames_from_angles([0.0, 0.5, 1.0, 1.95, 0.8, 2.5])
    assert R.segment(x, cfg()) == [(0, 1), (2, 4), (5, 5)]
    # Segment [2,4]: its single interior frame 3 passes; nothing is merged.
    plan, _ = R.merge_plan(x, cfg())
    assert plan == [(i, i, 1.0) for i in range(6)]


def test_ema_reset_after_a_cut_with_alpha_one_half():
    # S = 2 positions of basis vectors, ema .5, tau .6; frames [e0,e0], [e1,e1], [e1,e0], [e1,e1], [e1,e1].
    # i=1: c = 0 -> s = .5: cut [0,0], reset s = 1. i=2: c(1,2) = .5 -> s = .75; i=3, 4: c = 1 -> .875, .9375.
    # Without the reset: i=2 gives .5 (cut), i=3: c(2,3) = .5 -> .5 (cut), i=4: c = 1 -> .75:
    # [(0,0), (1,1), (2,2), (3,4)].
    x = frames_from_vectors([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], S=2)
    x[2, 1] = torch.tensor([1.0, 0.0])
    assert R.segment(x, cfg(ema=0.5)) == [(0, 0), (1, 4)]


def test_similarity_exactly_tau_does_not_cut():
    # D = 1 tokens of one sign: every cosine is exactly 1, s_hat = .9 + .1 = 1.0 exactly;
    # tau = 1.0 and `1.0 < 1.0` is false: one segment. Orthogonal frames with ema = 1 give
    # s_hat = 0 exactly: tau = 0 does not cut either.
    x = torch.tensor([0.5, 2.0, 3.0, 0.25, 7.0]).view(5, 1, 1).repeat(1, 3, 1)
    assert R.segment(x, cfg(tau=1.0)) == [(0, 4)]
    assert R.segment(frames_from_vectors(torch.eye(5)), cfg(tau=0.0, ema=1.0)) == [(0, 4)]


def test_ema_accumulates_over_steps():
    # With alpha = 0.5 the history matters: c1 = 1 (s=1), c2 = cos(1.2)=.362 -> s = .681 >= .6 stays,
    # c3 = cos(1.3) = .267 -> s = .474 < .6: cut before frame 3.
    x = frames_from_angles([0.0, 0.0, 1.2, 1.3])
    assert R.segment(x, cfg(ema=0.5)) == [(0, 2), (3, 3)]
    # With alpha = 1 (no memory) frame 2 alone already cuts; frame 3 is close to the new reference 2.
    assert R.segment(x, cfg(ema=1.0)) == [(0, 1), (2, 3)]


def test_tau_minus_one_never_cuts_on_similarity():
    x = frames_from_vectors(torch.eye(6) * -1 + 0.0)  # orthogonal frames
    assert R.segment(x, cfg(tau=-1.0, max_window=100)) == [(0, 5)]


# ------------------------------------------------------------------------------ fine merge
def one_segment_cfg(keep_last_interior=False):
    # tau = -1 and a large window: the whole video is one segment [0, T-1].
    return cfg(tau=-1.0, max_window=64, keep_last_interior=keep_last_interior)


def chain(increments):
    """Angles with the given consecutive increments (frame 0 at angle 0)."""
    angles = [0.0]
    for d in increments:
        angles.append(angles[-1] + d)
    return angles


def test_interior_of_length_one_passes():
    x = frames_from_angles(chain([0.3, 0.3]))
    for keep in (False, True):
        plan, segs = R.merge_plan(x, one_segment_cfg(keep))
        assert segs == [(0, 2)]
        assert plan == [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0)]


@pytest.mark.parametrize("keep", [False, True])
def test_interior_of_length_two(keep):
    # F = frames 1, 2. sigma_0 = cos(.1) > tau_m = cos(.5+.1+.5): last pair merges.
    x = frames_from_angles(chain([0.5, 0.1, 0.5]))
    plan, _ = R.merge_plan(x, one_segment_cfg(keep))
    assert plan == [(0, 0, 1.0), (1, 2, 0.5 if keep else 1.0), (3, 3, 1.0)]
    # Endpoints close together: sigma_0 = cos(1.5) = .071 < tau_m = cos(.1) = .995, no merge.
    x = frames_from_angles([0.0, 1.0, -0.5, 0.1])
    plan, _ = R.merge_plan(x, one_segment_cfg(keep))
    expected = [(0, 0, 1.0), (1, 1, 1.0)] + ([(2, 2, 1.0)] if keep else []) + [(3, 3, 1.0)]
    assert plan == expected  # published: the last interior frame (2) is never emitted


@pytest.mark.parametrize("keep", [False, True])
def test_interior_of_length_three_merge_first_pair(keep):
    # F = 1,2,3; sigma = [cos .1, cos .4]; tau_m = cos(.3+.1+.4+.3) = cos 1.1: merge (1,2), jump to j=2.
    x = frames_from_angles(chain([0.3, 0.1, 0.4, 0.3]))
    plan, _ = R.merge_plan(x, one_segment_cfg(keep))
    s0, s1 = math.cos(0.1), math.cos(0.4)
    assert [p[:2] for p in plan] == [(0, 0), (1, 2)] + ([(3, 3)] if keep else []) + [(4, 4)]
    assert plan[1][2] == pytest.approx(s0 / (s0 + s1), abs=1e-6)


@pytest.mark.parametrize("keep", [False, True])
def test_interior_of_length_three_no_merge_then_last_pair(keep):
    # sigma = [cos .4, cos .1]: sigma_0 < sigma_1 so F0 is emitted alone; last pair (1,2) merges.
    x = frames_from_angles(chain([0.3, 0.4, 0.1, 0.3]))
    plan, _ = R.merge_plan(x, one_segment_cfg(keep))
    assert plan == [(0, 0, 1.0), (1, 1, 1.0), (2, 3, 0.5 if keep else 1.0), (4, 4, 1.0)]


@pytest.mark.parametrize("keep", [False, True])
def test_interior_of_length_four(keep):
    # F = 1..4, sigma = [cos .1, cos .3, cos .2], tau_m = cos(.5+.1+.3+.2+.6) = cos 1.7 < 0.
    # j=0: .995 > .955 -> merge (1,2), j=2 = last pair: .980 > tau_m -> merge (3,4).
    x = frames_from_angles(chain([0.5, 0.1, 0.3, 0.2, 0.6]))
    plan, _ = R.merge_plan(x, one_segment_cfg(keep))
    s0, s1 = math.cos(0.1), math.cos(0.3)
    assert [p[:2] for p in plan] == [(0, 0), (1, 2), (3, 4), (5, 5)]
    assert plan[1][2] == pytest.approx(s0 / (s0 + s1), abs=1e-6)
    assert plan[2][2] == (0.5 if keep else 1.0)


def test_interior_merge_requires_sigma_above_tau_m():
    # Endpoints nearly identical (tau_m = cos .05 high): no interior pair is that similar.
    x = frames_from_angles([0.0, 0.4, 0.8, 0.4, 0.05])
    plan, _ = R.merge_plan(x, one_segment_cfg(True))
    assert plan == [(i, i, 1.0) for i in range(5)]


def test_merged_values_use_the_plan_weights():
    x = frames_from_angles(chain([0.3, 0.1, 0.4, 0.3]))
    extras = torch.arange(5, dtype=torch.float32).view(5, 1) * 10
    xm, em, segs = R.merge_frames(x, one_segment_cfg(), extras=extras)
    s0, s1 = math.cos(0.1), math.cos(0.4)
    w = s0 / (s0 + s1)
    assert xm.shape[0] == 3 and segs == [(0, 4)]
    torch.testing.assert_close(xm[1], w * x[1] + (1 - w) * x[2])
    torch.testing.assert_close(em[:, 0], torch.tensor([0.0, w * 10 + (1 - w) * 20, 40.0]))


def test_merge_keeps_dtype():
    x = frames_from_angles(chain([0.3, 0.1, 0.4, 0.3])).to(torch.bfloat16)
    xm, _, _ = R.merge_frames(x, one_segment_cfg())
    assert xm.dtype == torch.bfloat16


def test_segments_of_a_video_with_cuts_and_windows():
    # Two static shots of 9 frames each, with M = 6 the first shot splits into 5 + 4 frames.
    x = frames_from_vectors([[1.0, 0.0]] * 9 + [[0.0, 1.0]] * 9)
    segs = R.segment(x, cfg(max_window=6))
    assert segs == [(0, 4), (5, 8), (9, 13), (14, 17)]


# ------------------------------------------------------------------------------ batched
def test_batched_equals_per_video():
    torch.manual_seed(0)
    base = torch.randn(1, 6, 12)
    videos = [
        base + 0.3 * torch.randn(7, 6, 12),
        torch.randn(1, 6, 12),
        base.repeat(9, 1, 1) + 0.05 * torch.randn(9, 6, 12),
    ]
    x = torch.cat(videos)
    extras = torch.rand(x.shape[0], 6)
    c = cfg(max_window=5, tau=0.4)
    xm, em, counts, segs, plans = R.merge_frames_batched(x, [7, 1, 9], c, extras=extras)
    offs = 0
    parts_x, parts_e = [], []
    for v, n in zip(videos, [7, 1, 9]):
        xv, ev, sv = R.merge_frames(v, c, extras=extras[offs : offs + n])
        parts_x.append(xv)
        parts_e.append(ev)
        assert sv == segs.pop(0)
        offs += n
    torch.testing.assert_close(xm, torch.cat(parts_x), rtol=0, atol=0)
    torch.testing.assert_close(em, torch.cat(parts_e), rtol=0, atol=0)
    assert counts == [p.shape[0] for p in parts_x]
    assert R.segment_batched(x, [7, 1, 9], c) == [R.segment(v, c) for v in videos]


def test_batched_does_not_segment_across_videos():
    # Two identical static videos: across the boundary the similarity is 1, but it must cut there.
    x = frames_from_angles([0.0] * 6)
    segs = R.segment_batched(x, [3, 3], cfg())
    assert segs == [[(0, 2)], [(0, 2)]]


def test_batched_rejects_bad_counts():
    x = torch.randn(4, 2, 3)
    with pytest.raises(ValueError):
        R.merge_frames_batched(x, [2, 1], cfg())
    with pytest.raises(ValueError):
        R.merge_frames_batched(x, [4, 0], cfg())


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("N,H,S_,d", [(1, 1, 1, 4), (2, 3, 7, 5), (1, 16, 30, 72)])
def test_attention_received_matches_explicit_maps(N, H, S_, d):
    torch.manual_seed(1)
    q = torch.randn(N, H, S_, d, dtype=torch.float64)
    k = torch.randn(N, H, S_, d, dtype=torch.float64)
    scale = d**-0.5
    expected = torch.zeros(N, S_, dtype=torch.float64)
    for n in range(N):
        for h in range(H):
            logits = q[n, h] @ k[n, h].T * scale
            p = torch.exp(logits - logits.max(-1, keepdim=True).values)
            p = p / p.sum(-1, keepdim=True)
            expected[n] += p.sum(0)
    expected /= H * S_
    got = R.attention_received(q.float(), k.float(), scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # every query row is a distribution, so the received attention sums to 1 per frame
    torch.testing.assert_close(got.sum(-1), torch.ones(N), rtol=1e-5, atol=1e-5)


def test_attention_received_one_dominant_key():
    q = torch.ones(1, 2, 4, 3)
    k = torch.zeros(1, 2, 4, 3)
    k[0, :, 2] = 50.0  # every query attends (almost) only to key 2
    got = R.attention_received(q, k, 1.0)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ Stage II
def test_adjusted_ratio_formula_and_counts():
    # r' = r T / T' ; bit-exact published form in double precision
    assert R.adjusted_ratio(0.1, 32, 16) == pytest.approx(0.2)
    assert R.adjusted_ratio(0.5, 32, 8) == 1.0  # capped
    assert R.adjusted_ratio(0.1, 32, 32) == pytest.approx(0.1)
    # 196 * 0.125 = 24.5: ceil -> 25 dynamic tokens; Python round (half to even) -> 24 windows
    assert R.dynamic_keep(0.125) == 25 and R.static_windows(0.125) == 24
    # 196 * 0.375 = 73.5 -> 74 (even) windows; 196 * 0.25 = 49 exactly
    assert R.static_windows(0.375) == 74 and R.dynamic_keep(0.25) == 49 and R.static_windows(0.25) == 49
    assert R.static_windows(0.001) == 1  # never zero windows
    assert R.dynamic_keep(1.0) == 196 and R.static_windows(1.0) == 196


def test_window_bounds_split_when_not_divisible():
    b = R.window_bounds(196, 24)  # 196 = 24 * 8 + 4: first four windows have 9 positions
    assert [e - s for s, e in b] == [9] * 4 + [8] * 20
    assert b[0][0] == 0 and b[-1][1] == 196
    assert all(b[i][1] == b[i + 1][0] for i in range(23))
    assert R.window_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError):
        R.window_bounds(5, 6)


def test_frame_kinds():
    assert R.frame_kinds([(0, 0), (1, 2), (3, 7)]) == [False, False, False, False, True, True, True, False]


def test_select_tokens_dynamic_topk_raster_order_and_ties():
    P = 196
    scores = torch.zeros(1, P)
    scores[0, [150, 3, 77]] = torch.tensor([5.0, 4.0, 3.0])
    feats = torch.arange(P, dtype=torch.float32).view(1, P, 1)
    # r' = 0.02: k = ceil(3.92) = 4: the three high scores plus the lowest-index zero (position 0)
    tokens, index = R.select_tokens(feats, scores, [(0, 0)], 0.02)
    assert index[:, 1].tolist() == [0, 3, 77, 150]
    assert index[:, 0].tolist() == [0] * 4
    assert tokens[:, 0].tolist() == [0.0, 3.0, 77.0, 150.0]


def test_select_tokens_all_ties_keep_lowest_indices():
    feats = torch.randn(2, 196, 3)
    scores = torch.ones(2, 196)
    _, index = R.select_tokens(feats, scores, [(0, 1)], 0.1)  # k = ceil(19.6) = 20
    assert index[:, 1].tolist() == list(range(20)) * 2


def test_select_tokens_static_windows_top1():
    P = 196
    T = 3  # one segment of 3 frames: frame 1 is static
    torch.manual_seed(0)
    scores = torch.rand(T, P)
    feats = torch.randn(T, P, 4)
    r = 0.125  # 24 windows (first 4 of 9 positions, then 8), k = 25 for dynamic frames
    tokens, index = R.select_tokens(feats, scores, [(0, 2)], r)
    f = index[:, 0]
    assert (f == 0).sum() == 25 and (f == 1).sum() == 24 and (f == 2).sum() == 25
    static_pos = index[f == 1, 1].tolist()
    starts = [0, 9, 18, 27] + [36 + 8 * i for i in range(20)]
    for w, p in enumerate(static_pos):
        lo = starts[w]
        hi = starts[w + 1] if w + 1 < len(starts) else P
        assert lo <= p < hi
        assert scores[1, p] == scores[1, lo:hi].max()
    # output order = time order: frame 0 tokens, then the static frame, then frame 2
    assert f.tolist() == sorted(f.tolist())
    torch.testing.assert_close(tokens, feats[index[:, 0], index[:, 1]])


def test_select_tokens_static_window_tie_lowest_index():
    scores = torch.zeros(3, 10)
    feats = torch.zeros(3, 10, 1)
    _, index = R.select_tokens(feats, scores, [(0, 2)], 0.2)  # n = round(2.0) = 2 windows of 5
    assert index[index[:, 0] == 1, 1].tolist() == [0, 5]


def test_select_tokens_ratio_one_keeps_everything():
    feats = torch.randn(4, 196, 2)
    scores = torch.rand(4, 196)
    tokens, index = R.select_tokens(feats, scores, [(0, 3)], 1.0)
    assert index.shape[0] == 4 * 196
    torch.testing.assert_close(tokens, feats.reshape(-1, 2))


def test_select_tokens_batched_equals_per_video():
    torch.manual_seed(3)
    feats = torch.randn(7, 196, 5)
    scores = torch.rand(7, 196)
    segs = [[(0, 2), (3, 3)], [(0, 0), (1, 2)]]
    ratios = [0.1, 0.3]
    tokens, index = R.select_tokens_batched(feats, scores, [4, 3], segs, ratios)
    t0, i0 = R.select_tokens(feats[:4], scores[:4], segs[0], 0.1)
    t1, i1 = R.select_tokens(feats[4:], scores[4:], segs[1], 0.3)
    torch.testing.assert_close(tokens, torch.cat([t0, t1]))
    assert index.tolist() == i0.tolist() + (i1 + torch.tensor([4, 0])).tolist()


# ------------------------------------------------------------------------------ pooling
def test_pool_grid_matches_bilinear_resize_of_the_grid():
    x = torch.randn(2, 729, 3)
    got = R.pool_grid(x)
    assert got.shape == (2, 196, 3)
    grid = x.view(2, 27, 27, 3).permute(0, 3, 1, 2)
    exp = torch.nn.functional.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, exp.permute(0, 2, 3, 1).reshape(2, 196, 3))
    s = torch.rand(2, 729)
    torch.testing.assert_close(R.pool_grid(s), R.pool_grid(s.unsqueeze(-1)).squeeze(-1))
    # a constant grid stays constant
    torch.testing.assert_close(R.pool_grid(torch.full((1, 729), 0.25)), torch.full((1, 196), 0.25))


def test_compress_after_encoder_counts():
    T, Tm = 8, 4
    feats = torch.randn(Tm, 729, 6)
    scores = torch.rand(Tm, 729)
    segs = [(0, 2), (3, 3)]  # frames 0, 2, 3 dynamic, frame 1 static
    tokens, index, r_adj = R.compress_after_encoder(feats, scores, segs, 0.1, T)
    # r' = 0.1 * 8 / 4 = 0.2; 196 r' = 39.2: k = 40 per dynamic frame, n = 39 windows: 3 * 40 + 39
    assert r_adj == pytest.approx(0.2, abs=1e-15)
    assert tokens.shape == (159, 6)
    assert index[:, 0].tolist() == [0] * 40 + [1] * 39 + [2] * 40 + [3] * 40


def test_run_encoder_shrinks_frames_and_merges_scores():
    # Identity layers; 6 frames "a" (e0 at every position) then 4 frames "b" (e1); M = 5, tau = .5.
    # Prune layer 1 on a a a a a a b b b b: window cut at i = 4 -> [0,3]; c(4,6) = 0 -> s = .1: cut
    #   [4,5]; last [6,9]. [0,3] keeps 0, 1, 3 (interior F = 1, 2: sigma = 1 = tau_m, no merge, frame 2
    #   dropped), [4,5] passes, [6,9] keeps 6, 7, 9: 8 frames a a a a a b b b.
    # Prune layer 3 on those 8: [0,3] (window) keeps 0, 1, 3; [4,4] (c(4,5) = 0); [5,7] passes:
    #   7 frames a a a a b b b; refined segments [0,3], [4,6].
    # All tokens of a frame are equal, so every attention row is uniform: scores 1/9 everywhere.
    T, S_, Dm = 10, 9, 8
    hidden = torch.zeros(T, S_, Dm)
    hidden[:6, :, 0] = 1.0
    hidden[6:, :, 1] = 1.0
    layers = [lambda h: h * 1.0 for _ in range(4)]
    c = EarlyTomConfig(tau=0.5, max_window=5, prune_layers=(1, 3))
    seen = []

    def qk(i, h):
        seen.append((i, h.shape[0]))
        q = h.view(h.shape[0], S_, 2, 4).transpose(1, 2)
        return q, q, 0.5

    out, scores, refined, counts = R.run_encoder(hidden, layers, c, qk)
    assert seen == [(3, 8)]  # Q, K of the last prune layer, on the frames it receives
    assert counts == [8, 7]
    assert refined == [(0, 3), (4, 6)]
    expected = torch.zeros(7, S_, Dm)
    expected[:4, :, 0] = 1.0
    expected[4:, :, 1] = 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(scores, torch.full((7, S_), 1.0 / 9.0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="run_encoder needs EarlyTomConfig.prune_layers"):
        R.run_encoder(hidden, layers, c.replace(prune_layers=None), qk)  # no model to choose them


def test_apply_plan_weight_one_is_a_copy():
    t = torch.tensor([[1.0], [float("inf")], [3.0]])
    out = R.apply_plan(t, [(0, 1, 1.0), (2, 2, 1.0), (0, 2, 0.25)])
    torch.testing.assert_close(out, torch.tensor([[1.0], [3.0], [0.25 * 1.0 + 0.75 * 3.0]]))
