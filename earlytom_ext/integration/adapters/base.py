"""The model-adapter seam: what the model-independent core asks of one model family."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...config import EarlyTomConfig
from ..run import VideoRun

__all__ = ["EncodedVideos", "ModelAdapter", "VideoInputs", "scaled_prune_layers"]


@dataclass
class VideoInputs:
    """The video arguments of one call, parsed and checked by the adapter."""

    pixels: torch.Tensor  # model-specific layout
    frames: list[int]  # Stage I frames per video (LLaVA-OneVision: T; Qwen: temporal groups)
    placeholders: list[int]  # video placeholder tokens per video in input_ids before compression
    extra: dict[str, Any] = field(default_factory=dict)  # model-specific (grid sizes, feature layer, ...)
    #: P of these videos when it is not the adapter's ``tokens_per_frame`` (Qwen: from the grid)
    tokens_per_frame: int | None = None
    #: set by the core before ``build_llm_inputs``: the rewritten prompt on the host
    #: (:class:`~earlytom_ext.integration.prompt.RewrittenPrompt`: input_ids, attention_mask, spans)
    prompt: Any | None = None


@dataclass
class EncodedVideos:
    """The encoder's output for Stage II: per merged frame, P positions on the LLM's side."""

    feats: torch.Tensor  # [N', P, C] in the LLM's hidden size
    scores: torch.Tensor  # [N', P] fp32
    extra: dict[str, Any] = field(default_factory=dict)


class ModelAdapter:
    """One model family. Subclasses answer the model-specific questions; the core
    (:class:`~earlytom_ext.integration.core.EarlyTomHandle`) does the rest: the armed run, Stage I /
    score / Stage II orchestration, statistics, placeholder rewriting and the forward / generate
    wrapping.

    A subclass sets the attributes below in ``__init__`` and implements the methods that raise
    ``NotImplementedError``.
    """

    #: ``config.model_type`` values this adapter serves.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the call argument that carries the videos (its presence switches the video path on).
    video_arg: ClassVar[str] = "pixel_values_videos"
    #: further call arguments :meth:`video_inputs` reads, and those it removes from the call.
    video_kwargs: ClassVar[tuple[str, ...]] = ()
    consumed_kwargs: ClassVar[tuple[str, ...]] = ()

    model: nn.Module
    video_token_id: int
    depth: int  # vision encoder layers (prune layers index them)
    tokens_per_frame: int  # P: tokens per frame the LLM sees without compression
    extra_tokens_per_video: int = 0  # tokens appended per video after Stage II (LLaVA-OneVision: image_newline)
    #: the paper's presets (:func:`earlytom_ext.preset`) were tuned on this family's encoder
    presets_tuned: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    # ---------------------------------------------------------------- configuration
    def default_prune_layers(self) -> tuple[int, ...]:
        """Prune layers scaled to this encoder: what ``apply(model)`` uses without a config."""
        raise NotImplementedError

    def check_config(self, cfg: EarlyTomConfig) -> None:
        """Raise ``ValueError`` when ``cfg`` does not fit the model (beyond the depth check)."""

    # ---------------------------------------------------------------- life cycle
    def install(self, core) -> None:
        """Hooks on the encoder (the core arms them with a :class:`VideoRun` per call)."""

    def remove(self) -> None:
        """Undo :meth:`install` exactly (idempotent)."""

    def end_call(self) -> None:
        """After each wrapped ``forward`` / ``generate`` call (also when it failed): drop per-call state."""

    def encoder_device(self) -> torch.device:
        """Where the vision encoder runs (frame counts and runs live there)."""
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- the video path
    def check_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, videos: VideoInputs) -> None:
        """Checks of the prompt beyond the video placeholder counts, before the encoder runs (host
        ``input_ids``: the core calls it on the CPU path only, where it reads nothing from a device)."""

    def check_position_ids(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """The caller's ``position_ids`` on a call with videos (checked before the encoder runs).
        The compressed prompt is renumbered from its attention mask, which equals the caller's
        positions up to a shift per sample (rotary is shift-invariant) when they count up by one
        over each sample's attended tokens (``arange``, or the mask's cumulative sum); any other
        layout (packed sequences that restart, scaled positions) raises ``ValueError``. One host
        read, on this path only."""
        ids_shape = tuple(attention_mask.shape) if attention_mask is not None else None
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
            got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
            raise ValueError(f"position_ids given with videos must be a 2-D tensor [batch, length], got {got}")
        pos = position_ids.long()
        if attention_mask is None:
            attended = torch.ones_like(pos, dtype=torch.bool)
        else:
            try:
                pos = pos.to(attention_mask.device).expand(ids_shape)
            except RuntimeError:
                raise ValueError(
                    f"position_ids must have the shape of attention_mask {ids_shape}, got {tuple(position_ids.shape)}"
                ) from None
            attended = attention_mask != 0
        offset = pos - (attended.long().cumsum(-1) - 1)  # constant per row for counting-up positions
        hi = offset.masked_fill(~attended, torch.iinfo(torch.int64).min).amax(-1)
        lo = offset.masked_fill(~attended, torch.iinfo(torch.int64).max).amin(-1)
        if not bool(((hi == lo) | ~attended.any(-1)).all()):
            raise ValueError(
                "position_ids given with videos must count up by one over each sample's attended tokens "
                "(EarlyTom renumbers the compressed prompt); packed or scaled positions are not supported: "
                "leave position_ids unset"
            )

    def video_inputs(self, call: dict[str, Any]) -> VideoInputs:
        """Parse and check this family's video arguments from ``call`` (``video_arg`` and
        ``video_kwargs`` by name); raise ``TypeError`` / ``ValueError`` naming the argument."""
        raise NotImplementedError

    def encode(self, run: VideoRun, videos: VideoInputs) -> EncodedVideos:
        """Run the vision encoder on ``videos`` calling ``run.score`` / ``run.stage1`` at the prune
        layers, then whatever the model does until the LLM's side (projector, pooling)."""
        raise NotImplementedError

    def split(self, videos: VideoInputs) -> list[tuple[list[int], VideoInputs]] | None:
        """``None`` when one encoder pass takes all ``videos`` (the default); else the groups of
        videos that share a pass, as ``(indices into videos, their VideoInputs)`` (Qwen: one group
        per spatial grid). The core encodes each group and then calls :meth:`join`."""
        return None

    def join(self, videos: VideoInputs, parts: list[tuple[list[int], VideoInputs]]) -> None:
        """After the groups of :meth:`split` went through :meth:`finish`: gather into ``videos``
        what :meth:`build_llm_inputs` reads per video."""

    def finish(
        self,
        tokens: Sequence[torch.Tensor],
        index: Sequence[torch.Tensor],
        run: VideoRun,
        videos: VideoInputs,
        encoded: EncodedVideos,
    ) -> list[torch.Tensor]:
        """Stage II's kept tokens per video (``tokens[v]: [n_v, C]``, ``index[v]: [n_v, 2]`` =
        (merged frame, position)) -> the video features the LLM receives. Default: as they are."""
        return list(tokens)

    def build_llm_inputs(
        self,
        call: dict[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: Sequence[torch.Tensor],
        videos: VideoInputs,
    ) -> dict[str, Any]:
        """The rewritten prompt (``input_ids`` with the compressed placeholder runs, its
        ``attention_mask``) and the video features -> keyword arguments for the model's forward
        (at least ``inputs_embeds``; position ids where the model needs them)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers for subclasses
    def pad_token_id(self) -> int:
        m = self.model
        config = getattr(m, "config", None)
        for src in (getattr(m, "generation_config", None), config, getattr(config, "text_config", None)):
            v = getattr(src, "pad_token_id", None)
            if isinstance(v, int):
                return v
        return 0

    def language_model(self) -> nn.Module:
        """The decoder stack (for the inner-LLM merge)."""
        lm = find_module(self.model, ("model.language_model", "language_model", "model.model"))
        if lm is None:
            raise TypeError(f"cannot find the language model of {type(self.model).__name__}")
        return lm

    def input_embeddings(self) -> nn.Module:
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "get_input_embeddings"):
            return inner.get_input_embeddings()
        return self.model.get_input_embeddings()

    def scatter_features(self, input_ids: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed ``input_ids`` and write the video features at the placeholders, in order
        (``masked_scatter``: no host sync)."""
        embed = self.input_embeddings()
        ids = input_ids.to(embed.weight.device)
        emb = embed(ids)
        flat = torch.cat(list(features), dim=0).to(device=emb.device, dtype=emb.dtype)
        mask = (ids == self.video_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask, flat)


def scaled_prune_layers(depth: int) -> tuple[int, ...]:
    """The paper's prune layers (6, 21, 23 of SigLIP's 26) at about the same depths of an encoder of
    ``depth`` layers: ``round(depth * f)`` for f = 0.25, 0.8, 0.88 (duplicates dropped)."""
    if depth == 26:
        return (6, 21, 23)
    return tuple(sorted({min(depth - 1, round(depth * f)) for f in (0.25, 0.8, 0.88)}))


def find_module(model: nn.Module, names: Sequence[str]) -> nn.Module | None:
    """The first attribute path in ``names`` (dotted) that exists on ``model``."""
    for path in names:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return obj
    return None
