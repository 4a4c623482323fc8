"""The shared finiteness check (`_validation.all_finite` / `check_finite`), with hand-placed values."""

import pytest
import torch

from earlytom_ext._validation import all_finite, check_finite

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 7, -1])
def test_one_non_finite_value_is_seen(dtype, value, where):
    t = torch.linspace(-3, 3, 4 * 5 * 6).to(dtype).view(4, 5, 6)
    t.view(-1)[where] = value
    assert all_finite(t).item() is False
    with pytest.raises(ValueError, match="pixels contains NaN or Inf values"):
        check_finite("pixels", t)


@pytest.mark.parametrize("dtype", FLOATS)
def test_finite_values_pass(dtype):
    big = torch.finfo(dtype).max
    t = torch.tensor([[-big, 0.0], [big, -0.0]], dtype=dtype)  # the extremes are finite
    assert all_finite(t).item() is True
    assert all_finite(t.t()).item() is True  # non-contiguous
    check_finite("x", t)


def test_all_nan_and_mixed_infinities():
    assert all_finite(torch.full((3,), float("nan"))).item() is False
    assert all_finite(torch.tensor([float("inf"), -float("inf")])).item() is False
    assert all_finite(torch.tensor([1.0, float("nan"), float("inf")])).item() is False


def test_empty_integer_bool_and_complex():
    assert all_finite(torch.empty(0, 3)).item() is True
    assert all_finite(torch.tensor([0, 255], dtype=torch.uint8)).item() is True
    assert all_finite(torch.tensor([True, False])).item() is True
    assert all_finite(torch.tensor([1 + 2j])).item() is True
    assert all_finite(torch.tensor([complex(1.0, float("inf"))])).item() is False
    check_finite("x", torch.empty(0))


def test_result_is_a_0d_bool_on_the_input_device():
    r = all_finite(torch.randn(5))
    assert r.dtype == torch.bool and r.dim() == 0 and r.device.type == "cpu"
