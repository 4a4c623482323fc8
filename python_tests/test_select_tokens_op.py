"""select_tokens / stage2_plan (Stage II): counts derived by hand from docs/algorithm.md, the fused
op against earlytom_ext.reference over grids of shapes, ratios, segment structures and dtypes,
ties, strides, bad inputs, opcheck, and CUDA == CPU == reference when a GPU is present."""

import math
import random

import numpy as np
import pytest
import torch

from earlytom_ext import reference as R
from earlytom_ext.ops import has_cuda_kernels, select_tokens, stage2_plan
from earlytom_ext.ops.select import Stage2Plan

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.cuda.is_available() and has_cuda_kernels()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA kernels")


# ------------------------------------------------------------------------------ helpers
def random_segments(T, rng, max_len=7):
    """Contiguous inclusive segments covering 0..T-1 with random lengths in [1, max_len]."""
    segs, s = [], 0
    while s < T:
        e = min(T - 1, s + rng.randint(1, max_len) - 1)
        segs.append((s, e))
        s = e + 1
    return segs


def segments_from_lengths(lengths):
    segs, s = [], 0
    for n in lengths:
        segs.append((s, s + n - 1))
        s += n
    return segs


STRUCTURES = {
    "one_frame": [1],
    "singles": [1, 1, 1],
    "pairs": [2, 2],
    "long": [7],
    "three": [3],
    "mix": [1, 2, 5, 3, 1, 6],
}


def make_batch(lengths_per_video, P, C, dtype, seed, extra_frames=None, scores_fn=None):
    """Merged frames of several videos: (feats, scores, segments per video, T' per video, T per video)."""
    g = torch.Generator().manual_seed(seed)
    segs = [segments_from_lengths(lens) for lens in lengths_per_video]
    counts = [sum(lens) for lens in lengths_per_video]
    if extra_frames is None:
        extra_frames = [3 * v for v in range(len(counts))]
    before = [c + x for c, x in zip(counts, extra_frames)]
    N = sum(counts)
    feats = torch.randn(N, P, C, generator=g).to(dtype)
    scores = torch.rand(N, P, generator=g) if scores_fn is None else scores_fn(N, P, g)
    return feats, scores, segs, counts, before


def check_against_reference(feats, scores, segs, counts, before, r, device="cpu"):
    plan = stage2_plan(segs, before, r, tokens_per_frame=feats.shape[1])
    ref_t, ref_i = R.select_tokens_batched(feats, scores.float(), counts, segs, plan.ratios)
    tok, idx = select_tokens(feats.to(device), scores.to(device), plan)
    assert tok.dtype == feats.dtype and idx.dtype == torch.int64
    assert tok.shape == (plan.num_out, feats.shape[2]) and idx.shape == (plan.num_out, 2)
    assert torch.equal(idx.cpu(), ref_i.cpu())
    assert torch.equal(tok.cpu(), ref_t.cpu())  # a gather: bit-exact for every dtype
    # Per-video counts of the plan match the reference output.
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    per_video = [int(((ref_i[:, 0] >= a) & (ref_i[:, 0] < b)).sum()) for a, b in zip(offs[:-1], offs[1:])]
    assert per_video == plan.tokens_per_video
    return plan, tok, idx


# ------------------------------------------------------------------------------ stage2_plan
def test_plan_round_half_even_r0125():
    # T = T' = 32, r = 0.125: r' = 0.125, P*r' = 24.5 -> k = ceil = 25, n = round-half-even = 24.
    segs = [[(0, 0), (1, 2), (3, 7), (8, 31)]]
    plan = stage2_plan(segs, [32], 0.125)
    assert plan.ratios == [0.125]
    # Kinds: (0,0) dyn; (1,2) dyn dyn; (3,7) dyn S S S dyn; (8,31) dyn + 22 static + dyn.
    expected_static = [False, False, False, False, True, True, True, False, False] + [True] * 22 + [False]
    assert plan.frame_static == expected_static
    assert plan.frame_keep == [24 if s else 25 for s in expected_static]
    assert plan.num_out == 7 * 25 + 25 * 24
    assert plan.tokens_per_video == [plan.num_out]


def test_plan_round_half_even_r025_after_merge():
    # T = 32, T' = 16, r = 0.125: r' = 0.125 / ((32*196 - 16*196) / (32*196)) = 0.25, P*r' = 49.
    segs = [[(0, 15)]]
    plan = stage2_plan(segs, [32], 0.125)
    assert plan.ratios == [0.25]
    assert plan.frame_keep == [49] + [49] * 14 + [49]
    assert plan.frame_static == [False] + [True] * 14 + [False]
    # P = 4 with r' = 0.625: P*r' = 2.5 -> k = 3, n = 2 (half to even); r' = 0.375: 1.5 -> k = 2, n = 2;
    # r' = 0.125: 0.5 -> k = 1, n = max(1, 0) = 1.
    for r, k, n in [(0.625, 3, 2), (0.375, 2, 2), (0.125, 1, 1)]:
        p = stage2_plan([[(0, 2)]], [3], r, tokens_per_frame=4)
        assert p.frame_keep == [k, n, k], (r, p)
        assert p.num_out == 2 * k + n


