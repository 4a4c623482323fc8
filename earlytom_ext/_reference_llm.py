"""Pure-torch reference of the inner-LLM token merge (``earlytom_ext.reference.llm_merge``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["llm_merge"]


# --------------------------------------------------------------------------------------------
# Inner-LLM token merge (the published INNER_k / INNER_r option)
# --------------------------------------------------------------------------------------------
def llm_merge(
    hidden: torch.Tensor, span: tuple[int, int], scores: torch.Tensor, keep_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner-LLM merge of ONE sample, before decoder layer k: ``(new_hidden, kept)``.

    ``hidden [N, D]``: the hidden states entering layer k (the output of layer k - 1).
    ``span = (s, L)``: the video span (Stage II tokens and the newline), positions s .. s+L-1.
    ``scores [L]``: the attention the last prompt token pays to each span position (layer k - 1,
    mean over heads). ``keep_ratio``: the fraction of the span kept, ``1 - r_in``, in (0, 1].

    1. Keep set: the ``n_keep = max(1, round(L * keep_ratio))`` span positions with the highest
       score (Python ``round``, half to even; ties: the lower position). At least one token is
       kept so that the removed ones have a target (published: ``round`` alone).
    2. Every removed position i gets the target ``j* = argmax_j cos(h_i, h_j)`` over the kept j,
       cosines computed once before any update (``F.normalize``, eps 1e-12); ties go to the kept
       position with the higher score, then to the lower position.
    3. For the removed positions in ascending order: ``h[j*] = (h[j*] + h[i]) / 2`` (fp32, one
       rounding to the input dtype at the end), so a kept token that absorbs several weights
       them 1/2, 1/4, ... from the last one back.
    4. Drop: tokens before the span, the kept span tokens in ascending order, tokens after.

    Returns ``new_hidden [N - L + n_keep, D]`` (input dtype) and ``kept`` (int64 ``[n_keep]``,
    the kept tokens' original positions in the sequence, ascending).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a [N, D] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    N = hidden.shape[0]
    if (
        not isinstance(span, (tuple, list))
        or len(span) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
    ):
        raise TypeError(f"span must be a (start, length) pair of ints, got {span!r}")
    s, L = span
    if s < 0 or L < 0 or s + L > N:
        raise ValueError(f"span (start, length) must lie inside the {N} positions of hidden, got {span}")
    if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool):
        raise TypeError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
    if not (math.isfinite(keep_ratio) and 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1] (the fraction of the span kept, 1 - r_in), got {keep_ratio!r}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.shape[0] != L:
        raise ValueError(f"scores must be a 1-D tensor of the span length {L}, got {getattr(scores, 'shape', scores)}")
    if L == 0:
        return hidden.clone(), torch.empty(0, dtype=torch.long, device=hidden.device)
    a = [float(v) for v in scores.float().tolist()]
    if not all(math.isfinite(v) for v in a):
        raise ValueError("scores must be finite")

    n_keep = max(1, round(L * keep_ratio))
    by_score = sorted(range(L), key=lambda p: (-a[p], p))  # highest score first, ties: lower position
    keep = sorted(by_score[:n_keep])
    removed = sorted(by_score[n_keep:])

    x = hidden[s : s + L].float()
    xn = F.normalize(x, dim=-1, eps=1e-12)
    merged = x.clone()
    if removed:
        cos = (xn[removed] @ xn[keep].T).tolist()  # [removed, kept], before any update
        targets = [max(range(n_keep), key=lambda c: (row[c], a[keep[c]], -keep[c])) for row in cos]
        for i, c in zip(removed, targets):  # ascending i: sequential halving
            j = keep[c]
            merged[j] = (merged[j] + x[i]) / 2
    kept_rows = merged[keep].to(hidden.dtype)
    new_hidden = torch.cat([hidden[:s], kept_rows, hidden[s + L :]], dim=0)
    kept = torch.tensor(keep, dtype=torch.long, device=hidden.device) + s
    return new_hidden, kept
