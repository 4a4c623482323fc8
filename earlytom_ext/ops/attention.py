"""Attention received per token: ``a[n, s] = mean_h mean_q softmax(q kᵀ·scale)[n, h, q, s]``.

Wrapper of ``torch.ops.earlytom.attention_received`` (schema in ``csrc/earlytom.cpp``, contract
in ``docs/design.md``). The op computes a row log-sum-exp pass and a column-sum pass over tiles;
no ``S x S`` attention map is stored in global memory. The op checks the shapes, dtypes and
devices of q and k itself (``csrc/ops/attention_received.cpp``); the wrapper handles the
``[N, S, H·d]`` layout, ``num_heads`` and ``scale``.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._validation import (
    FLOAT_DTYPES,
    all_finite,
    check_bool,
    check_int,
    check_meta_tensor,
    check_real,
    check_same_device,
    check_tensor,
)

__all__ = ["attention_received"]


def _attention_received_fake(q, k, scale):
    op = "attention_received"
    check_meta_tensor(op, "q", q, dtypes=FLOAT_DTYPES, dim=4)
    torch._check_value(
        k.shape == q.shape, lambda: f"{op}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}"
    )
    check_meta_tensor(op, "k", k, dtypes=(q.dtype,))
    check_same_device(op, "q", q, k=k)
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32)


if _ext.available():
    torch.library.register_fake("earlytom::attention_received")(_attention_received_fake)


def _as_heads(name: str, t: torch.Tensor, num_heads: int | None) -> torch.Tensor:
    """``[N, H, S, d]`` view of ``t`` (``[N, H, S, d]`` as is, ``[N, S, H·d]`` split into heads)."""
    if t.dim() == 4:
        if num_heads is not None and t.shape[1] != num_heads:
            raise ValueError(f"{name} has {t.shape[1]} heads (dim 1 of [N, H, S, d]) but num_heads={num_heads}")
        return t
    if t.dim() == 3:
        if num_heads is None:
            raise ValueError(f"{name} is 3-D [N, S, H*d]: num_heads must be given")
        n, s, hd = t.shape
        if hd % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide the last dim of {name} ({hd})")
        # A view whenever the strides allow it (always when the last dim is contiguous).
        return t.reshape(n, s, num_heads, hd // num_heads).transpose(1, 2)
    raise ValueError(f"{name} must be [N, H, S, d] or [N, S, H*d] (with num_heads), got shape {tuple(t.shape)}")


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    num_heads: int | None = None,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Attention received by each key, averaged over heads and queries.

    Args:
        q, k: ``[N, H, S, d]`` (any strides; a non-contiguous last dim is copied) or
            ``[N, S, H·d]`` with ``num_heads`` given (viewed as heads without a copy, e.g. the
            output of ``q_proj``). float32/float16/bfloat16, same dtype, same device.
        scale: softmax scale (a finite real number), default ``d ** -0.5``.
        num_heads: number of heads H (a positive int); required for 3-D inputs, checked for
            4-D inputs.
        check_finite: reject NaN/Inf in ``q``/``k`` and logits ``q·k·scale`` that overflow
            float32 (ValueError). This costs one reduction over each input and the output and
            one host sync (the flags are read together, after the op); pass ``False`` in a hot
            loop when the inputs are known to be finite.

    Returns:
        ``a [N, S]`` float32 with ``a[n, s] = mean_h mean_q softmax(q kᵀ·scale)[n, h, q, s]``
        (each row sums to 1). ``S = 0`` or ``N = 0`` gives an empty ``[N, S]`` result.

    The logits ``q·k·scale`` must be finite in float32 (always the case for float16 inputs;
    bfloat16/float32 inputs of magnitude ~1e19, or a huge ``scale``, can overflow: with
    ``check_finite`` that is a ValueError, without it the result holds NaN).
    """
    _ext.require()
    check_tensor("q", q)
    check_tensor("k", k)
    if num_heads is not None:
        num_heads = check_int("num_heads", num_heads)
        if num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    check_bool("check_finite", check_finite)
    if k.dim() != q.dim():
        raise ValueError(f"k must have the rank of q ({q.dim()}), got shape {tuple(k.shape)}")
    qh = _as_heads("q", q, num_heads)
    kh = _as_heads("k", k, num_heads)
    d = qh.shape[3]
    if scale is None:
        scale = d**-0.5 if d > 0 else 1.0  # d = 0 is rejected by the op
    else:
        scale = check_real("scale", scale)
    with torch.no_grad():  # a constant, as the merge ops return (no autograd formula)
        out = torch.ops.earlytom.attention_received(qh, kh, scale)
    if check_finite and out.numel() and out.device.type != "meta":
        # One sync for all three flags. The op is safe on non-finite inputs (it only computes
        # NaN/Inf); finite inputs give a finite result unless the logits overflow float32.
        flags = torch.stack([all_finite(q), all_finite(k), all_finite(out)]).tolist()
        if not flags[0]:
            raise ValueError("q contains NaN or Inf values")
        if not flags[1]:
            raise ValueError("k contains NaN or Inf values")
        if not flags[2]:
            raise ValueError(
                f"the logits q·kᵀ·scale overflow float32 (scale = {scale!r}): q, k and scale must keep "
                "|q·k·scale| within the float32 range (about 3.4e38)"
            )
    return out
