"""The Qwen2-VL / Qwen2.5-VL adapters' 3-D rotary positions: layouts read from get_rope_index, kept
tokens, LLM inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..._validation import host_to_device
from ..run import VideoRun
from .base import EncodedVideos, VideoInputs


class _Layout:
    """One uncompressed vision block as the model lays it out: ``rel [3, T, P]`` positions relative
    to the block's start, ``advance`` (the first position after the block, relative), ``pad`` (the
    padding positions' value), ``padded_delta`` (``rope_deltas`` counts the padded length)."""

    def __init__(self, rel: torch.Tensor, advance: int, pad: int, padded_delta: bool):
        self.rel, self.advance, self.pad, self.padded_delta = rel, advance, pad, padded_delta
        self._on: dict[str, torch.Tensor] = {}

    def rel_on(self, device: torch.device) -> torch.Tensor:
        """``rel`` on ``device``, copied there once (the layout is cached per grid)."""
        t = self._on.get(str(device))
        if t is None:
            t = self._on[str(device)] = host_to_device(self.rel, torch.int64, device)
        return t


class _RopePositions:
    """The multimodal rotary positions of the compressed prompt (the kept tokens keep their place in the
    uncompressed video). Mixed into ``Qwen2_5_VLAdapter`` (and so ``Qwen2VLAdapter``), whose
    ``__init__`` sets the attributes read here."""

    # ---------------------------------------------------------------- after Stage II
    def finish(
        self,
        tokens: Sequence[torch.Tensor],
        index: Sequence[torch.Tensor],
        run: VideoRun,
        videos: VideoInputs,
        encoded: EncodedVideos,
    ) -> list[torch.Tensor]:
        """Features as selected; the (t, h, w) rotary offsets of every kept token are kept for
        :meth:`build_llm_inputs` (those of its place in the uncompressed video; a merged group
        takes those of its first source group)."""
        frames = videos.frames
        grids = videos.extra["grid"]
        layouts = [self._layout("video", tuple(grids[v]), self._spg(videos, v)) for v in range(len(frames))]
        videos.extra["layouts"] = layouts
        if not tokens:
            videos.extra["kept_thw"] = []
            return []
        device = tokens[0].device
        # First source group of every merged group, through every prune layer (on the device).
        first = torch.arange(sum(frames), device=device)
        for _layer, _counts, plan_src, _w in run.merges:
            first = torch.minimum(first[plan_src[:, 0]], first[plan_src[:, 1]])
        kept = []
        offset = 0
        for v, idx in enumerate(index):
            table = layouts[v].rel_on(device)  # [3, T, P]
            kept.append(table[:, first[idx[:, 0]] - offset, idx[:, 1]])
            offset += frames[v]
        videos.extra["kept_thw"] = kept
        return list(tokens)

    @staticmethod
    def _spg(videos: VideoInputs, v: int):
        spg = videos.extra.get("second_per_grid_ts")
        return None if spg is None else spg[v]

    def _layout(self, kind: str, grid: tuple[int, int, int], spg) -> _Layout:
        """The model's own 3-D positions of one uncompressed image / video (relative to its start),
        the position advance of the block, the padding value and the ``rope_deltas`` length rule:
        read from the model's ``get_rope_index`` on a one-block prompt ``[pad, <vision_start>,
        placeholders, <vision_end>]`` (cached per grid and time step), so that every
        transformers version's own arithmetic is followed."""
        key = (kind, grid, None if spg is None else float(spg))
        hit = self._layout_cache.get(key)
        if hit is not None:
            return hit
        t, h, w = grid
        n = t * (h // self.merge) * (w // self.merge)
        cfg = self.config
        token = self.video_token_id if kind == "video" else self.image_token_id
        start_id = getattr(cfg, "vision_start_token_id", None)
        end_id = getattr(cfg, "vision_end_token_id", None)
        if start_id is None or end_id is None:
            raise TypeError(f"model.config needs vision_start_token_id and vision_end_token_id ({self.family})")
        ids = torch.tensor([[self.pad_token_id(), start_id] + [token] * n + [end_id]])
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        kw: dict[str, Any] = {"attention_mask": mask}
        grid_t = torch.tensor([list(grid)])
        if kind == "video":
            kw["video_grid_thw"] = grid_t
            if "second_per_grid_ts" in self.video_kwargs:  # Qwen2-VL has no time step
                kw["second_per_grid_ts"] = [spg] if spg is not None else None
        else:
            kw["image_grid_thw"] = grid_t
        if self._v5_rope:
            mm = torch.zeros_like(ids)
            mm[0, 2 : 2 + n] = 2 if kind == "video" else 1
            kw["mm_token_type_ids"] = mm
        rope_index = self._orig_get_rope_index or self.inner.get_rope_index
        pos, delta = rope_index(ids, **kw)
        row = pos[:, 0].to("cpu", torch.int64)
        begin = int(row[0, 1]) + 1  # the block starts right after <vision_start>
        rel = (row[:, 2 : 2 + n] - begin).reshape(3, t, n // t)
        peak = int(row[:, 1:].max())
        d = int(delta.reshape(-1)[0])
        if d not in (peak + 1 - ids.shape[1], peak + 1 - (ids.shape[1] - 1)):
            raise RuntimeError(f"unexpected rope_deltas {d} from {type(self.inner).__name__}.get_rope_index")
        out = _Layout(
            rel=rel, advance=int(row[0, 2 + n]) - begin, pad=int(row[0, 0]), padded_delta=d == peak + 1 - ids.shape[1]
        )
        self._layout_cache[key] = out
        return out

    # ---------------------------------------------------------------- LLM inputs
    def build_llm_inputs(
        self,
        call: dict[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: Sequence[torch.Tensor],
        videos: VideoInputs,
    ) -> dict[str, Any]:
        embeds = self.scatter_features(input_ids, features)
        prompt = videos.prompt
        if prompt is not None:
            ids_h, mask_h = prompt.input_ids, prompt.attention_mask
        else:
            ids_h, mask_h = input_ids.cpu(), attention_mask.cpu()
        positions, runs, rules = self._host_positions(ids_h, mask_h, videos)
        device = input_ids.device
        pos = host_to_device(positions, torch.int64, device)
        for b, col, length, start, v in runs:
            pos[:, b, col : col + length] = videos.extra["kept_thw"][v].to(device) + start
        mask = attention_mask.to(device) != 0
        peak = pos.amax(dim=0).masked_fill(~mask, -1).amax(dim=-1, keepdim=True)
        length = pos.shape[-1] if rules.padded_delta else mask.sum(dim=-1, keepdim=True)
        delta = peak + 1 - length
        out: dict[str, Any] = {"inputs_embeds": embeds}
        mm = videos.extra.get("mm_token_type_ids")
        if mm is not None:
            types = torch.zeros_like(ids_h, dtype=mm.dtype)
            if self.image_token_id is not None:
                types[ids_h == self.image_token_id] = 1
            types[ids_h == self.video_token_id] = 2
            out["mm_token_type_ids"] = host_to_device(types, mm.dtype, mm.device)
        if self._v5_rope:
            text = mask.long().cumsum(-1) - 1
            text = text.masked_fill(~mask, 0)
            out["position_ids"] = torch.cat([text[None], pos], dim=0)
            self.inner.rope_deltas = delta
        else:
            self._armed = (pos, delta)
        return out

    def _host_positions(self, ids: torch.Tensor, mask: torch.Tensor, videos: VideoInputs):
        """3-D positions of the text and image tokens (``[3, B, L]``, host), the video runs
        ``(sample, column, length, start position, video)`` whose positions come from the kept
        tokens, and the padding / ``rope_deltas`` rules."""
        self._check_vision_start(ids, mask)
        B, L = ids.shape
        layouts = videos.extra["layouts"]
        rules = layouts[0]
        positions = torch.full((3, B, L), rules.pad, dtype=torch.int64)
        image_grid = videos.extra["image_grid"]
        counts = [int(k.shape[1]) for k in videos.extra["kept_thw"]]
        vision = {self.video_token_id} | ({self.image_token_id} if self.image_token_id is not None else set())
        runs = []
        v = img = 0
        for b in range(B):
            cols = (mask[b] != 0).nonzero().flatten().tolist()
            toks = ids[b].tolist()
            cur = 0
            j = 0
            while j < len(cols):
                tok = toks[cols[j]]
                if tok in vision:
                    e = j
                    while e < len(cols) and toks[cols[e]] == tok:
                        e += 1
                    n = e - j
                    if tok == self.video_token_id:
                        if v >= len(counts) or n != counts[v]:
                            raise ValueError(
                                f"input_ids: sample {b} has a run of video tokens that is not one video (after "
                                f"compression {n} tokens where video {v} has "
                                f"{counts[v] if v < len(counts) else 'none'}); each video needs a run of its own "
                                f"(the processor writes <|vision_start|> before each video)"
                            )
                        runs.append((b, cols[j], n, cur, v))
                        cur += layouts[v].advance
                        v += 1
                    else:
                        lay = self._layout("image", self._image_grid_of(img, n, image_grid), None)
                        positions[:, b, torch.tensor(cols[j:e])] = lay.rel.reshape(3, -1) + cur
                        cur += lay.advance
                        img += 1
                    j = e
                else:  # a run of text tokens: consecutive positions, written at once
                    e = j + 1
                    while e < len(cols) and toks[cols[e]] not in vision:
                        e += 1
                    positions[:, b, torch.tensor(cols[j:e])] = torch.arange(cur, cur + e - j)
                    cur += e - j
                    j = e
        if v != len(counts):
            raise ValueError(
                f"input_ids hold {v} video placeholder runs, video_grid_thw describes {len(counts)} videos"
            )
        self._check_image_count(img, image_grid)
        return positions, runs, rules

    def _check_vision_start(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """4.57 finds a video or image only right after ``<|vision_start|>`` (the processor writes it);
        without it the unpatched model gives the placeholders text positions, which the compressed
        prompt cannot reproduce. 5.x places them by ``mm_token_type_ids``."""
        if self._v5_rope:
            return
        start_id = self.config.vision_start_token_id
        vision = torch.tensor([t for t in (self.video_token_id, self.image_token_id) if t is not None])
        for b in range(ids.shape[0]):
            row = ids[b] if mask is None else ids[b][mask[b] != 0]
            is_vision = torch.isin(row, vision)
            first = is_vision & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_vision[:-1]])
            before = torch.cat([torch.full((1,), -1, dtype=row.dtype), row[:-1]])[first]
            if bool((before != start_id).any()):
                raise ValueError(
                    f"input_ids: sample {b} has video or image placeholders without <|vision_start|> (id {start_id}) "
                    f"right before them; with this transformers version the model finds a video or image by that "
                    f"token (the processor writes it before each one)"
                )

    def check_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, videos: VideoInputs) -> None:
        """Runs that follow ``<|vision_start|>`` (4.57), the image placeholder runs against
        ``image_grid_thw`` (host tensors, before the encoder)."""
        mask = None if attention_mask is None else attention_mask.cpu() != 0
        self._check_vision_start(input_ids, mask)
        if self.image_token_id is None:
            return
        image_grid = videos.extra["image_grid"]
        edge = torch.zeros(1, dtype=torch.int8)
        img = 0
        for b in range(input_ids.shape[0]):
            row = input_ids[b] if mask is None else input_ids[b][mask[b]]
            edges = torch.diff((row == self.image_token_id).to(torch.int8), prepend=edge, append=edge)
            lengths = (edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()
            for n in lengths.tolist():
                self._image_grid_of(img, n, image_grid)
                img += 1
        self._check_image_count(img, image_grid)

    def _image_grid_of(self, img: int, n: int, image_grid) -> tuple[int, int, int]:
        """``image_grid_thw``'s row of image ``img``, whose run in ``input_ids`` holds ``n`` placeholders."""
        if image_grid is None or img >= len(image_grid):
            have = "no image_grid_thw" if image_grid is None else f"image_grid_thw has {len(image_grid)} row(s)"
            raise ValueError(
                f"input_ids hold more image placeholder runs than images: {have}; image_grid_thw needs one "
                f"(t, h, w) row per image"
            )
        t, h, w = image_grid[img]
        m = self.merge
        if n != t * (h // m) * (w // m):
            raise ValueError(
                f"image {img}: {n} placeholders in input_ids, image_grid_thw[{img}] = {(t, h, w)} needs "
                f"{t * (h // m) * (w // m)}"
            )
        return t, h, w

    @staticmethod
    def _check_image_count(runs: int, image_grid) -> None:
        if image_grid is not None and runs != len(image_grid):
            raise ValueError(
                f"image_grid_thw describes {len(image_grid)} images, input_ids hold {runs} image placeholder runs"
            )
