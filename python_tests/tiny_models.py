"""Tiny random LLaVA-OneVision models and hand-built inputs for the tests.

Everything is defined once, in ``earlytom_ext.tiny_model`` (shared with the demo and the
benchmarks); this module re-exports it under the names the tests use, and holds the helpers
several test files share.
"""

from earlytom_ext.tiny_model import (  # noqa: F401  (re-exported for the tests)
    GRID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_ID,
    PATCH_SIZE,
    POOLED,
    TEXT_ID_RANGE,
    TOKENS_PER_FRAME,
    VIDEO_KINDS,
    VIDEO_TOKEN_ID,
    VOCAB,
    build_model,
    image_token_count,
    make_feature_video,
    make_image,
    make_inputs,
    make_video,
    tiny_config,
    video_token_count,
)


def vision_layers(model):
    """``(vision model, its encoder layers)`` of a LLaVA-OneVision or LLaVA-NeXT-Video model, or the
    video tower's of a Video-LLaVA model (transformers 4.57 wraps the transformer in the tower, 5.x's
    tower is it)."""
    vt = getattr(model.model, "video_tower", None)
    vt = model.model.vision_tower if vt is None else vt
    vm = getattr(vt, "vision_model", vt)
    return vm, vm.encoder.layers


def call_layer(layer, h):
    """One SigLIP or CLIP encoder layer on ``h`` (it returns a tensor or a tuple, by version;
    transformers 4.57's CLIP layer also takes a causal mask)."""
    import inspect

    extra = (None,) if "causal_attention_mask" in inspect.signature(layer.forward).parameters else ()
    out = layer(h, None, *extra)
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_qk(layer, h):
    """``(q, k, scale)`` of a SigLIP / CLIP encoder layer's attention on its input ``h [N, S, D]``
    (``q``, ``k``: ``[N, heads, S, head_dim]``), as the layer computes them."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    n, s, _ = x.shape
    q = attn.q_proj(x).view(n, s, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(n, s, attn.num_heads, -1).transpose(1, 2)
    return q, k, attn.scale


def measured_cuda_syncs(script: str, tmp_path, *args: str) -> list[str]:
    """Run ``script`` in a subprocess (its ``sys.argv[1]`` is this folder, then ``args``) and return the
    synchronising CUDA operations it reports between its ``=== measured`` and ``=== done`` lines
    on stderr (``torch.cuda.set_sync_debug_mode("warn")``). A subprocess, because syncs inside
    custom ops are reported by c10 on stderr, not as Python warnings."""
    import os
    import subprocess
    import sys

    path = tmp_path / "syncs.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONWARNINGS="always")
    proc = subprocess.run(
        [sys.executable, str(path), os.path.dirname(__file__), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = proc.stderr.split("=== measured", 1)[1].split("=== done", 1)[0]
    return [line for line in measured.splitlines() if "synchronizing CUDA operation" in line]


_MEASURE_LOOP = """
with torch.no_grad():
    for i in range(2):  # the first call initialises lazily (cuBLAS, pinned allocator, per-grid caches)
        torch.cuda.synchronize()
        if i:
            print("=== measured", file=sys.stderr, flush=True)
            torch.cuda.set_sync_debug_mode("warn")
        {call}
        torch.cuda.set_sync_debug_mode(0)
print("=== done", file=sys.stderr, flush=True)
"""


def call_syncs(setup: str, call: str, tmp_path, *args: str) -> list[str]:
    """The synchronising CUDA operations of the second of two runs of ``call`` (one line of Python)
    after ``setup`` (Python code; ``sys`` and ``torch`` are imported and this folder is on the path),
    in a subprocess that gets ``args`` after this folder (see :func:`measured_cuda_syncs`)."""
    import textwrap

    head = "import sys\nimport torch\nsys.path.insert(0, sys.argv[1])\n"
    return measured_cuda_syncs(head + textwrap.dedent(setup) + _MEASURE_LOOP.format(call=call), tmp_path, *args)


_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "cpu", "numpy")


def spy_host_reads(monkeypatch, files) -> list:
    """Record every tensor read on the host (``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``, ...)
    called directly from a file of ``earlytom_ext/integration/`` named in ``files``; returns the
    list the ``(method, "file:line")`` pairs go to (undo with ``monkeypatch.undo()``)."""
    import inspect
    import os

    import torch

    reads = []

    def caller():
        frame = inspect.stack()[2]  # the direct caller of the tensor method
        path = frame.filename.replace(os.sep, "/")
        if "/earlytom_ext/integration/" in path and path.rsplit("/", 1)[-1] in files:
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno}"
        return None

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            where = caller()
            if where is not None:
                reads.append((name, where))
            return orig(self, *args, **kwargs)

        return wrapper

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    return reads


def cache_names() -> tuple:
    """The names the installed transformers takes the KV cache under, the current one first:
    5.24 renamed past_key_values to cache (the old name still works there, with a FutureWarning)."""
    import inspect

    from transformers import LlavaOnevisionForConditionalGeneration

    if "cache" in inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters:
        return ("cache", "past_key_values")
    return ("past_key_values",)


def check_compiled_model(model, cfg, calls: list, generate_inputs: dict) -> None:
    """Under ``apply(model, cfg)``: forward over ``calls`` (then the first again) and a short greedy
    generate after ``model.compile()`` equal the same calls uncompiled."""
    import torch

    import earlytom_ext

    with earlytom_ext.apply(model, cfg), torch.no_grad():
        expected = [model(**x).logits for x in calls]
        expected_ids = model.generate(**generate_inputs, max_new_tokens=3, do_sample=False)
        torch._dynamo.reset()
        model.compile(backend="eager")
        try:
            for x, want in zip(calls + calls[:1], expected + expected[:1]):
                torch.testing.assert_close(model(**x).logits, want)
            assert torch.equal(model.generate(**generate_inputs, max_new_tokens=3, do_sample=False), expected_ids)
        finally:
            model._compiled_call_impl = None
            torch._dynamo.reset()
