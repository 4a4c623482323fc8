"""The paper's analytical FLOPs count, uncompressed vs EarlyTom.

Per transformer layer with ``n`` tokens in one sequence, hidden ``d`` and MLP width ``m``::

    4·n·d² + 2·n²·d + 2·n·d·m

(Q/K/V/O projections, attention scores and values, a two-matrix MLP; the paper's formula, used
as-is for both the SigLIP encoder and the Qwen2 LLM: it ignores GQA's smaller K/V projections and
the third matrix of the gated MLP, exactly as the paper does.)

* Encoder: every frame is its own sequence of 729 tokens; layer ``i`` runs on the frames that
  are left before it (all T frames up to and including the first prune layer, then the merged
  counts).
* LLM: one sequence per sample with its prefill tokens (text + video tokens + newline). With the
  inner-LLM merge, layers from the merge layer on run on the sequence without the removed tokens.
The projector, pooling and LM head are not counted (the paper does not count them either).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["layer_flops", "frames_per_layer", "encoder_flops", "llm_flops", "compare", "section_rows", "main"]


def layer_flops(n: int, d: int, m: int) -> int:
    """``4nd² + 2n²d + 2ndm`` for one layer over one sequence of ``n`` tokens."""
    n, d, m = int(n), int(d), int(m)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def frames_per_layer(
    frames: int, num_layers: int, prune_layers: Sequence[int] = (), counts_after: Sequence[int] = ()
) -> list[int]:
    """Frames each encoder layer runs on.

    ``counts_after[j]`` is the frame count after Stage I at ``prune_layers[j]``; layers up to and
    including a prune layer run on the count before it (Stage I runs after the layer).
    """
    if len(prune_layers) != len(counts_after):
        raise ValueError(f"prune_layers {list(prune_layers)} and counts_after {list(counts_after)} differ in length")
    out, current, j = [], int(frames), 0
    for i in range(num_layers):
        out.append(current)
        if j < len(prune_layers) and i == prune_layers[j]:
            current = int(counts_after[j])
            j += 1
    return out


def encoder_flops(per_layer_frames: Sequence[int], tokens: int, d: int, m: int) -> int:
    """Encoder FLOPs: each frame is one sequence of ``tokens``."""
    per_frame = layer_flops(tokens, d, m)
    return sum(int(f) * per_frame for f in per_layer_frames)


def llm_flops(
    seq_lens: Sequence[int],
    layers: int,
    d: int,
    m: int,
    merge_layer: int | None = None,
    removed: Sequence[int] | None = None,
) -> int:
    """LLM prefill FLOPs over the given sequence lengths (one per sample).

    ``merge_layer`` / ``removed``: the inner-LLM merge; layers ``merge_layer ..`` run on
    ``n - removed[b]`` tokens of sample ``b``.
    """
    if merge_layer is None:
        return sum(layers * layer_flops(n, d, m) for n in seq_lens)
    if removed is None or len(removed) != len(seq_lens):
        raise ValueError(f"removed must give one count per sample ({len(seq_lens)}), got {removed!r}")
    if not 0 <= merge_layer <= layers:
        raise ValueError(f"merge_layer must be in [0, {layers}], got {merge_layer}")
    return sum(
        merge_layer * layer_flops(n, d, m) + (layers - merge_layer) * layer_flops(n - r, d, m)
        for n, r in zip(seq_lens, removed)
    )


def compare(
    spec,
    frames: Sequence[int],
    seq_lens_full: Sequence[int],
    seq_lens_comp: Sequence[int],
    prune_layers: Sequence[int] = (),
    counts_after: Sequence[Sequence[int]] | None = None,
    llm_merge_layer: int | None = None,
    llm_merge_removed: Sequence[int] | None = None,
) -> dict[str, float]:
    """Uncompressed vs compressed FLOPs for a batch.

    ``frames``: frames per video; ``counts_after[b]``: video b's frame counts after each prune
    layer; ``seq_lens_*``: LLM prefill tokens per sample (uncompressed / compressed);
    ``llm_merge_layer`` / ``llm_merge_removed``: the inner-LLM merge of the compressed run (see
    :func:`llm_flops`).
    """
    d, m, L = spec.vision_hidden, spec.vision_mlp, spec.vision_layers
    S = spec.encoder_tokens
    enc_full = sum(encoder_flops(frames_per_layer(T, L), S, d, m) for T in frames)
    if counts_after is None:
        counts_after = [[] for _ in frames]
        prune_layers = ()
    enc_comp = sum(
        encoder_flops(frames_per_layer(T, L, prune_layers, c), S, d, m) for T, c in zip(frames, counts_after)
    )
    llm_full = llm_flops(seq_lens_full, spec.text_layers, spec.text_hidden, spec.text_mlp)
    llm_comp = llm_flops(
        seq_lens_comp, spec.text_layers, spec.text_hidden, spec.text_mlp, llm_merge_layer, llm_merge_removed
    )
    full, comp = enc_full + llm_full, enc_comp + llm_comp
    return {
        "encoder_tflops_full": enc_full / 1e12,
        "encoder_tflops": enc_comp / 1e12,
        "llm_tflops_full": llm_full / 1e12,
        "llm_tflops": llm_comp / 1e12,
        "total_tflops_full": full / 1e12,
        "total_tflops": comp / 1e12,
        "flops_reduction_pct": 100.0 * (1.0 - comp / full) if full else 0.0,
        "encoder_reduction_pct": 100.0 * (1.0 - enc_comp / enc_full) if enc_full else 0.0,
        "llm_reduction_pct": 100.0 * (1.0 - llm_comp / llm_full) if llm_full else 0.0,
    }


def section_rows(
    spec,
    ttft_rows: Sequence[dict],
    frames: int,
    text_tokens: int,
    preset_name: str,
    ratios: Sequence[float] = (0.10, 0.15, 0.20, 0.25),
) -> list[dict]:
    """The FLOPs section: the measured TTFT runs (actual frame and token counts) when there are
    any, plus the forced patterns computed without a model."""
    from bench import models, patterns
    from earlytom_ext.config import preset

    keys = (
        "encoder_tflops_full",
        "encoder_tflops",
        "llm_tflops_full",
        "llm_tflops",
        "total_tflops_full",
        "total_tflops",
        "encoder_reduction_pct",
        "llm_reduction_pct",
        "flops_reduction_pct",
    )
    rows = []
    for r in ttft_rows:
        if r.get("config") != "earlytom" or "total_tflops" not in r:
            continue
        counts = r.get("frames_after_prune") or []
        rows.append(
            {
                "source": "measured run",
                "pattern": r["pattern"],
                "ratio": r["ratio"],
                "llm_merge": bool(r.get("llm_merge")),
                "frames_after_prune": "; ".join("/".join(str(x) for x in v) for v in counts),
                "prefill_tokens": r.get("prefill_tokens"),
                **{k: r[k] for k in keys},
            }
        )
    for pattern in patterns.FORCED_PATTERNS:
        for ratio in ratios:
            cfg = preset(preset_name, ratio)
            counts = patterns.forced_counts(frames, cfg, pattern)
            kept = patterns.forced_video_tokens(frames, cfg, pattern, spec.tokens_per_frame)
            full_len = models.video_placeholders(frames, spec) + text_tokens
            comp_len = kept + 1 + text_tokens
            row = {
                "source": "analytical",
                "pattern": pattern,
                "ratio": ratio,
                "llm_merge": False,
                "frames_after_prune": "/".join(map(str, counts)),
                "prefill_tokens": comp_len,
            }
            row.update(compare(spec, [frames], [full_len], [comp_len], cfg.prune_layers, [counts]))
            rows.append(row)
    return rows


def main(argv=None) -> None:
    """Print the analytical table for the forced pattern (no model, no GPU needed)."""
    import argparse

    from bench import models, patterns
    from bench.common import markdown_table
    from earlytom_ext.config import preset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llava-ov-7b", choices=sorted(models.SPECS))
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    spec = models.get_spec(args.model)
    rows = []
    for r in (0.10, 0.15, 0.20, 0.25):
        cfg = preset("videomme", r)
        counts = patterns.forced_counts(args.frames, cfg)
        kept = patterns.forced_video_tokens(args.frames, cfg, P=spec.tokens_per_frame)
        full_len = models.video_placeholders(args.frames, spec) + args.text_tokens
        comp_len = kept + 1 + args.text_tokens
        row = {"r": r, "frames_after_prune": "/".join(map(str, counts)), "prefill_tokens": comp_len}
        row.update(compare(spec, [args.frames], [full_len], [comp_len], cfg.prune_layers, [counts]))
        rows.append(row)
    print(
        markdown_table(
            rows,
            [
                "r",
                "frames_after_prune",
                "prefill_tokens",
                "encoder_tflops_full",
                "encoder_tflops",
                "llm_tflops_full",
                "llm_tflops",
                "flops_reduction_pct",
            ],
        )
    )


if __name__ == "__main__":
    main()
