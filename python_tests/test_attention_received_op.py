"""attention_received: the fused op against explicit softmax maps (float64 oracle) and
earlytom_ext.reference over grids of S / d / H / N / dtypes, strided and [N, S, H·d] inputs,
large logits, bad inputs, opcheck on CPU, determinism, and CUDA == CPU == oracle with a GPU."""

import numpy as np
import pytest
import torch

from earlytom_ext import reference as R
from earlytom_ext.ops import attention_received, has_cuda_kernels
from earlytom_ext.ops.attention import _as_heads

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.cuda.is_available() and has_cuda_kernels()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA kernels")

# (rtol, atol * S): the op computes in fp32 from the given (already rounded) inputs, so the
# oracle is evaluated on the same values; 16-bit inputs get a little slack for the reduced
# precision of logits formed from them on tensor cores.
TOL = {torch.float32: (2e-4, 1e-5), torch.float16: (5e-4, 2e-5), torch.bfloat16: (5e-4, 2e-5)}
# The CPU op computes in fp32 whatever the input dtype and stays within ~1.5e-6 of the oracle
# (relative) on these grids; this tolerance catches a softmax scale that is off by 1e-4.
TOL_CPU = (1e-5, 1e-6)


# ------------------------------------------------------------------------------ helpers
def oracle(q, k, scale):
    """Explicit softmax maps in float64: mean over heads and queries. q, k [N, H, S, d]."""
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


def make_qk(N, H, S, d, dtype, seed, device="cpu", std=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(N, H, S, d, generator=g) * std).to(dtype)
    k = (torch.randn(N, H, S, d, generator=g) * std).to(dtype)
    return q.to(device), k.to(device)


def assert_matches(a, ref, dtype, S, scale_tol=1.0):
    """``a`` (the op's output, on its device) against the float64 oracle ``ref``."""
    rtol, atol_s = TOL_CPU if a.device.type == "cpu" else TOL[dtype]
    a = a.cpu()
    assert a.dtype == torch.float32 and a.shape == ref.shape
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.double(), ref.double(), rtol=rtol * scale_tol, atol=atol_s * scale_tol / S)


# ------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 7, 65, 130])
@pytest.mark.parametrize("d", [8, 64, 72, 80])
def test_grid_small(dtype, S, d):
    q, k = make_qk(2, 3, S, d, dtype, seed=S * 100 + d)
    scale = d**-0.5
    a = attention_received(q, k)
    assert_matches(a, oracle(q, k, scale), dtype, S)
    # every row is a mean of probability rows: sums to 1
    torch.testing.assert_close(a.sum(-1).double(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,S,d", [(1, 16, 729, 72), (2, 1, 729, 64), (64, 1, 7, 8), (64, 16, 65, 80)])
def test_grid_heads_frames(dtype, N, H, S, d):
    q, k = make_qk(N, H, S, d, dtype, seed=N + H + S + d)
    a = attention_received(q, k)
    assert a.shape == (N, S)
    assert_matches(a, oracle(q, k, d**-0.5), dtype, S)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype):
    q, k = make_qk(3, 4, 50, 72, dtype, seed=7)
    scale = 72**-0.5
    a = attention_received(q, k, scale)
    ref = R.attention_received(q, k, scale)  # float32 explicit maps
    torch.testing.assert_close(a, ref, rtol=1e-3, atol=1e-5 / 50)
    assert_matches(a, oracle(q, k, scale), dtype, 50)


@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0, -0.3, 3])
def test_explicit_scales(scale):
    q, k = make_qk(2, 2, 33, 16, torch.float32, seed=11)
    a = attention_received(q, k, scale)
    assert_matches(a, oracle(q, k, float(scale)), torch.float32, 33)
    if scale == 0.0:  # uniform attention
        torch.testing.assert_close(a, torch.full((2, 33), 1 / 33), rtol=1e-6, atol=1e-7)


