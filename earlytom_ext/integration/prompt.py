"""Rewriting the prompt for the compressed videos: every video's run of placeholder tokens is
shortened to its compressed length, padding kept on the side the inputs used.

All decisions are made on host copies of ``input_ids`` / ``attention_mask`` / ``labels``; when they
live on a GPU, the copies are started (non-blocking, pinned) before the vision encoder runs and are
complete by the time they are read, so the rewriting adds no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .run import AsyncHostCopy

__all__ = ["HostPrompt", "RewrittenPrompt", "placeholder_runs", "rewrite_placeholders"]


class HostPrompt:
    """Host copies of the prompt tensors, started at construction, read after :meth:`wait`."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None):
        named = [
            (n, t)
            for n, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels))
            if t is not None
        ]
        self.devices = {n: t.device for n, t in named}
        self.dtypes = {n: t.dtype for n, t in named}
        self._copy = AsyncHostCopy(input_ids, attention_mask, labels)
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def wait(self) -> HostPrompt:
        # Complete long before: the copies were queued ahead of the vision encoder.
        self.input_ids, self.attention_mask, self.labels = self._copy.wait()
        return self


@dataclass
class RewrittenPrompt:
    input_ids: torch.Tensor  # host
    attention_mask: torch.Tensor  # host
    labels: torch.Tensor | None  # host
    spans: list[list[tuple[int, int]]]  # per sample: (start, length) of each compressed video run
    padding_side: str

    def to_devices(self, prompt: HostPrompt) -> dict[str, torch.Tensor]:
        """The rewritten tensors on the devices (and in the dtypes) the caller's tensors used."""
        out = {}
        for name in ("input_ids", "attention_mask", "labels"):
            t = getattr(self, name)
            if t is None:
                continue
            dev = prompt.devices.get(name, prompt.devices["input_ids"])
            t = t.to(prompt.dtypes.get(name, t.dtype))
            if dev.type == "cuda":
                t = t.pin_memory().to(dev, non_blocking=True)
            out[name] = t
        return out


def _padding(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """Leading and trailing zeros of each row of an attention mask."""
    nz = mask != 0
    Bs, L = mask.shape
    if bool(nz.all()):  # the common case, one reduction
        return [0] * Bs, [0] * Bs
    any_ = nz.any(dim=1)
    first = torch.where(any_, nz.int().argmax(dim=1), torch.full_like(any_, L, dtype=torch.long))
    last = torch.where(any_, L - 1 - nz.flip(1).int().argmax(dim=1), torch.full_like(any_, L - 1, dtype=torch.long))
    lead = first.tolist()
    trail = [L - 1 - int(e) if a else 0 for e, a in zip(last.tolist(), any_.tolist())]
    return lead, trail


def placeholder_runs(ids: torch.Tensor, video_token_id: int, before: Sequence[int]) -> dict[int, list[tuple]]:
    """Per sample, ``(start, end, video)`` of each video's run of ``before[video]`` placeholders in the
    host tensor ``ids``, matched in the order Hugging Face fills them (sample-major). Every run must be
    contiguous and lie in one sample (``ValueError`` otherwise)."""
    is_ph = (ids == video_token_id).to(torch.int8)
    edge = is_ph.new_zeros((ids.shape[0], 1))
    # +1 where a run of placeholders starts, -1 one past its end; row-major = sample-major.
    bounds = torch.diff(is_ph, dim=1, prepend=edge, append=edge).nonzero().tolist()
    found = [(b, s, e) for (b, s), (_, e) in zip(bounds[0::2], bounds[1::2])]
    count, total = sum(e - s for _, s, e in found), sum(before)
    if count != total:
        raise ValueError(
            f"input_ids hold {count} video placeholder tokens (id {video_token_id}), but the "
            f"{len(before)} video(s) need {' + '.join(map(str, before))} = {total}"
        )
    # Consecutive videos may share one run (nothing between them); a video never spans two.
    runs: dict[int, list[tuple[int, int, int]]] = {}
    r, pos = 0, found[0][1] if found else 0
    for v, n0 in enumerate(before):
        b, _, e = found[r]
        if pos + n0 > e:
            raise ValueError(
                f"the {n0} video placeholders of video {v} must be one contiguous run in one sample of input_ids"
            )
        runs.setdefault(b, []).append((pos, pos + n0, v))
        pos += n0
        if pos == e and r + 1 < len(found):
            r += 1
            pos = found[r][1]
    return runs


def rewrite_placeholders(
    prompt: HostPrompt,
    video_token_id: int,
    before: Sequence[int],
    after: Sequence[int],
    *,
    padding_side: str | None,
    pad_token_id: int,
) -> RewrittenPrompt:
    """Shorten video ``v``'s run of ``before[v]`` placeholders to ``after[v]``.

    The runs are found by :func:`placeholder_runs`. ``padding_side=None`` keeps the side the inputs used
    (right when only trailing padding exists, else left).
    """
    ids = prompt.input_ids
    Bs, L = ids.shape
    mask = prompt.attention_mask if prompt.attention_mask is not None else torch.ones_like(ids)
    labels = prompt.labels
    runs = placeholder_runs(ids, video_token_id, before)

    lead, trail = _padding(mask) if prompt.attention_mask is not None else ([0] * Bs, [0] * Bs)
    if padding_side is None:
        padding_side = "right" if any(trail) and not any(lead) else "left"
    pad_id = pad_token_id
    for b in range(Bs):
        if lead[b]:
            pad_id = int(ids[b, 0])
            break
        if trail[b]:
            pad_id = int(ids[b, L - 1])
            break

    rows_ids, rows_mask, rows_lab, rel_spans = [], [], [], []
    for b in range(Bs):
        pieces_i, pieces_m, pieces_l, spans = [], [], [], []
        pos, end, length = lead[b], L - trail[b], 0
        for s, e, v in sorted(runs.get(b, [])):
            n = after[v]
            pieces_i += [ids[b, pos:s], torch.full((n,), video_token_id, dtype=ids.dtype)]
            pieces_m += [mask[b, pos:s], mask[b, s : s + 1].expand(n)]
            if labels is not None:
                pieces_l += [labels[b, pos:s], labels[b, s : s + 1].expand(n)]
            length += s - pos
            spans.append((length, n))
            length += n
            pos = e
        pieces_i.append(ids[b, pos:end])
        pieces_m.append(mask[b, pos:end])
        if labels is not None:
            pieces_l.append(labels[b, pos:end])
        rows_ids.append(torch.cat(pieces_i))
        rows_mask.append(torch.cat(pieces_m))
        rows_lab.append(torch.cat(pieces_l) if labels is not None else None)
        rel_spans.append(spans)

    L2 = max(r.shape[0] for r in rows_ids)
    left = padding_side == "left"

    def pad(rows, value, dtype):
        if all(r.shape[0] == L2 for r in rows):
            return torch.stack(rows)
        out = torch.full((Bs, L2), value, dtype=dtype)
        for b, r in enumerate(rows):
            n = r.shape[0]
            if left:
                out[b, L2 - n :] = r
            else:
                out[b, :n] = r
        return out

    spans = [[(s + (L2 - rows_ids[b].shape[0] if left else 0), n) for s, n in rel_spans[b]] for b in range(Bs)]
    return RewrittenPrompt(
        input_ids=pad(rows_ids, pad_id, ids.dtype),
        attention_mask=pad(rows_mask, 0, mask.dtype),
        labels=pad(rows_lab, -100, labels.dtype) if labels is not None else None,
        spans=spans,
        padding_side=padding_side,
    )
