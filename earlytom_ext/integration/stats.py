"""``handle.last_stats`` (device values copied to the host on first access) and ``summary()``."""

from __future__ import annotations

from ..config import EarlyTomConfig

__all__ = ["materialize", "summary"]


def materialize(raw: dict, cfg: EarlyTomConfig, adapter) -> dict:
    parts = raw["parts"]
    videos: list[dict | None] = [None] * sum(len(where) for where, _ in parts)
    for where, part in parts:
        for v, stats in zip(where, _videos(part, adapter)):
            videos[v] = stats
    per_frame = {v["tokens_per_frame"] for v in videos}
    return {
        "videos": videos,
        "timings_ms": raw["clock"].resolve(),
        "prune_layers": tuple(cfg.prune_layers),
        "tokens_per_frame": per_frame.pop() if len(per_frame) == 1 else None,
        "device": raw["device"],
    }


def _videos(raw: dict, adapter) -> list[dict]:
    """The statistics of the videos of one encoder pass."""
    frames = raw["frames"]
    B = len(frames)
    plan = raw["plan"]
    offsets_in = [0]
    for t in frames:
        offsets_in.append(offsets_in[-1] + t)
    # Frame provenance: which original frames each merged frame is made of.
    sources = [[t] for t in range(offsets_in[-1])]
    counts_per_layer = {}
    for layer, counts, plan_src, _w in raw["merges"]:
        sources = [sorted(set(sources[a]) | set(sources[b])) for a, b in plan_src.tolist()]
        counts_per_layer[layer] = [int(c) for c in counts.tolist()]
    final_counts = [int(c) for c in raw["final_counts"].tolist()]
    offsets = [0]
    for c in final_counts:
        offsets.append(offsets[-1] + c)
    kept_per_video: list[list[tuple]] = [[] for _ in range(B)]
    v = 0
    for f, pos in raw["index"].tolist():
        while f >= offsets[v + 1]:
            v += 1
        kept_per_video[v].append((f - offsets[v], pos))
    extra = adapter.extra_tokens_per_video
    videos = []
    for b in range(B):
        videos.append(
            {
                "frames_before": frames[b],
                "frames_after": {layer: counts_per_layer[layer][b] for layer in counts_per_layer},
                "segments": [tuple(s) for s in raw["segments"][b]],
                "frame_sources": [[s - offsets_in[b] for s in sources[i]] for i in range(offsets[b], offsets[b + 1])],
                "ratio": float(plan.ratios[b]),
                "tokens_before": raw["placeholders"][b],
                "tokens_after": int(plan.tokens_per_video[b]) + extra,
                "tokens_per_frame": raw["tokens_per_frame"],
                "kept": kept_per_video[b],
            }
        )
    return videos


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def summary(stats: dict | None, cfg: EarlyTomConfig) -> str:
    """The statistics of the last video batch as a text table."""
    if stats is None:
        return "EarlyTom: no video has gone through the model yet"
    layers = stats["prune_layers"]
    lines = [
        f"EarlyTom  r={cfg.retain_ratio:g}  tau={cfg.tau:g}  max_window={cfg.max_window}  ema={cfg.ema:g}  "
        f"prune_layers={tuple(layers)}  device={stats['device']}"
    ]
    head = (
        ["video", "frames"]
        + [f"after L{p}" for p in layers]
        + ["segments", "r'", "tokens before", "tokens after", "kept"]
    )
    rows = [head]
    tb = ta = 0
    for i, v in enumerate(stats["videos"]):
        tb += v["tokens_before"]
        ta += v["tokens_after"]
        rows.append(
            [str(i), str(v["frames_before"])]
            + [str(v["frames_after"].get(p, "")) for p in layers]
            + [
                str(len(v["segments"])),
                f"{v['ratio']:.4f}",
                str(v["tokens_before"]),
                str(v["tokens_after"]),
                f"{100.0 * v['tokens_after'] / max(v['tokens_before'], 1):.1f}%",
            ]
        )
    if len(stats["videos"]) > 1:
        rows.append(["all", ""] + [""] * len(layers) + ["", "", str(tb), str(ta), f"{100.0 * ta / max(tb, 1):.1f}%"])
    lines += _table(rows)
    merge = stats.get("llm_merge")
    if merge:
        lines.append("")
        rows = [["sample", "span start", "span length", "kept", "prefill before", "prefill after"]]
        for i, m in enumerate(merge):
            span = m.get("span") if m else None
            if not span:
                continue
            rows.append(
                [
                    str(i),
                    str(span[0]),
                    str(span[1]),
                    str(len(m.get("kept") or [])),
                    str(m.get("prefill_len_before", "")),
                    str(m.get("prefill_len_after", "")),
                ]
            )
        if len(rows) > 1:
            lines.append(f"inner-LLM merge at decoder layer {cfg.llm_merge_layer} (r_in={cfg.llm_merge_ratio:g})")
            lines += _table(rows)
    timings = stats["timings_ms"]
    if timings:
        lines.append("")
        lines += _table([["stage", "ms"]] + [[k, f"{v:.3f}"] for k, v in timings.items()])
    return "\n".join(lines)