def test_identical_tokens_uniform():
    q = torch.randn(1, 2, 9, 8).expand(3, 2, 9, 8).contiguous()
    k = torch.ones(3, 2, 9, 8)  # all keys equal: every softmax row is uniform
    a = attention_received(q, k)
    torch.testing.assert_close(a, torch.full((3, 9), 1 / 9), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ large logits
def dominant_key_inputs(N, H, S, d, dtype, seed, strength):
    """Queries share a direction u; key 0 is strength * u: key 0 dominates every row."""
    g = torch.Generator().manual_seed(seed)
    u = torch.where(torch.arange(d) % 2 == 0, -1.0, 1.0)
    q = torch.randn(N, H, S, d, generator=g) + 2.0 * u
    k = torch.randn(N, H, S, d, generator=g)
    k[:, :, 0] = strength * u
    return q.to(dtype), k.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strength", [6.0, 60.0])
def test_dominant_key_lse_stability(dtype, strength):
    S, d = 129, 72
    q, k = dominant_key_inputs(2, 4, S, d, dtype, seed=3, strength=strength)
    scale = d**-0.5
    # logits of key 0 are ~ 2 * strength * d * scale: far beyond exp()'s fp32 range at 60
    a = attention_received(q, k, scale)
    ref = oracle(q, k, scale)
    assert ref[:, 0].min() > 0.5
    assert_matches(a, ref, dtype, S, scale_tol=4.0)


def test_peaked_softmax_large_scale():
    q, k = make_qk(2, 3, 65, 32, torch.float32, seed=5)
    scale = 40.0  # logits in the hundreds: each row is nearly one-hot
    a = attention_received(q, k, scale)
    assert_matches(a, oracle(q, k, scale), torch.float32, 65, scale_tol=10.0)


# ------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("dtype", DTYPES)
def test_qproj_layout_3d(dtype):
    N, S, H, d = 2, 65, 4, 72
    g = torch.Generator().manual_seed(1)
    q3 = torch.randn(N, S, H * d, generator=g).to(dtype)
    k3 = torch.randn(N, S, H * d, generator=g).to(dtype)
    a = attention_received(q3, k3, num_heads=H)
    q4 = q3.view(N, S, H, d).transpose(1, 2)
    k4 = k3.view(N, S, H, d).transpose(1, 2)
    assert_matches(a, oracle(q4, k4, d**-0.5), dtype, S)
    # the same values, contiguous [N, H, S, d]: bitwise the same result
    assert torch.equal(a, attention_received(q4.contiguous(), k4.contiguous()))
    # the wrapper views the 3-D input without a copy
    view = _as_heads("q", q3, H)
    assert view.data_ptr() == q3.data_ptr() and view.shape == (N, H, S, d)


def test_transposed_view_4d_no_copy_needed():
    N, S, H, d = 3, 30, 2, 16
    q3, k3 = torch.randn(N, S, H * d), torch.randn(N, S, H * d)
    q4 = q3.view(N, S, H, d).transpose(1, 2)
    k4 = k3.view(N, S, H, d).transpose(1, 2)
    assert not q4.is_contiguous() and q4.stride(-1) == 1
    a = attention_received(q4, k4)
    assert_matches(a, oracle(q4, k4, d**-0.5), torch.float32, S)
    assert torch.equal(a, attention_received(q4.contiguous(), k4.contiguous()))


def test_non_contiguous_last_dim_and_sliced():
    N, H, S, d = 2, 3, 20, 12
    base_q, base_k = torch.randn(N, H, d, S), torch.randn(N, H, d, S)
    q, k = base_q.transpose(-1, -2), base_k.transpose(-1, -2)  # last dim strided
    a = attention_received(q, k)
    assert_matches(a, oracle(q, k, d**-0.5), torch.float32, S)
    big_q, big_k = torch.randn(N, 2 * H, S + 5, d + 4), torch.randn(N, 2 * H, S + 5, d + 4)
    q2, k2 = big_q[:, ::2, 3 : 3 + S, 2 : 2 + d], big_k[:, ::2, 3 : 3 + S, 2 : 2 + d]
    a2 = attention_received(q2, k2)
    assert_matches(a2, oracle(q2, k2, d**-0.5), torch.float32, S)


def test_expanded_inputs():
    q = torch.randn(1, 1, 10, 8).expand(4, 3, 10, 8)  # stride 0 over N and H
    k = torch.randn(4, 3, 10, 8)
    a = attention_received(q, k)
    assert_matches(a, oracle(q, k, 8**-0.5), torch.float32, 10)


def test_empty_batch():
    q = torch.randn(0, 2, 5, 8)
    a = attention_received(q, q.clone())
    assert a.shape == (0, 5) and a.dtype == torch.float32


def test_deterministic_across_thread_counts():
    q, k = make_qk(4, 4, 65, 72, torch.bfloat16, seed=9)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a1 = attention_received(q, k)
        torch.set_num_threads(max(2, prev))
        a2 = attention_received(q, k)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a1, a2)


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention_received([1.0], k)
    with pytest.raises(ValueError, match=r"q must be \[N, H, S, d\]"):
        attention_received(torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="k must have the shape of q"):
        attention_received(q, torch.randn(2, 2, 6, 8))
    with pytest.raises(ValueError, match="k must have the rank of q"):
        attention_received(q, torch.randn(2, 5, 16), num_heads=2)
    with pytest.raises(TypeError, match="q must have dtype"):
        attention_received(q.double(), k.double())
    with pytest.raises(TypeError, match="q must have dtype"):
        attention_received(q.long(), k.long())
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        attention_received(q, k.half())
    with pytest.raises(ValueError, match="k must be on"):
        attention_received(q, k.to("meta"))
    # On meta tensors (shape inference) the default finiteness check has no values to read.
    assert attention_received(q.to("meta"), k.to("meta")).shape == (2, 5)
    with pytest.raises(ValueError, match="num_heads must be given"):
        attention_received(torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        attention_received(torch.randn(2, 5, 16), torch.randn(2, 5, 16), num_heads=3)
    with pytest.raises(ValueError, match="num_heads=3"):
        attention_received(q, k, num_heads=3)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        attention_received(torch.randn(2, 5, 16), torch.randn(2, 5, 16), num_heads=0)
    with pytest.raises(ValueError, match="at least one head"):
        attention_received(torch.randn(2, 0, 5, 8), torch.randn(2, 0, 5, 8))
    with pytest.raises(ValueError, match="head dim"):
        attention_received(torch.randn(2, 2, 5, 0), torch.randn(2, 2, 5, 0))
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite real number"):
            attention_received(q, k, bad)
    for bad in (True, "0.1", torch.tensor(0.1), [0.1]):
        with pytest.raises(TypeError, match="scale must be a finite real number"):
            attention_received(q, k, bad)


def test_bad_num_heads_and_dtypes():
    q3 = torch.randn(2, 5, 16)
    for bad in (2.0, True, "2", [2]):
        with pytest.raises(TypeError, match="num_heads must be an int"):
            attention_received(q3, q3.clone(), num_heads=bad)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"num_heads must be a positive int, got {bad}"):
            attention_received(q3, q3.clone(), num_heads=bad)
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(TypeError, match=r"q must have dtype in \(float32, float16, bfloat16\), got bool"):
        attention_received(q > 0, k > 0)
    with pytest.raises(TypeError, match=r"k must have the dtype of q \(bfloat16\), got float32"):
        attention_received(q.bfloat16(), k)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got ndarray"):
        attention_received(q, k.numpy())
    with pytest.raises(ValueError, match=r"q must be \[N, H, S, d\] or \[N, S, H\*d\]"):
        attention_received(torch.randn(1, 2, 2, 5, 8), torch.randn(1, 2, 2, 5, 8))
    with pytest.raises(ValueError, match="head dim d must be >= 1"):
        attention_received(torch.randn(0, 2, 5, 0), torch.randn(0, 2, 5, 0))
    with pytest.raises(ValueError, match="head dim d must be >= 1"):
        attention_received(torch.randn(2, 5, 0), torch.randn(2, 5, 0), num_heads=2)


