"""Values of earlytom_ext.apply on tiny random LLaVA-OneVision models, beyond float32 and left padding.

* float16 / bfloat16 models: the compressed tokens against the reference pipeline run by hand
  (embeddings, encoder layers one by one, Stage I / score / refined segmentation / pooling /
  Stage II from earlytom_ext.reference), with dtype tolerances.
* right-padded batches: the patched model's logits against the language model run by hand on
  the reference tokens.
* forced decisions (``handle.force_decisions``): Stage I plans and refined segments fixed by
  hand, so the token counts follow from the spec's Stage II formula alone; the counts are written
  below, and the kept tokens are checked against the reference pipeline run with the same plans.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

pytest.importorskip("transformers")

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig, ops  # noqa: E402
from earlytom_ext import reference as R  # noqa: E402

CFG = EarlyTomConfig(retain_ratio=0.2, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
T = 8
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not earlytom_ext._ext.has_cuda_kernels(),
    reason="needs a CUDA device and the CUDA kernels",
)
# Kept-token tolerance per dtype. Stage I merges in fp32 and rounds once to the model dtype, so a
# merged frame may differ from the reference's by one rounding of the dtype, which the later
# encoder layers carry on; decisions (segments, kept positions) must still be identical.
TOL = {
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


@pytest.fixture(scope="module")
def videos():
    # A crossfade (merges at the later prune layers) and a static shot (merges at every one).
    return [tm.make_video(T, seed=5, kind="crossfade", scene_length=3), tm.make_video(T, seed=2, kind="static")]


_layers = tm.vision_layers
_call_layer = tm.call_layer


_qk = tm.layer_qk


@torch.no_grad()
def reference_video(model, video, cfg, plans=None, refined=None):
    """Compressed tokens of one video ``[T, 3, H, W]`` by the reference, run layer by layer.

    ``plans``: ``{prune layer: plan}`` (local frame indices) forced in place of the reference's
    Stage I; ``refined``: the refined segments forced in place of its segmentation. Returns
    ``(tokens + newline, index, segments, frames after each prune layer, r')``.
    """
    vm, layers = _layers(model)
    hidden = vm.embeddings(video.to(device=model.device, dtype=model.dtype))
    last = cfg.prune_layers[-1]
    scores, segs, counts = None, None, []
    for i, layer in enumerate(layers):  # vision_feature_layer = -1: every layer
        if i == last:
            scores = R.attention_received(*_qk(layer, hidden))
        hidden = _call_layer(layer, hidden)
        if i in cfg.prune_layers:
            plan = plans[i] if plans is not None else R.merge_plan(hidden, cfg)[0]
            hidden = R.apply_plan(hidden, plan)
            if i == last:
                scores = R.apply_plan(scores, plan)
                segs = refined if refined is not None else R.segment(hidden, cfg)
            counts.append(hidden.shape[0])
    proj = model.model.multi_modal_projector(hidden)
    tokens, index, r_adj = R.compress_after_encoder(proj, scores, segs, cfg.retain_ratio, video.shape[0])
    tokens = torch.cat([tokens, model.model.image_newline[None].to(tokens.dtype)])
    return tokens, index, [tuple(s) for s in segs], counts, r_adj


def _close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _check_video_against_reference(st, feats, ref, dtype):
    tokens, index, segs, counts, r_adj = ref
    assert st["segments"] == segs
    assert [st["frames_after"][p] for p in CFG.prune_layers] == counts
    assert st["kept"] == [tuple(x) for x in index.tolist()]
    assert st["ratio"] == r_adj
    assert feats.dtype == dtype
    _close(feats, tokens, TOL[dtype])


# --------------------------------------------------------------------------------------------
# Half-precision models, the model's own decisions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kept_tokens_equal_reference(videos, dtype):
    m = tm.build_model(seed=0, dtype=dtype)
    with earlytom_ext.apply(m, CFG) as h:
        feats = h.encode_videos(torch.stack(videos))
        stats = h.last_stats
    merged_late = False
    for b, v in enumerate(videos):
        ref = reference_video(m, v, CFG)
        _check_video_against_reference(stats["videos"][b], feats[b], ref, dtype)
        merged_late |= ref[3][1] < ref[3][0]  # frames merged after the first prune layer too
    assert merged_late, "the test videos should exercise Stage I at a later prune layer"
    assert stats["videos"][1]["frames_after"][4] < T


# --------------------------------------------------------------------------------------------
# Right-padded batches: logits against the language model run by hand
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def hand_logits(model, ids, video_tokens):
    """Logits of one unpadded sample whose video placeholders are filled with ``video_tokens``."""
    ids = ids.to(model.device)
    emb = model.get_input_embeddings()(ids[None])[0].clone()
    where = ids == tm.VIDEO_TOKEN_ID
    assert int(where.sum()) == video_tokens.shape[0]
    emb[where] = video_tokens.to(emb.dtype)
    out = model.model.language_model(inputs_embeds=emb[None])
    return model.lm_head(out.last_hidden_state)[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_right_padded_batch_logits_equal_reference(videos, dtype, tol):
    m = tm.build_model(seed=0, dtype=dtype)
    inputs = tm.make_inputs(videos, seed=7, padding_side="right", prefix_lengths=[3, 9], suffix_lengths=[6, 2])
    with earlytom_ext.apply(m, CFG) as h, torch.no_grad():
        logits = m(**inputs).logits
        li = h.last_inputs
    am = li["attention_mask"]
    for b, v in enumerate(videos):
        tokens = reference_video(m, v, CFG)[0]
        # The original prompt with its video placeholders replaced by as many as tokens were kept.
        orig = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        vid = (orig == tm.VIDEO_TOKEN_ID).nonzero().flatten()
        s, e = int(vid[0]), int(vid[-1]) + 1
        ids = torch.cat([orig[:s], torch.full((tokens.shape[0],), tm.VIDEO_TOKEN_ID), orig[e:]])
        n = ids.shape[0]
        assert int(am[b].sum()) == n and am[b, :n].all()  # right padding kept
        assert torch.equal(li["input_ids"][b, :n].cpu(), ids)
        assert (li["input_ids"][b, n:] == tm.PAD_ID).all()
        _close(logits[b, :n], hand_logits(m, ids, tokens), tol)


# --------------------------------------------------------------------------------------------
# Forced decisions: counts from the Stage II formula
# --------------------------------------------------------------------------------------------
# Stage I plans per prune layer and video, (src0, src1, w) with local frame indices.
FORCED_PLANS = {
    1: [  # video 0: 8 -> 6 frames; video 1: unchanged
        [(0, 0, 1.0), (1, 2, 0.5), (3, 3, 1.0), (4, 5, 0.25), (6, 6, 1.0), (7, 7, 1.0)],
        [(i, i, 1.0) for i in range(8)],
    ],
    3: [  # 6 -> 5; 8 -> 7
        [(0, 0, 1.0), (1, 1, 1.0), (2, 3, 0.75), (4, 4, 1.0), (5, 5, 1.0)],
        [(0, 1, 0.5)] + [(i, i, 1.0) for i in range(2, 8)],
    ],
    4: [  # the score layer: 5 -> 4; 7 -> 6
        [(0, 0, 1.0), (1, 2, 0.5), (3, 3, 1.0), (4, 4, 1.0)],
        [(0, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0), (3, 4, 0.5), (5, 5, 1.0), (6, 6, 1.0)],
    ],
}
FORCED_REFINED = [[(0, 2), (3, 3)], [(0, 5)]]
# By hand (docs/algorithm.md, P = 196, r = 0.2, T = 8):
# video 0: T' = 4, r' = 0.2 * 8 / 4 = 0.4, 196 r' = 78.4: k = 79 (dynamic), n = 78 (static);
#          segments [0,2], [3,3]: frames 0, 2, 3 dynamic, frame 1 static: 3 * 79 + 78 = 315.
# video 1: T' = 6, r' = 0.2 * 8 / 6 = 0.2667, 196 r' = 52.27: k = 53, n = 52;
#          segment [0,5]: frames 0, 5 dynamic, 1..4 static: 2 * 53 + 4 * 52 = 314.
# Plus one image_newline per video.
FORCED_KEEP_PER_FRAME = [[79, 78, 79, 79], [53, 52, 52, 52, 52, 53]]
FORCED_TOKENS = [316, 315]
FORCED_RATIOS = [0.4, 0.2 * 8 / 6]


def forced_stage1(calls):
    def stage1(x, frame_counts, layer_index, extras=None):
        counts = [int(c) for c in frame_counts.tolist()]
        calls.append((layer_index, counts, extras is not None))
        src, w, out_counts, off = [], [], [], 0
        for n, plan in zip(counts, FORCED_PLANS[layer_index]):
            assert max(max(a, b) for a, b, _ in plan) < n
            src += [(a + off, b + off) for a, b, _ in plan]
            w += [p[2] for p in plan]
            out_counts.append(len(plan))
            off += n
        dev = x.device
        plan_src = torch.tensor(src, dtype=torch.int64, device=dev)
        plan_w = torch.tensor(w, dtype=torch.float32, device=dev)
        merged = ops.apply_merge_plan(extras, plan_src, plan_w) if extras is not None else None
        starts = [0]
        for n in counts[:-1]:
            starts.append(starts[-1] + n)
        segments = torch.tensor([[s, s + n - 1] for s, n in zip(starts, counts)], dtype=torch.int64, device=dev)
        return ops.MergeResult(
            ops.apply_merge_plan(x, plan_src, plan_w),
            merged,
            torch.tensor(out_counts, dtype=torch.int64, device=dev),
            segments,
            torch.ones(len(counts), dtype=torch.int64, device=dev),
            plan_src,
            plan_w,
        )

    return stage1


def forced_refine(calls):
    def refine(x, frame_counts):
        counts = [int(c) for c in frame_counts.tolist()]
        calls.append(counts)
        segs, off = [], 0
        for n, video in zip(counts, FORCED_REFINED):
            assert video[-1][1] == n - 1
            segs += [[s + off, e + off] for s, e in video]
            off += n
        return (
            torch.tensor(segs, dtype=torch.int64, device=x.device),
            torch.tensor([len(v) for v in FORCED_REFINED], dtype=torch.int64, device=x.device),
        )

    return refine


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.float32),
        ("cpu", torch.bfloat16),
        ("cpu", torch.float16),
        pytest.param("cuda", torch.float32, marks=needs_cuda),
        pytest.param("cuda", torch.bfloat16, marks=needs_cuda),
    ],
)
def test_forced_segments_give_the_formula_token_counts(videos, device, dtype):
    m = tm.build_model(seed=0, dtype=dtype, device=device)
    pix = torch.stack(videos).to(device)
    s1_calls, refine_calls = [], []
    with earlytom_ext.apply(m, CFG) as h:
        assert h.force_decisions(stage1=forced_stage1(s1_calls), refine=forced_refine(refine_calls)) is h
        feats = h.encode_videos(pix)
        stats = h.last_stats
        # The prompt follows the forced counts (right padding).
        inputs = tm.make_inputs(videos, seed=11, padding_side="right", prefix_lengths=[2, 5], suffix_lengths=[3, 3])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            logits = m(**inputs).logits
        li = h.last_inputs
    # The seam was called at every prune layer with the frame counts the forced plans produce.
    assert s1_calls[:3] == [(1, [8, 8], False), (3, [6, 8], False), (4, [5, 7], True)]
    assert refine_calls[0] == [4, 6]
    assert [f.shape[0] for f in feats] == FORCED_TOKENS
    for b in range(2):
        st = stats["videos"][b]
        assert st["frames_after"] == {1: [6, 8][b], 3: [5, 7][b], 4: [4, 6][b]}
        assert st["segments"] == FORCED_REFINED[b]
        assert st["ratio"] == pytest.approx(FORCED_RATIOS[b], rel=1e-15)
        assert st["tokens_after"] == FORCED_TOKENS[b]
        per_frame = [sum(1 for f, _ in st["kept"] if f == i) for i in range(len(FORCED_KEEP_PER_FRAME[b]))]
        assert per_frame == FORCED_KEEP_PER_FRAME[b]
        # Values: the reference pipeline with the same plans and segments.
        ref = reference_video(
            m, videos[b], CFG, plans={p: FORCED_PLANS[p][b] for p in CFG.prune_layers}, refined=FORCED_REFINED[b]
        )
        assert st["kept"] == [tuple(x) for x in ref[1].tolist()]
        _close(feats[b], ref[0], TOL[dtype])
    assert li["video_token_counts"] == FORCED_TOKENS
    assert [int((li["input_ids"][b] == tm.VIDEO_TOKEN_ID).sum()) for b in range(2)] == FORCED_TOKENS
    lengths = [2 + 316 + 3, 5 + 315 + 3]
    assert li["attention_mask"].sum(1).tolist() == lengths
    assert logits.shape[:2] == (2, max(lengths))


def test_force_decisions_none_restores_the_default(videos):
    m = tm.build_model(seed=0)
    pix = torch.stack(videos)
    with earlytom_ext.apply(m, CFG) as h:
        default = h.encode_videos(pix)
        h.force_decisions(stage1=forced_stage1([]), refine=forced_refine([]))
        assert [f.shape[0] for f in h.encode_videos(pix)] == FORCED_TOKENS
        assert h.force_decisions() is h
        again = h.encode_videos(pix)
    assert all(torch.equal(a, b) for a, b in zip(default, again))
    assert [f.shape[0] for f in again] != FORCED_TOKENS
