"""The paper's analytical FLOPs count, uncompressed vs EarlyTom.

Per transformer layer with ``n`` tokens in one sequence, hidden ``d`` and MLP width ``m``::

    4·n·d² + 2·n²·d + 2·n·d·m

(Q/K/V/O projections, attention scores and values, a two-matrix MLP; the paper's formula, used
as-is for both the SigLIP encoder and the Qwen2 LLM: it ignores GQA's smaller K/V projections and
the third matrix of the gated MLP, exactly as the paper does.)

* Encoder: every frame is its own sequence of 729 tokens; layer ``i`` runs on the frames that
  are left before it (all T frames up to and including the first prune layer, then the merged
  counts).
* LLM: one sequence per sample with its prefill tokens (text + video tokens + newline).
The projector, pooling and LM head are not counted (the paper does not count them either).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

__all__ = ["layer_flops", "frames_per_layer", "encoder_flops", "llm_flops", "compare", "main"]


def layer_flops(n: int, d: int, m: int) -> int:
    """``4nd² + 2n²d + 2ndm`` for one layer over one sequence of ``n`` tokens."""
    n, d, m = int(n), int(d), int(m)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def frames_per_layer(frames: int, num_layers: int, prune_layers: Sequence[int] = (),
                     counts_after: Sequence[int] = ()) -> List[int]:
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


def llm_flops(seq_lens: Sequence[int], layers: int, d: int, m: int) -> int:
    """LLM prefill FLOPs over the given sequence lengths (one per sample)."""
    return sum(layers * layer_flops(n, d, m) for n in seq_lens)


def compare(spec, frames: Sequence[int], seq_lens_full: Sequence[int], seq_lens_comp: Sequence[int],
            prune_layers: Sequence[int] = (), counts_after: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, float]:
    """Uncompressed vs compressed FLOPs for a batch.

    ``frames``: frames per video; ``counts_after[b]``: video b's frame counts after each prune
    layer; ``seq_lens_*``: LLM prefill tokens per sample (uncompressed / compressed).
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
    llm_comp = llm_flops(seq_lens_comp, spec.text_layers, spec.text_hidden, spec.text_mlp)
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


def main(argv=None) -> None:
    """Print the analytical table for the forced pattern (no model, no GPU needed)."""
    import argparse

    from earlytom_ext.config import preset

    from . import models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llava-ov-7b", choices=sorted(models.SPECS))
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    spec = models.get_spec(args.model)
    rows = []
    for r in (0.10, 0.15, 0.20, 0.25):
        cfg = preset("videomme", r)
        counts = models.forced_counts(args.frames, cfg)
        kept = models.forced_video_tokens(args.frames, cfg)
        full_len = models.video_placeholders(args.frames) + args.text_tokens
        comp_len = kept + 1 + args.text_tokens
        row = {"r": r, "frames_after_prune": "/".join(map(str, counts)), "prefill_tokens": comp_len}
        row.update(compare(spec, [args.frames], [full_len], [comp_len], cfg.prune_layers, [counts]))
        rows.append(row)
    from .common import markdown_table

    print(markdown_table(rows, ["r", "frames_after_prune", "prefill_tokens", "encoder_tflops_full", "encoder_tflops",
                                "llm_tflops_full", "llm_tflops", "flops_reduction_pct"]))


if __name__ == "__main__":
    main()