def test_numpy_scalars_accepted():
    """NumPy scalars are real numbers / ints (they used to be rejected as 'not finite')."""
    q, k = make_qk(2, 2, 9, 8, torch.float32, seed=1)
    a = attention_received(q, k, np.float32(0.25))
    assert_matches(a, oracle(q, k, float(np.float32(0.25))), torch.float32, 9)
    q3 = q.transpose(1, 2).reshape(2, 9, 16)
    k3 = k.transpose(1, 2).reshape(2, 9, 16)
    assert torch.equal(attention_received(q3, k3, 0.25, num_heads=np.int64(2)), attention_received(q, k, 0.25))


def test_empty_positions():
    """S = 0 (no tokens): an empty [N, 0] result, as for N = 0."""
    for q in (torch.randn(2, 3, 0, 8), torch.randn(0, 3, 0, 8)):
        a = attention_received(q, q.clone())
        assert a.shape == (q.shape[0], 0) and a.dtype == torch.float32
    a = attention_received(torch.randn(2, 0, 16), torch.randn(2, 0, 16), num_heads=2)
    assert a.shape == (2, 0)


@pytest.mark.parametrize("case", ["large_inputs", "large_scale"])
def test_overflowing_logits_rejected(case):
    """Finite q, k and scale whose logits overflow float32 used to return NaN rows silently."""
    q, k = make_qk(2, 2, 5, 8, torch.float32, seed=3)
    if case == "large_inputs":
        q, k, scale = q * 1e19, k * 1e19, None
    else:
        scale = 1e38
    with pytest.raises(ValueError, match="overflow float32"):
        attention_received(q, k, scale)
    attention_received(q, k, scale, check_finite=False)  # unchecked: no error (result unspecified)


def test_cpu_tolerance_catches_small_scale_error():
    """The CPU tolerance is tight enough to see a softmax scale off by 1e-4 (relative)."""
    q, k = make_qk(2, 3, 65, 64, torch.float32, seed=1)
    a = attention_received(q, k, 0.125 * (1 + 1e-4))
    with pytest.raises(AssertionError):
        assert_matches(a, oracle(q, k, 0.125), torch.float32, 65)


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(which, value):
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    (q if which == "q" else k)[1, 1, 3, 2] = value
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        attention_received(q, k)
    attention_received(q, k, check_finite=False)  # skipped check: no error (result unspecified)
    for flag in (None, 0, "no"):  # a flag is a bool: truthiness would turn the check on or off silently
        with pytest.raises(TypeError, match=f"check_finite must be a bool, got {flag!r}"):
            attention_received(q, k, check_finite=flag)


