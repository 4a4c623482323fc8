"""EarlyTom for Hugging Face LLaVA-OneVision (transformers 4.57.x and 5.x).

``apply(model, cfg)`` patches one ``LlavaOnevisionForConditionalGeneration`` instance:

* **Inside the vision encoder** (only while a video goes through it, images are untouched):
  forward hooks on the prune layers merge frames with ``ops.merge_frames`` (Stage I), so the
  later layers run on fewer frames. Forward hooks on the last prune layer's ``q_proj`` and
  ``k_proj`` capture Q and K; ``ops.attention_received`` turns them into one score per token
  (no attention map is materialised and every layer keeps the model's attention
  implementation: sdpa, eager or flash). The scores travel with the frames through that
  layer's merge; the refined segmentation (``ops.segment_frames``) runs on the merged frames.
* **After the encoder**: the feature layer the model uses (``vision_feature_layer``), the
  select strategy, the model's own ``multi_modal_projector`` and bilinear pooling (features
  and scores), then Stage II (``ops.stage2_plan`` + ``ops.select_tokens``) per video and one
  ``image_newline`` per video.
* **Feeding the language model**: ``model.forward`` and ``model.generate`` are wrapped (as
  instance attributes). When ``pixel_values_videos`` is given, each sample's run of video
  placeholders in ``input_ids`` is shortened to the compressed count (``attention_mask`` and
  ``labels`` follow, padding kept on the side the inputs used), the compressed features are
  written into the input embeddings, and the model runs on ``inputs_embeds`` (image inputs in
  the same batch go through the model unchanged).

  - ``generate`` returns sequences whose prompt part is the caller's *original*
    ``input_ids`` (repeated per beam / returned sequence), so
    ``out[:, inputs["input_ids"].shape[1]:]`` is the generated text. An explicit
    ``max_length`` / ``min_length`` counts that original prompt (as without EarlyTom); a
    ``streamer`` receives the original prompt. Scores, hidden states and attentions returned by
    ``generate`` refer to the compressed prompt, and the KV cache is always used (Hugging Face
    forces it when generating from ``inputs_embeds``).
  - ``forward`` returns the model's output over the *compressed* sequence (``logits`` are
    ``[B, L', V]``); the compressed inputs are on ``handle.last_inputs``. An empty
    ``past_key_values`` may be passed to prefill; decoding then continues with
    ``handle.last_inputs["attention_mask"]``. A cache that already holds tokens is rejected.

``handle.remove()`` (or leaving a ``with`` block) restores the model exactly.

Benchmark seam: Stage I and the refined segmentation are called through
``handle._stage1(x, frame_counts, layer_index, extras) -> ops.MergeResult`` and
``handle._refine(x, frame_counts) -> (segments, segment_counts)``; a benchmark may override
them on the handle instance (e.g. to force a fixed merge pattern).
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

# Import the ops package as a submodule first (``from .ops import ...``): this binds
# ``earlytom_ext.ops`` without going through the package's lazy ``__getattr__``.
from .ops import merge as _merge_ops
from . import ops
from ._validation import check_finite
from .config import EarlyTomConfig

__all__ = ["apply", "EarlyTomHandle"]

_MISSING = object()
_MARKER = "_earlytom_handle"


# --------------------------------------------------------------------------------------------
# Model discovery
# --------------------------------------------------------------------------------------------
class _Parts:
    """The pieces of a LLaVA-OneVision model that EarlyTom touches, found by structure."""

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        inner = getattr(model, "model", None)
        if not isinstance(model, nn.Module) or not isinstance(inner, nn.Module):
            raise TypeError(
                "model must be a Hugging Face LlavaOnevisionForConditionalGeneration (with a `.model` "
                f"holding the vision tower and the language model), got {name}"
            )
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type != "llava_onevision":
            raise TypeError(
                "earlytom_ext.apply supports Hugging Face LLaVA-OneVision models (config.model_type "
                f"'llava_onevision'), got {name} with model_type {model_type!r}"
            )
        missing = [a for a in ("vision_tower", "multi_modal_projector", "image_newline", "apply_pooling")
                   if not hasattr(inner, a)]
        if missing or not callable(getattr(model, "generate", None)):
            raise TypeError(
                "model must be a Hugging Face LlavaOnevisionForConditionalGeneration-like model "
                f"(model.model needs vision_tower, multi_modal_projector, image_newline, apply_pooling; the model needs "
                f"generate); {name} lacks {missing or ['generate']}"
            )
        vcfg = getattr(config, "vision_config", None)
        video_token_id = getattr(config, "video_token_id", None)
        if video_token_id is None:
            video_token_id = getattr(config, "video_token_index", None)
        if vcfg is None or video_token_id is None:
            raise TypeError(f"model.config must have vision_config and video_token_id (LLaVA-OneVision), got {name}")
        self.model = model
        self.inner = inner
        self.config = config
        self.video_token_id = int(video_token_id)
        self.tower = inner.vision_tower
        vm = getattr(self.tower, "vision_model", self.tower)
        encoder = getattr(vm, "encoder", None)
        layers = getattr(encoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise TypeError(
                "unsupported vision tower: expected a SigLIP-like encoder with `encoder.layers` "
                f"(nn.ModuleList), got {type(vm).__name__}"
            )
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj")):
                raise TypeError(
                    "unsupported vision tower: every encoder layer needs `self_attn` with separate "
                    f"`q_proj` and `k_proj` linears (SigLIP); layer {i} is {type(layer).__name__}"
                )
        self.layers = layers
        self.depth = len(layers)
        image_size = getattr(vcfg, "image_size", None)
        patch_size = getattr(vcfg, "patch_size", None)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise TypeError("model.config.vision_config needs integer image_size and patch_size")
        self.image_size = image_size
        self.num_channels = getattr(vcfg, "num_channels", 3)
        self.grid = image_size // patch_size  # HF's apply_pooling: height = width = image_size // patch_size
        self.pooled = math.ceil(self.grid / 2)
        self.tokens_per_frame = self.pooled * self.pooled

    def attention_geometry(self, layer_index: int):
        attn = self.layers[layer_index].self_attn
        q_out = attn.q_proj.out_features
        num_heads = getattr(attn, "num_heads", None)
        if num_heads is None:
            num_heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
        if not isinstance(num_heads, int) or num_heads < 1 or q_out % num_heads:
            raise TypeError(f"cannot determine the number of heads of {type(attn).__name__} (layer {layer_index})")
        scale = getattr(attn, "scale", None)
        if not isinstance(scale, (int, float)):
            scale = (q_out // num_heads) ** -0.5
        return attn, num_heads, float(scale)

    def feature_layers(self, vision_feature_layer) -> List[int]:
        """Encoder layer indices whose outputs form the features (``hidden_states[j]`` is the
        output of layer ``j - 1``; ``hidden_states[0]`` is the embedding output)."""
        idx = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
        out = []
        n = self.depth + 1
        for j in idx:
            if not isinstance(j, int) or isinstance(j, bool) or not -n <= j < n:
                raise ValueError(
                    f"vision_feature_layer must be an int (or list of ints) in [-{n}, {n - 1}], got {vision_feature_layer!r}"
                )
            out.append((j % n) - 1)
        return out


# --------------------------------------------------------------------------------------------
# Timing (CUDA events resolved lazily; perf_counter on CPU)
# --------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: List[tuple] = []

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def span(self, name: str, start, end) -> None:
        self.spans.append((name, start, end))

    def resolve(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name, a, b in self.spans:
            if self.cuda:
                b.synchronize()
                ms = float(a.elapsed_time(b))
            else:
                ms = (b - a) * 1000.0
            out[name] = out.get(name, 0.0) + ms
        return out


class _Run:
    """Per-call state of one pass of videos through the vision tower."""

    def __init__(self, frame_counts: torch.Tensor, capture: Sequence[int], clock: _Clock):
        self.frame_counts = frame_counts
        self.capture = set(capture)
        self.captured: Dict[int, torch.Tensor] = {}
        self.q = None
        self.k = None
        self.scores = None
        self.merges: List[tuple] = []  # (layer, frame_counts, plan_src, plan_weight)
        self.refined = None
        self.clock = clock


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------
class EarlyTomHandle:
    """Returned by :func:`apply`. ``remove()`` undoes everything; usable as a context manager.

    Attributes:
        config: the :class:`EarlyTomConfig` in use.
        last_stats: statistics of the last video batch (see :meth:`last_stats`).
        last_inputs: the compressed language-model inputs of the last patched ``forward`` /
            ``generate`` call (``input_ids``, ``attention_mask``, ``labels`` when given,
            ``video_token_counts``).
    """

    def __init__(self, model: nn.Module, cfg: EarlyTomConfig, parts: _Parts):
        self._model = model
        self._cfg = cfg
        self._parts = parts
        self._hooks: List[Any] = []
        self._run: Optional[_Run] = None
        self._raw_stats: Optional[dict] = None
        self._stats_cache: Optional[dict] = None
        self._prev_attrs: Dict[str, Any] = {}
        self._removed = False
        self.last_inputs: Optional[dict] = None
        last = cfg.prune_layers[-1]
        self._score_attn, self._num_heads, self._scale = parts.attention_geometry(last)

    # ---------------------------------------------------------------- public
    @property
    def config(self) -> EarlyTomConfig:
        return self._cfg

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per frame after pooling (196 for LLaVA-OneVision's SigLIP)."""
        return self._parts.tokens_per_frame

    @property
    def last_stats(self) -> Optional[dict]:
        """Statistics of the last video batch, or ``None`` before the first one::

            {
              "videos": [  # one dict per video
                {"frames_before": T,
                 "frames_after": {prune_layer: frames after Stage I at that layer, ...},
                 "segments": [(start, end), ...],   # refined segments, local merged-frame indices
                 "frame_sources": [[orig frames merged into merged frame i], ...],
                 "ratio": r',                        # adjusted retain ratio
                 "tokens_before": T * 196 + 1,       # what the unpatched model feeds the LLM
                 "tokens_after": kept + 1,           # kept tokens + image_newline
                 "kept": [(merged frame, position in the 14x14 grid), ...]},
              ],
              "timings_ms": {"vision_tower": ..., "stage1_layer<p>": ..., "attention_score": ...,
                             "refine_segments": ..., "projector": ..., "pooling": ...,
                             "stage2": ..., "total": ...},
              "prune_layers": (...), "tokens_per_frame": 196, "device": "cpu" | "cuda:0",
            }

        Device values are copied to the host on first access (not during the forward pass).
        """
        if self._raw_stats is None:
            return None
        if self._stats_cache is None:
            self._stats_cache = self._materialize_stats(self._raw_stats)
        return self._stats_cache

    def remove(self) -> None:
        """Remove every hook and instance attribute added by :func:`apply` (idempotent)."""
        if self._removed:
            return
        model = self._model
        for name in ("forward", "generate"):
            cur = model.__dict__.get(name, _MISSING)
            if cur is not _MISSING and getattr(cur, "_earlytom_wrapper_of", None) is not self:
                raise RuntimeError(
                    f"model.{name} was replaced after earlytom_ext.apply(); remove that wrapper first"
                )
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name, prev in self._prev_attrs.items():
            if prev is _MISSING:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = prev
        self._prev_attrs.clear()
        model.__dict__.pop(_MARKER, None)
        self._run = None
        self._removed = True

    def __enter__(self) -> "EarlyTomHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"EarlyTomHandle({state}, {self._cfg!r})"

    # ---------------------------------------------------------------- benchmark seam
    def _stage1(self, x: torch.Tensor, frame_counts: torch.Tensor, layer_index: int, extras=None):
        """Stage I at one prune layer: returns an ``ops.MergeResult``."""
        return ops.merge_frames(x, frame_counts, self._cfg, extras=extras)

    def _refine(self, x: torch.Tensor, frame_counts: torch.Tensor):
        """Refined segmentation at the last prune layer: ``(segments [K, 2] global, segment_counts [B])``."""
        return ops.segment_frames(x, frame_counts, self._cfg)

    def _attention_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Attention received per token of the score layer, ``[N, S]`` fp32."""
        # The pixels were checked for NaN/Inf; skip the op's check (a host sync).
        return ops.attention_received(q, k, scale=self._scale, num_heads=self._num_heads, check_finite=False)

    # ---------------------------------------------------------------- installation
    def _install(self) -> None:
        p = self._parts
        cfg = self._cfg
        last = cfg.prune_layers[-1]
        for idx in sorted(set(cfg.prune_layers) | set(range(last, p.depth))):
            self._hooks.append(p.layers[idx].register_forward_hook(functools.partial(self._on_layer, idx)))
        self._hooks.append(self._score_attn.q_proj.register_forward_hook(self._on_q))
        self._hooks.append(self._score_attn.k_proj.register_forward_hook(self._on_k))
        model = self._model
        for name, wrapper in (("forward", self._make_forward()), ("generate", self._make_generate())):
            self._prev_attrs[name] = model.__dict__.get(name, _MISSING)
            model.__dict__[name] = wrapper
        model.__dict__[_MARKER] = self

    # ---------------------------------------------------------------- hooks
    def _on_q(self, module, args, output):
        if self._run is not None:
            self._run.q = output

    def _on_k(self, module, args, output):
        if self._run is not None:
            self._run.k = output

    def _on_layer(self, idx: int, module, args, output):
        run = self._run
        if run is None:
            return None
        x = output[0] if isinstance(output, (tuple, list)) else output
        cfg = self._cfg
        prune = idx in cfg.prune_layers
        if prune:
            clock = run.clock
            extras = None
            if idx == cfg.prune_layers[-1]:
                if run.q is None or run.k is None:
                    raise RuntimeError("EarlyTom: Q/K of the score layer were not captured")
                t0 = clock.now()
                extras = self._attention_scores(run.q, run.k)
                run.q = run.k = None
                clock.span("attention_score", t0, clock.now())
            t0 = clock.now()
            res = self._stage1(x, run.frame_counts, idx, extras)
            clock.span(f"stage1_layer{idx}", t0, clock.now())
            x = res.x
            run.frame_counts = res.frame_counts
            run.merges.append((idx, res.frame_counts, res.plan_src, res.plan_weight))
            if idx == cfg.prune_layers[-1]:
                if res.extras is None:
                    raise RuntimeError("EarlyTom: Stage I at the score layer must return the merged scores")
                run.scores = res.extras
                t0 = clock.now()
                run.refined = self._refine(x, run.frame_counts)
                clock.span("refine_segments", t0, clock.now())
        if idx in run.capture:
            run.captured[idx] = x
        if not prune:
            return None
        if isinstance(output, tuple):
            return (x,) + tuple(output[1:])
        if isinstance(output, list):
            return [x] + list(output[1:])
        return x

    # ---------------------------------------------------------------- the video path
    def _feature_plan(self, vision_feature_layer=None, vision_feature_select_strategy=None):
        """``(encoder layers whose outputs form the features, select strategy)``: the call's values,
        else the model config's; checked against the prune layers."""
        c = self._parts.config
        layer = vision_feature_layer if vision_feature_layer is not None else getattr(c, "vision_feature_layer", -1)
        strategy = (vision_feature_select_strategy if vision_feature_select_strategy is not None
                    else getattr(c, "vision_feature_select_strategy", "full"))
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        layers = self._parts.feature_layers(layer)
        last = self._cfg.prune_layers[-1]
        if min(layers) < last:
            raise ValueError(
                f"vision_feature_layer {layer!r} selects encoder layer {min(layers)}, before the "
                f"last prune layer {last}: EarlyTom needs the features from the last prune layer on "
                f"(lower EarlyTomConfig.prune_layers)"
            )
        return layers, strategy

    def _check_pixels(self, pv) -> tuple:
        """``(B, T)`` of a ``pixel_values_videos`` tensor (type, shape and geometry checked)."""
        if self._removed:
            raise RuntimeError("this EarlyTom handle was removed")
        p = self._parts
        if not isinstance(pv, torch.Tensor):
            raise TypeError(f"pixel_values_videos must be a torch.Tensor [B, T, 3, H, W], got {type(pv).__name__}")
        if pv.dim() != 5:
            raise ValueError(f"pixel_values_videos must have 5 dimensions [B, T, 3, H, W], got shape {tuple(pv.shape)}")
        B, T = int(pv.shape[0]), int(pv.shape[1])
        if B < 1:
            raise ValueError(f"pixel_values_videos must hold at least one video, got shape {tuple(pv.shape)}")
        if T < 1:
            raise ValueError(f"every video must have at least 1 frame, got shape {tuple(pv.shape)} (T = {T})")
        if not pv.is_floating_point():
            raise TypeError(f"pixel_values_videos must be a floating-point tensor, got {pv.dtype}")
        frame_shape = (p.num_channels, p.image_size, p.image_size)
        if tuple(pv.shape[2:]) != frame_shape:
            raise ValueError(
                f"pixel_values_videos must be [B, T, {', '.join(map(str, frame_shape))}] (the vision tower's "
                f"num_channels and image_size), got shape {tuple(pv.shape)}"
            )
        return B, T

    @torch.no_grad()
    def encode_videos(self, pixel_values_videos: torch.Tensor, vision_feature_layer=None,
                      vision_feature_select_strategy=None) -> List[torch.Tensor]:
        """Compressed LLM features of a batch of videos.

        ``pixel_values_videos``: ``[B, T, 3, H, W]`` (as the LLaVA-OneVision processor makes it).
        Returns a list of ``B`` tensors ``[n_b + 1, hidden]`` (kept tokens, then
        ``image_newline``) in the projector's dtype (as Hugging Face returns them). Statistics go to ``last_stats``.
        """
        pv = pixel_values_videos
        B, T = self._check_pixels(pv)
        check_finite("pixel_values_videos", pv)
        feat_layers, strategy = self._feature_plan(vision_feature_layer, vision_feature_select_strategy)
        p = self._parts
        tower = p.tower
        ref_param = next(tower.parameters())
        device, vdtype = ref_param.device, ref_param.dtype
        pix = pv.reshape(B * T, *pv.shape[2:]).to(device=device, dtype=vdtype)
        frame_counts = torch.full((B,), T, dtype=torch.int64, device=device)
        clock = _Clock(device)
        run = _Run(frame_counts, feat_layers, clock)

        t_start = clock.now()
        self._run = run  # arms the hooks for this call only (images through the tower stay untouched)
        try:
            tower(pixel_values=pix)
        finally:
            self._run = None
        t_tower = clock.now()
        clock.span("vision_tower", t_start, t_tower)
        if run.refined is None or any(li not in run.captured for li in feat_layers):
            raise RuntimeError("EarlyTom: the vision tower did not run through the patched layers")

        # Features of the layer(s) the model uses, then the select strategy (as HF does).
        feats = run.captured[feat_layers[0]] if len(feat_layers) == 1 else torch.cat(
            [run.captured[li] for li in feat_layers], dim=-1)
        scores = run.scores
        if strategy == "default":
            feats = feats[:, 1:]
            scores = scores[:, 1:]
        S = feats.shape[1]
        if S != p.grid * p.grid:
            raise ValueError(
                f"EarlyTom needs a square {p.grid}x{p.grid} token grid per frame for pooling, got {S} tokens "
                f"(vision_feature_select_strategy={strategy!r})"
            )
        t0 = clock.now()
        proj = p.inner.multi_modal_projector(feats)
        t1 = clock.now()
        clock.span("projector", t0, t1)
        pooled = p.inner.apply_pooling(proj)
        pooled_scores = p.inner.apply_pooling(scores.unsqueeze(-1).to(torch.float32)).squeeze(-1)
        t2 = clock.now()
        clock.span("pooling", t1, t2)

        segments, segment_counts = run.refined
        segs_local = _merge_ops.segments_per_video(segments, segment_counts, run.frame_counts)
        plan = ops.stage2_plan(segs_local, [T] * B, self._cfg.retain_ratio, tokens_per_frame=p.tokens_per_frame)
        tokens, index = ops.select_tokens(pooled, pooled_scores, plan)
        newline = p.inner.image_newline.to(device=tokens.device, dtype=tokens.dtype)[None, :]
        per_video = [torch.cat([t, newline], dim=0) for t in torch.split(tokens, list(plan.tokens_per_video), dim=0)]
        t3 = clock.now()
        clock.span("stage2", t2, t3)
        clock.span("total", t_start, t3)

        self._raw_stats = {
            "B": B, "T": T, "merges": run.merges, "segments": segs_local, "plan": plan, "index": index,
            "final_counts": run.frame_counts, "clock": clock, "device": str(device),
        }
        self._stats_cache = None
        return per_video

    def _materialize_stats(self, raw: dict) -> dict:
        B, T = raw["B"], raw["T"]
        P = self._parts.tokens_per_frame
        plan = raw["plan"]
        merges = raw["merges"]
        # Frame provenance: which original frames each merged frame is made of.
        sources = [[t] for t in range(B * T)]
        counts_per_layer = {}
        for layer, counts, plan_src, _w in merges:
            src = plan_src.tolist()
            sources = [sorted(set(sources[a]) | set(sources[b])) for a, b in src]
            counts_per_layer[layer] = [int(c) for c in counts.tolist()]
        index = raw["index"].tolist()
        final_counts = [int(c) for c in raw["final_counts"].tolist()]
        offsets = [0]
        for c in final_counts:
            offsets.append(offsets[-1] + c)
        kept_per_video: List[List[tuple]] = [[] for _ in range(B)]
        v = 0
        for f, pos in index:
            while f >= offsets[v + 1]:
                v += 1
            kept_per_video[v].append((f - offsets[v], pos))
        videos = []
        for b in range(B):
            srcs = [[s - b * T for s in sources[i]] for i in range(offsets[b], offsets[b + 1])]
            videos.append({
                "frames_before": T,
                "frames_after": {layer: counts_per_layer[layer][b] for layer in counts_per_layer},
                "segments": [tuple(s) for s in raw["segments"][b]],
                "frame_sources": srcs,
                "ratio": float(plan.ratios[b]),
                "tokens_before": T * P + 1,
                "tokens_after": int(plan.tokens_per_video[b]) + 1,
                "kept": kept_per_video[b],
            })
        return {
            "videos": videos,
            "timings_ms": raw["clock"].resolve(),
            "prune_layers": tuple(self._cfg.prune_layers),
            "tokens_per_frame": P,
            "device": raw["device"],
        }

    # ---------------------------------------------------------------- LLM inputs
    def _pad_token_id(self) -> int:
        m = self._model
        for src in (getattr(m, "generation_config", None), self._parts.config,
                    getattr(self._parts.config, "text_config", None)):
            v = getattr(src, "pad_token_id", None)
            if isinstance(v, int):
                return v
        return 0

    def prepare_inputs(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                       vision_feature_layer=None, vision_feature_select_strategy=None,
                       padding_side: Optional[str] = None) -> dict:
        """Compress the videos and rewrite the language-model inputs.

        Returns ``{"input_ids", "attention_mask", "inputs_embeds", "labels" (when given),
        "video_token_counts"}``: every sample's run of ``T*196+1`` video placeholders becomes a
        run of the compressed length, the batch is re-padded on the side the inputs used
        (``padding_side`` when the inputs had no padding; default ``"left"``), and the
        compressed video features are written into ``inputs_embeds`` at the placeholders.
        The video features carry no gradient; the input embeddings follow the caller's grad mode.
        """
        p = self._parts
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                "input_ids must be an integer tensor [batch, seq_len] when pixel_values_videos is given, got "
                f"{type(input_ids).__name__}{'' if not isinstance(input_ids, torch.Tensor) else tuple(input_ids.shape)}"
            )
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        Bs, L = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (Bs, L):
            raise ValueError(f"attention_mask must have the shape of input_ids {(Bs, L)}, got {tuple(attention_mask.shape)}")
        if labels is not None and tuple(labels.shape) != (Bs, L):
            raise ValueError(f"labels must have the shape of input_ids {(Bs, L)}, got {tuple(labels.shape)}")
        B, T = self._check_pixels(pixel_values_videos)
        n0 = T * p.tokens_per_frame + 1
        vid = p.video_token_id

        ids_host = input_ids.tolist()
        mask_host = attention_mask.tolist() if attention_mask is not None else [[1] * L for _ in range(Bs)]
        labels_host = labels.tolist() if labels is not None else None
        # The runs of placeholders, one per video, in the order HF fills them (sample-major).
        flat = [tuple(bi) for bi in (input_ids == vid).nonzero().tolist()]  # row-major = sample-major
        if len(flat) != B * n0:
            raise ValueError(
                f"input_ids hold {len(flat)} video placeholder tokens (id {vid}), but {B} video(s) of {T} frames "
                f"need {B} x {n0} = {B * n0} (T * {p.tokens_per_frame} + 1 per video)"
            )
        runs: Dict[int, List[tuple]] = {}
        for v in range(B):
            chunk = flat[v * n0:(v + 1) * n0]
            b0, s = chunk[0]
            if any(b != b0 for b, _ in chunk) or chunk[-1][1] - s != n0 - 1:
                raise ValueError(
                    f"the {n0} video placeholders of video {v} must be one contiguous run in one sample of input_ids"
                )
            runs.setdefault(b0, []).append((s, s + n0, v))
        feats = self.encode_videos(pixel_values_videos, vision_feature_layer, vision_feature_select_strategy)

        # Padding: leading / trailing zeros of the attention mask.
        lead = [0] * Bs
        trail = [0] * Bs
        if attention_mask is not None:
            for b in range(Bs):
                row = mask_host[b]
                while lead[b] < L and row[lead[b]] == 0:
                    lead[b] += 1
                while trail[b] < L - lead[b] and row[L - 1 - trail[b]] == 0:
                    trail[b] += 1
        if padding_side is None:
            padding_side = "right" if any(trail) and not any(lead) else "left"
        pad_id = None
        for b in range(Bs):
            if lead[b]:
                pad_id = ids_host[b][0]
                break
            if trail[b]:
                pad_id = ids_host[b][L - 1]
                break
        if pad_id is None:
            pad_id = self._pad_token_id()

        counts = [int(f.shape[0]) for f in feats]
        new_ids, new_mask, new_labels = [], [], []
        for b in range(Bs):
            ids_b, mask_b = ids_host[b], mask_host[b]
            lab_b = labels_host[b] if labels_host is not None else None
            o_ids, o_mask, o_lab = [], [], []
            pos = lead[b]
            end = L - trail[b]
            for s, e, v in sorted(runs.get(b, [])):
                o_ids += ids_b[pos:s]
                o_mask += mask_b[pos:s]
                o_ids += [vid] * counts[v]
                o_mask += [mask_b[s]] * counts[v]
                if lab_b is not None:
                    o_lab += lab_b[pos:s] + [lab_b[s]] * counts[v]
                pos = e
            o_ids += ids_b[pos:end]
            o_mask += mask_b[pos:end]
            if lab_b is not None:
                o_lab += lab_b[pos:end]
            new_ids.append(o_ids)
            new_mask.append(o_mask)
            new_labels.append(o_lab)
        L2 = max(len(s) for s in new_ids)

        def pad(rows, value):
            out = []
            for r in rows:
                fill = [value] * (L2 - len(r))
                out.append(fill + r if padding_side == "left" else r + fill)
            return out

        dev = input_ids.device
        ids_t = torch.tensor(pad(new_ids, pad_id), dtype=input_ids.dtype, device=dev)
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        mask_dev = attention_mask.device if attention_mask is not None else dev
        mask_t = torch.tensor(pad(new_mask, 0), dtype=mask_dtype, device=mask_dev)
        result = {"input_ids": ids_t, "attention_mask": mask_t}
        if labels is not None:
            result["labels"] = torch.tensor(pad(new_labels, -100), dtype=labels.dtype, device=labels.device)

        embed = p.inner.get_input_embeddings() if hasattr(p.inner, "get_input_embeddings") else self._model.get_input_embeddings()
        emb_ids = ids_t.to(embed.weight.device)
        emb = embed(emb_ids)
        video_mask = (emb_ids == vid).unsqueeze(-1)
        flat_feats = torch.cat(feats, dim=0).to(device=emb.device, dtype=emb.dtype)
        result["inputs_embeds"] = emb.masked_scatter(video_mask, flat_feats)
        result["video_token_counts"] = counts
        self.last_inputs = {k: v for k, v in result.items() if k != "inputs_embeds"}
        return result

    # ---------------------------------------------------------------- forward / generate
    def _compress_call(self, call: dict, pixel_values_videos: torch.Tensor, input_ids) -> dict:
        """Shared by the ``forward`` and ``generate`` wrappers: compress the videos and rewrite the
        call's arguments in place (``inputs_embeds``, ``attention_mask``, ``labels``,
        ``position_ids``). Returns :meth:`prepare_inputs`' result."""
        if call.get("inputs_embeds") is not None:
            raise ValueError("EarlyTom needs input_ids (not inputs_embeds) together with pixel_values_videos")
        if _cache_holds_tokens(call.get("past_key_values")):
            raise ValueError(
                "past_key_values must be empty (or None) when pixel_values_videos is given under EarlyTom: a cache "
                "that already holds tokens cannot line up with the compressed prompt"
            )
        call.pop("image_sizes_videos", None)
        call.pop("cache_position", None)
        prep = self.prepare_inputs(
            input_ids, pixel_values_videos, attention_mask=call.pop("attention_mask", None),
            labels=call.pop("labels", None), vision_feature_layer=call.get("vision_feature_layer"),
            vision_feature_select_strategy=call.get("vision_feature_select_strategy"))
        if call.get("position_ids") is not None:
            call["position_ids"] = _positions_from_mask(prep["attention_mask"]).to(call["position_ids"].device)
        call.update(inputs_embeds=prep["inputs_embeds"], attention_mask=prep["attention_mask"])
        if "labels" in prep:
            call["labels"] = prep["labels"]
        return prep

    def _shift_lengths(self, call: dict, prompt_len: int, compressed_len: int) -> None:
        """Keep ``max_length`` / ``min_length`` counting the caller's prompt: an explicit value (in the
        call, its ``generation_config`` or the model's) that is not overridden by ``max_new_tokens`` /
        ``min_new_tokens`` is lowered by the number of tokens the compression removed."""
        shift = prompt_len - compressed_len
        if shift == 0:
            return
        from transformers import GenerationConfig

        defaults = GenerationConfig()
        configs = (call.get("generation_config"), getattr(self._model, "generation_config", None))

        def explicit(name):
            if call.get(name) is not None:
                return call[name]
            for gc in configs:
                v = getattr(gc, name, None)
                if v is not None and v != getattr(defaults, name, None):
                    return v
            return None

        if explicit("max_new_tokens") is None:
            max_length = explicit("max_length")
            if max_length is not None:
                if max_length <= prompt_len:
                    raise ValueError(
                        f"max_length must be larger than the prompt length input_ids.shape[1] = {prompt_len} "
                        f"(it counts the prompt), got {max_length}; or give max_new_tokens"
                    )
                call["max_length"] = max_length - shift
        if explicit("min_new_tokens") is None:
            min_length = explicit("min_length")
            if min_length:
                call["min_length"] = max(0, min_length - shift)

    def _make_forward(self):
        orig = self._model.forward  # bound (or a previous instance wrapper)
        bind = _binder(orig)
        handle = self

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if not args and kwargs.get("pixel_values_videos") is None:
                return orig(*args, **kwargs)
            call = bind(args, kwargs)
            pv = call.pop("pixel_values_videos", None)
            if pv is not None:
                handle._compress_call(call, pv, call.pop("input_ids", None))
            return orig(**call)

        forward._earlytom_wrapper_of = self
        return forward

    def _make_generate(self):
        orig = self._model.generate
        bind = _binder(orig)
        first = next(iter(inspect.signature(orig).parameters))  # "inputs"
        handle = self

        @functools.wraps(orig)
        def generate(*args, **kwargs):
            if kwargs.get("pixel_values_videos") is None:
                return orig(*args, **kwargs)
            call = bind(args, kwargs)
            pv = call.pop("pixel_values_videos")
            inputs, input_ids = call.pop(first, None), call.pop("input_ids", None)
            if inputs is not None and input_ids is not None:
                raise ValueError(f"give the prompt once: as input_ids or as {first} (positionally), not both")
            if input_ids is None:
                input_ids = inputs
            with torch.no_grad():  # generate is inference only
                prep = handle._compress_call(call, pv, input_ids)
            L, L2 = input_ids.shape[1], prep["input_ids"].shape[1]
            handle._shift_lengths(call, L, L2)
            if call.get("streamer") is not None:
                call["streamer"] = _PromptStreamer(call["streamer"], input_ids, L2)
            out = orig(prep["input_ids"], **call)
            return _restore_prompt(out, L2, input_ids)

        generate._earlytom_wrapper_of = self
        return generate


