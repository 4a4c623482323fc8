"""The ops in the autograd modes a model runs in: inputs that require grad (grad mode) and inference
tensors (``torch.inference_mode``, with several CPU threads): the values of ``torch.no_grad()``, no
error from the ops' internal ATen calls or their worker threads."""

import pytest
import torch

from earlytom_ext import EarlyTomConfig, ops
from earlytom_ext.ops import has_cuda_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])
CFG = EarlyTomConfig(retain_ratio=0.5, tau=0.5, max_window=4, ema=0.9, prune_layers=(1, 2))


@pytest.fixture(params=["grad", "inference"])
def mode(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the CPU ops' worker threads in use
    yield request.param
    torch.set_num_threads(threads)


def _both(mode, fn, *tensors):
    """``fn`` on copies that require grad (grad mode) or on inference tensors (inference mode), then
    on plain copies under no_grad."""
    if mode == "grad":
        with torch.enable_grad():
            out = fn(*[t.clone().requires_grad_(t.is_floating_point()) for t in tensors])
        # Constants, like every op of the compression (no autograd fallback with its warning).
        assert not any(t.requires_grad for t in _flat(out))
    else:
        with torch.inference_mode():
            out = fn(*[t.clone() for t in tensors])
    with torch.no_grad():
        plain = fn(*[t.clone() for t in tensors])
    return out, plain


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


def _assert_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert torch.equal(x.detach(), y), (x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_received(device, mode):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 2, 600, 8, generator=g).to(device) for _ in range(2))  # S > one row block
    _assert_equal(*_both(mode, lambda q, k: ops.attention_received(q, k), q, k))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_ops(device, mode):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 5, 16, generator=g)
    x = (base + 0.1 * torch.randn(7, 5, 16, generator=g)).to(device)  # similar frames: merges happen
    scores = torch.rand(7, 5, generator=g).to(device)
    counts = [4, 3]
    merged = _both(mode, lambda x, s: ops.merge_frames(x, counts, CFG, extras=s), x, scores)
    _assert_equal(*merged)
    plan_src, plan_weight = merged[1].plan_src, merged[1].plan_weight
    _assert_equal(*_both(mode, lambda s: ops.apply_merge_plan(s, plan_src, plan_weight), scores))
    _assert_equal(*_both(mode, lambda x: ops.segment_frames(x, counts, CFG), x))
    _assert_equal(*_both(mode, lambda x: ops.segment_frames_deferred(x, counts, CFG), x))


@pytest.mark.parametrize("device", DEVICES)
def test_select_tokens(device, mode):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(4, 9, 6, generator=g).to(device)
    scores = torch.rand(4, 9, generator=g).to(device)
    plan = ops.stage2_plan([[(0, 1), (2, 3)]], [6], 0.5, tokens_per_frame=9)
    _assert_equal(*_both(mode, lambda f, s: ops.select_tokens(f, s, plan), feats, scores))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_ops_refuse_backward(device):
    """The raw ``torch.ops.earlytom`` ops on inputs that require grad: their backward raises instead
    of silently giving no gradient (the wrappers above return constants)."""
    E = torch.ops.earlytom
    x = torch.randn(4, 3, 8, device=device).cumsum(0).requires_grad_()
    counts = torch.tensor([4], device=device)
    q = torch.randn(2, 2, 5, 4, device=device, requires_grad=True)
    plan_src = torch.tensor([[0, 1], [2, 3]], device=device)
    feats = torch.randn(2, 6, 8, device=device, requires_grad=True)
    keep = torch.tensor([2, 1], device=device)
    static = torch.zeros(2, dtype=torch.bool, device=device)
    calls = {
        "merge_frames": lambda: E.merge_frames(x, counts, 0.5, 4, 0.9, False)[0],
        "apply_merge_plan": lambda: E.apply_merge_plan(x, plan_src, torch.full((2,), 0.5, device=device)),
        "attention_received": lambda: E.attention_received(q, q, 0.5),
        "select_tokens": lambda: E.select_tokens(feats, torch.randn(2, 6, device=device), keep, static, 3)[0],
    }
    for name, call in calls.items():
        out = call()
        with pytest.raises(RuntimeError, match=f"derivative for earlytom::{name} is not implemented"):
            out.sum().backward()