def test_plan_adjusted_ratio_double_precision_and_clamp():
    # r = 0.1, T = 32, T' = 20: r' = 0.1 / 0.625 = 0.16 (as the published double formula gives);
    # P*r' = 31.36 -> k = 32, n = 31.
    plan = stage2_plan([[(0, 19)]], [32], 0.1)
    assert plan.ratios[0] == 0.1 / ((32 * 196 - 12 * 196) / (32 * 196))
    assert plan.frame_keep[0] == 32 and plan.frame_keep[1] == 31
    # r' clamps at 1: every token of every frame.
    plan = stage2_plan([[(0, 3), (4, 7)]], [32], 0.5)
    assert plan.ratios == [1.0]
    assert plan.frame_keep == [196] * 8 and plan.num_out == 8 * 196


def test_plan_batch_different_ratios():
    # Video 0: T = 32, T' = 8, r = 0.1 -> r' = 0.4, P*r' = 78.4 -> k = 79, n = 78.
    # Video 1: T = T' = 4, r = 0.1 -> r' = 0.1, P*r' = 19.6 -> k = 20, n = 20.
    segs = [[(0, 1), (2, 7)], [(0, 0), (1, 3)]]
    plan = stage2_plan(segs, [32, 4], 0.1)
    assert plan.ratios[0] == pytest.approx(0.4, abs=1e-15) and plan.ratios[1] == 0.1
    assert plan.frame_keep == [79, 79, 79, 78, 78, 78, 78, 79, 20, 20, 20, 20]
    assert plan.frame_static == [False, False, False, True, True, True, True, False, False, False, True, False]
    assert plan.tokens_per_video == [4 * 79 + 4 * 78, 3 * 20 + 20]
    assert plan.num_out == sum(plan.tokens_per_video)
    # Per-video retain ratios.
    plan2 = stage2_plan(segs, [32, 4], [0.1, 0.05])
    assert plan2.frame_keep[:8] == plan.frame_keep[:8]
    assert plan2.frame_keep[8:] == [10, 10, 10, 10]  # P*0.05 = 9.8 -> k = 10, n = 10


def test_plan_uses_reference_definitions():
    rng = random.Random(0)
    for _ in range(50):
        Tm = rng.randint(1, 32)
        T = Tm + rng.randint(0, 32)
        r = rng.choice([0.01, 0.05, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0])
        P = rng.choice([1, 5, 196, 729])
        segs = random_segments(Tm, rng)
        plan = stage2_plan([segs], [T], r, tokens_per_frame=P)
        r_adj = min(r / ((T * P - (T - Tm) * P) / (T * P)), 1.0)
        assert plan.ratios == [r_adj]
        k, n = math.ceil(P * r_adj), max(1, round(P * r_adj))
        kinds = R.frame_kinds(segs)
        assert plan.frame_static == kinds
        assert plan.frame_keep == [n if s else k for s in kinds]


@pytest.mark.parametrize(
    "segs, before, r, exc, match",
    [
        ([[(1, 3)]], [4], 0.1, ValueError, "start at frame 0"),
        ([[(0, 1), (3, 4)]], [5], 0.1, ValueError, "in order without gaps or overlaps"),
        ([[(0, 2), (2, 4)]], [5], 0.1, ValueError, "in order without gaps or overlaps"),
        ([[(0, 1), (2, 1)]], [5], 0.1, ValueError, "start <= end"),
        ([[]], [5], 0.1, ValueError, "at least one segment"),
        ([], [], 0.1, ValueError, "at least one video"),
        ([[(0, 4)]], [5, 6], 0.1, ValueError, "one entry per video"),
        ([[(0, 4)]], [3], 0.1, ValueError, "frames_before"),
        ([[(0, 4)]], [5], 0.0, ValueError, "retain_ratio"),
        ([[(0, 4)]], [5], 1.5, ValueError, "retain_ratio"),
        ([[(0, 4)]], [5], float("nan"), ValueError, "retain_ratio"),
        ([[(0, 4)]], [5], True, TypeError, "retain_ratio"),
        ([[(0, 4)]], [5], [0.1, 0.2], ValueError, "retain_ratio"),
        ([[(0, 4.0)]], [5], 0.1, TypeError, "int"),
        ([[(0,)]], [5], 0.1, TypeError, "pair"),
        ([[(0, 4)]], [5.0], 0.1, TypeError, "frames_before"),
        ("abc", [5], 0.1, TypeError, "segments_per_video"),
        # ratios outside (0, 1] and non-real ratios, scalar or per video
        ([[(0, 4)]], [5], -0.1, ValueError, r"retain_ratio must be in \(0, 1\], got -0.1"),
        ([[(0, 4)]], [5], float("inf"), ValueError, r"retain_ratio must be a float in \(0, 1\], got inf"),
        ([[(0, 4)]], [5], 1.0 + 1e-9, ValueError, r"retain_ratio must be in \(0, 1\]"),
        ([[(0, 4)]], [5], "0.1", TypeError, r"retain_ratio must be a float in \(0, 1\]"),
        ([[(0, 4)]], [5], None, TypeError, r"retain_ratio must be a float in \(0, 1\]"),
        ([[(0, 4)], [(0, 1)]], [5, 2], [0.1, 0.0], ValueError, r"retain_ratio\[1\] must be in \(0, 1\], got 0.0"),
        ([[(0, 4)], [(0, 1)]], [5, 2], [0.1, "0.2"], TypeError, r"retain_ratio\[1\] must be a float in \(0, 1\]"),
        ([[(0, 4)]], [5], torch.tensor([[0.1]]), ValueError, "retain_ratio must be a float or a 1-D tensor"),
        # frames_before of the wrong form or too large for the double-precision ratio
        ([[(0, 4)]], torch.tensor([5.0]), 0.1, TypeError, "frames_before must hold integers"),
        ([[(0, 4)]], torch.tensor([[5]]), 0.1, ValueError, r"frames_before must be 1-D \[B\]"),
        ([[(0, 4)]], 5, 0.1, TypeError, "frames_before must be a 1-D int tensor or a list of ints"),
        ([[(0, 4)]], [True], 0.1, TypeError, r"frames_before\[0\] must be an int, got bool"),
        ([[(0, 0)]], [10**400], 0.1, ValueError, r"frames_before\[0\] must be < 2\*\*63"),  # was ZeroDivisionError
        # segments of the wrong form
        ([torch.tensor([[0.0, 4.0]])], [5], 0.1, TypeError, r"segments_per_video\[0\] must hold integer frame indices"),
        (
            [torch.tensor([0, 4])],
            [5],
            0.1,
            ValueError,
            r"segments_per_video\[0\] must be a list of \(start, end\) pairs or a \[K, 2\] tensor",
        ),
        (torch.tensor([[[0, 4]]]), [5], 0.1, TypeError, "segments_per_video must be a list"),
        ([[(-1, 4)]], [6], 0.1, ValueError, "should start at frame 0"),
    ],
)
def test_plan_bad_inputs(segs, before, r, exc, match):
    with pytest.raises(exc, match=match):
        stage2_plan(segs, before, r)