def _binder(fn):
    """``bind(args, kwargs) -> dict`` of ``fn``'s arguments by name (``**kwargs`` flattened in)."""
    sig = inspect.signature(fn)
    varkw = next((n for n, prm in sig.parameters.items() if prm.kind is prm.VAR_KEYWORD), None)

    def bind(args, kwargs) -> dict:
        call = dict(sig.bind_partial(*args, **kwargs).arguments)
        if varkw is not None:
            call.update(call.pop(varkw, {}))
        return call

    return bind


def _cache_holds_tokens(past_key_values) -> bool:
    if past_key_values is None:
        return False
    length = getattr(past_key_values, "get_seq_length", None)
    if callable(length):
        return int(length()) > 0
    return not isinstance(past_key_values, (tuple, list)) or len(past_key_values) > 0


class _PromptStreamer:
    """Gives a ``generate`` streamer the caller's prompt in place of the compressed one (Hugging
    Face puts the prompt first, then each new token)."""

    def __init__(self, streamer, prompt: torch.Tensor, compressed_len: int):
        self._streamer = streamer
        self._prompt = prompt
        self._compressed_len = compressed_len

    def put(self, value):
        if self._prompt is not None and value.dim() == 2 and value.shape[1] == self._compressed_len:
            value = self._prompt.to(value.device)
        self._prompt = None
        self._streamer.put(value)

    def end(self):
        self._streamer.end()

    def __getattr__(self, name):
        return getattr(self._streamer, name)


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _restore_prompt(out, compressed_len: int, original_ids: torch.Tensor):
    """Replace the compressed prompt at the start of generated sequences by the original one
    (repeated per beam / returned sequence, as ``generate`` expands its inputs)."""
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if not isinstance(seqs, torch.Tensor):
        return out
    orig = original_ids.to(device=seqs.device, dtype=seqs.dtype)
    orig = orig.repeat_interleave(seqs.shape[0] // orig.shape[0], dim=0)
    full = torch.cat([orig, seqs[:, compressed_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def apply(model: nn.Module, cfg: Optional[EarlyTomConfig] = None) -> EarlyTomHandle:
    """Patch one Hugging Face LLaVA-OneVision model with EarlyTom.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration`` (transformers 4.57.x or 5.x).
        cfg: the :class:`EarlyTomConfig` (default ``EarlyTomConfig()``); its prune layers must be
            below the vision encoder's depth and not after the feature layer.

    Returns:
        an :class:`EarlyTomHandle` (``remove()``, context manager, ``last_stats``,
        ``last_inputs``, ``config``, ``encode_videos``, ``prepare_inputs``).

    Raises:
        TypeError: the model is not a supported LLaVA-OneVision model (or cfg is not an
            ``EarlyTomConfig``).
        ValueError: the config does not fit the model.
        RuntimeError: EarlyTom is already applied to this model.
    """
    if cfg is None:
        cfg = EarlyTomConfig()
    if not isinstance(cfg, EarlyTomConfig):
        raise TypeError(f"cfg must be an earlytom_ext.EarlyTomConfig, got {type(cfg).__name__}")
    if isinstance(model, nn.Module) and isinstance(model.__dict__.get(_MARKER), EarlyTomHandle):
        raise RuntimeError("EarlyTom is already applied to this model; call handle.remove() first")
    parts = _Parts(model)
    cfg.validate(num_layers=parts.depth)
    handle = EarlyTomHandle(model, cfg, parts)
    handle._feature_plan()
    handle._install()
    return handle
