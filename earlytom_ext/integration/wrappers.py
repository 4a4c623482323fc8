"""The instance-level ``forward`` / ``generate`` wrappers and what ``generate`` needs so that the
caller sees the original prompt (lengths, streamer, returned sequences)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

__all__ = ["make_forward", "make_generate"]


def binder(fn: Callable) -> Callable[[tuple, dict], dict[str, Any]]:
    """``bind(args, kwargs) -> dict`` of ``fn``'s arguments by name (``**kwargs`` flattened in)."""
    sig = inspect.signature(fn)
    varkw = next((n for n, prm in sig.parameters.items() if prm.kind is prm.VAR_KEYWORD), None)

    def bind(args, kwargs) -> dict:
        call = dict(sig.bind_partial(*args, **kwargs).arguments)
        if varkw is not None:
            call.update(call.pop(varkw, {}))
        return call

    return bind


def cache_holds_tokens(past_key_values) -> bool:
    if past_key_values is None:
        return False
    length = getattr(past_key_values, "get_seq_length", None)
    if callable(length):
        return int(length()) > 0
    return not isinstance(past_key_values, (tuple, list)) or len(past_key_values) > 0


class PromptStreamer:
    """Gives a ``generate`` streamer the caller's prompt in place of the compressed one (Hugging
    Face puts the prompt first, then each new token)."""

    def __init__(self, streamer, prompt: torch.Tensor, compressed_len: int):
        self._streamer = streamer
        self._prompt = prompt
        self._compressed_len = compressed_len

    def put(self, value):
        if self._prompt is not None and value.dim() == 2 and value.shape[1] == self._compressed_len:
            value = self._prompt.to(value.device)
        self._prompt = None
        self._streamer.put(value)

    def end(self):
        self._streamer.end()

    def __getattr__(self, name):
        return getattr(self._streamer, name)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def restore_prompt(out, compressed_len: int, original_ids: torch.Tensor):
    """Replace the compressed prompt at the start of generated sequences by the original one
    (repeated per beam / returned sequence, as ``generate`` expands its inputs)."""
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if not isinstance(seqs, torch.Tensor):
        return out
    orig = original_ids.to(device=seqs.device, dtype=seqs.dtype)
    orig = orig.repeat_interleave(seqs.shape[0] // orig.shape[0], dim=0)
    full = torch.cat([orig, seqs[:, compressed_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


def shift_lengths(model, call: dict, prompt_len: int, compressed_len: int) -> None:
    """Keep ``max_length`` / ``min_length`` counting the caller's prompt: an explicit value (in the
    call, its ``generation_config`` or the model's) that is not overridden by ``max_new_tokens`` /
    ``min_new_tokens`` is lowered by the number of tokens the compression removed."""
    shift = prompt_len - compressed_len
    if shift == 0:
        return
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    configs = (call.get("generation_config"), getattr(model, "generation_config", None))

    def explicit(name):
        if call.get(name) is not None:
            return call[name]
        for gc in configs:
            v = getattr(gc, name, None)
            if v is not None and v != getattr(defaults, name, None):
                return v
        return None

    if explicit("max_new_tokens") is None:
        max_length = explicit("max_length")
        if max_length is not None:
            if max_length <= prompt_len:
                raise ValueError(
                    f"max_length must be larger than the prompt length input_ids.shape[1] = {prompt_len} "
                    f"(it counts the prompt), got {max_length}; or give max_new_tokens"
                )
            call["max_length"] = max_length - shift
    if explicit("min_new_tokens") is None:
        min_length = explicit("min_length")
        if min_length:
            call["min_length"] = max(0, min_length - shift)


def make_forward(core, orig: Callable) -> Callable:
    """``model.forward`` that compresses the videos of a call (``core.video_arg`` given) and runs the
    model on the rewritten inputs; any other call goes through unchanged."""
    bind = binder(orig)
    video_arg = core.video_arg

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        if not args and kwargs.get(video_arg) is None:
            return orig(*args, **kwargs)
        call = bind(args, kwargs)
        if call.get(video_arg) is None:
            return orig(**call)
        core.compress_call(call, call.pop("input_ids", None))
        try:
            return orig(**call)
        finally:
            core.end_call()

    forward._earlytom_wrapper_of = core
    return forward


def make_generate(core, orig: Callable) -> Callable:
    """``model.generate`` on the compressed prompt, returning sequences that start with the caller's
    original prompt."""
    bind = binder(orig)
    first = next(iter(inspect.signature(orig).parameters))  # "inputs"
    video_arg = core.video_arg

    @functools.wraps(orig)
    def generate(*args, **kwargs):
        if kwargs.get(video_arg) is None:
            return orig(*args, **kwargs)
        call = bind(args, kwargs)
        inputs, input_ids = call.pop(first, None), call.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise ValueError(f"give the prompt once: as input_ids or as {first} (positionally), not both")
        if input_ids is None:
            input_ids = inputs
        with torch.no_grad():  # generate is inference only
            ids = core.compress_call(call, input_ids)
        L, L2 = input_ids.shape[1], ids.shape[1]
        try:
            shift_lengths(core.model, call, L, L2)
        except BaseException:
            core.end_call()
            raise
        if call.get("streamer") is not None:
            call["streamer"] = PromptStreamer(call["streamer"], input_ids, L2)
        try:
            out = orig(ids, **call)
        finally:
            core.end_call()
        return restore_prompt(out, L2, input_ids)

    generate._earlytom_wrapper_of = core
    return generate
