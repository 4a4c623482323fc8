"""earlytom_ext.apply on tiny random Hugging Face Qwen2.5-VL and Qwen2-VL models (transformers 4.57.x /
5.x); every test that takes the ``family`` or ``model`` fixture runs on both.

The compressed tokens are checked against the reference pipeline run by hand on the same model:
patch embedding, the model's own window order (Qwen2.5-VL), every vision block run group by group (one group
at a time, so no cu_seqlens tiling is shared with the adapter), Stage I / score / refined
segmentation / Stage II from earlytom_ext.reference. Positions are checked against values written
from the model's rope rules, and the uncompressed layout against the model's own get_rope_index.
"""

import inspect
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip("this transformers has no Qwen2_5_VLForConditionalGeneration", allow_module_level=True)

from tiny_models import cache_names, check_compiled_model  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig  # noqa: E402
from earlytom_ext import reference as R  # noqa: E402
from earlytom_ext._ext import has_cuda_kernels  # noqa: E402
from earlytom_ext.integration.adapters.qwen2_5_vl import QWEN2_5_VL_PRUNE_LAYERS, default_prune_layers  # noqa: E402
from earlytom_ext.integration.adapters.qwen2_vl import QWEN2_VL_PRUNE_LAYERS  # noqa: E402
from earlytom_ext.tiny_model import make_video  # noqa: E402

IMG, VID, VS, VE = 120, 121, 122, 123
PATCH, TP, MS = 2, 2, 2
TPS = 2  # tokens_per_second
# 6 blocks, full attention in 2 and 5; windows of 2x2 merge units (window_size 8 px / 2 / 2).
CFG = EarlyTomConfig(retain_ratio=0.3, tau=0.5, max_window=6, ema=0.9, prune_layers=(0, 1, 2))
IDENTITY = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, prune_layers=(1, 2))
FRAMES = 12  # video frames -> 6 temporal groups
SIZE = 12  # pixels -> 6x6 patches -> 3x3 merged tokens (uneven windows: 2x2, 2x1, 1x2, 1x1)


FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def build_model(
    seed=0,
    attn_implementation="sdpa",
    depth=6,
    fullatt=(2, 5),
    hidden=32,
    patch=PATCH,
    window=8,
    dtype=torch.float32,
    family="qwen2_5_vl",
):
    """A tiny model of ``family``; ``fullatt`` and ``window`` are Qwen2.5-VL's (Qwen2-VL: full
    attention in every block, no windows)."""
    if family == "qwen2_vl":
        vision = dict(embed_dim=hidden, hidden_size=32, mlp_ratio=2, hidden_act="quick_gelu")
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            tokens_per_second=TPS,
            window_size=window,
            out_hidden_size=32,
            fullatt_block_indexes=list(fullatt),
        )
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vision.update(
        depth=depth, num_heads=2, in_channels=3, patch_size=patch, spatial_merge_size=MS, temporal_patch_size=TP
    )
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    cfg._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval()


def family_of(model):
    return model.config.model_type


def full_attention_blocks(model):
    vis = model.model.visual
    return list(vis.fullatt_block_indexes) if family_of(model) == "qwen2_5_vl" else list(range(len(vis.blocks)))


def v5_rope(model):
    return "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters


def patchify(frames, patch=PATCH):
    """The Qwen2-VL processor's patch layout: [t*h*w, C*2*p*p], merge-unit major."""
    T2, C, Hp, Wp = frames.shape
    gt, gh, gw = T2 // TP, Hp // patch, Wp // patch
    x = frames.reshape(gt, TP, C, gh // MS, MS, patch, gw // MS, MS, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * TP * patch * patch), (gt, gh, gw)


def make_inputs(model, videos, seed=0, images=None, spgt=(1.0, 0.5), padding_side="left", patch=PATCH):
    """Left-padded prompts ``text <vs> video <ve> text`` (an image first where ``images[b]`` is given);
    ``second_per_grid_ts`` from ``spgt`` for Qwen2.5-VL (Qwen2-VL has none)."""
    g = torch.Generator().manual_seed(seed)
    pix, grids, rows = [], [], []
    img_pix, img_grids = [], []
    for b, v in enumerate(videos):
        x, grid = patchify(v, patch)
        pix.append(x)
        grids.append(grid)
        row = torch.randint(3, 100, (2 + b,), generator=g).tolist()
        if images is not None and images[b] is not None:
            ix, ig = patchify(images[b][None].repeat(TP, 1, 1, 1), patch)
            img_pix.append(ix)
            img_grids.append(ig)
            row += [VS] + [IMG] * (ig[0] * ig[1] * ig[2] // 4) + [VE, 7]
        row += [VS] + [VID] * (grid[0] * grid[1] * grid[2] // 4) + [VE]
        row += torch.randint(3, 100, (3,), generator=g).tolist()
        rows.append(row)
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        am[b, sl] = 1
    out = dict(
        input_ids=ids,
        attention_mask=am,
        pixel_values_videos=torch.cat(pix),
        video_grid_thw=torch.tensor(grids),
    )
    if family_of(model) == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor(list(spgt[: len(videos)]))
    if img_pix:
        out["pixel_values"] = torch.cat(img_pix)
        out["image_grid_thw"] = torch.tensor(img_grids)
    if v5_rope(model):
        out["mm_token_type_ids"] = (ids == IMG).long() + 2 * (ids == VID).long()
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return build_model(family=family)


@pytest.fixture(scope="module")
def videos():
    return [
        make_video(FRAMES, seed=1, kind="scenes", scene_length=4, image_size=SIZE),
        make_video(FRAMES, seed=2, kind="static", image_size=SIZE),
    ]


@pytest.fixture(autouse=True)
def _no_leftover(model):
    yield
    h = model.__dict__.get("_earlytom_handle")
    if h is not None:
        h.remove()


# --------------------------------------------------------------------------------------------
# The reference pipeline, by hand
# --------------------------------------------------------------------------------------------
def _window_index(model, grid):
    vis = model.model.visual
    if family_of(model) == "qwen2_vl":  # no windows: raster order of the merge units, one group
        n = int(grid.prod())
        return torch.arange(n // 4), torch.tensor([0, n], dtype=torch.int32)
    if hasattr(vis, "get_window_index"):  # 4.57
        idx, cu = vis.get_window_index(grid)
        return idx, torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid, spatial_merge_size=MS, window_size=vis.window_size, patch_size=vis.patch_size)


def _rotary(model, grid, window_index):
    vis = model.model.visual
    n = int(grid.prod())
    if hasattr(vis, "rot_pos_emb"):  # 4.57
        rot = vis.rot_pos_emb(grid).reshape(n // 4, 4, -1)[window_index].reshape(n, -1)
        emb = torch.cat((rot, rot), dim=-1)
        return emb.cos(), emb.sin()
    from transformers.vision_utils import get_vision_position_ids

    cos, sin = vis.rotary_pos_emb(torch.empty(0), get_vision_position_ids(grid, MS))
    return tuple(t.reshape(n // 4, 4, -1)[window_index].reshape(n, -1) for t in (cos, sin))


def _rope_fn(model):
    import importlib

    return importlib.import_module(type(model.model.visual.blocks[0].attn).__module__).apply_rotary_pos_emb_vision


@torch.no_grad()
def reference_video(model, pix, grid_row, cfg):
    """One video through the vision blocks group by group with the reference Stage I / II."""
    vis = model.model.visual
    grid = torch.tensor([grid_row])
    T, H, W = grid_row
    S = H * W
    window_index, cu_win = _window_index(model, grid)
    cos, sin = _rotary(model, grid, window_index)
    # Per-group assumption of the adapter, checked on the model's own tensors.
    assert torch.equal(cos.view(T, S, -1), cos[:S].expand(T, S, -1))
    wi = window_index.view(T, -1)
    assert torch.equal(wi - torch.arange(T)[:, None] * (S // 4), wi[:1].expand(T, -1))
    cos1, sin1 = cos[:S], sin[:S]
    cu1 = cu_win[cu_win <= S]
    hidden = vis.patch_embed(pix.type(vis.dtype))
    D = hidden.shape[-1]
    hidden = hidden.reshape(-1, 4, D)[window_index].reshape(T, S, D)
    rope = _rope_fn(model)

    def layer(i, h):
        full = i in full_attention_blocks(model)
        cu = torch.tensor([0, S], dtype=torch.int32) if full else cu1
        kw = {} if hasattr(vis, "rot_pos_emb") else {"max_seqlen": None}
        return torch.stack(
            [vis.blocks[i](h[t], cu_seqlens=cu, position_embeddings=(cos1, sin1), **kw) for t in range(h.shape[0])]
        )

    def qk(i, h):
        attn = vis.blocks[i].attn
        x = vis.blocks[i].norm1(h.reshape(-1, D))
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rope(q, k, cos1.repeat(h.shape[0], 1), sin1.repeat(h.shape[0], 1))
        n = h.shape[0]
        heads = attn.num_heads
        return (q.reshape(n, S, heads, -1).transpose(1, 2), k.reshape(n, S, heads, -1).transpose(1, 2), attn.scaling)

    layers = [(lambda h, i=i: layer(i, h)) for i in range(len(vis.blocks))]
    hidden, scores, refined, counts = R.run_encoder(hidden, layers, cfg, qk)
    n = hidden.shape[0]
    P = S // 4
    inv = torch.argsort(window_index[:P])
    feats = vis.merger(hidden.reshape(-1, D)).view(n, P, -1)[:, inv]
    pooled = scores.float().view(n, P, 4).sum(-1)[:, inv]
    r_adj = R.adjusted_ratio(cfg.retain_ratio, T, n, P)
    tokens, index = R.select_tokens(feats, pooled, refined, r_adj)
    return tokens, index, {"segments": refined, "counts": counts, "ratio": r_adj}


def _split_pixels(inputs):
    grids = inputs["video_grid_thw"].tolist()
    return list(torch.split(inputs["pixel_values_videos"], [t * h * w for t, h, w in grids])), grids


def check_against_reference(model, inputs, feats, stats, cfg):
    """Each video's statistics and kept features equal the reference pipeline run on that video
    alone; returns the reference's statistics per video."""
    pix, grids = _split_pixels(inputs)
    refs = []
    for b in range(len(grids)):
        ref_tokens, ref_index, ref = reference_video(model, pix[b], grids[b], cfg)
        v = stats["videos"][b]
        assert v["segments"] == [tuple(s) for s in ref["segments"]]
        assert [v["frames_after"][p] for p in cfg.prune_layers] == ref["counts"]
        assert v["kept"] == [tuple(x) for x in ref_index.tolist()]
        assert v["ratio"] == ref["ratio"]
        _close(feats[b], ref_tokens)
        refs.append(ref)
    return refs


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _positions(model, handle, inputs):
    """(position_ids [3, B, L], rope_deltas [B, 1]) the patched model uses for the compressed prompt."""
    call = {
        k: v
        for k, v in inputs.items()
        if k not in ("input_ids", "pixel_values_videos", "attention_mask", "pixel_values")
    }
    prep = handle.prepare_inputs(
        inputs["input_ids"], inputs["pixel_values_videos"], attention_mask=inputs["attention_mask"], **call
    )
    if "position_ids" in prep:  # 5.x
        return prep, prep["position_ids"][1:], model.model.rope_deltas
    pos, delta = model.model.get_rope_index(None, attention_mask=prep["attention_mask"])  # 4.57: armed
    return prep, pos, delta


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_default_prune_layers():
    assert QWEN2_5_VL_PRUNE_LAYERS == (7, 21, 23)
    assert QWEN2_VL_PRUNE_LAYERS == (8, 26, 28)  # round(32 * f) for f = 0.25, 0.8, 0.88
    assert default_prune_layers(32, [7, 15, 23, 31]) == (7, 21, 23)
    assert default_prune_layers(6, [2, 5]) == (0, 2)  # first full block is the last prune layer itself
    assert default_prune_layers(12, [3, 7, 11]) == (3, 5, 7)
    assert default_prune_layers(4, [3]) == (1, 3)  # only the final block is full attention
    with pytest.raises(ValueError, match="full-attention"):
        default_prune_layers(4, [])


def check_identity(model, inputs):
    """The identity configuration gives the unpatched model's logits and generated tokens bit for
    bit and leaves the prompt as it is; returns the statistics."""
    with torch.no_grad():
        base_logits = model(**inputs).logits
    base_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with earlytom_ext.apply(model, IDENTITY) as h:
        with torch.no_grad():
            logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        st = h.last_stats
    assert torch.equal(h.last_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(logits, base_logits)
    assert torch.equal(gen, base_gen)
    return st


def test_identity_config_equals_unpatched(model, videos):
    st = check_identity(model, make_inputs(model, videos, seed=3))
    assert all(v["tokens_after"] == v["tokens_before"] == 6 * 9 for v in st["videos"])


def test_inference_mode_with_several_threads(model, videos):
    """Under torch.inference_mode, with the CPU ops' worker threads in use (they must run in the
    caller's inference mode to update its tensors)."""
    inputs = make_inputs(model, videos, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        with torch.inference_mode():
            base = model(**inputs).logits
            with earlytom_ext.apply(model, IDENTITY):
                same = model(**inputs).logits
            with earlytom_ext.apply(model, CFG) as h:
                model(**inputs)
                assert h.last_stats["videos"][0]["tokens_after"] < h.last_stats["videos"][0]["tokens_before"]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(same, base)


def test_geometry_follows_a_dtype_change(family, videos):
    """The per-grid rotary tables are rebuilt when model.to(dtype) casts the encoder's inv_freq."""
    model = build_model(family=family)
    inputs = make_inputs(model, videos, seed=3)
    grid = inputs["video_grid_thw"]
    with torch.no_grad(), earlytom_ext.apply(model, IDENTITY) as h:
        h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=grid)  # caches fp32 tables
        model.to(torch.bfloat16)
        pv = inputs["pixel_values_videos"].bfloat16()
        got = torch.cat(h.encode_videos(pv, video_grid_thw=grid))
    with torch.no_grad():
        base = model.model.get_video_features(pv, grid)
    base = torch.cat(list(getattr(base, "pooler_output", base)))
    assert torch.equal(got, base)


def _merge_oracle_logits(model, emb, position_ids, span, k, ratio):
    """Layer-by-layer recomputation of the inner-LLM merge on one unpadded sample: layers < k on the
    prompt with its 3-D rotary positions, ``reference.llm_merge`` on the span with the last prompt
    token's layer k - 1 attention (an eager copy), layers >= k on the kept tokens at their
    positions."""
    import copy

    lm = model.model.language_model
    eager = copy.deepcopy(lm)
    eager.set_attn_implementation("eager")
    rope = position_ids[1:] if position_ids.shape[0] == 4 else position_ids  # 5.x: text positions first
    att = eager(inputs_embeds=emb[None], position_ids=position_ids, output_attentions=True).attentions[k - 1]
    scores = att[0, :, -1, :].mean(0)

    def layers(h, pos, stack):
        n = h.shape[1]
        cos, sin = lm.rotary_emb(h, pos)
        mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        for layer in stack:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
        return h

    s, L = span
    h = layers(emb[None], rope, lm.layers[:k])[0]
    merged, kept = R.llm_merge(h, span, scores[s : s + L], 1.0 - ratio)
    idx = torch.cat([torch.arange(s), kept, torch.arange(s + L, emb.shape[0])])
    h = layers(merged[None], rope[..., idx], lm.layers[k:])
    return model.lm_head(lm.norm(h)), kept


def test_inner_llm_merge_matches_a_layer_by_layer_recomputation(family, videos):
    """The merge keeps the kept tokens' 3-D rotary angles (the Qwen language model)."""
    model = build_model(family=family)
    k, ratio = 1, 0.5
    cfg = CFG.replace(llm_merge_layer=k, llm_merge_ratio=ratio)
    if not hasattr(
        sys.modules[type(model.model.language_model.layers[0].self_attn).__module__], "apply_rotary_pos_emb"
    ):
        with pytest.raises(TypeError, match="needs transformers 5"):  # 4.x: 3-D rotary inside the attention
            earlytom_ext.apply(model, cfg)
        assert "forward" not in model.__dict__
        return
    with torch.no_grad():  # distinct attention rows, so that the scores decide the kept tokens
        for name, p in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
    inputs = make_inputs(model, videos[:1], seed=10)
    video_kw = {n: inputs[n] for n in ("video_grid_thw", "second_per_grid_ts") if n in inputs}
    with torch.no_grad(), earlytom_ext.apply(model, cfg) as h:
        logits = model(**inputs).logits
        stats = h.last_stats["llm_merge"][0]
        p = h.prepare_inputs(inputs["input_ids"], inputs["pixel_values_videos"], inputs["attention_mask"], **video_kw)
    with torch.no_grad():
        want, kept = _merge_oracle_logits(model, p["inputs_embeds"][0], p["position_ids"], stats["span"], k, ratio)
    assert kept.tolist() == stats["kept"] and len(kept) < stats["span"][1]
    assert logits.shape == want.shape
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    # generate: the same merged prefill (its greedy token), then decoding steps on the merged cache
    with earlytom_ext.apply(model, cfg):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    L = inputs["input_ids"].shape[1]
    assert out.shape == (1, L + 3) and int(out[0, L]) == int(want[0, -1].argmax())


def test_remove_restores_exactly(model, videos):
    inputs = make_inputs(model, videos[:1], seed=4)
    with torch.no_grad():
        before = model(**inputs).logits
    modules = list(model.modules())
    hooks_before = [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in modules]
    dicts_before = [set(model.__dict__), set(model.model.__dict__)]
    h = earlytom_ext.apply(model, CFG)
    with torch.no_grad():
        patched = model(**inputs).logits
    assert patched.shape[1] < before.shape[1]
    h.remove()
    h.remove()
    assert [set(model.__dict__), set(model.model.__dict__)] == dicts_before
    assert [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in modules] == hooks_before
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    base_gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with earlytom_ext.apply(model, IDENTITY):
        pass
    assert torch.equal(model.generate(**inputs, max_new_tokens=2, do_sample=False), base_gen)


def test_kept_tokens_equal_reference(model, videos):
    inputs = make_inputs(model, videos, seed=5)
    with earlytom_ext.apply(model, CFG) as h:
        feats = h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        stats = h.last_stats
        # The grid by position, as the model's get_video_features takes it: the same call.
        for a, b in zip(feats, h.encode_videos(inputs["pixel_values_videos"], inputs["video_grid_thw"])):
            assert torch.equal(a, b)
        n = len(h.adapter.video_kwargs)  # 4 on Qwen2.5-VL (second_per_grid_ts), 3 on Qwen2-VL
        with pytest.raises(TypeError, match=rf"at most {n} positional argument\(s\) after the videos \(video_grid"):
            h.encode_videos(inputs["pixel_values_videos"], inputs["video_grid_thw"], *[None] * n)
    refs = check_against_reference(model, inputs, feats, stats, CFG)
    assert all(v["tokens_before"] == 6 * 9 for v in stats["videos"])
    assert any(ref["counts"][-1] < 6 for ref in refs), "the test videos should exercise Stage I merging"
    assert stats["tokens_per_frame"] == 9


@pytest.mark.parametrize("prune_layers", [(1, 3), (3, 5)])
def test_qwen2_vl_scores_at_any_block(prune_layers, videos):
    """Qwen2-VL: every block attends over its whole group, so any block is a score layer (blocks 3
    and 5 are not full-attention blocks in the Qwen2.5-VL build; 5 is the last block)."""
    model = build_model(family="qwen2_vl")
    cfg = CFG.replace(prune_layers=prune_layers)
    inputs = make_inputs(model, videos, seed=5)
    with earlytom_ext.apply(model, cfg) as h:
        feats = h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        stats = h.last_stats
    pix, grids = _split_pixels(inputs)
    for b in range(2):
        ref_tokens, ref_index, ref = reference_video(model, pix[b], grids[b], cfg)
        assert stats["videos"][b]["kept"] == [tuple(x) for x in ref_index.tolist()]
        assert [stats["videos"][b]["frames_after"][p] for p in prune_layers] == ref["counts"]
        _close(feats[b], ref_tokens)


def test_adapter_errors_name_the_family():
    for family, cls, label in (
        ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL"),
        ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2-VL"),
    ):
        model = build_model(family=family)
        model.model.visual.blocks[1].norm1 = None
        del model.model.visual.blocks[1].norm1
        with pytest.raises(TypeError, match=f"as in {label}; block 1"):
            earlytom_ext.apply(model, CFG)
        del model.model.visual
        with pytest.raises(TypeError, match=f"model must be a Hugging Face {cls}"):
            earlytom_ext.apply(model, CFG)
        assert "forward" not in model.__dict__ and "generate" not in model.__dict__  # nothing half-patched


def test_rope_index_wrapped_before_apply(family, videos):
    """A ``get_rope_index`` wrapper taking ``*args`` installed on the model before ``apply`` hides
    its parameter names: the adapter still tells 4.57 from 5.x and (4.57, positions handed to the
    prefill's own call) still matches the prefill's call."""
    model = build_model(family=family)
    inputs = make_inputs(model, videos, seed=3)  # before the wrapper: v5_rope reads the signature
    orig = model.model.get_rope_index
    model.model.get_rope_index = lambda *args, **kwargs: orig(*args, **kwargs)
    with torch.no_grad():
        base = model(**inputs).logits
    base_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with earlytom_ext.apply(model, IDENTITY):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), base_gen)


def test_eager_and_sdpa_keep_the_same_tokens(family, videos):
    out = {}
    for impl in ("sdpa", "eager"):
        m = build_model(attn_implementation=impl, family=family)
        inputs = make_inputs(m, videos[1:], seed=6)
        with earlytom_ext.apply(m, CFG) as h:
            f = h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
            out[impl] = (f[0], h.last_stats["videos"][0]["kept"])
    assert out["sdpa"][1] == out["eager"][1]
    _close(out["sdpa"][0], out["eager"][0], tol=1e-5)


def test_forced_segments_give_the_spec_count(model, videos):
    """No Stage I merges (max_window=2) and hand-fixed refined segments (0..2), (3..5): per video
    4 dynamic frames with k = ceil(9 * 0.5) = 5 and 2 static frames with n = round(4.5) = 4."""
    cfg = EarlyTomConfig(retain_ratio=0.5, tau=-1.0, max_window=2, prune_layers=(1, 2))
    inputs = make_inputs(model, videos, seed=7)

    def refine(x, frame_counts):
        segs = torch.tensor([[0, 2], [3, 5], [6, 8], [9, 11]], device=x.device)
        return segs, torch.tensor([2, 2], device=x.device)

    with earlytom_ext.apply(model, cfg) as h:
        h.force_decisions(refine=refine)
        with torch.no_grad():
            logits = model(**inputs).logits
        counts = h.last_inputs["video_token_counts"]
        st = h.last_stats
    assert counts == [4 * 5 + 2 * 4] * 2 == [28, 28]
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (54 - 28)  # both rows shrink alike
    # Static frames keep the top-1 of each window: windows of 9 positions in 4 -> sizes 3, 2, 2, 2.
    kept = st["videos"][0]["kept"]
    static = [p for f, p in kept if f == 1]
    assert len(static) == 4
    assert [0 <= static[0] < 3, 3 <= static[1] < 5, 5 <= static[2] < 7, 7 <= static[3] < 9] == [True] * 4


def check_positions(model, inputs, cfg):
    """Every kept token has the position the unpatched model gives its (first source group,
    position) in the uncompressed prompt; text keeps its positions; padding and rope_deltas follow
    the model's own rules (all read from the model's get_rope_index on the uncompressed prompt).
    One video per sample. Returns the statistics."""
    v5 = v5_rope(model)
    kw = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if v5 else {}
    if "second_per_grid_ts" in inputs:
        kw["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    full_pos, full_delta = model.model.get_rope_index(
        inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"], **kw
    )
    with earlytom_ext.apply(model, cfg) as h:
        prep, pos, delta = _positions(model, h, inputs)
        st = h.last_stats
    mask, ids = prep["attention_mask"], prep["input_ids"]
    L, L2 = inputs["input_ids"].shape[1], ids.shape[1]
    for b, (T, gh, gw) in enumerate(inputs["video_grid_thw"].tolist()):
        P = gh * gw // 4
        real_full = inputs["attention_mask"][b].nonzero().flatten().tolist()
        full = [tuple(full_pos[:, b, c].tolist()) for c in real_full]
        start = inputs["input_ids"][b, real_full].tolist().index(VID)
        sources = st["videos"][b]["frame_sources"]
        expect = full[:start]
        expect += [full[start + min(sources[f]) * P + p] for f, p in st["videos"][b]["kept"]]
        expect += full[start + T * P :]
        real = mask[b].nonzero().flatten().tolist()
        assert [tuple(pos[:, b, c].tolist()) for c in real] == expect
        pad = [tuple(full_pos[:, b, c].tolist()) for c in range(L) if c not in real_full]
        assert all(tuple(pos[:, b, c].tolist()) == pad[0] for c in range(L2) if c not in real)
        # rope_deltas: the largest position + 1 - the length the model counts (padded or not).
        padded = int(full_delta[b, 0]) == max(map(max, full)) + 1 - L
        assert padded or int(full_delta[b, 0]) == max(map(max, full)) + 1 - len(real_full)
        assert int(delta[b, 0]) == max(map(max, expect)) + 1 - (L2 if padded else len(real))
    merged = [f for v in st["videos"] for f in v["frame_sources"] if len(f) > 1]
    assert merged, "the test should exercise the position of a merged group"
    return st


def test_positions_follow_the_original_grid(model, videos):
    check_positions(model, make_inputs(model, videos, seed=8, spgt=(1.0, 1.5)), CFG)


def mixed_grid_videos():
    """Three videos on two spatial grids, the odd one in the middle: 12x12 px (3x3 tokens per group),
    8x16 px (2x4 tokens, windows of another shape), 12x12 px with fewer groups (static: Stage I
    merges groups in it on both families)."""
    return [
        make_video(FRAMES, seed=1, kind="scenes", scene_length=4, image_size=SIZE),
        make_video(FRAMES, seed=2, kind="static", image_size=16)[:, :, :8, :],
        make_video(10, seed=2, kind="static", image_size=SIZE),
    ]


def test_videos_of_different_grids_in_one_call(model):
    """Videos on different spatial grids are encoded one grid at a time: the identity configuration
    still gives the unpatched model's logits and tokens, each video's kept tokens equal the
    reference pipeline run on that video alone, and the positions follow the original grids."""
    vids = mixed_grid_videos()
    inputs = make_inputs(model, vids, seed=12, spgt=(1.0, 0.5, 2.0))
    assert inputs["video_grid_thw"].tolist() == [[6, 6, 6], [6, 4, 8], [5, 6, 6]]
    assert [v["tokens_after"] for v in check_identity(model, inputs)["videos"]] == [54, 48, 45]

    st = check_positions(model, inputs, CFG)
    assert st["tokens_per_frame"] is None
    assert [v["tokens_per_frame"] for v in st["videos"]] == [9, 8, 9]
    with earlytom_ext.apply(model, CFG) as h:
        feats = h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        assert h.tokens_per_frame == 0  # the call's videos have no one P
        assert h.last_stats["videos"] == st["videos"]
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    check_against_reference(model, inputs, feats, st, CFG)
    assert st["videos"][1]["frames_after"][CFG.prune_layers[-1]] < 6, "the odd grid's video should merge"


def test_generate_batch_with_image_and_different_lengths(model, videos):
    img = make_video(1, seed=9, image_size=8)[0]  # one 8x8 image: 4x4 patches, 2x2 tokens
    inputs = make_inputs(model, videos, seed=9, images=[img, None])
    with torch.no_grad():
        base_img = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    base_img = getattr(base_img, "pooler_output", base_img)
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            img_feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        img_feats = getattr(img_feats, "pooler_output", img_feats)
        for a, b in zip(base_img, img_feats):
            assert torch.equal(a, b)  # images through the same encoder are untouched
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        counts = h.last_inputs["video_token_counts"]
        li = h.last_inputs
        with torch.no_grad():
            last_batch = model(**inputs).logits[:, -1]
        # Each sample alone gives the same next-token logits as in the batch.
        for b in range(2):
            names = ("input_ids", "attention_mask", "mm_token_type_ids")
            one = {k: v[b : b + 1] for k, v in inputs.items() if k in names}
            pix, grids = _split_pixels(inputs)
            one.update(pixel_values_videos=pix[b], video_grid_thw=inputs["video_grid_thw"][b : b + 1])
            if "second_per_grid_ts" in inputs:
                one["second_per_grid_ts"] = inputs["second_per_grid_ts"][b : b + 1]
            if b == 0:
                one.update(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
            keep = one["attention_mask"][0].bool()
            one["input_ids"] = one["input_ids"][:, keep]
            one["attention_mask"] = one["attention_mask"][:, keep]
            if "mm_token_type_ids" in one:
                one["mm_token_type_ids"] = one["mm_token_type_ids"][:, keep]
            with torch.no_grad():
                _close(model(**one).logits[:, -1], last_batch[b : b + 1], tol=1e-4)
    assert counts[0] != counts[1]
    n_img = int(inputs["image_grid_thw"][0].prod()) // 4
    assert int((li["input_ids"][0] == IMG).sum()) == n_img
    assert gen.shape[0] == 2 and torch.equal(gen[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4


def test_generate_beams(model, videos):
    inputs = make_inputs(model, videos[:1], seed=10)
    with earlytom_ext.apply(model, CFG):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 2 and torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat(2, 1))


def test_generate_continues_from_the_cache_it_filled(model, videos):
    """The returned sequences plus new text with the returned cache (which holds the compressed
    prompt) give what the compressed prompt plus the same tokens gives with that cache: the text
    after the video continues the compressed 3-D positions (rope_deltas of the compressed prefill)."""
    import copy

    inputs = make_inputs(model, videos[:1], seed=10)
    L = inputs["input_ids"].shape[1]
    text = torch.tensor([[11, 12, 13, 14]])
    with earlytom_ext.apply(model, CFG) as h:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        compressed = h.last_inputs["input_ids"]
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        name = cache_names()[0]
        by_hand_cache = copy.deepcopy(cache)
        ids = torch.cat([out.sequences, text], dim=1)
        cont = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{name: cache}, max_new_tokens=4)
        ids_c = torch.cat([compressed, out.sequences[:, L:], text], dim=1)
        by_hand = model.generate(
            input_ids=ids_c, attention_mask=torch.ones_like(ids_c), **{name: by_hand_cache}, max_new_tokens=4
        )
    assert compressed.shape[1] < L
    assert torch.equal(cont[:, : ids.shape[1]], ids)
    assert torch.equal(cont[:, ids.shape[1] :], by_hand[:, ids_c.shape[1] :])


def test_errors(model, videos):
    inputs = make_inputs(model, videos, seed=11)
    with earlytom_ext.apply(model, CFG) as h:
        bad = dict(inputs)
        bad.pop("video_grid_thw")
        with pytest.raises(ValueError, match="video_grid_thw is required"):
            model(**bad)
        L = inputs["input_ids"].shape[1]
        with pytest.raises(ValueError, match="position_ids cannot be given with videos"):
            model(**inputs, position_ids=torch.arange(L).expand(3, *inputs["input_ids"].shape))
        with pytest.raises(ValueError, match=r"assisted decoding \(prompt_lookup_num_tokens\)"):
            model.generate(**inputs, max_new_tokens=2, prompt_lookup_num_tokens=2)
        with pytest.raises(ValueError, match=r"pixel_values_videos must have shape \[patches, 24\]"):
            h.encode_videos(inputs["pixel_values_videos"][:, :10], video_grid_thw=inputs["video_grid_thw"])
        with pytest.raises(ValueError, match="pixel_values_videos has"):
            h.encode_videos(inputs["pixel_values_videos"][:-4], video_grid_thw=inputs["video_grid_thw"])
        with pytest.raises(TypeError, match="video_grid_thw must be an integer torch.Tensor"):
            h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=[[6, 6, 6], [6, 6, 6]])
        with pytest.raises(ValueError, match=r"video_grid_thw must have shape \[n, 3\]"):
            h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=torch.tensor([6, 6, 6]))
        with pytest.raises(TypeError, match="pixel_values_videos must be a floating-point"):
            h.encode_videos(inputs["pixel_values_videos"].long(), video_grid_thw=inputs["video_grid_thw"])
        with pytest.raises(ValueError, match=r"pixel_values_videos has 432 patches but video_grid_thw"):
            h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=torch.tensor([[4, 6, 6], [3, 8, 6]]))
        if family_of(model) == "qwen2_5_vl":
            with pytest.raises(ValueError, match="second_per_grid_ts must have one value per video"):
                h.encode_videos(
                    inputs["pixel_values_videos"],
                    video_grid_thw=inputs["video_grid_thw"],
                    second_per_grid_ts=torch.tensor([1.0]),
                )
            # second_per_grid_ts as a column [n, 1] (the model's arithmetic accepts it) is the same call
            column = dict(inputs, second_per_grid_ts=inputs["second_per_grid_ts"][:, None])
            with torch.no_grad():
                torch.testing.assert_close(model(**column).logits, model(**inputs).logits, rtol=0, atol=0)
            with pytest.raises(ValueError, match=r"one value per video \(\[n\] or \[n, 1\]\), got shape \(2, 2\)"):
                model(**dict(inputs, second_per_grid_ts=torch.ones(2, 2)))
            with pytest.raises(TypeError, match=r"second_per_grid_ts must hold one real number per video .*got 'a'"):
                model(**dict(inputs, second_per_grid_ts=[1.0, "a"]))
            with pytest.raises(TypeError, match=r"hold real numbers \(seconds\), got torch.bool"):
                model(**dict(inputs, second_per_grid_ts=torch.tensor([True, False])))
        else:  # Qwen2-VL's videos have no time step
            with pytest.raises(TypeError, match=r"unexpected video argument\(s\) \['second_per_grid_ts'\]"):
                h.encode_videos(
                    inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=[1, 1]
                )
        # Two videos with no <|vision_start|> between them: one run where video 0 has fewer tokens.
        n = [int(t * hh * ww) // 4 for t, hh, ww in inputs["video_grid_thw"].tolist()]
        ids = torch.tensor([[5, VS] + [VID] * sum(n) + [VE, 9]])
        adjacent = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inputs:
            adjacent["mm_token_type_ids"] = 2 * (ids == VID).long()
        with pytest.raises(ValueError, match=r"is not one video .* a run of its own"):
            model(**adjacent)
    if family_of(model) == "qwen2_5_vl":
        with pytest.raises(ValueError, match="full-attention block of the Qwen2.5-VL vision encoder"):
            earlytom_ext.apply(model, EarlyTomConfig(prune_layers=(1, 3)))
    else:  # every Qwen2-VL block attends over its whole group
        earlytom_ext.apply(model, EarlyTomConfig(prune_layers=(1, 3))).remove()
    with pytest.raises(ValueError, match="below the vision encoder depth"):
        earlytom_ext.apply(model, EarlyTomConfig(prune_layers=(1, 7)))


def test_video_placeholders_without_vision_start(model, videos):
    """5.x places a video by mm_token_type_ids: a prompt without <|vision_start|> runs and the identity
    configuration equals the unpatched model. 4.57 finds a video only after <|vision_start|> (without it
    the model gives the placeholders text positions): refused before the encoder."""
    pix, grid = patchify(videos[0])
    ids = torch.tensor([[5, 6] + [VID] * (grid[0] * grid[1] * grid[2] // 4) + [7, 8]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pix)
    inputs["video_grid_thw"] = torch.tensor([grid])
    if family_of(model) == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([1.0])
    if v5_rope(model):
        inputs["mm_token_type_ids"] = 2 * (ids == VID).long()
        with torch.no_grad():
            base = model(**inputs).logits
            with earlytom_ext.apply(model, IDENTITY):
                assert torch.equal(model(**inputs).logits, base)
        return
    calls = []
    hook = model.model.visual.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with earlytom_ext.apply(model, IDENTITY), torch.no_grad():
            with pytest.raises(
                ValueError, match=r"sample 0 has video or image placeholders without <\|vision_start\|>"
            ):
                model(**inputs)
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("check", ["before the encoder", "after it (the GPU path)"])
def test_image_placeholders_checked_against_image_grid_thw(model, videos, check, monkeypatch):
    """On the CPU the image runs are checked before the encoder; on a GPU (which would have to wait for
    the prompt) after it, from the host copy: the same errors either way."""
    img = make_video(1, seed=9, image_size=8)[0]  # one 8x8 image: grid (1, 4, 4), 4 placeholders
    inputs = make_inputs(model, videos, seed=9, images=[img, None])
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]
    no_image = {k: v for k, v in inputs.items() if k not in ("image_grid_thw", "pixel_values")}
    cases = [
        (no_image, r"more image placeholder runs than images: no image_grid_thw"),
        (dict(inputs, image_grid_thw=grid.repeat(2, 1)), r"image_grid_thw describes 2 images, input_ids hold 1 image"),
        (dict(inputs, image_grid_thw=torch.tensor([[1, 8, 4]])), r"image 0: 4 placeholders .* = \(1, 8, 4\) needs 8"),
    ]
    with earlytom_ext.apply(model, CFG) as h:
        if check != "before the encoder":
            monkeypatch.setattr(h.adapter, "check_prompt", lambda *args: None)
        ran = []
        hook = h.adapter.visual.patch_embed.register_forward_hook(lambda *args: ran.append(1))
        try:
            for call, needle in cases:
                ran.clear()
                with pytest.raises(ValueError, match=needle), torch.no_grad():
                    model(**call)
                assert bool(ran) == (check != "before the encoder")
        finally:
            hook.remove()


def test_compiled_model_runs_the_video_path_eagerly(family, videos):
    """model.compile(): the compression runs eagerly, the model call after it compiled (4.57: the
    positions handed to the prefill's get_rope_index differ call by call)."""
    model = build_model(family=family)
    second = make_inputs(model, [videos[1][:8]], seed=15, spgt=(2.0,))
    check_compiled_model(model, CFG, [make_inputs(model, videos, seed=14), second], second)


def test_published_geometry_runs_with_the_default_prune_layers(family):
    """32 blocks (Qwen2.5-VL: full attention in 7/15/23/31, 112-px windows), 14-px patches (the 7B
    layout, narrow): 4 frames of 224x224 (2 groups of 16x16 patches)."""
    m = build_model(depth=32, fullatt=(7, 15, 23, 31), hidden=16, patch=14, window=112, family=family)
    layers = QWEN2_5_VL_PRUNE_LAYERS if family == "qwen2_5_vl" else QWEN2_VL_PRUNE_LAYERS
    cfg = EarlyTomConfig(retain_ratio=0.25, tau=0.5, max_window=6, prune_layers=layers)
    vids = [make_video(4, seed=1, kind="static", image_size=224)]
    inputs = make_inputs(m, vids, seed=12, patch=14)
    with earlytom_ext.apply(m) as h:  # no config: the family's prune layers
        assert h.config == EarlyTomConfig(prune_layers=layers)
    with earlytom_ext.apply(m, cfg.replace(prune_layers=None)) as h:  # a config without them: the same
        assert h.config == cfg
    with earlytom_ext.apply(m, cfg) as h:
        assert h.adapter.default_prune_layers() == layers
        with torch.no_grad():
            logits = m(**inputs).logits
        st = h.last_stats["videos"][0]
    assert st["tokens_before"] == 2 * 64
    assert st["tokens_after"] == h.last_inputs["video_token_counts"][0] < 2 * 64
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (st["tokens_before"] - st["tokens_after"])
    # A preset's layers (LLaVA-OneVision's SigLIP) fit this encoder: accepted, with a warning naming the family's.
    family_name = "Qwen2.5-VL" if family == "qwen2_5_vl" else "Qwen2-VL"
    with pytest.warns(UserWarning, match=rf"prune_layers \(10, 21, 23\) are a paper preset's.*{family_name}'s own are"):
        earlytom_ext.apply(m, earlytom_ext.preset("videomme", 0.1)).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        earlytom_ext.apply(m, earlytom_ext.preset("videomme", 0.1).replace(prune_layers=None)).remove()
        earlytom_ext.apply(m, cfg.replace(prune_layers=(7, 15, 23))).remove()  # chosen by hand: no warning


@pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs CUDA and the CUDA kernels")
@pytest.mark.parametrize("grids", ["one grid", "two grids"])
def test_cuda_matches_cpu(model, videos, grids, monkeypatch):
    # fp32 on both sides: cuDNN runs the patch embedding's Conv3d in TF32 unless told otherwise.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    if grids == "one grid":
        inputs = make_inputs(model, videos, seed=13)
    else:
        inputs = make_inputs(model, mixed_grid_videos(), seed=13, spgt=(1.0, 0.5, 2.0))
    with earlytom_ext.apply(model, CFG) as h:
        cpu = h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        cpu_kept = [v["kept"] for v in h.last_stats["videos"]]
        with torch.no_grad():
            cpu_logits = model(**inputs).logits
        cpu_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    gm = build_model(family=family_of(model)).cuda()
    gi = {k: v.cuda() for k, v in inputs.items()}
    with earlytom_ext.apply(gm, CFG) as h:
        gpu = h.encode_videos(gi["pixel_values_videos"], video_grid_thw=gi["video_grid_thw"])
        gpu_kept = [v["kept"] for v in h.last_stats["videos"]]
        with torch.no_grad():
            gpu_logits = gm(**gi).logits
        gpu_gen = gm.generate(**gi, max_new_tokens=3, do_sample=False)
    assert gpu_kept == cpu_kept
    for a, b in zip(cpu, gpu):
        _close(a, b.cpu(), tol=1e-4)
    _close(cpu_logits, gpu_logits.cpu(), tol=1e-3)
    assert torch.equal(cpu_gen, gpu_gen.cpu())


_SYNC_SETUP = """
from test_qwen2_5_vl import CFG, build_model, make_inputs
from earlytom_ext.tiny_model import make_video
import earlytom_ext

videos = [
    make_video(12, seed=1, kind="scenes", scene_length=4, image_size=16),
    make_video(12, seed=2, kind="static", image_size=16),
]
if sys.argv[3] == "two grids":  # a third video on another grid: one encoder pass per grid
    videos.append(make_video(12, seed=3, kind="static", image_size=24)[:, :, :8, :])
m = build_model(family=sys.argv[2]).cuda()
inputs = make_inputs(m, videos, seed=5, spgt=(1.0, 0.5, 2.0))
grid = inputs.pop("video_grid_thw")  # on the host, as the processor gives it
inputs = {k: v.cuda() for k, v in inputs.items()}
h = earlytom_ext.apply(m, CFG)
"""


@pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs CUDA and the CUDA kernels")
@pytest.mark.parametrize("grids", ["one grid", "two grids"])
def test_cuda_host_syncs_at_most_one_per_prune_layer(family, grids, tmp_path):
    from tiny_models import call_syncs

    syncs = call_syncs(
        _SYNC_SETUP, 'h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=grid)', tmp_path, family, grids
    )
    # Stage I's size read per prune layer and encoder pass (one pass per spatial grid); no per-block
    # window-length read (the windows are batched from the host geometry) and no read of the refined
    # segments (an asynchronous copy).
    passes = 2 if grids == "two grids" else 1
    assert 1 <= len(syncs) <= passes * len(CFG.prune_layers), "\n".join(syncs)