def test_plan_bad_tokens_per_frame():
    with pytest.raises(ValueError, match="tokens_per_frame"):
        stage2_plan([[(0, 0)]], [1], 0.1, tokens_per_frame=0)
    for bad in (196.0, True, "196"):
        with pytest.raises(TypeError, match="tokens_per_frame must be an int"):
            stage2_plan([[(0, 0)]], [1], 0.1, tokens_per_frame=bad)
    for big in (2**31, 2**63, 10**400):  # the op holds a frame's positions in int32
        with pytest.raises(ValueError, match=r"tokens_per_frame must be in \[1, 2\*\*31\)"):
            stage2_plan([[(0, 0)]], [1], 0.1, tokens_per_frame=big)
    stage2_plan([[(0, 0)]], [1], 0.1, tokens_per_frame=2**31 - 1)


def test_plan_segments_per_video_must_be_a_sequence():
    for bad in ({0: [(0, 1)]}, {((0, 1),)}, iter([[(0, 1)]])):
        with pytest.raises(TypeError, match="segments_per_video must be a list"):
            stage2_plan(bad, [3], 0.1)


def test_plan_ratio_forms():
    """A 0-d tensor / NumPy scalar ratio and a 1-D tensor of per-video ratios (a 0-d tensor used
    to fail with 'iteration over a 0-d tensor', a 1-D one was rejected)."""
    segs = [[(0, 3)], [(0, 0), (1, 2)]]
    ref = stage2_plan(segs, [8, 3], 0.25)
    assert stage2_plan(segs, [8, 3], torch.tensor(0.25)) == ref
    assert stage2_plan(segs, [8, 3], np.float32(0.25)) == ref
    assert stage2_plan(segs, [8, 3], np.array(0.25)) == ref  # a 0-d NumPy array
    assert stage2_plan(segs, [8, 3], torch.tensor([0.25, 0.25], dtype=torch.float64)) == ref
    assert stage2_plan(segs, [8, 3], (0.25, 0.25)) == ref
    assert stage2_plan(segs, torch.tensor([8, 3]), 0.25) == ref


def test_plan_accepts_segment_tensors():
    segs = torch.tensor([[0, 0], [1, 4]])
    assert stage2_plan([segs], [5], 0.2) == stage2_plan([[(0, 0), (1, 4)]], [5], 0.2)


# ------------------------------------------------------------------------------ hand-derived selections
def test_dynamic_ties_lowest_index_raster_order():
    # P = 5, r' = 0.4 -> k = 2. Scores [1, 3, 3, 2, 3]: the three 3s tie; the lowest indices win -> 1, 2.
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    feats = torch.arange(5 * 2, dtype=torch.float32).view(1, 5, 2)
    plan = stage2_plan([[(0, 0)]], [1], 0.4, tokens_per_frame=5)
    assert plan.frame_keep == [2]
    tok, idx = select_tokens(feats, scores, plan)
    assert idx.tolist() == [[0, 1], [0, 2]]
    assert tok.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    # Raster order, not score order: [5, 1, 9, 0, 7] with k = 3 -> positions 0, 2, 4.
    plan3 = stage2_plan([[(0, 0)]], [1], 0.6, tokens_per_frame=5)
    _, idx = select_tokens(feats, torch.tensor([[5.0, 1.0, 9.0, 0.0, 7.0]]), plan3)
    assert idx[:, 1].tolist() == [0, 2, 4]


