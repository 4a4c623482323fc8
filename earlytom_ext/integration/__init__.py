"""EarlyTom for Hugging Face video LLMs.

``apply(model, cfg)`` patches one model instance (removable): inside the vision encoder, Stage I
merges similar frames after the prune layers (only while a video goes through it; images are
untouched) and the last prune layer's attention gives one score per token; after the encoder,
Stage II keeps each frame's most attended tokens; the ``forward`` / ``generate`` wrappers shorten
each video's run of placeholders and feed the compressed features to the language model.

Layout: :mod:`.core` (the handle: model-independent), :mod:`.run` (one armed pass through the
encoder), :mod:`.prompt` (placeholder rewriting), :mod:`.wrappers` (``forward`` / ``generate``),
:mod:`.stats`, :mod:`.pooling`, :mod:`.window_attention` (Qwen2.5-VL's windows and Qwen2-VL's
groups batched), :mod:`.llm_merge` (the optional inner-LLM merge), and :mod:`.adapters` (one per
model family: LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA, Qwen2.5-VL, Qwen2-VL).

``generate`` returns sequences whose prompt part is the caller's *original* ``input_ids``;
``max_length`` / ``min_length`` count that prompt; a ``streamer`` receives it. ``forward`` returns the
model's output over the *compressed* sequence; the compressed inputs are on ``handle.last_inputs``.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from .._logging import logger
from ..config import PAPER_PRESETS, EarlyTomConfig
from .adapters import adapter_for
from .core import MARKER, EarlyTomHandle
from .pooling import FastPoolingHandle, fast_pooling
from .window_attention import FastWindowAttentionHandle, fast_window_attention

__all__ = [
    "EarlyTomHandle",
    "FastPoolingHandle",
    "FastWindowAttentionHandle",
    "apply",
    "fast_pooling",
    "fast_window_attention",
]


def apply(model: nn.Module, cfg: EarlyTomConfig | None = None) -> EarlyTomHandle:
    """Patch one Hugging Face video LLM with EarlyTom.

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration``, ``LlavaNextVideoForConditionalGeneration``,
            ``VideoLlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen2VLForConditionalGeneration`` (transformers 4.57.x or 5.x).
        cfg: the :class:`EarlyTomConfig`; its prune layers must be below the vision encoder's depth
            and not after the feature layer. Default: ``EarlyTomConfig()``. Prune layers ``None`` (the
            config's default) become the model family's own (``handle.adapter.default_prune_layers()``,
            ``handle.config`` shows them: (6, 21, 23) for
            LLaVA-OneVision's 26-layer SigLIP, (6, 18, 20) for LLaVA-NeXT-Video's and Video-LLaVA's CLIP (23
            of its 24 layers feed the features), (7, 21, 23) for Qwen2.5-VL's 32 blocks, (8, 26, 28) for
            Qwen2-VL's 32 blocks; scaled for other depths and, on the LLaVA families, to the layers
            that feed the features, ``config.vision_feature_layer``).

    Returns:
        an :class:`EarlyTomHandle` (``remove()``, context manager, ``last_stats``, ``summary()``,
        ``last_inputs``, ``config``, ``encode_videos``, ``prepare_inputs``, ``force_decisions``).

    Raises:
        TypeError: the model is not a supported model (or cfg is not an ``EarlyTomConfig``); with
            the inner-LLM merge, a language model it cannot wrap (e.g. the Qwen models on transformers 4.57).
        ValueError: the config does not fit the model.
        RuntimeError: EarlyTom is already applied to this model, or its language model already
            carries another handle's inner-LLM merge.
    """
    if cfg is not None and not isinstance(cfg, EarlyTomConfig):
        raise TypeError(f"cfg must be an earlytom_ext.EarlyTomConfig, got {type(cfg).__name__}")
    if isinstance(model, nn.Module) and isinstance(model.__dict__.get(MARKER), EarlyTomHandle):
        raise RuntimeError("EarlyTom is already applied to this model; call handle.remove() first")
    adapter = adapter_for(model)
    if cfg is None:
        cfg = EarlyTomConfig()
    if cfg.prune_layers is None:
        cfg = cfg.replace(prune_layers=adapter.default_prune_layers())
    cfg.check_depths(num_layers=adapter.depth)
    adapter.check_config(cfg)
    _warn_preset_layers(adapter, cfg)
    llm_merge = None
    if cfg.llm_merge_layer is not None:
        from .llm_merge import LLMMerge

        llm_merge = LLMMerge(adapter.language_model(), cfg.llm_merge_layer, cfg.llm_merge_ratio)
    handle = EarlyTomHandle(model, cfg, adapter, llm_merge)
    handle.install()
    logger.info(
        "EarlyTom applied to %s (%s, encoder depth %d): %r",
        type(model).__name__,
        type(adapter).__name__,
        adapter.depth,
        cfg,
    )
    return handle


def _warn_preset_layers(adapter, cfg: EarlyTomConfig) -> None:
    """A preset's prune layers on a family they were not tuned on (they index LLaVA-OneVision's SigLIP):
    accepted, since they fit the encoder, with a warning naming the family's own."""
    if adapter.presets_tuned:
        return
    layers = tuple(cfg.prune_layers)
    own = tuple(adapter.default_prune_layers())
    if layers == own or layers not in {tuple(c.prune_layers) for t in PAPER_PRESETS.values() for c in t.values()}:
        return
    family = getattr(adapter, "family", type(adapter.model).__name__)
    warnings.warn(
        f"EarlyTom: prune_layers {layers} are a paper preset's, tuned on LLaVA-OneVision's SigLIP encoder; "
        f"{family}'s own are {own} (preset(...).replace(prune_layers=None) uses them)",
        UserWarning,
        stacklevel=3,
    )
