"""The demo's text output: the summary as markdown tables, and one-line error messages."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..config import EarlyTomConfig
from .families import frame_word, tokens_label

RANDOM_WEIGHTS_NOTE = "random weights: kept patches show the mechanism, not a trained model's choice"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _one_line(e: BaseException) -> str:
    # Library messages (PyAV, Hugging Face) can span several lines; the command line prints one.
    text = " ".join(str(e).split())
    return text or type(e).__name__


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
    model_type: str = "llava_onevision",
    decoded_frames: int | None = None,
) -> str:
    """The demo's summary as markdown tables.

    ``timings``: per stage, the ms of each timed run (the median is shown, with the range);
    without it the single run in ``stats["timings_ms"]``. ``baseline_ms``: the unpatched vision
    tower's runs. ``model_type`` words the counts (Qwen: the stats count temporal groups of
    ``decoded_frames`` frames).
    """
    v = stats["videos"][0]
    layers = tuple(stats["prune_layers"])  # the layers the run used (a config may leave them to the model)
    unit = frame_word(model_type)
    clip = _count(v["frames_before"], unit)
    if unit != "frame" and decoded_frames is not None:
        clip = f"{_count(decoded_frames, 'frame')} = {clip}"
    out = [f"EarlyTom demo: {clip} ({source}), model: {model_name}, device {stats['device']}"]
    if random_weights:
        out.append(RANDOM_WEIGHTS_NOTE)
    out += [
        f"config: retain_ratio={cfg.retain_ratio} tau={cfg.tau} max_window={cfg.max_window} "
        f"ema={cfg.ema} prune_layers={layers}",
        "",
    ]
    rows = [["input", v["frames_before"]]]
    rows += [[f"after Stage I at layer {p}", v["frames_after"][p]] for p in layers]
    out += [markdown_table(["encoder stage", unit + "s"], rows), ""]
    segs = v["segments"]
    out.append(f"refined segments ({len(segs)}): " + ", ".join(f"[{s}-{e}]" for s, e in segs))
    kept = v["tokens_after"]
    before = v["tokens_before"]
    unpatched, patched = tokens_label(model_type, v.get("tokens_per_frame") or stats["tokens_per_frame"])
    out += [
        "",
        markdown_table(
            ["video tokens into the LLM", "count"],
            [
                [unpatched, before],
                [patched, kept],
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
        + [f"stage1_layer{p}" for p in layers]
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