def test_static_windows_hand_derived():
    # Segment (0, 2), P = 7, r' = 3/7 -> n = 3 windows: [0, 3), [3, 5), [5, 7) (first 7 mod 3 = 1 longer).
    r = 3 / 7
    plan = stage2_plan([[(0, 2)]], [3], r, tokens_per_frame=7)
    assert plan.frame_static == [False, True, False] and plan.frame_keep[1] == 3
    scores = torch.zeros(3, 7)
    scores[1] = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.2, 0.0, 0.9])  # ties inside windows 0 and 1
    feats = torch.randn(3, 7, 4)
    _, idx = select_tokens(feats, scores, plan)
    static_rows = idx[idx[:, 0] == 1, 1].tolist()
    assert static_rows == [1, 3, 6]


def test_constant_scores_pick_first_positions_and_window_starts():
    P = 196
    plan = stage2_plan([[(0, 4)]], [5], 0.1, tokens_per_frame=P)  # k = 20, n = 20
    feats = torch.randn(5, P, 3)
    _, idx = select_tokens(feats, torch.full((5, P), 0.5), plan)
    idx = idx.tolist()
    assert [p for f, p in idx if f == 0] == list(range(20))
    # 196 = 20 * 9 + 16: the first 16 windows hold 10 positions, the last 4 hold 9.
    starts = [10 * w if w < 16 else 160 + 9 * (w - 16) for w in range(20)]
    assert [p for f, p in idx if f == 2] == starts


# ------------------------------------------------------------------------------ parity with the reference
@pytest.mark.parametrize("P", [1, 5, 196, 729])
@pytest.mark.parametrize("r", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_parity_structures(P, r):
    C = 8 if P == 729 else 16
    lengths = [STRUCTURES[k] for k in ("one_frame", "singles", "pairs", "long", "three", "mix")]
    feats, scores, segs, counts, before = make_batch(
        lengths, P, C, torch.float32, seed=P * 1000 + int(r * 100), extra_frames=[0, 1, 4, 9, 2, 30]
    )
    check_against_reference(feats, scores, segs, counts, before, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 3, 64, 130])
def test_parity_dtypes_bit_exact(dtype, C):
    rng = random.Random(C)
    lengths = [[rng.randint(1, 6) for _ in range(rng.randint(1, 6))] for _ in range(3)]
    feats, scores, segs, counts, before = make_batch(lengths, 196, C, dtype, seed=C, extra_frames=[0, 5, 11])
    check_against_reference(feats, scores, segs, counts, before, 0.1)


@pytest.mark.parametrize("seed", range(6))
def test_parity_random_batches(seed):
    rng = random.Random(100 + seed)
    B = rng.randint(1, 5)
    lengths = [[rng.randint(1, 7) for _ in range(rng.randint(1, 8))] for _ in range(B)]
    P = rng.choice([5, 49, 196])
    feats, scores, segs, counts, before = make_batch(
        lengths, P, 12, rng.choice(DTYPES), seed=seed, extra_frames=[rng.randint(0, 20) for _ in range(B)]
    )
    r = rng.choice([0.05, 0.1, 0.15, 0.2, 0.3])
    check_against_reference(feats, scores, segs, counts, before, r)


@pytest.mark.parametrize("kind", ["constant", "few_values", "signed_zeros_and_infs", "integers"])
@pytest.mark.parametrize("P", [5, 196, 729])
def test_parity_ties(kind, P):
    def scores_fn(N, P, g):
        if kind == "constant":
            return torch.full((N, P), 0.25)
        if kind == "few_values":
            return torch.randint(0, 3, (N, P), generator=g).float() / 3
        if kind == "integers":
            return torch.randint(0, 50, (N, P), generator=g).float()
        s = torch.randint(0, 4, (N, P), generator=g).float()
        table = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
        return table[s.long()]

    lengths = [[1, 2, 5], [4, 1], [7]]
    for r in (0.1, 0.25, 0.5):
        feats, scores, segs, counts, before = make_batch(
            lengths, P, 4, torch.float32, seed=P, scores_fn=scores_fn, extra_frames=[0, 2, 3]
        )
        check_against_reference(feats, scores, segs, counts, before, r)


@pytest.mark.parametrize("P", [4096, 8192])
def test_parity_large_p(P):
    """Frames as large as the CUDA kernel takes, with many ties, on the CPU against the reference
    (the CUDA tests compare these sizes with the CPU op)."""
    feats, scores, segs, counts, before = make_batch(
        [[1, 3]],
        P,
        4,
        torch.float32,
        seed=P,
        scores_fn=lambda N, P, g: torch.randint(0, 7, (N, P), generator=g).float(),
    )
    for r in (0.01, 0.05, 0.5):
        check_against_reference(feats, scores, segs, counts, before, r)


def test_single_video_matches_reference_select_tokens():
    feats, scores, segs, counts, before = make_batch([[2, 5, 1, 3]], 196, 10, torch.bfloat16, seed=7, extra_frames=[21])
    plan = stage2_plan(segs, before, 0.1)
    ref_t, ref_i = R.select_tokens(feats, scores, segs[0], plan.ratios[0])
    tok, idx = select_tokens(feats, scores, plan)
    assert torch.equal(idx, ref_i) and torch.equal(tok, ref_t)