def test_raw_op_checks():
    op = torch.ops.earlytom.attention_received
    with pytest.raises(ValueError, match="q must be"):
        op(torch.randn(2, 5, 8), torch.randn(2, 5, 8), 1.0)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        op(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8).half(), 1.0)
    with pytest.raises(ValueError, match="scale must be a finite real number"):
        op(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), float("nan"))


# ------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_cpu(dtype):
    op = torch.ops.earlytom.attention_received.default
    q, k = make_qk(2, 3, 17, 24, dtype, seed=2)
    torch.library.opcheck(op, (q, k, 0.2))
    q3 = torch.randn(2, 9, 3 * 8).to(dtype)
    q4 = q3.view(2, 9, 3, 8).transpose(1, 2)
    torch.library.opcheck(op, (q4, q4.clone(), 1.0))


def test_torch_compile_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 2, 11, 8)
        out = torch.ops.earlytom.attention_received(q, q, 0.5)
    assert out.shape == (3, 11) and out.dtype == torch.float32


# ------------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,H,S,d",
    [
        (2, 3, 1, 8),
        (2, 3, 7, 72),
        (3, 2, 65, 64),
        (2, 16, 729, 72),
        (64, 1, 65, 80),
        (1, 2, 100, 96),
        (1, 2, 77, 200),
        (1, 2, 70, 300),
        (1, 2, 66, 7),
    ],
)
def test_cuda_matches_cpu_and_oracle(dtype, N, H, S, d):
    q, k = make_qk(N, H, S, d, dtype, seed=N * 7 + S + d)
    scale = d**-0.5
    a_cuda = attention_received(q.cuda(), k.cuda(), scale)
    assert a_cuda.device.type == "cuda"
    ref = oracle(q, k, scale)
    assert_matches(a_cuda, ref, dtype, S)
    assert_matches(attention_received(q, k, scale), ref, dtype, S)
    # deterministic: bitwise equal on a second run
    assert torch.equal(a_cuda, attention_received(q.cuda(), k.cuda(), scale))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_qproj_layout_and_large_logits(dtype):
    N, S, H, d = 3, 729, 16, 72
    g = torch.Generator().manual_seed(4)
    q3 = torch.randn(N, S, H * d, generator=g).to(dtype).cuda()
    k3 = torch.randn(N, S, H * d, generator=g).to(dtype).cuda()
    a = attention_received(q3, k3, num_heads=H)
    q4 = q3.view(N, S, H, d).transpose(1, 2).cpu()
    k4 = k3.view(N, S, H, d).transpose(1, 2).cpu()
    assert_matches(a, oracle(q4, k4, d**-0.5), dtype, S)
    # contiguous copy of the same values: same result (up to accumulation order)
    a_c = attention_received(q4.contiguous().cuda(), k4.contiguous().cuda())
    torch.testing.assert_close(a, a_c, rtol=1e-5, atol=1e-8)
    qd, kd = dominant_key_inputs(2, 4, 150, 72, dtype, seed=8, strength=60.0)
    a_dom = attention_received(qd.cuda(), kd.cuda())
    assert_matches(a_dom, oracle(qd, kd, 72**-0.5), dtype, 150, scale_tol=4.0)


@needs_cuda
def test_cuda_bad_and_edge_inputs():
    q = torch.randn(2, 2, 5, 8, device="cuda")
    with pytest.raises(ValueError, match="k must be on"):
        attention_received(q, q.cpu())
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\)"):
        attention_received(q.cpu(), q)
    q3 = torch.randn(2, 5, 16, device="cuda")
    with pytest.raises(ValueError, match="k must be on"):
        attention_received(q3, q3.cpu(), num_heads=2)
    ones = torch.ones(2, 2, 5, 8, device="cuda")  # logits 8e38: beyond float32
    with pytest.raises(ValueError, match="overflow float32"):
        attention_received(ones, ones.clone(), 1e38)
    assert attention_received(q[:, :, :0], q[:, :, :0].clone()).shape == (2, 0)
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        attention_received(q, q.clone().nan_to_num())
    e = torch.randn(0, 2, 5, 8, device="cuda")
    assert attention_received(e, e).shape == (0, 5)


@needs_cuda
def test_cuda_opcheck_and_stream():
    q, k = make_qk(2, 3, 17, 24, torch.bfloat16, seed=2, device="cuda")
    torch.library.opcheck(torch.ops.earlytom.attention_received.default, (q, k, 0.2))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        a = attention_received(q, k, 0.2)
    s.synchronize()
    assert_matches(a, oracle(q.cpu(), k.cpu(), 0.2), torch.bfloat16, 17)
