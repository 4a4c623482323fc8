"""The model-independent core: :class:`EarlyTomHandle` (installation and removal, the armed run,
Stage II, statistics, the compressed call) over a :class:`~.adapters.base.ModelAdapter`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .. import ops
from .._ext import has_cuda_kernels, require
from .._logging import logger
from .._validation import check_finite
from ..config import EarlyTomConfig
from . import stats as _stats
from .adapters.base import ModelAdapter, VideoInputs
from .llm_merge_support import MERGE_LEFT_PADDING, MERGE_ONE_VIDEO, check_merge_cache
from .patches import MISSING, restore_attr, set_attr
from .prompt import HostPrompt, placeholder_runs, rewrite_placeholders
from .run import Clock, Decisions, RefineFn, Stage1Fn, VideoRun
from .wrappers import cache_holds_tokens, make_forward, make_generate, positions_from_mask

__all__ = ["EarlyTomHandle"]

MARKER = "_earlytom_handle"


class EarlyTomHandle:
    """Returned by :func:`~earlytom_ext.apply`. ``remove()`` undoes everything; usable as a context
    manager.

    Attributes:
        config: the :class:`EarlyTomConfig` in use.
        last_stats: statistics of the last video batch (see :attr:`last_stats`).
        last_inputs: the compressed language-model inputs of the last patched ``forward`` /
            ``generate`` call (``input_ids``, ``attention_mask``, ``labels`` when given,
            ``video_token_counts``, ``video_spans``; Qwen2.5-VL / Qwen2-VL also ``position_ids`` (5.x) and
            ``mm_token_type_ids``).
    """

    def __init__(self, model: nn.Module, cfg: EarlyTomConfig, adapter: ModelAdapter, llm_merge=None):
        self._model = model
        self._cfg = cfg
        self._adapter = adapter
        self._llm_merge = llm_merge
        self._decisions = Decisions()
        self._raw_stats: dict | None = None
        self._stats_cache: dict | None = None
        self._prev_attrs: dict[str, Any] = {}
        self._wrappers: dict[str, Any] = {}  # what install() put on the model (checked by identity)
        self._removed = False
        self.last_inputs: dict | None = None

    # ---------------------------------------------------------------- public
    @property
    def config(self) -> EarlyTomConfig:
        return self._cfg

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def llm_merge_on(self) -> bool:
        return self._llm_merge is not None

    @property
    def adapter(self) -> ModelAdapter:
        """The model family's adapter (read-only use)."""
        return self._adapter

    @property
    def video_arg(self) -> str:
        return self._adapter.video_arg

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per frame the LLM sees without compression (196 for LLaVA-OneVision's SigLIP; Qwen: of
        the last call's videos, 0 when their grids differ: ``last_stats`` has it per video)."""
        return self._adapter.tokens_per_frame

    @property
    def last_stats(self) -> dict | None:
        """Statistics of the last video batch, or ``None`` before the first one::

            {
              "videos": [  # one dict per video (a "frame" is a temporal patch group on Qwen)
                {"frames_before": T,
                 "frames_after": {prune_layer: frames after Stage I at that layer, ...},
                 "segments": [(start, end), ...],   # refined segments, local merged-frame indices
                 "frame_sources": [[orig frames merged into merged frame i], ...],
                 "ratio": r',                        # adjusted retain ratio
                 "tokens_before": T * P + e,         # what the unpatched model feeds the LLM
                 "tokens_after": kept + e,           # e: tokens appended per video (LLaVA-OV's image_newline)
                 "tokens_per_frame": P,              # of this video (Qwen: from its grid)
                 "kept": [(merged frame, position in the frame's P LLM tokens), ...]},
              ],
              "timings_ms": {"vision_tower": ..., "stage1_layer<p>": ..., "attention_score": ...,
                             "refine_segments": ..., "projector": ..., "pooling": ... (LLaVA),
                             "stage2": ..., "total": ..., "prompt_rewrite": ...},
              "prune_layers": (...), "tokens_per_frame": P (None if the videos differ), "device": "cpu" | "cuda:0",
              "llm_merge": [per sample: span, kept, prefill_len_before, prefill_len_after] (when on),
            }

        ``P`` is :attr:`tokens_per_frame` (196 on LLaVA-OneVision: 1 + 196 T tokens per video there,
        144 T on LLaVA-NeXT-Video, 257 T on Video-LLaVA). Device values are copied to the host on
        first access (not during the forward pass).
        """
        if self._raw_stats is None:
            return None
        if self._stats_cache is None:
            self._stats_cache = _stats.materialize(self._raw_stats, self._cfg, self._adapter)
        if self._llm_merge is not None:
            self._stats_cache["llm_merge"] = self._llm_merge.last_stats
        return self._stats_cache

    def summary(self) -> str:
        """The statistics of the last video batch as a text table (per video: frames, segments,
        tokens before/after, ratio; then the timings)."""
        return _stats.summary(self.last_stats, self._cfg)

    def force_decisions(self, stage1: Stage1Fn | None = None, refine: RefineFn | None = None) -> EarlyTomHandle:
        """Replace the merge decisions of the vision path (benchmarks, experiments, tests).

        ``stage1(x, frame_counts, layer_index, extras) -> ops.MergeResult`` replaces
        ``ops.merge_frames(x, frame_counts, handle.config, extras=extras)`` after every prune layer
        (``extras`` are the attention scores at the last prune layer, else ``None``; they must come
        back merged alike). ``refine(x, frame_counts) -> (segments [K, 2] int64 global frame indices,
        segment_counts [B])`` replaces the refined segmentation (``ops.segment_frames_deferred``) at
        the last prune layer. ``None``
        restores the default. Returns the handle.
        """
        self._check_active()
        for name, fn in (("stage1", stage1), ("refine", refine)):
            if fn is not None and not callable(fn):
                raise TypeError(f"force_decisions: {name} must be callable or None, got {type(fn).__name__}")
        self._decisions = Decisions(stage1=stage1, refine=refine)
        return self

    def remove(self) -> None:
        """Remove every hook and instance attribute added by :func:`apply` (idempotent)."""
        if self._removed:
            return
        model = self._model
        for name, wrapper in self._wrappers.items():
            # By identity: a wrapper made with functools.wraps (accelerate's hooks) copies attributes.
            if model.__dict__.get(name, MISSING) is not wrapper:
                raise RuntimeError(f"model.{name} was replaced after earlytom_ext.apply(); remove that wrapper first")
        if self._llm_merge is not None:
            self._llm_merge.remove()  # first: it raises, changing nothing, if its forward was wrapped since
        self._adapter.remove()
        for name, prev in self._prev_attrs.items():
            restore_attr(model, name, prev)
        self._prev_attrs.clear()
        self._wrappers.clear()
        model.__dict__.pop(MARKER, None)
        self._removed = True
        logger.info("EarlyTom removed from %s", type(model).__name__)

    def __enter__(self) -> EarlyTomHandle:
        self._check_active()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"EarlyTomHandle({state}, {type(self._adapter).__name__}, {self._cfg!r})"

    # ---------------------------------------------------------------- installation
    def install(self) -> None:
        model = self._model
        self._adapter.install(self)
        try:
            if self._llm_merge is not None:
                self._llm_merge.install()
            for name, make in (("forward", make_forward), ("generate", make_generate)):
                wrapper = make(self, getattr(model, name))
                self._prev_attrs[name] = set_attr(model, name, wrapper)
                self._wrappers[name] = wrapper
        except BaseException:
            self.remove()  # undoes what was installed so far
            raise
        model.__dict__[MARKER] = self

    # ---------------------------------------------------------------- the video path
    def _check_active(self) -> None:
        if self._removed:
            raise RuntimeError("this EarlyTom handle was removed: call earlytom_ext.apply(model, cfg) again")

    def _video_inputs(self, pixel_values_videos, kwargs: dict[str, Any]) -> VideoInputs:
        self._check_active()
        unknown = sorted(set(kwargs) - set(self._adapter.video_kwargs))
        if unknown:
            raise TypeError(
                f"unexpected video argument(s) {unknown}; {type(self._adapter).__name__} takes "
                f"{list(self._adapter.video_kwargs)}"
            )
        call = dict(kwargs)
        call[self.video_arg] = pixel_values_videos
        videos = self._adapter.video_inputs(call)
        pv = videos.pixels
        if pv.device.type != "cuda":
            check_finite(self.video_arg, pv)  # free on the CPU; on a GPU Stage I's flags catch it
        return videos

    @torch.no_grad()
    def encode_videos(self, pixel_values_videos: torch.Tensor, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Compressed LLM features of a batch of videos: a list of one ``[n_v, hidden]`` tensor per
        video (kept tokens, then what the model appends per video, e.g. LLaVA-OneVision's
        ``image_newline``) in the dtype of the model's own video features (the projector's; under
        autocast, what the model's concatenation promotes to). Further arguments, by position or
        keyword, are the model's video arguments in the order of ``handle.adapter.video_kwargs`` (LLaVA-OneVision,
        LLaVA-NeXT-Video: first ``vision_feature_layer``, ``vision_feature_select_strategy``; Video-LLaVA:
        ``vision_feature_layer`` only, its select strategy is for images; Qwen: first ``video_grid_thw``).
        Statistics go to :attr:`last_stats`."""
        names = self._adapter.video_kwargs
        if len(args) > len(names):
            raise TypeError(
                f"encode_videos takes at most {len(names)} positional argument(s) after the videos ({', '.join(names)})"
            )
        for n, a in zip(names, args):
            if n in kwargs:
                raise TypeError(f"encode_videos got {n} both positionally and by keyword")
            kwargs[n] = a
        return self._encode(self._video_inputs(pixel_values_videos, kwargs))

    def _encode(self, videos: VideoInputs) -> list[torch.Tensor]:
        adapter = self._adapter
        device = adapter.encoder_device()
        if device.type == "cuda" and not has_cuda_kernels():
            require()  # a failed import of the extension says so itself
            raise RuntimeError(
                "earlytom_ext was built without its CUDA kernels (no CUDA toolkit found when it was built), so "
                "it cannot compress on the GPU: rebuild it from the repository with the toolkit, CUDA_HOME=/usr/"
                "local/cuda pip install --no-build-isolation -e . (EARLYTOM_SKIP_CUDA unset), or run the model "
                "on the CPU"
            )
        clock = Clock(device)
        t_start = clock.now()
        # Videos that cannot share one pass (Qwen: different spatial grids) are encoded in groups;
        # each video is compressed on its own either way, so the result is the same.
        parts = adapter.split(videos) or [(list(range(len(videos.frames))), videos)]
        features: list[torch.Tensor | None] = [None] * len(videos.frames)
        raw_parts = []
        for where, part in parts:
            feats, raw = self._encode_part(part, clock)
            for v, f in zip(where, feats):
                features[v] = f
            raw_parts.append((where, raw))
        if len(parts) > 1:
            adapter.join(videos, parts)
        clock.span("total", t_start, clock.now())
        self._raw_stats = {"parts": raw_parts, "clock": clock, "device": str(device)}
        self._stats_cache = None
        logger.debug(
            "EarlyTom: %d video(s) in %d pass(es), %s frames, video tokens %s -> %s",
            len(videos.frames),
            len(parts),
            videos.frames,
            videos.placeholders,
            [int(f.shape[0]) for f in features],
        )
        return features

    def _encode_part(self, videos: VideoInputs, clock: Clock) -> tuple[list[torch.Tensor], dict]:
        """One pass of the encoder over videos that share it: Stage I / score inside, Stage II after."""
        adapter = self._adapter
        device = adapter.encoder_device()
        frame_counts = torch.tensor(videos.frames, dtype=torch.int64)
        if device.type == "cuda":
            frame_counts = frame_counts.pin_memory()  # an asynchronous copy: no host sync
        frame_counts = frame_counts.to(device, non_blocking=True)
        run = VideoRun(self._cfg, frame_counts, clock, self._decisions)
        encoded = adapter.encode(run, videos)
        t2 = clock.now()
        segs_local = run.refined_segments()  # copied while the encoder ran
        # P of these videos (Qwen: from their grid)
        P = videos.tokens_per_frame if videos.tokens_per_frame is not None else adapter.tokens_per_frame
        plan = ops.stage2_plan(segs_local, videos.frames, self._cfg.retain_ratio, tokens_per_frame=P)
        tokens, index = ops.select_tokens(encoded.feats, encoded.scores, plan)
        sizes = list(plan.tokens_per_video)
        features = adapter.finish(
            list(torch.split(tokens, sizes, dim=0)), list(torch.split(index, sizes, dim=0)), run, videos, encoded
        )
        clock.span("stage2", t2, clock.now())
        raw = {
            "frames": list(videos.frames),
            "placeholders": list(videos.placeholders),
            "merges": run.merges,
            "segments": segs_local,
            "plan": plan,
            "index": index,
            "final_counts": run.frame_counts,
            "tokens_per_frame": P,
        }
        return features, raw

    # ---------------------------------------------------------------- LLM inputs
    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
        **video_kwargs: Any,
    ) -> dict:
        """Compress the videos and rewrite the language-model inputs.

        Returns ``{"input_ids", "attention_mask", "inputs_embeds", "labels" (when given),
        "video_token_counts", "video_spans"}`` (spans: per sample, ``(start, length)`` of each compressed
        video run) plus what the model family needs (Qwen: position ids, ``mm_token_type_ids``): every video's
        run of placeholders becomes a run of its compressed length, the batch is re-padded on the
        side the inputs used (``padding_side`` when the inputs had no padding; default ``"left"``), and
        the compressed video features are written into ``inputs_embeds`` at the placeholders. The video
        features carry no gradient; the input embeddings follow the caller's grad mode.
        """
        return self._prepare(input_ids, pixel_values_videos, attention_mask, labels, padding_side, video_kwargs)

    def _prepare(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        padding_side: str | None,
        video_kwargs: dict[str, Any],
        for_merge: bool = False,
    ) -> dict:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq_len] when {self.video_arg} is given, got "
                f"{type(input_ids).__name__}{'' if not isinstance(input_ids, torch.Tensor) else tuple(input_ids.shape)}"
            )
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        Bs, L = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (Bs, L):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {(Bs, L)}, got {tuple(attention_mask.shape)}"
            )
        if labels is not None and tuple(labels.shape) != (Bs, L):
            raise ValueError(f"labels must have the shape of input_ids {(Bs, L)}, got {tuple(labels.shape)}")
        videos = self._video_inputs(pixel_values_videos, video_kwargs)
        adapter = self._adapter
        host = HostPrompt(input_ids, attention_mask, labels)  # copies start now, read after the encoder
        if input_ids.device.type != "cuda":
            # Placeholder counts checked before the vision tower runs (free on the CPU).
            runs = placeholder_runs(input_ids, adapter.video_token_id, videos.placeholders)
            adapter.check_prompt(input_ids, attention_mask, videos)
            if for_merge:  # what the armed prefill would refuse, known from the caller's prompt
                if any(len(r) > 1 for r in runs.values()):
                    raise ValueError(MERGE_ONE_VIDEO)
                if attention_mask is not None and not bool(attention_mask[:, -1].all()):
                    raise ValueError(MERGE_LEFT_PADDING)
        with torch.no_grad():
            features = self._encode(videos)
        clock = self._raw_stats["clock"]
        t0 = clock.now()
        counts = [int(f.shape[0]) for f in features]
        new = rewrite_placeholders(
            host.wait(),
            adapter.video_token_id,
            videos.placeholders,
            counts,
            padding_side=padding_side,
            pad_token_id=adapter.pad_token_id(),
        )
        result = new.to_devices(host)
        videos.prompt = new  # host copies for adapters that lay out positions (no device read)
        result.update(adapter.build_llm_inputs({}, result["input_ids"], result["attention_mask"], features, videos))
        clock.span("prompt_rewrite", t0, clock.now())
        result["video_token_counts"] = counts
        result["video_spans"] = new.spans
        self.last_inputs = {k: v for k, v in result.items() if k != "inputs_embeds"}
        return result

    # Under torch.compile (model.compile(), torch.compile(model.forward)) the video path runs eagerly:
    # its hooks, host reads and data-dependent shapes are not traceable; the model call after it is.
    @torch.compiler.disable
    def compress_call(self, call: dict, input_ids) -> torch.Tensor:
        """Shared by the ``forward`` and ``generate`` wrappers: compress the videos and rewrite the
        call's arguments in place. Returns the compressed ``input_ids``."""
        if call.get("inputs_embeds") is not None:
            raise ValueError(f"EarlyTom needs input_ids (not inputs_embeds) together with {self.video_arg}")
        encoded = call.get("mm_encoder_outputs")  # transformers 5.x: features computed beforehand
        if isinstance(encoded, dict) and encoded.get("video") is not None:
            raise ValueError(
                f"mm_encoder_outputs['video'] (video features computed beforehand) cannot be given together with "
                f"{self.video_arg}: EarlyTom computes the compressed video features itself"
            )
        # transformers 5.24 renamed past_key_values to cache and still accepts both: check each.
        for name in ("cache", "past_key_values"):
            if cache_holds_tokens(call.get(name)):
                raise ValueError(
                    f"{name} must be empty (or None) when {self.video_arg} is given under EarlyTom: a cache "
                    "that already holds tokens cannot line up with the compressed prompt"
                )
        if self._llm_merge is not None:
            for name in ("cache", "past_key_values"):
                check_merge_cache(call.get(name), name)
        if self._llm_merge is not None and call.get("labels") is not None:
            raise ValueError(
                "labels cannot be used while the inner-LLM merge is on (EarlyTomConfig.llm_merge_layer): the "
                "merge shortens the sequence inside the language model, so the logits no longer align with labels"
            )
        call.pop("cache_position", None)
        adapter = self._adapter
        if call.get("position_ids") is not None:
            adapter.check_position_ids(call["position_ids"], call.get("attention_mask"))
        video_kwargs = {k: call[k] for k in adapter.video_kwargs if k in call}
        for k in adapter.consumed_kwargs:
            call.pop(k, None)
        if self._llm_merge is not None and torch.is_grad_enabled() and self._llm_merge.checkpointed():
            raise ValueError(
                "the inner-LLM merge cannot run under gradient checkpointing with gradients on with this "
                "transformers version (before 5.25 the backward pass recomputes the decoder layers without the "
                "merge); call under torch.no_grad(), or model.eval(), or model.gradient_checkpointing_disable()"
            )
        prep = self._prepare(
            input_ids,
            call.pop(self.video_arg),
            call.pop("attention_mask", None),
            call.pop("labels", None),
            None,
            video_kwargs,
            for_merge=self._llm_merge is not None,
        )
        if call.get("position_ids") is not None:
            call["position_ids"] = positions_from_mask(prep["attention_mask"]).to(call["position_ids"].device)
        for k, v in prep.items():
            if k not in ("input_ids", "video_token_counts", "video_spans"):
                call[k] = v
        if self._llm_merge is not None:
            spans = prep["video_spans"]
            if any(len(s) > 1 for s in spans):
                raise ValueError(MERGE_ONE_VIDEO)
            self._llm_merge.arm([s[0] if s else None for s in spans])
        return prep["input_ids"]

    @torch.compiler.disable
    def end_call(self) -> None:
        """After the wrapped call: an armed inner-LLM merge that no prefill consumed (the call failed
        first) must not apply to the next, unrelated prefill."""
        if self._llm_merge is not None:
            self._llm_merge.disarm()
        self._adapter.end_call()