# ------------------------------------------------------------------------------ layouts and dtypes of inputs
def test_non_contiguous_feats_and_scores():
    lengths = [[1, 2, 5], [3, 3]]
    feats, scores, segs, counts, before = make_batch(lengths, 196, 24, torch.float16, seed=3, extra_frames=[4, 0])
    plan = stage2_plan(segs, before, 0.1)
    ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
    N = feats.shape[0]
    variants = {
        # channels non-contiguous (stride P)
        "channels_last_strided": feats.permute(0, 2, 1).contiguous().permute(0, 2, 1),
        # every other position of a larger tensor
        "position_step": torch.zeros(N, 392, 24, dtype=feats.dtype).index_copy_(1, torch.arange(0, 392, 2), feats)[
            :, ::2
        ],
        # a channel slice with an odd offset (rows not 16-byte aligned)
        "channel_slice": torch.cat(
            [torch.zeros(N, 196, 1, dtype=feats.dtype), feats, torch.zeros(N, 196, 3, dtype=feats.dtype)], dim=2
        )[:, :, 1:25],
        # frames interleaved with another tensor
        "frame_step": torch.stack([feats, torch.zeros_like(feats)], dim=1).view(2 * N, 196, 24)[::2],
        # expanded (stride 0) channels
        "expanded": feats[:, :, :1].expand(N, 196, 24),
    }
    for name, v in variants.items():
        exp_t, exp_i = R.select_tokens_batched(v, scores, counts, segs, plan.ratios)
        assert torch.equal(exp_i, ref_i), name
        if name != "expanded":
            assert torch.equal(v, feats), name
            assert torch.equal(exp_t, ref_t), name
        tok, idx = select_tokens(v, scores.t().contiguous().t(), plan)
        assert torch.equal(idx, exp_i), name
        assert torch.equal(tok, exp_t), name
        assert tok.is_contiguous()


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_are_upcast(sdtype):
    feats, scores, segs, counts, before = make_batch([[2, 4]], 196, 8, torch.float32, seed=11)
    scores = scores.to(sdtype)
    plan = stage2_plan(segs, before, 0.1)
    ref_t, ref_i = R.select_tokens_batched(feats, scores.float(), counts, segs, plan.ratios)
    tok, idx = select_tokens(feats, scores, plan)
    assert torch.equal(idx, ref_i) and torch.equal(tok, ref_t)


# ------------------------------------------------------------------------------ bad inputs
def _good():
    feats, scores, segs, counts, before = make_batch([[1, 3]], 5, 4, torch.float32, seed=0)
    return feats, scores, stage2_plan(segs, before, 0.4, tokens_per_frame=5)


def test_nan_scores_raise():
    feats, scores, plan = _good()
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_tokens(feats, scores, plan)


def test_nan_scores_unchecked_rank_highest_like_torch_sort():
    feats, scores, segs, counts, before = make_batch([[1, 3], [2]], 196, 4, torch.float32, seed=5)
    scores[0, 7] = float("nan")
    scores[2, 100:110] = float("nan")
    scores[3, ::3] = float("nan")
    plan = stage2_plan(segs, before, 0.1)
    ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
    tok, idx = select_tokens(feats, scores, plan, check_nan=False)
    assert torch.equal(idx, ref_i) and torch.equal(tok, ref_t)
    for flag in ("off", 0):
        with pytest.raises(TypeError, match=f"check_nan must be a bool or None, got {flag!r}"):
            select_tokens(feats, scores, plan, check_nan=flag)


def test_bad_wrapper_inputs():
    feats, scores, plan = _good()
    with pytest.raises(TypeError, match="feats"):
        select_tokens(feats.int(), scores, plan)
    with pytest.raises(TypeError, match="feats"):
        select_tokens(feats.numpy(), scores, plan)
    with pytest.raises(ValueError, match="feats"):
        select_tokens(feats[0], scores, plan)
    with pytest.raises(TypeError, match="scores"):
        select_tokens(feats, scores.double(), plan)
    with pytest.raises(ValueError, match="scores"):
        select_tokens(feats, scores[:, :4], plan)
    with pytest.raises(ValueError, match="scores"):
        select_tokens(feats, scores[:3], plan)
    with pytest.raises(ValueError, match="frame"):
        select_tokens(feats[:3], scores[:3], plan)
    with pytest.raises(ValueError, match=r"frame_keep\[1\]"):
        select_tokens(feats, scores, plan._replace(frame_keep=[2, 6, 2, 2]))
    with pytest.raises(ValueError, match=r"frame_keep\[0\]"):
        select_tokens(feats, scores, plan._replace(frame_keep=[0, 2, 2, 2]))
    with pytest.raises(ValueError, match="num_out"):
        select_tokens(feats, scores, plan._replace(num_out=plan.num_out + 1))
    for beyond in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="num_out must equal sum.*beyond int64"):
            select_tokens(feats, scores, plan._replace(num_out=beyond))
    with pytest.raises(ValueError, match="num_out"):
        select_tokens(feats, scores, plan._replace(num_out=-1))
    with pytest.raises(TypeError, match="plan"):
        select_tokens(feats, scores, (1, 2))


