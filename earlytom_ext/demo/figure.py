"""The demo's PNG: a timeline of the original frames, then the merged frames with their kept patches."""

from __future__ import annotations

import colorsys
import math

import torch

from .families import TokenGrid

# The timeline gets one label per this many pixels at most (a label is up to 3 digits at 7 pt).
_LABEL_PX = 22
_DPI = 80

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


def _figure(
    frames_u8: torch.Tensor, stats: dict, title: str = "", note: str | None = None, grid: TokenGrid | None = None
):
    """The matplotlib figure of :func:`plot` (not saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = stats["videos"][0]
    G = v["frames_before"]  # Stage I frames (Qwen: temporal groups)
    T = int(frames_u8.shape[0])  # decoded frames
    sources = v["frame_sources"]
    segs = v["segments"]
    Tm = len(sources)
    per_frame = v.get("tokens_per_frame") or stats["tokens_per_frame"]
    if grid is None:  # one decoded frame per Stage I frame, a square grid
        side = int(round(math.sqrt(per_frame)))
        grid = TokenGrid(side, side)
    k = grid.frames_per_group
    cls = int(grid.class_token)
    if grid.tokens != per_frame:
        raise ValueError(
            f"the token grid {grid.rows} x {grid.cols}{' + class token' if cls else ''} does not match the "
            f"{per_frame} tokens per frame of the stats"
        )
    if math.ceil(T / k) != G:
        raise ValueError(f"{T} decoded frames in groups of {k} do not make the {G} Stage I frames of the stats")
    seg_of = {}
    for j, (s, e) in enumerate(segs):
        for f in range(s, e + 1):
            seg_of[f] = j
    colors = segment_colors(max(1, len(segs)))
    kept = {}
    for f, pos in v["kept"]:
        if not 0 <= pos < per_frame:
            raise ValueError(f"kept position {pos} of merged frame {f} is outside its {per_frame} tokens")
        kept.setdefault(f, []).append(pos)
    static = {f for s, e in segs if e - s + 1 >= 3 for f in range(s + 1, e)}

    def decoded(group: int) -> range:  # the decoded frames of one Stage I frame
        return range(group * k, min((group + 1) * k, T))

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
    # One box per Stage I frame (k decoded frames wide); the axis spans about the figure's width:
    # label only every step-th box so labels never overlap.
    step = timeline_label_step(G, 0.9 * width_in * _DPI)
    for g in range(G):
        i = owner.get(g)
        color = "lightgrey" if i is None else colors[seg_of[i] % len(colors)]
        span = decoded(g)
        width = len(span) - (0.08 if step == 1 else 0.0)
        ax.add_patch(Rectangle((span.start, 0), width, 1, color=color, linewidth=0))
        if g % step == 0:
            ax.text(
                span.start + len(span) / 2,
                0.5,
                "x" if i is None else str(i),
                ha="center",
                va="center",
                fontsize=7,
                gid="timeline-label",
            )
    ax.set_xlim(0, T)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ticks = [g * k for g in range(0, G, step)]  # the first decoded frame of each labelled box
    ax.set_xticks([t + 0.5 for t in ticks], [str(t) for t in ticks])
    heading = f"{title}\n" if title else ""
    if note:
        heading += f"{note}\n"
    if k == 1 and not cls:
        every = "" if step == 1 else f" (every {step}th frame labelled)"
        text = (
            f"original frames 0..{T - 1}{every}: label = the merged frame each went into, x = dropped by Stage I; "
            "colour = refined segment. Below: merged frames, kept patches bright"
        )
    elif k == 1:  # three shorter lines: the class token's note makes it long
        every = "" if step == 1 else f" (every {step}th frame labelled)"
        text = (
            f"original frames 0..{T - 1}{every}: label = the merged frame each went into, x = dropped by Stage I;\n"
            "colour = refined segment. Below: merged frames, kept patches bright;\n"
            "'kept' counts the class token (position 0 of each frame), which is not drawn"
        )
    else:
        every = "" if step == 1 else f", every {step}th labelled"
        text = (
            f"decoded frames 0..{T - 1} (ticks), one box per temporal group of {k} frames{every}:\n"
            "label = the merged group each went into, x = dropped by Stage I; colour = refined segment.\n"
            "Below: merged groups (the mean of their frames), kept tokens bright"
        )
    ax.set_title(heading + text, fontsize=9)
    ax.tick_params(labelsize=7)
    frames = frames_u8.float() / 255.0
    for i in range(Tm):
        a = fig.add_subplot(gs[1 + i // cols, i % cols], gid="merged-frame")
        src = sources[i]
        shown = [t for g in src for t in decoded(g)]
        img = frames[shown].mean(0).permute(1, 2, 0).numpy()
        mine = kept.get(i, [])
        mask = torch.full((grid.rows * grid.cols,), 0.3)
        mask[[p - cls for p in mine if p >= cls]] = 1.0
        mask = mask.view(1, 1, grid.rows, grid.cols)
        mask = torch.nn.functional.interpolate(mask, size=img.shape[:2], mode="nearest")[0, 0].numpy()
        a.imshow(img * mask[..., None])
        for spine in a.spines.values():
            spine.set_edgecolor(colors[seg_of[i] % len(colors)])
            spine.set_linewidth(3)
        a.set_xticks([])
        a.set_yticks([])
        src_txt = str(src[0]) if len(src) == 1 else f"{src[0]}..{src[-1]} ({len(src)})"
        if k > 1:
            frames_txt = f"frame {shown[0]}" if len(shown) == 1 else f"frames {shown[0]}..{shown[-1]}"
            src_txt = f"group{'s' if len(src) > 1 else ''} {src_txt}, {frames_txt}"
        kind = "static" if i in static else "dynamic"
        with_cls = " incl. class token" if cls and 0 in mine else ""
        a.set_title(f"#{i} <- {src_txt}\n{kind}, {len(mine)} kept{with_cls}", fontsize=7)
    return fig


def plot(
    frames_u8: torch.Tensor,
    stats: dict,
    path: str,
    title: str = "",
    note: str | None = None,
    grid: TokenGrid | None = None,
) -> str:
    """PNG: timeline of the original frames (colour = refined segment of the merged frame they went
    into, grey = dropped by Stage I), then every merged frame with its kept patches. ``note`` is
    printed under the title (the random-weights note). ``grid``: where the kept positions lie on a
    frame and how many decoded frames make a Stage I frame (default: a square grid, one frame each)."""
    import matplotlib.pyplot as plt

    fig = _figure(frames_u8, stats, title=title, note=note, grid=grid)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path
