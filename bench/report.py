"""The benchmark report: markdown tables, the goals, and one PNG figure (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

from bench.bench_ttft import config_label
from bench.common import is_cuda, markdown_table, params_text

__all__ = [
    "GOALS",
    "PAPER",
    "breakdown",
    "goals_section",
    "next_video_family",
    "qwen_family",
    "write_markdown",
    "write_plot",
]

#: our targets at r = 0.10, 32 frames, batch 1, bf16 on an H100/H200 (vs stock Hugging Face).
GOALS = {
    "ttft_speedup_r010": {"forced-merge": 4.0, "natural": 3.5},
    "ops_share_pct_max": 1.5,  # EarlyTom's stream spans, % of the compressed TTFT
    "glue_ms_max": 6.0,  # TTFT minus (vision tower + LLM prefill)
}
PAPER = {
    "ttft_reduction_r010": 2.65,
    "flops_reduction_pct_r010": 61.0,
    "throughput_gain": 1.3,
    "hardware": "A100",
    "dtype": "fp16",
    "model": "LLaVA-OneVision-7B",
}

#: the TTFT breakdown: (column, label); the parts add up to TTFT.
BREAKDOWN = (
    ("vision", "vision encoder"),
    ("earlytom_in_tower", "Stage I + score + segments"),
    ("projector", "projector"),
    ("pooling", "pooling"),
    ("stage2", "Stage II"),
    ("prompt_rewrite", "prompt rewriting"),
    ("setup", "setup before the prefill"),
    ("llm", "LLM prefill"),
    ("overhead", "generate overhead"),
)


def _fmt_counts(c) -> str:
    if not c:
        return ""
    return "; ".join("/".join(str(x) for x in v) for v in c)


def _ok(r: dict) -> bool:
    return not r.get("error") and not r.get("skipped")


def _near(a, b) -> bool:
    return a is not None and abs(float(a) - b) < 1e-9


def breakdown(r: dict) -> dict[str, float | None]:
    """The disjoint parts of one TTFT row (ms): EarlyTom's in-tower steps moved out of the vision
    encoder; a part that was not measured is ``None``."""
    in_tower = r.get("in_tower_ops_ms")
    vision = r.get("vision_ms")
    if vision is not None and in_tower is not None:
        vision = max(vision - in_tower, 0.0)
    return {
        "vision": vision,
        "earlytom_in_tower": in_tower,
        "projector": r.get("projector_ms"),
        "pooling": r.get("pooling_ms"),
        "stage2": r.get("stage2_ms"),
        "prompt_rewrite": r.get("prompt_rewrite_ms"),
        "setup": r.get("setup_ms"),
        "llm": r.get("llm_ms"),
        "overhead": r.get("overhead_ms"),
    }


def _outcome(r: dict) -> str:
    if r.get("error"):
        return f"ERROR: {r['error']}"
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    return ""


# ---------------------------------------------------------------------------------------------
# Goals
# ---------------------------------------------------------------------------------------------
def _speedup_goal(pattern: str, speedup: float) -> str:
    """``"goal >= 4.0x: met; "`` for a pattern with a goal, else ``""``."""
    goal = GOALS["ttft_speedup_r010"].get(pattern)
    if goal is None:
        return ""
    return f"goal >= {goal:.1f}x: {'met' if speedup >= goal else 'NOT met'}; "


def _glue_ms(r: dict) -> float | None:
    """TTFT minus the vision tower (EarlyTom's in-tower steps included) and the LLM prefill."""
    t, v, llm = r.get("ttft_ms"), r.get("vision_ms"), r.get("llm_ms")
    return None if t is None or v is None or llm is None else t - v - llm


def _spans_kind(meta: dict) -> str:
    """How the handle timed its spans (CUDA events on a GPU, the host clock on the CPU)."""
    return "CUDA-event spans" if is_cuda(meta["device"]) else "host-clock spans"


def goals_section(results: dict) -> list[str]:
    meta = results["meta"]
    hp = meta["headline_pattern"]
    ttft = results.get("ttft") or []
    L = ["## Goals (reported, not asserted)", ""]
    head = [
        r
        for r in ttft
        if r.get("config") == "earlytom" and r.get("pattern") == hp and not r.get("llm_merge") and _ok(r)
    ]
    r010 = next((r for r in head if _near(r["ratio"], 0.10)), None)
    gpu = results["env"].get("gpu", {}).get("name", "CPU")
    if r010 is not None and r010.get("speedup") is not None:
        sp = r010["speedup"]
        fp = r010.get("speedup_vs_fastpool")
        fp_txt = f"; **{fp:.2f}x** vs stock + fast pooling (the algorithm alone)" if fp else ""
        L.append(
            f"- TTFT speed-up at r = 0.10 ({hp}): **{sp:.2f}x** vs stock Hugging Face on {gpu}{fp_txt} "
            f"({_speedup_goal(hp, sp)}paper: {PAPER['ttft_reduction_r010']}x on {PAPER['hardware']}, "
            f"{PAPER['dtype']})."
        )
        glue = _glue_ms(r010)
        if glue is not None:
            met = "met" if glue <= GOALS["glue_ms_max"] else "NOT met"
            setup = r010.get("setup_ms")
            stock = next((r for r in ttft if r.get("baseline") == "stock" and r.get("when") == "before"), {})
            setup_txt = (
                f"; of it, setup before the prefill {setup:.2f} ms (stock's: {stock['setup_ms']:.2f} ms)"
                if setup is not None and stock.get("setup_ms") is not None
                else ""
            )
            L.append(
                f"- TTFT minus (vision tower + LLM prefill) at r = 0.10 ({hp}): **{glue:.2f} ms**{setup_txt} "
                f"(goal <= {GOALS['glue_ms_max']:.0f} ms: {met})."
            )
        if r010.get("flops_reduction_pct") is not None:
            L.append(
                f"- FLOPs at r = 0.10: **-{r010['flops_reduction_pct']:.1f}%** "
                f"(paper: -{PAPER['flops_reduction_pct_r010']:.0f}%)."
            )
    elif "ttft" in results or "ttft" in meta.get("sections", ["ttft"]):  # asked for, no headline result
        L.append("- TTFT speed-up at r = 0.10: no result (see Errors / Skipped).")
    else:
        flops = next(
            (
                r
                for r in results.get("flops") or []
                if r.get("pattern") == hp and not r.get("llm_merge") and _near(r["ratio"], 0.10)
            ),
            None,
        )
        if flops is not None and flops.get("flops_reduction_pct") is not None:
            L.append(
                f"- FLOPs at r = 0.10 ({hp}, analytical; no TTFT section in this run): "
                f"**-{flops['flops_reduction_pct']:.1f}%** (paper: -{PAPER['flops_reduction_pct_r010']:.0f}%)."
            )
        else:
            L.append(f"- No TTFT section in this run, and no analytical FLOPs row at r = 0.10 for {hp}.")
    fast = next((r for r in ttft if r.get("baseline") == "fastpool" and r.get("when") == "before" and _ok(r)), None)
    if fast is not None and fast.get("speedup"):
        L.append(f"- The pooling fix alone (stock + fast pooling, uncompressed): {fast['speedup']:.2f}x vs stock.")
    others = [
        r
        for r in ttft
        if r.get("config") == "earlytom"
        and _ok(r)
        and _near(r["ratio"], 0.10)
        and (r.get("pattern") != hp or r.get("llm_merge"))
        and r.get("speedup")
    ]
    if others:
        L.append(
            "- Other configurations at r = 0.10: "
            + ", ".join(
                f"{'LLM merge ' if r.get('llm_merge') else ''}{r['pattern']} {r['speedup']:.2f}x"
                + ("" if r.get("llm_merge") else f" ({_speedup_goal(r['pattern'], r['speedup']).rstrip('; ')})")
                for r in others
            ).replace(" ()", "")
            + "."
        )
    shares = [(r["ratio"], r["ops_share_pct"]) for r in head if r.get("ops_share_pct") is not None]
    if shares:
        worst = max(s for _, s in shares)
        met = "met" if worst <= GOALS["ops_share_pct_max"] else "NOT met"
        L.append(
            f"- EarlyTom ops' share of compressed TTFT ({_spans_kind(meta)}): "
            + ", ".join(f"r={a:.2f}: {s:.2f}%" for a, s in shares)
            + f" (goal <= {GOALS['ops_share_pct_max']:.1f}%: {met} at the worst ratio)."
        )
    kshares = [(r["ratio"], r["ops_kernel_share_pct"]) for r in head if r.get("ops_kernel_share_pct") is not None]
    if kshares:
        L.append(
            "- Kernel time only (torch.profiler, earlytom:: ops): "
            + ", ".join(f"r={a:.2f}: {s:.2f}%" for a, s in kshares)
            + "."
        )
    all_tp = results.get("throughput") or []
    tp = [r for r in all_tp if r.get("config") == "earlytom" and r.get("speedup")]
    if tp:
        steps = []
        for r in tp:
            s = next((b for b in all_tp if b.get("config") == "stock" and b.get("batch") == r["batch"]), {})
            if r.get("decode_ms_per_step") and s.get("decode_ms_per_step"):
                steps.append(f"batch {r['batch']}: {r['decode_ms_per_step']:.1f} / {s['decode_ms_per_step']:.1f}")
        L.append(
            "- Generation throughput (tokens/s, EarlyTom r = 0.10 vs stock): "
            + ", ".join(f"batch {r['batch']}: {r['speedup']:.2f}x" for r in tp)
            + f" (paper: {PAPER['throughput_gain']}x)"
            + (f"; ms per decoding step, EarlyTom / stock: {', '.join(steps)}" if steps else "")
            + "."
        )
    for key, family in (("qwen25vl", qwen_family(results)), ("llava_next_video", next_video_family(results))):
        qrows = (results.get(key) or {}).get("rows") or []
        q = [r for r in qrows if r.get("config") == "earlytom" and _ok(r) and r.get("speedup")]
        if not q:
            continue
        fw = next((r for r in qrows if r.get("baseline") == "fastwin" and _ok(r)), None)
        fw_txt = f"; stock + fast window attention alone: {fw['speedup']:.2f}x" if fw and fw.get("speedup") else ""
        L.append(
            f"- {family} TTFT: "
            + ", ".join(
                f"r={r['ratio']:.2f}: {r['speedup']:.2f}x vs stock"
                + (
                    f", {r['speedup_vs_fastwin']:.2f}x vs stock + fast window attention"
                    if r.get("speedup_vs_fastwin")
                    else ""
                )
                for r in q
            )
            + f"{fw_txt}."
        )
    if not is_cuda(meta["device"]):
        L.append("- CPU smoke run: these numbers say nothing about GPU performance.")
    L.append("")
    return L


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
_TTFT_COLS = [
    "name",
    "frames_after_prune",
    "prefill_tokens",
    "ttft_ms",
    "speedup",
    "speedup_vs_fastpool",
    "ops_ms",
    "ops_share_pct",
    "ops_kernel_ms",
    "ops_kernel_share_pct",
    "peak_mem_gib",
    "flops_reduction_pct",
    "outcome",
]
_TTFT_HEAD = [
    "configuration",
    "frames after prune",
    "prefill tokens",
    "TTFT ms",
    "x vs stock",
    "x vs stock+fast pooling",
    "ops ms",
    "ops %",
    "ops kernel ms",
    "ops kernel %",
    "peak GiB",
    "FLOPs -%",
    "",
]


def _view(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        v = dict(r)
        v["name"] = config_label(r)
        v["frames_after_prune"] = _fmt_counts(r.get("frames_after_prune"))
        v["outcome"] = _outcome(r)
        out.append(v)
    return out


def _ttft_section(results: dict) -> list[str]:
    meta = results["meta"]
    hp = meta["headline_pattern"]
    ttft = results.get("ttft") or []
    if not ttft:
        return []
    L = [f"## TTFT, pattern `{hp}` (headline)", ""]
    head = [r for r in ttft if r["config"] == "uncompressed" or (r.get("pattern") == hp and not r.get("llm_merge"))]
    L += [markdown_table(_view(head), _TTFT_COLS, _TTFT_HEAD), ""]
    lm = [r for r in ttft if r.get("llm_merge")]
    if lm:
        L += [
            f"## TTFT with the inner-LLM merge (pattern `{hp}`)",
            "",
            "EarlyTom plus the published inner-LLM token merge (`preset(..., llm_merge=True)`: at LLM layer "
            f"{lm[0].get('llm_merge_layer', 18)}, half of the video span is merged into the rest).",
            "",
            markdown_table(_view(lm), _TTFT_COLS, _TTFT_HEAD),
            "",
        ]
    for pat in meta["patterns"]:
        if pat == hp:
            continue
        rows = [r for r in ttft if r["config"] == "earlytom" and r.get("pattern") == pat and not r.get("llm_merge")]
        if not rows:
            continue
        L += [f"## TTFT, pattern `{pat}`", ""]
        if pat == "natural":
            L += [
                "Random weights and a synthetic video: the segmentation is whatever these weights give, not what "
                "a trained encoder gives on real video.",
                "",
            ]
        L += [markdown_table(_view(rows), _TTFT_COLS, _TTFT_HEAD), ""]
    L += [
        "Speed-ups divide the baseline's TTFT (measured before the EarlyTom runs) by the configuration's. "
        f"`ops`: EarlyTom's own {_spans_kind(results['meta'])} (Stage I at each prune layer, attention score, refined "
        "segmentation, Stage II), stream time including host work and syncs (median); `ops kernel`: kernel "
        "time of top-level `earlytom::` operators from one torch.profiler run. `peak GiB`: "
        "`torch.cuda.max_memory_allocated` over one call (weights included). Column details: bench/README.md.",
        "",
    ]
    bd_rows = [
        r
        for r in ttft
        if _ok(r)
        and (
            (r["config"] == "uncompressed" and r.get("when") == "before")
            or (r["config"] == "earlytom" and r.get("pattern") == hp)
        )
    ]
    if bd_rows:
        view = []
        for r in bd_rows:
            v = {"name": config_label(r), "ttft_ms": r.get("ttft_ms")}
            v.update(breakdown(r))
            view.append(v)
        cols = ["name", "ttft_ms"] + [k for k, _ in BREAKDOWN]
        L += [
            f"### Where TTFT goes (ms, medians; pattern `{hp}`)",
            "",
            markdown_table(view, cols, ["configuration", "TTFT"] + [lab for _, lab in BREAKDOWN]),
            "",
            "vision encoder: the tower without EarlyTom's steps inside it; projector / pooling: the handle's "
            "spans (EarlyTom) or hooks on `multi_modal_projector` / `apply_pooling` (baselines); Stage II and "
            "prompt rewriting (placeholder rewriting + embedding scatter): the handle's spans; setup before "
            "the prefill: from the `generate` call to the model's first `forward` minus the parts that ran in "
            "between (Hugging Face's generate setup, and with EarlyTom the wrapper's host work around the video "
            "path; stream time, so host work hidden behind queued GPU work does not count); generate "
            "overhead: TTFT minus every measured part (embedding, LM head, token choice, the remaining host "
            "work and gaps). A blank part was not measured (its time is in the overhead).",
            "",
        ]
    spans = [
        dict(ratio=r["ratio"], llm_merge=bool(r.get("llm_merge")), **(r.get("op_spans_ms") or {}))
        for r in ttft
        if r["config"] == "earlytom" and r.get("pattern") == hp and _ok(r)
    ]
    if spans:
        keys = sorted({k for s in spans for k in s if k not in ("ratio", "llm_merge")})
        L += [
            f"### EarlyTom step spans (ms, pattern `{hp}`)",
            "",
            markdown_table(spans, ["ratio", "llm_merge"] + keys),
            "",
        ]
    return L


def _gaps_section(results: dict) -> list[str]:
    rows = results.get("gaps")
    if not rows or isinstance(rows, dict):
        return []
    L = [
        "## Where the GPU waits (one TTFT call under torch.profiler)",
        "",
        "Device idle time inside one `generate(max_new_tokens=1)`: gaps between kernels, copies and "
        "memsets (>= 10 us), each charged to the phase around the host call that launched the work ending "
        "it (bench/profile_ttft.py). The profiler's own host overhead lengthens the gaps a little.",
        "",
    ]
    view = []
    for r in rows:
        v = dict(r)
        v["name"] = "stock HF" if r["config"] == "stock" else f"EarlyTom r={r.get('ratio')} {r.get('pattern')}"
        v["phases"] = "; ".join(f"{k} {ms:.2f}" for k, ms in list((r.get("idle_by_phase_ms") or {}).items())[:6])
        v["outcome"] = _outcome(r)
        view.append(v)
    L += [
        markdown_table(
            view,
            ["name", "wall_ms", "device_busy_ms", "device_idle_ms", "idle_after_last_ms", "phases", "outcome"],
            [
                "configuration",
                "wall ms",
                "device busy ms",
                "device idle ms",
                "idle after the last kernel ms",
                "idle ms by phase (largest first)",
                "",
            ],
        ),
        "",
    ]
    for v in view:
        gaps = v.get("top_gaps") or []
        if gaps:
            L += [
                f"Largest gaps, {v['name']}:",
                "",
                markdown_table(
                    gaps, ["ms", "phase", "op", "after", "before"], ["ms", "phase", "launching op", "after", "before"]
                ),
                "",
            ]
    return L


def _throughput_section(results: dict) -> list[str]:
    tp = results.get("throughput") or []
    if not tp:
        return []
    r0 = tp[0]
    view = []
    for r in tp:
        v = dict(r)
        v["name"] = {"stock": "stock HF", "fastpool": "stock HF + fast pooling"}.get(
            r["config"], f"EarlyTom r={r.get('ratio')} {r.get('pattern')}"
        )
        v["outcome"] = _outcome(r)
        view.append(v)
    return [
        f"## Generation throughput ({r0.get('frames')} frames per video, {r0.get('new_tokens')} new tokens per sample)",
        "",
        "One call: `generate(max_new_tokens=N, min_new_tokens=N)` on a batch (the length is forced and "
        "checked). videos/s = batch / time per call; tokens/s = batch x N / time per call; `x` = EarlyTom's "
        "tokens/s over the baseline's at the same batch; first token: the same batch with `max_new_tokens=1`; "
        "ms per decoding step: (time per call - first token) / (N - 1).",
        "",
        markdown_table(
            view,
            [
                "batch",
                "name",
                "seconds",
                "videos_per_s",
                "tokens_per_s",
                "speedup",
                "speedup_vs_fastpool",
                "first_token_s",
                "decode_ms_per_step",
                "outcome",
            ],
            [
                "batch",
                "configuration",
                "s per call",
                "videos/s",
                "tokens/s",
                "x vs stock",
                "x vs stock+fast pooling",
                "first token s",
                "ms per decoding step",
                "",
            ],
        ),
        "",
    ]


def _encoder_section(results: dict) -> list[str]:
    enc = results.get("encoder") or []
    if not enc:
        return []
    view = []
    for r in enc:
        v = dict(r)
        v["name"] = (
            {"stock": "stock HF", "fastpool": "stock HF + fast pooling"}[r["baseline"]]
            if r["config"] == "uncompressed"
            else f"EarlyTom r={r['ratio']} {r['pattern']}"
        )
        v["frames_after_prune"] = _fmt_counts(r.get("frames_after_prune"))
        v["outcome"] = _outcome(r)
        view.append(v)
    return [
        "## Vision side: pixels to LLM-ready video tokens",
        "",
        "Baselines: `get_video_features` (Hugging Face path), without and with fast pooling. EarlyTom: "
        "`handle.encode_videos` (what the patched `generate` uses). `tower ms`: the SigLIP forward alone "
        "(forward-hook events; EarlyTom's Stage I and score run inside it).",
        "",
        markdown_table(
            view,
            [
                "name",
                "frames_after_prune",
                "video_tokens",
                "features_ms",
                "features_speedup",
                "features_speedup_vs_fastpool",
                "tower_ms",
                "tower_speedup",
                "ops_ms",
                "peak_mem_gib",
                "peak_over_weights_gib",
                "outcome",
            ],
            [
                "configuration",
                "frames after prune",
                "video tokens",
                "features ms",
                "x vs stock",
                "x vs stock+fast pooling",
                "tower ms",
                "tower x",
                "ops ms",
                "peak GiB",
                "peak above weights GiB",
                "",
            ],
        ),
        "",
    ]


def _flops_section(results: dict) -> list[str]:
    fl = results.get("flops") or []
    if not fl:
        return []
    meta = results["meta"]
    return [
        "## FLOPs (the paper's analytical count, `4nd² + 2n²d + 2ndm` per layer)",
        "",
        f"Encoder: each frame is a sequence of {meta['spec']['encoder_tokens_per_frame']} tokens; each "
        "layer counts the frames it runs on. LLM: the prefill sequence (with the inner-LLM merge, the layers "
        "from the merge layer on count the shorter sequence). TFLOPs per batch.",
        "",
        markdown_table(
            fl,
            [
                "source",
                "pattern",
                "ratio",
                "llm_merge",
                "frames_after_prune",
                "prefill_tokens",
                "encoder_tflops_full",
                "encoder_tflops",
                "llm_tflops_full",
                "llm_tflops",
                "total_tflops_full",
                "total_tflops",
                "flops_reduction_pct",
            ],
        ),
        "",
    ]


def _scaling_section(results: dict) -> list[str]:
    sc = results.get("scaling") or []
    if not sc:
        return []
    L = [f"## Scaling (r = {sc[0].get('ratio')}, pattern `{sc[0].get('pattern')}`)", ""]
    for axis in ("frames", "batch"):
        rows = [dict(r, outcome=_outcome(r)) for r in sc if r["axis"] == axis]
        if rows:
            L += [
                f"### vs {axis}",
                "",
                markdown_table(
                    rows,
                    [
                        "batch",
                        "frames",
                        "prefill_tokens_full",
                        "prefill_tokens",
                        "ttft_full_ms",
                        "ttft_fastpool_ms",
                        "ttft_ms",
                        "speedup",
                        "speedup_vs_fastpool",
                        "ops_ms",
                        "ops_share_pct",
                        "peak_mem_full_gib",
                        "peak_mem_gib",
                        "outcome",
                    ],
                    [
                        "batch",
                        "frames",
                        "prefill tokens (stock)",
                        "prefill tokens",
                        "TTFT stock ms",
                        "TTFT stock+fast pooling ms",
                        "TTFT EarlyTom ms",
                        "x vs stock",
                        "x vs stock+fast pooling",
                        "ops ms",
                        "ops %",
                        "peak GiB (stock)",
                        "peak GiB",
                        "",
                    ],
                ),
                "",
            ]
    return L


def qwen_family(results: dict) -> str:
    """The model family of the --qwen section (results before it named one: Qwen2.5-VL)."""
    return ((results.get("qwen25vl") or {}).get("model_info") or {}).get("family") or "Qwen2.5-VL"


def _qwen_section(results: dict) -> list[str]:
    return _family_section(results, "qwen25vl", qwen_family(results))


def next_video_family(results: dict) -> str:
    """The model family of the --next-video section (LLaVA-NeXT-Video, or Video-LLaVA with
    ``--next-video-model video-llava-7b``)."""
    return ((results.get("llava_next_video") or {}).get("model_info") or {}).get("family") or "LLaVA-NeXT-Video"


def _next_video_section(results: dict) -> list[str]:
    return _family_section(results, "llava_next_video", next_video_family(results))


def _family_section(results: dict, key: str, family: str) -> list[str]:
    """The TTFT table of one more model family (``bench.family``), under ``results[key]``."""
    q = results.get(key)
    if not q:
        return []
    info = q.get("model_info") or {}
    rows = q.get("rows") or []
    geo = info.get("geometry") or next((r for r in rows if r.get("frames") and r.get("image_size")), None)
    where = f", {geo['frames']} frames at {geo['image_size']}x{geo['image_size']}" if geo else ""
    if str(info.get("model", "")).startswith("tiny"):
        L = [f"## {family} at tiny widths (random weights{where})", ""]
    else:
        L = [f"## {family}-7B architecture (random weights{where})", ""]
    if q.get("skipped"):
        return L + [f"_skipped: {q['skipped']}_", ""]
    if info.get("prune_layers"):
        L += [f"EarlyTom at the {family} prune layers {tuple(info['prune_layers'])} (the preset's other settings).", ""]
    keys = ["name", "prefill_tokens", "ttft_ms", "speedup"]
    titles = ["configuration", "prefill tokens", "TTFT ms", "x vs stock"]
    if any(r.get("baseline") == "fastwin" for r in rows):
        keys.append("speedup_vs_fastwin")
        titles.append("x vs stock+fast window attention")
    keys += ["vision_ms", "llm_ms", "setup_ms", "overhead_ms", "ops_ms", "peak_mem_gib", "outcome"]
    titles += [
        "vision ms",
        "LLM ms",
        "setup before the prefill ms",
        "generate overhead ms",
        "ops ms",
        "peak GiB",
        "",
    ]
    return L + [markdown_table(_view(rows), keys, titles), ""]


def _kernels_section(results: dict) -> list[str]:
    kr = results.get("kernels") or {}
    if not kr:
        return []
    L = ["## Kernel microbenchmarks", ""]
    for name, res in kr.items():
        L += [f"### {name}", ""]
        if res.get("rows"):
            cols: list[str] = []
            for row in res["rows"]:
                cols += [k for k in row if k not in cols]
            L.append(markdown_table(res["rows"], cols))
        else:
            L.append(f"_{res.get('skipped') or res.get('error') or 'no rows'}_")
        L.append("")
    return L


def write_markdown(path: Path, results: dict) -> None:
    meta, env = results["meta"], results["env"]
    cpu = not is_cuda(meta["device"])
    info = meta.get("model_info", {})
    L: list[str] = [f"# EarlyTom benchmark: {env.get('gpu', {}).get('name', 'CPU')}, {env['date_utc']}", ""]
    if cpu:
        L += [
            "> **CPU SMOKE RUN: tiny random model, few frames. Checks that the benchmark code runs;",
            "> the numbers are NOT performance results.**",
            "",
        ]
    L += [
        "## Setup",
        "",
        f"- model: `{meta['model']}` ({params_text(info.get('params'))}, random weights, "
        f"{meta['dtype']}, attention `{info.get('attn_implementation')}`); built in {info.get('build_s', 0):.1f} s",
        f"- input: batch {meta['batch']}, {meta['frames']} frames of {meta['spec']['image_size']}x"
        f"{meta['spec']['image_size']} (synthetic video), {meta['text_tokens']} text tokens; TTFT = "
        "`generate(max_new_tokens=1)`",
        "- baselines: stock Hugging Face, and stock + `earlytom_ext.fast_pooling` (the pooling fix alone)",
        f'- EarlyTom settings: `preset("{meta["preset"]}", r)` (max_window 6, ema 0.9; tau and prune layers per r)',
        (
            f"- timing: CUDA events around each call, {meta['warmup']} warm-ups, median of {meta['iters']}"
            if not cpu
            else f"- timing: perf_counter, {meta['warmup']} warm-ups, median of {meta['iters']}"
        ),
        f'- headline merge pattern: `{meta["headline_pattern"]}` (see "Merge patterns" in bench/README.md)',
        f"- run time: {meta.get('elapsed_s', 0):.0f} s"
        + (f" of a {meta['time_budget_s']:.0f} s budget" if meta.get("time_budget_s") else ""),
        "",
    ]
    env_rows = [{"key": k, "value": v} for k, v in env.items() if k not in ("gpu", "nvml")]
    for group in ("gpu", "nvml"):
        env_rows += [{"key": f"{group}.{k}", "value": v} for k, v in (env.get(group) or {}).items()]
    L += [
        "<details><summary>environment</summary>",
        "",
        markdown_table(env_rows, ["key", "value"]),
        "",
        "</details>",
        "",
    ]
    L += goals_section(results)
    for part in (
        _ttft_section,
        _gaps_section,
        _throughput_section,
        _scaling_section,
        _encoder_section,
        _flops_section,
        _qwen_section,
        _next_video_section,
        _kernels_section,
    ):
        L += part(results)
    for key, title in (("errors", "Errors"), ("skipped", "Skipped")):
        if results.get(key):
            L += [f"## {title}", ""] + [f"- {e}" for e in results[key]] + [""]
    path.write_text("\n".join(L))


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------
def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def write_plot(path: Path, results: dict) -> Path | None:
    """One PNG with four panels: speed-up vs ratio (against both baselines), where TTFT goes,
    scaling with frames, generation throughput vs batch. ``None`` without matplotlib (the reason
    goes to ``results["skipped"]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        results.setdefault("skipped", []).append(f"plot: matplotlib unavailable ({type(e).__name__}: {e})")
        return None
    meta = results["meta"]
    label = results["env"].get("gpu", {}).get("name", "CPU smoke run (not a performance result)")
    hp = meta["headline_pattern"]
    ttft = [r for r in results.get("ttft") or [] if _ok(r)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))

    # (a) speed-up vs ratio
    ax = axes[0][0]
    colors = ["C0", "C1", "C2", "C3"]
    for pat, color in zip(meta["patterns"], colors):
        rows = [r for r in ttft if r["config"] == "earlytom" and r.get("pattern") == pat and not r.get("llm_merge")]
        for key, style, what in (("speedup", "o-", "vs stock"), ("speedup_vs_fastpool", "s--", "vs fast pooling")):
            pts = sorted((r["ratio"], r[key]) for r in rows if r.get(key))
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{pat} {what}")
    pts = sorted((r["ratio"], r["speedup"]) for r in ttft if r.get("llm_merge") and r.get("speedup"))
    if pts:
        ax.plot(*zip(*pts), "D", color="C4", label=f"{hp} + LLM merge vs stock")
    goal = GOALS["ttft_speedup_r010"].get(hp)
    if goal is not None:
        ax.axhline(goal, color="gray", lw=0.8, ls="--", label=f"goal {goal:.1f}x ({hp}, r=0.1)")
    ax.scatter(
        [0.10], [PAPER["ttft_reduction_r010"]], marker="*", s=120, color="k", zorder=5, label="paper 2.65x (A100)"
    )
    ax.set_xlabel("retain ratio r")
    ax.set_ylabel("TTFT speed-up (x)")
    ax.set_title("TTFT speed-up vs stock HF (solid) and stock + fast pooling (dashed)", fontsize=8)
    ax.grid(alpha=0.3)
    _legend(ax)

    # (b) where TTFT goes
    ax = axes[0][1]
    bars = [
        (
            config_label(r)
            .replace(" (before)", "")
            .replace("stock HF + fast pooling", "fast pooling")
            .replace(f" {hp}", "")
            .replace("EarlyTom", "ET"),
            breakdown(r),
        )
        for r in ttft
        if (r["config"] == "uncompressed" and r.get("when") == "before")
        or (r["config"] == "earlytom" and r.get("pattern") == hp)
    ]
    if bars:
        names = [b[0] for b in bars]
        bottoms = [0.0] * len(bars)
        for (part, lab), color in zip(
            BREAKDOWN, ["#4C72B0", "#C44E52", "#DD8452", "#937860", "#DA8BC3", "#8172B3", "#55A868", "#8C8C8C"]
        ):
            vals = [b[1][part] or 0.0 for b in bars]
            ax.bar(names, vals, bottom=bottoms, label=lab, color=color)
            bottoms = [a + b for a, b in zip(bottoms, vals)]
        ax.tick_params(axis="x", labelrotation=30, labelsize=6)
    ax.set_ylabel("ms")
    ax.set_title(f"Where TTFT goes ({hp})", fontsize=8)
    _legend(ax)

    # (c) scaling with frames
    ax = axes[1][0]
    sc = sorted(
        (r for r in results.get("scaling") or [] if r.get("axis") == "frames" and r.get("ttft_ms")),
        key=lambda r: r["value"],
    )
    if sc:
        xs = [r["value"] for r in sc]
        ax.plot(xs, [r["ttft_full_ms"] for r in sc], "o-", label="stock HF")
        if all(r.get("ttft_fastpool_ms") for r in sc):
            ax.plot(xs, [r["ttft_fastpool_ms"] for r in sc], "v-", label="stock + fast pooling")
        ax.plot(xs, [r["ttft_ms"] for r in sc], "s-", label="EarlyTom")
        ax.plot(xs, [r.get("ops_ms") or 0.0 for r in sc], "^--", label="EarlyTom ops")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("frames (batch 1)")
    ax.set_ylabel("TTFT ms")
    ax.set_title(f"Scaling (r = {sc[0]['ratio'] if sc else '-'})", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _legend(ax)

    # (d) throughput
    ax = axes[1][1]
    tp = [r for r in results.get("throughput") or [] if r.get("tokens_per_s")]
    batches = sorted({r["batch"] for r in tp})
    width = 0.27
    for i, (cfg, lab) in enumerate(
        (("stock", "stock HF"), ("fastpool", "stock + fast pooling"), ("earlytom", "EarlyTom r=0.1"))
    ):
        vals = {r["batch"]: r["tokens_per_s"] for r in tp if r["config"] == cfg}
        if vals:
            ax.bar(
                [j + (i - 1) * width for j, b in enumerate(batches)],
                [vals.get(b, 0.0) for b in batches],
                width,
                label=lab,
            )
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("videos per batch")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Generation throughput", fontsize=8)
    _legend(ax)

    fig.suptitle(f"EarlyTom, {meta['model']}, {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