def test_bad_plan_entries():
    """frame_keep / frame_static entries of the wrong type used to be truncated/coerced silently
    (int(2.7) == 2, bool("no") is True)."""
    feats, scores, plan = _good()
    keep = plan.frame_keep
    with pytest.raises(TypeError, match=r"plan.frame_keep\[0\] must be an int, got float"):
        select_tokens(feats, scores, plan._replace(frame_keep=[k + 0.7 for k in keep]))
    with pytest.raises(TypeError, match=r"plan.frame_keep\[0\] must be an int, got bool"):
        select_tokens(feats, scores, plan._replace(frame_keep=[True] * 4, num_out=4))
    with pytest.raises(TypeError, match=r"plan.frame_keep\[0\] must be an int, got str"):
        select_tokens(feats, scores, plan._replace(frame_keep=[str(k) for k in keep]))
    with pytest.raises(TypeError, match="plan.frame_keep must hold integers"):
        select_tokens(feats, scores, plan._replace(frame_keep=torch.tensor(keep, dtype=torch.float32)))
    with pytest.raises(TypeError, match="plan.frame_keep must be a 1-D int tensor or a list of ints, got NoneType"):
        select_tokens(feats, scores, plan._replace(frame_keep=None))
    with pytest.raises(TypeError, match=r"plan.frame_static\[0\] must be a bool, got str"):
        select_tokens(feats, scores, plan._replace(frame_static=["no"] * 4))
    with pytest.raises(TypeError, match=r"plan.frame_static\[1\] must be a bool, got int"):
        select_tokens(feats, scores, plan._replace(frame_static=[False, 2, False, False]))
    with pytest.raises(TypeError, match="plan.frame_static must hold bools"):
        select_tokens(feats, scores, plan._replace(frame_static=torch.tensor(plan.frame_static).long()))
    with pytest.raises(ValueError, match=r"plan.frame_static must be 1-D"):
        select_tokens(feats, scores, plan._replace(frame_static=torch.tensor([plan.frame_static])))
    # tensors and NumPy arrays of the right kind are accepted
    ref = select_tokens(feats, scores, plan)
    for alt in (
        plan._replace(frame_keep=torch.tensor(keep), frame_static=torch.tensor(plan.frame_static)),
        plan._replace(frame_keep=np.array(keep), frame_static=np.array(plan.frame_static)),
    ):
        out = select_tokens(feats, scores, alt)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_bad_dtypes_and_empty_shapes():
    feats, scores, plan = _good()
    with pytest.raises(TypeError, match=r"feats must have dtype in \(float32, float16, bfloat16\), got float64"):
        select_tokens(feats.double(), scores, plan)
    with pytest.raises(TypeError, match="feats must have dtype .* got bool"):
        select_tokens(feats > 0, scores, plan)
    with pytest.raises(TypeError, match="scores must have dtype .* got int64"):
        select_tokens(feats, (scores * 10).long(), plan)
    with pytest.raises(TypeError, match="scores must have dtype .* got bool"):
        select_tokens(feats, scores > 0.5, plan)
    # P = 0: no position to select from
    msg = r"feats must have P >= 1 positions per frame \[N, P, C\], got shape \[4, 0, 4\]"
    with pytest.raises(ValueError, match=msg):
        select_tokens(feats[:, :0], scores[:, :0], plan)
    with pytest.raises(ValueError, match=r"feats must have P >= 1 positions"):
        select_tokens(feats[:0, :0], scores[:0, :0], Stage2Plan([], [], 0, [], []))
    # N' = 0 with an empty plan: empty outputs
    tok, idx = select_tokens(feats[:0], scores[:0], Stage2Plan([], [], 0, [], []))
    assert tok.shape == (0, 4) and tok.dtype == feats.dtype and idx.shape == (0, 2) and idx.dtype == torch.int64
    msg = r"frame_keep must have shape \[0\] \(one entry per frame of feats\), got \[4\]"
    with pytest.raises(ValueError, match=msg):
        select_tokens(feats[:0], scores[:0], plan)


def test_zero_channels():
    """C = 0: the positions are still selected (index as the reference), the tokens are empty rows."""
    feats, scores, segs, counts, before = make_batch([[1, 3], [2]], 5, 0, torch.float32, seed=8)
    plan, tok, idx = check_against_reference(feats, scores, segs, counts, before, 0.4)
    assert tok.shape == (plan.num_out, 0)


def test_bad_raw_op_inputs():
    feats, scores, plan = _good()
    keep = torch.tensor(plan.frame_keep)
    static = torch.tensor(plan.frame_static)
    op = torch.ops.earlytom.select_tokens
    with pytest.raises(ValueError, match="num_out"):
        op(feats, scores, keep, static, plan.num_out - 1)
    with pytest.raises(ValueError, match="frame_keep"):
        op(feats, scores, keep * 3, static, 3 * plan.num_out)
    with pytest.raises(TypeError, match="frame_keep"):
        op(feats, scores, keep.int(), static, plan.num_out)
    with pytest.raises(TypeError, match="frame_static"):
        op(feats, scores, keep, static.long(), plan.num_out)
    with pytest.raises(ValueError, match="frame_static"):
        op(feats, scores, keep, static[:2], plan.num_out)
    with pytest.raises(TypeError, match="scores"):
        op(feats, scores.half(), keep, static, plan.num_out)
    with pytest.raises(TypeError, match="feats"):
        op(feats.double(), scores, keep, static, plan.num_out)
    with pytest.raises(ValueError, match="scores"):
        op(feats, scores.t(), keep, static, plan.num_out)


