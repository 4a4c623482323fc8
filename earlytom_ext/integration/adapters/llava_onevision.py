"""LLaVA-OneVision (SigLIP encoder, 2x2 bilinear pooling, one ``image_newline`` per video).

Stage I runs in forward hooks on the SigLIP prune layers (a hook that returns fewer frames makes
every later layer run on fewer frames, in transformers 4.57 and 5.x); Q and K of the last prune
layer are captured by hooks on its ``q_proj`` / ``k_proj`` (every layer keeps the model's attention
implementation). After the encoder: the feature layer(s), the select strategy, the model's projector,
then pooling of features and scores (channels-last, bit-identical to the model's ``apply_pooling``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ...config import EarlyTomConfig
from ..pooling import bilinear_pool
from ..run import VideoRun
from .base import EncodedVideos, ModelAdapter, VideoInputs, scaled_prune_layers

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(ModelAdapter):
    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    #: what ``model.model`` must hold (the modules the video path calls)
    required_modules: tuple[str, ...] = ("vision_tower", "multi_modal_projector", "image_newline")
    #: the encoder of the videos in ``model.model``
    tower_name: str = "vision_tower"
    video_arg = "pixel_values_videos"
    video_kwargs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes_videos")
    consumed_kwargs = ("image_sizes_videos",)  # only the unpatched video path reads it
    extra_tokens_per_video = 1  # image_newline
    presets_tuned = True  # the paper's model: its presets' prune layers are SigLIP's

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        inner = getattr(model, "model", None)
        if not isinstance(model, nn.Module) or not isinstance(inner, nn.Module):
            raise TypeError(
                f"model must be a Hugging Face {self.model_class} (with a `.model` "
                f"holding the vision tower and the language model), got {name}"
            )
        config = getattr(model, "config", None)
        missing = [a for a in self.required_modules if not hasattr(inner, a)]
        if missing or not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"model must be a Hugging Face {self.model_class}-like model "
                f"(model.model needs {', '.join(self.required_modules)}; the model needs "
                f"generate); {name} lacks {missing or ['generate']}"
            )
        vcfg = getattr(config, "vision_config", None)
        video_token_id = getattr(config, "video_token_id", None)
        if video_token_id is None:
            video_token_id = getattr(config, "video_token_index", None)
        if vcfg is None or video_token_id is None:
            raise TypeError(f"model.config must have vision_config and video_token_id ({self.family}), got {name}")
        self.inner = inner
        self.config = config
        self.video_token_id = int(video_token_id)
        self.tower = getattr(inner, self.tower_name)
        vm = getattr(self.tower, "vision_model", self.tower)
        layers = getattr(getattr(vm, "encoder", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise TypeError(
                "unsupported vision tower: expected a SigLIP- or CLIP-like encoder with `encoder.layers` "
                f"(nn.ModuleList), got {type(vm).__name__}"
            )
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj")):
                raise TypeError(
                    "unsupported vision tower: every encoder layer needs `self_attn` with separate "
                    f"`q_proj` and `k_proj` linears (SigLIP, CLIP); layer {i} is {type(layer).__name__}"
                )
        self.layers = layers
        self.depth = len(layers)
        # CLIP puts a class token before the patches; only the 'default' strategy drops it.
        self.class_token = isinstance(getattr(getattr(vm, "embeddings", None), "class_embedding", None), torch.Tensor)
        image_size = getattr(vcfg, "image_size", None)
        patch_size = getattr(vcfg, "patch_size", None)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise TypeError("model.config.vision_config needs integer image_size and patch_size")
        self.image_size = image_size
        self.num_channels = getattr(vcfg, "num_channels", 3)
        self.grid = image_size // patch_size  # as HF's apply_pooling
        self.tokens_per_frame = self.pooled_tokens()
        self._hooks: list[Any] = []
        self._run: VideoRun | None = None
        self._captured: dict[int, torch.Tensor] = {}
        self._capture: set = set()
        self._qk: list[torch.Tensor | None] = [None, None]
        self._cfg: EarlyTomConfig | None = None

    def pooled_tokens(self) -> int:
        """Tokens per frame after the model's video pooling (2x2 bilinear: ceil(grid / 2) ** 2)."""
        return math.ceil(self.grid / 2) ** 2

    # ---------------------------------------------------------------- configuration
    def default_prune_layers(self) -> tuple[int, ...]:
        """The paper's layers scaled to the layers the features come from (the model config's
        ``vision_feature_layer``; all 26 of SigLIP for LLaVA-OneVision)."""
        layer = getattr(self.config, "vision_feature_layer", -1)
        first = min(self.feature_layers(layer))
        if first < 0:
            raise ValueError(
                f"config.vision_feature_layer {layer!r} selects the embedding output: no encoder layer runs "
                "before the features, so EarlyTom has nowhere to prune"
            )
        return scaled_prune_layers(first + 1)

    def check_config(self, cfg: EarlyTomConfig) -> None:
        self._cfg = cfg
        self.feature_plan()  # the model's default feature layer must come after the last prune layer
        self.attention_geometry(cfg.prune_layers[-1])

    def attention_geometry(self, layer_index: int) -> tuple[nn.Module, int, float]:
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

    def feature_layers(self, vision_feature_layer) -> list[int]:
        """Encoder layer indices whose outputs form the features (``hidden_states[j]`` is the output
        of layer ``j - 1``; ``hidden_states[0]`` is the embedding output)."""
        n = self.depth + 1
        v = vision_feature_layer
        if isinstance(v, int) and not isinstance(v, bool):
            idx = [v]
        elif isinstance(v, (list, tuple)) and len(v) > 0:
            idx = list(v)
        else:
            raise ValueError(
                f"vision_feature_layer must be an int or a non-empty list of ints in [-{n}, {n - 1}], got {v!r}"
            )
        out = []
        for j in idx:
            if not isinstance(j, int) or isinstance(j, bool) or not -n <= j < n:
                raise ValueError(
                    f"vision_feature_layer must be an int (or list of ints) in [-{n}, {n - 1}], "
                    f"got {vision_feature_layer!r}"
                )
            out.append((j % n) - 1)
        return out

    def feature_plan(self, vision_feature_layer=None, vision_feature_select_strategy=None) -> tuple[list[int], str]:
        """``(encoder layers whose outputs form the features, select strategy)``: the call's values,
        else the model config's; checked against the prune layers."""
        c = self.config
        layer = vision_feature_layer if vision_feature_layer is not None else getattr(c, "vision_feature_layer", -1)
        strategy = self.select_strategy(vision_feature_select_strategy)
        layers = self.feature_layers(layer)
        first, last = min(layers), self._cfg.prune_layers[-1]
        if first < last:
            fits = (
                f"lower EarlyTomConfig.prune_layers, e.g. to {scaled_prune_layers(first + 1)}"
                if first >= 0
                else "no prune layer comes before the embedding output"
            )
            raise ValueError(
                f"vision_feature_layer {layer!r} selects encoder layer {first}, before the last prune layer "
                f"{last}: EarlyTom needs the features from the last prune layer on ({fits})"
            )
        width = self.projector_input(len(layers))
        lin = getattr(self.inner.multi_modal_projector, "linear_1", None)
        if width is not None and isinstance(lin, nn.Linear) and lin.in_features != width:
            raise ValueError(
                f"vision_feature_layer {layer!r} gives {len(layers)} layer(s) of features, {width} channels, but "
                f"the model's projector takes {lin.in_features}: give as many layers as the model was built for"
            )
        return layers, strategy

    def select_strategy(self, vision_feature_select_strategy) -> str:
        """The call's select strategy, else the model config's; checked."""
        strategy = (
            vision_feature_select_strategy
            if vision_feature_select_strategy is not None
            else getattr(self.config, "vision_feature_select_strategy", "full")
        )
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        if strategy == "full" and self.class_token:
            raise ValueError(
                "vision_feature_select_strategy 'full' keeps the encoder's class token, so a frame's tokens form "
                "no square grid to pool: use 'default'"
            )
        return strategy

    def projector_input(self, n_layers: int) -> int | None:
        """Channels the projector receives from ``n_layers`` feature layers (``None``: not known)."""
        hidden = getattr(self.config.vision_config, "hidden_size", None)
        return hidden * n_layers if isinstance(hidden, int) else None

    # ---------------------------------------------------------------- hooks
    def install(self, core) -> None:
        cfg = self._cfg
        last = cfg.prune_layers[-1]
        for idx in sorted(set(cfg.prune_layers) | set(range(last, self.depth))):
            self._hooks.append(self.layers[idx].register_forward_hook(functools.partial(self._on_layer, idx)))
        attn, self._num_heads, self._scale = self.attention_geometry(last)
        self._hooks.append(attn.q_proj.register_forward_hook(functools.partial(self._on_proj, 0)))
        self._hooks.append(attn.k_proj.register_forward_hook(functools.partial(self._on_proj, 1)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._run = None

    def _on_proj(self, slot: int, module, args, output):
        if self._run is not None:
            self._qk[slot] = output

    def _on_layer(self, idx: int, module, args, output):
        run = self._run
        if run is None:
            return None
        x = output[0] if isinstance(output, (tuple, list)) else output
        prune = idx in run.cfg.prune_layers
        if prune:
            if idx == run.last_layer:
                q, k = self._qk
                if q is None or k is None:
                    raise RuntimeError("EarlyTom: Q/K of the score layer were not captured")
                self._qk = [None, None]
                run.score(q, k, scale=self._scale, num_heads=self._num_heads)
            x = run.stage1(x, idx)
        if idx in self._capture:
            self._captured[idx] = x
        if not prune:
            return None
        if isinstance(output, tuple):
            return (x,) + tuple(output[1:])
        if isinstance(output, list):
            return [x] + list(output[1:])
        return x

    def encoder_device(self) -> torch.device:
        return next(self.tower.parameters()).device

    # ---------------------------------------------------------------- the video path
    def video_inputs(self, call: dict[str, Any]) -> VideoInputs:
        pv = call["pixel_values_videos"]
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
        frame_shape = (self.num_channels, self.image_size, self.image_size)
        if tuple(pv.shape[2:]) != frame_shape:
            raise ValueError(
                f"pixel_values_videos must be [B, T, {', '.join(map(str, frame_shape))}] (the vision tower's "
                f"num_channels and image_size), got shape {tuple(pv.shape)}"
            )
        plan = self.feature_plan(call.get("vision_feature_layer"), call.get("vision_feature_select_strategy"))
        per_video = T * self.tokens_per_frame + self.extra_tokens_per_video
        return VideoInputs(pixels=pv, frames=[T] * B, placeholders=[per_video] * B, extra={"feature_plan": plan})

    def encode(self, run: VideoRun, videos: VideoInputs) -> EncodedVideos:
        feat_layers, strategy = videos.extra["feature_plan"]
        pv = videos.pixels
        B, T = pv.shape[:2]
        ref = next(self.tower.parameters())
        pix = pv.reshape(B * T, *pv.shape[2:]).to(device=ref.device, dtype=ref.dtype)
        self._capture = set(feat_layers)
        self._captured = {}
        self._qk = [None, None]
        clock = run.clock
        t0 = clock.now()
        self._run = run  # arms the hooks for this call only (images through the tower stay untouched)
        try:
            self.tower(pix)  # positionally, as the model calls it (hooks on the tower see the same args)
        finally:
            self._run = None
            self._qk = [None, None]
            if run.refined is None:  # failed inside the tower: keep no hidden states alive
                self._captured = {}
        t1 = clock.now()
        clock.span("vision_tower", t0, t1)
        run.check_complete()
        if any(li not in self._captured for li in feat_layers):
            raise RuntimeError("EarlyTom: the vision tower did not run through the patched layers")
        captured, self._captured = self._captured, {}
        feats = (
            captured[feat_layers[0]]
            if len(feat_layers) == 1
            else torch.cat([captured[li] for li in feat_layers], dim=-1)
        )
        scores = run.scores
        if strategy == "default":
            feats = feats[:, 1:]
            scores = scores[:, 1:]
        S = feats.shape[1]
        expected = self.grid * self.grid + int(strategy == "full" and self.class_token)
        if S != expected:
            raise ValueError(
                f"EarlyTom expects {expected} tokens per frame (a {self.grid}x{self.grid} patch grid"
                f"{' and the class token' if expected > self.grid * self.grid else ''}), got {S} "
                f"(vision_feature_select_strategy={strategy!r})"
            )
        pooled, pooled_scores = self.to_llm(feats, scores, clock, t1)
        return EncodedVideos(feats=pooled, scores=pooled_scores)

    def to_llm(self, feats: torch.Tensor, scores: torch.Tensor, clock, t0) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected features ``[N', grid*grid, D]`` and their scores -> ``(features [N', P, C] on
        the LLM's side, scores [N', P] fp32)``: the model's projector, then 2x2 bilinear pooling of
        both (channels-last, bit-identical to the model's ``apply_pooling``)."""
        proj = self.inner.multi_modal_projector(feats)
        t1 = clock.now()
        clock.span("projector", t0, t1)
        pooled = bilinear_pool(proj, self.grid)
        pooled_scores = bilinear_pool(scores.unsqueeze(-1).to(torch.float32), self.grid).squeeze(-1)
        clock.span("pooling", t1, clock.now())
        return pooled, pooled_scores

    def finish(
        self,
        tokens: Sequence[torch.Tensor],
        index: Sequence[torch.Tensor],
        run: VideoRun,
        videos: VideoInputs,
        encoded: EncodedVideos,
    ) -> list[torch.Tensor]:
        if not tokens or not self.extra_tokens_per_video:
            return list(tokens)
        # torch.cat promotes as the model's own cat does: under autocast the bf16 features meet an
        # fp32 newline, and both reach the LLM in fp32.
        newline = self.inner.image_newline.to(device=tokens[0].device)[None, :]
        return [torch.cat([t, newline], dim=0) for t in tokens]

    def build_llm_inputs(
        self,
        call: dict[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: Sequence[torch.Tensor],
        videos: VideoInputs,
    ) -> dict[str, Any]:
        return {"inputs_embeds": self.scatter_features(input_ids, features)}
