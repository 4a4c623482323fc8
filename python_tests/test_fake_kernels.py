"""The fake (meta) kernels, which run instead of the compiled ops under torch.compile and on meta
tensors, reject the inputs the ops reject, with the same error type and the argument's name."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from earlytom_ext import EarlyTomConfig, ops
from earlytom_ext._ext import available

pytestmark = pytest.mark.skipif(not available(), reason="needs the compiled extension")

E = torch.ops.earlytom
f32, i64 = torch.float32, torch.int64


def x3(n=5, dtype=f32):
    return torch.randn(n, 3, 4).to(dtype)


def plan(n=3):
    return torch.zeros(n, 2, dtype=i64), torch.full((n,), 0.5)


def sel(n=2, p=4):
    return torch.randn(n, p, 8), torch.randn(n, p), torch.ones(n, dtype=i64), torch.zeros(n, dtype=torch.bool)


CASES = {
    "merge_frames x 2-D": (lambda: (E.merge_frames, (torch.randn(5, 4), torch.tensor([5]), 0.6, 8, 0.9, False)), "x"),
    "merge_frames x int": (lambda: (E.merge_frames, (x3().long(), torch.tensor([5]), 0.6, 8, 0.9, False)), "x"),
    "merge_frames counts int32": (
        lambda: (E.merge_frames, (x3(), torch.tensor([5], dtype=torch.int32), 0.6, 8, 0.9, False)),
        "frame_counts",
    ),
    "merge_frames counts 2-D": (
        lambda: (E.merge_frames, (x3(), torch.tensor([[5]]), 0.6, 8, 0.9, False)),
        "frame_counts",
    ),
    "segment_frames x 2-D": (lambda: (E.segment_frames, (torch.randn(5, 4), torch.tensor([5]), 0.6, 8, 0.9)), "x"),
    "segment_frames_deferred x 2-D": (
        lambda: (E.segment_frames_deferred, (torch.randn(5, 4), torch.tensor([5]), 0.6, 8, 0.9)),
        "x",
    ),
    "apply_merge_plan x int": (lambda: (E.apply_merge_plan, (x3().long(), *plan())), "x"),
    "apply_merge_plan plan_src float": (lambda: (E.apply_merge_plan, (x3(), plan()[0].float(), plan()[1])), "plan_src"),
    "apply_merge_plan plan_src [n, 3]": (
        lambda: (E.apply_merge_plan, (x3(), torch.zeros(3, 3, dtype=i64), plan()[1])),
        "plan_src",
    ),
    "apply_merge_plan weight fp16": (lambda: (E.apply_merge_plan, (x3(), plan()[0], plan()[1].half())), "plan_weight"),
    "apply_merge_plan weight length": (lambda: (E.apply_merge_plan, (x3(), plan()[0], torch.ones(2))), "plan_weight"),
    "attention_received q int": (
        lambda: (E.attention_received, (torch.ones(2, 1, 3, 4, dtype=i64),) * 2 + (1.0,)),
        "q",
    ),
    "attention_received q 3-D": (lambda: (E.attention_received, (torch.randn(2, 3, 4),) * 2 + (1.0,)), "q"),
    "attention_received k dtype": (
        lambda: (E.attention_received, (torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4).half(), 1.0)),
        "k",
    ),
    "attention_received k shape": (
        lambda: (E.attention_received, (torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4), 1.0)),
        "k",
    ),
    "select_tokens feats 2-D": (lambda: (E.select_tokens, (torch.randn(2, 4), *sel()[1:], 1)), "feats"),
    "select_tokens scores fp16": (lambda: (E.select_tokens, (sel()[0], sel()[1].half(), *sel()[2:], 1)), "scores"),
    "select_tokens scores shape": (lambda: (E.select_tokens, (sel()[0], torch.randn(2, 5), *sel()[2:], 1)), "scores"),
    "select_tokens frame_keep length": (
        lambda: (E.select_tokens, (*sel()[:2], torch.ones(3, dtype=i64), sel()[3], 1)),
        "frame_keep",
    ),
    "select_tokens frame_static int": (
        lambda: (E.select_tokens, (*sel()[:3], torch.zeros(2, dtype=i64), 1)),
        "frame_static",
    ),
    "select_tokens num_out negative": (lambda: (E.select_tokens, (*sel(), -1)), "num_out"),
}


def _error(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    raise AssertionError("no TypeError / ValueError raised")


@pytest.mark.parametrize("case", list(CASES))
def test_fake_kernel_rejects_what_the_op_rejects(case):
    build, name = CASES[case]
    op, args = build()
    real_type, real_msg = _error(lambda: op(*args))
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_type, fake_msg = _error(lambda: op(*fake_args))
    assert fake_type is real_type, (real_msg, fake_msg)
    assert fake_msg.startswith(f"{op.__name__.split('.')[-1]}: {name} ") or f": {name} " in fake_msg, fake_msg
    assert f": {name} " in real_msg, real_msg


def test_valid_inputs_pass_the_fake_kernels():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):  # merge_frames' output size is data dependent
        out = E.merge_frames(x3(), torch.tensor([5]), 0.6, 8, 0.9, False)
        assert out[0].shape[1:] == (3, 4)
        assert E.apply_merge_plan(x3(), *plan()).shape == (3, 3, 4)
        assert E.attention_received(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), 1.0).shape == (2, 3)
        tokens, index = E.select_tokens(*sel(), 5)
        assert tokens.shape == (5, 8) and index.shape == (5, 2)


def test_compiled_wrapper_raises_the_ops_error():
    torch._dynamo.reset()

    def f(x):
        return ops.merge_frames(x, torch.tensor([5]), EarlyTomConfig()).x

    with pytest.raises(ValueError, match=r"merge_frames: x must"):
        torch.compile(f, backend="eager")(torch.randn(5, 4))