def test_raw_op_empty():
    tok, idx = torch.ops.earlytom.select_tokens(
        torch.zeros(0, 5, 3), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), 0
    )
    assert tok.shape == (0, 3) and idx.shape == (0, 2)


def test_opcheck_cpu():
    for dtype in DTYPES:
        feats, scores, segs, counts, before = make_batch([[1, 2, 4]], 196, 8, dtype, seed=1)
        plan = stage2_plan(segs, before, 0.1)
        args = (feats, scores, torch.tensor(plan.frame_keep), torch.tensor(plan.frame_static), plan.num_out)
        torch.library.opcheck(torch.ops.earlytom.select_tokens.default, args)


def test_plan_type():
    plan = stage2_plan([[(0, 0)]], [1], 0.1)
    assert isinstance(plan, Stage2Plan) and plan._fields == (
        "frame_keep",
        "frame_static",
        "num_out",
        "ratios",
        "tokens_per_video",
    )


# ------------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.parametrize("P", [1, 5, 196, 729])
@pytest.mark.parametrize("r", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_cuda_parity_structures(P, r):
    lengths = [STRUCTURES[k] for k in ("one_frame", "singles", "pairs", "long", "three", "mix")]
    for dtype in DTYPES:
        feats, scores, segs, counts, before = make_batch(
            lengths, P, 24, dtype, seed=P + int(r * 1000), extra_frames=[0, 1, 4, 9, 2, 30]
        )
        plan, tok_cpu, idx_cpu = check_against_reference(feats, scores, segs, counts, before, r, device="cpu")
        tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
        assert tok.is_cuda and idx.is_cuda
        assert torch.equal(idx.cpu(), idx_cpu) and torch.equal(tok.cpu(), tok_cpu)


@needs_cuda
@pytest.mark.parametrize("kind", ["constant", "few_values", "signed_zeros_and_infs", "nan"])
def test_cuda_ties_and_nan(kind):
    g = torch.Generator().manual_seed(2)
    for P in (5, 196, 729):
        feats, _, segs, counts, before = make_batch([[1, 2, 5], [7]], P, 8, torch.float16, seed=P)
        N = feats.shape[0]
        if kind == "constant":
            scores = torch.full((N, P), -1.5)
        elif kind == "few_values":
            scores = torch.randint(0, 3, (N, P), generator=g).float()
        elif kind == "nan":
            scores = torch.rand(N, P, generator=g)
            scores[torch.rand(N, P, generator=g) < 0.1] = float("nan")
        else:
            table = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
            scores = table[torch.randint(0, 4, (N, P), generator=g)]
        for r in (0.1, 0.3):
            plan = stage2_plan(segs, before, r, tokens_per_frame=P)
            ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
            tok_c, idx_c = select_tokens(feats, scores, plan, check_nan=False)
            tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
            assert torch.equal(idx_c, ref_i) and torch.equal(tok_c, ref_t)
            assert torch.equal(idx.cpu(), ref_i) and torch.equal(tok.cpu(), ref_t)


@needs_cuda
def test_cuda_layouts_and_alignment():
    feats, scores, segs, counts, before = make_batch([[1, 2, 5], [3, 3]], 196, 37, torch.bfloat16, seed=9)
    plan = stage2_plan(segs, before, 0.1)
    ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
    f = feats.cuda()
    N = f.shape[0]
    variants = [
        f,  # 74-byte rows: 2-byte copies
        torch.cat([torch.zeros(N, 196, 3, dtype=f.dtype, device="cuda"), f], 2)[:, :, 3:],  # odd offset
        f.permute(0, 2, 1).contiguous().permute(0, 2, 1),  # channels strided
        torch.stack([f, torch.zeros_like(f)], 1).view(2 * N, 196, 37)[::2],  # frame stride
    ]
    for v in variants:
        tok, idx = select_tokens(v, scores.cuda(), plan)
        assert torch.equal(idx.cpu(), ref_i) and torch.equal(tok.cpu(), ref_t)
    # 16-byte rows (C = 64 fp32 / 128 bf16) and 8-byte rows (C = 2 fp32).
    for C, dt in [(64, torch.float32), (128, torch.bfloat16), (2, torch.float32), (3584, torch.bfloat16)]:
        feats, scores, segs, counts, before = make_batch([[1, 2, 6], [4]], 196, C, dt, seed=C)
        plan = stage2_plan(segs, before, 0.1)
        ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
        tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
        assert torch.equal(idx.cpu(), ref_i) and torch.equal(tok.cpu(), ref_t)


@needs_cuda
def test_cuda_many_frames_scan_path():
    # More than 4096 frames: the frame offsets come from the separate scan launch.
    rng = random.Random(4)
    lengths = [[rng.randint(1, 7) for _ in range(300)] for _ in range(5)]
    feats, scores, segs, counts, before = make_batch(lengths, 5, 4, torch.float32, seed=4)
    assert feats.shape[0] > 4096
    plan = stage2_plan(segs, before, 0.3, tokens_per_frame=5)
    tok_c, idx_c = select_tokens(feats, scores, plan)
    tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
    assert torch.equal(idx.cpu(), idx_c) and torch.equal(tok.cpu(), tok_c)


@needs_cuda
def test_cuda_large_p_and_limit():
    feats, scores, segs, counts, before = make_batch([[1, 3]], 4096, 4, torch.float32, seed=1)
    plan = stage2_plan(segs, before, 0.05, tokens_per_frame=4096)
    tok_c, idx_c = select_tokens(feats, scores, plan)
    tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
    assert torch.equal(idx.cpu(), idx_c) and torch.equal(tok.cpu(), tok_c)
    big = stage2_plan([[(0, 0)]], [1], 0.01, tokens_per_frame=8193)
    with pytest.raises(ValueError, match="8192"):
        select_tokens(torch.zeros(1, 8193, 2, device="cuda"), torch.zeros(1, 8193, device="cuda"), big)


@needs_cuda
def test_cuda_max_positions_and_empty():
    # P = 8192: the largest frame the kernel takes (all keys of a frame in shared memory), with ties.
    feats, scores, segs, counts, before = make_batch(
        [[1, 3]],
        8192,
        4,
        torch.float32,
        seed=2,
        scores_fn=lambda N, P, g: torch.randint(0, 7, (N, P), generator=g).float(),
    )
    for r in (0.01, 0.5):
        plan = stage2_plan(segs, before, r, tokens_per_frame=8192)
        ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
        tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
        assert torch.equal(idx.cpu(), ref_i) and torch.equal(tok.cpu(), ref_t)
    # No frames at all.
    tok, idx = torch.ops.earlytom.select_tokens(
        torch.zeros(0, 5, 3, device="cuda"),
        torch.zeros(0, 5, device="cuda"),
        torch.zeros(0, dtype=torch.long, device="cuda"),
        torch.zeros(0, dtype=torch.bool, device="cuda"),
        0,
    )
    assert tok.is_cuda and tok.shape == (0, 3) and idx.shape == (0, 2)


@needs_cuda
def test_cuda_no_host_sync():
    feats, scores, segs, counts, before = make_batch([[1, 2, 5], [3]], 196, 64, torch.bfloat16, seed=5)
    plan = stage2_plan(segs, before, 0.1)
    f, s = feats.cuda(), scores.cuda()
    select_tokens(f, s, plan)  # warm-up (allocator, pinned pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tok, idx = select_tokens(f, s, plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_t, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
    assert torch.equal(idx.cpu(), ref_i) and torch.equal(tok.cpu(), ref_t)


@needs_cuda
def test_cuda_bad_device_mix():
    feats, scores, plan = _good()
    with pytest.raises(ValueError, match="device"):
        select_tokens(feats.cuda(), scores, plan)
    with pytest.raises(ValueError, match=r"scores must be on the device of feats \(cpu\)"):
        select_tokens(feats, scores.cuda(), plan)


@needs_cuda
def test_cuda_zero_channels_and_plan_tensors():
    feats, scores, segs, counts, before = make_batch([[1, 3], [2]], 5, 0, torch.bfloat16, seed=8)
    plan = stage2_plan(segs, before, 0.4, tokens_per_frame=5)
    _, ref_i = R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
    tok, idx = select_tokens(feats.cuda(), scores.cuda(), plan)
    assert tok.is_cuda and tok.shape == (plan.num_out, 0) and torch.equal(idx.cpu(), ref_i)
    # frame_keep / frame_static given as CUDA tensors (one host copy in the wrapper)
    plan_t = plan._replace(
        frame_keep=torch.tensor(plan.frame_keep, device="cuda"),
        frame_static=torch.tensor(plan.frame_static, device="cuda"),
    )
    _, idx = select_tokens(feats.cuda(), scores.cuda(), plan_t)
    assert torch.equal(idx.cpu(), ref_i)


@needs_cuda
def test_cuda_raw_op_inconsistent_plan_never_reads_out_of_bounds():
    # num_out larger than sum(frame_keep): the op cannot check it without a sync; the extra rows
    # must come back zero-filled with out-of-range indices left untouched (no crash).
    feats = torch.randn(2, 5, 3, device="cuda")
    scores = torch.rand(2, 5, device="cuda")
    keep = torch.tensor([2, 9], device="cuda")  # 9 > P: clamped to P
    static = torch.tensor([False, True], device="cuda")
    tok, idx = torch.ops.earlytom.select_tokens(feats, scores, keep, static, 4)
    torch.cuda.synchronize()
    assert tok.shape == (4, 3)
    # frame 0 is consistent (keep 2 <= P, offset 0): its rows are the reference's
    ref_t, ref_i = R.select_tokens(feats[:1].cpu(), scores[:1].cpu(), [(0, 0)], 2 / 5)
    assert torch.equal(idx[:2].cpu(), ref_i) and torch.equal(tok[:2].cpu(), ref_t)
