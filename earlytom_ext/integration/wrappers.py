"""The instance-level ``forward`` / ``generate`` wrappers and what ``generate`` needs so that the
caller sees the original prompt (lengths, streamer, returned sequences), the settings it refuses
on a call with videos (assisted decoding, chunked prefill, prompt penalties), and the quick form
of Hugging Face's per-call model-config check that the ``generate`` wrapper uses."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
import weakref
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import torch

from .llm_merge_support import call_cache
from .patches import swap_attr

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
            value = expand_rows(self._prompt.to(value.device), value.shape[0])
        self._prompt = None
        self._streamer.put(value)

    def end(self):
        self._streamer.end()

    def __getattr__(self, name):
        return getattr(self._streamer, name)


class PromptView:
    """A caller's logits processor or stopping criterion, called with the caller's prompt in place of
    the compressed one (as in an unpatched ``generate``: lengths and slices of ``input_ids`` keep
    their meaning)."""

    def __init__(self, fn, prompt: torch.Tensor, compressed_len: int):
        self._fn = fn
        self._prompt = prompt
        self._compressed_len = compressed_len

    # Exactly two parameters: Hugging Face's processor list reads the signature to pass extras.
    def __call__(self, input_ids, scores):
        return self._fn(self.full(input_ids), scores)

    def full(self, input_ids: torch.Tensor) -> torch.Tensor:
        return with_prompt(input_ids, self._compressed_len, self._prompt)

    def __getattr__(self, name):
        return getattr(self._fn, name)


class CriterionView(PromptView):
    def __call__(self, input_ids, scores, **kwargs):
        return self._fn(self.full(input_ids), scores, **kwargs)


@contextlib.contextmanager
def callbacks_see_prompt(model, call: dict, prompt: torch.Tensor, compressed_len: int):
    """Within the block, the caller's ``logits_processor``, ``stopping_criteria`` and
    ``prefix_allowed_tokens_fn`` see the caller's prompt (Hugging Face's own processors keep
    working on the compressed one). Processors and criteria are wrapped after Hugging Face merged
    them with its own, so one of the caller's still replaces a built-in one of its type."""
    allowed = call.get("prefix_allowed_tokens_fn")
    if allowed is not None:
        # Its batch index runs over the samples, except without beams before 5.24 (over the
        # returned sequences: Hugging Face groups the rows by num_beams only).
        beams = generation_setting(model, call, "num_beams", _defaults()) or 1
        per_sample = 1
        if beams == 1 and _transformers_release() < (5, 24):
            per_sample = generation_setting(model, call, "num_return_sequences", _defaults()) or 1

        def prefix_allowed_tokens_fn(batch_id: int, sent: torch.Tensor):
            head = prompt[batch_id // per_sample].to(sent.device)
            return allowed(batch_id, torch.cat([head, sent[compressed_len:]]))

        call["prefix_allowed_tokens_fn"] = prefix_allowed_tokens_fn
    views = {id(f): PromptView for f in call.get("logits_processor") or ()}
    views.update({id(f): CriterionView for f in call.get("stopping_criteria") or ()})
    merge = getattr(model, "_merge_criteria_processor_list", None)
    if not views or merge is None:
        yield
        return

    def merge_with_views(default_list, custom_list):
        merged = merge(default_list, custom_list)
        return type(merged)(views[id(f)](f, prompt, compressed_len) if id(f) in views else f for f in merged)

    with swap_attr(model, "_merge_criteria_processor_list", merge_with_views):
        yield


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def expand_rows(prompt: torch.Tensor, rows: int) -> torch.Tensor:
    """The caller's prompt repeated per beam / returned sequence, as ``generate`` expands its inputs."""
    return prompt if rows == prompt.shape[0] else prompt.repeat_interleave(rows // prompt.shape[0], dim=0)


def with_prompt(seqs: torch.Tensor, compressed_len: int, prompt: torch.Tensor) -> torch.Tensor:
    """``seqs`` (compressed prompt + new tokens) with the caller's ``prompt`` in place of the first
    ``compressed_len`` columns."""
    head = expand_rows(prompt.to(device=seqs.device, dtype=seqs.dtype), seqs.shape[0])
    return torch.cat([head, seqs[:, compressed_len:]], dim=1)


def restore_prompt(out, compressed_len: int, original_ids: torch.Tensor):
    """Replace the compressed prompt at the start of generated sequences by the original one."""
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if not isinstance(seqs, torch.Tensor):
        return out
    full = with_prompt(seqs, compressed_len, original_ids)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


@functools.cache
def _transformers_release() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release[:2]


@functools.cache
def _defaults():
    """``GenerationConfig()``: Hugging Face's global defaults (read only)."""
    from transformers import GenerationConfig

    return GenerationConfig()


_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _model_defaults_apply(model, call: dict, name: str) -> bool:
    """Whether the model's generation config fills this setting when the call gives its own
    ``generation_config``: always in 5.x; in 4.x only with ``use_model_defaults`` (default: on for
    model configs saved by 4.50+), else only the special token ids."""
    if call.get("generation_config") is None or _transformers_release() >= (5, 0) or name in _TOKEN_IDS:
        return True
    use = call.get("use_model_defaults")
    if use is not None:
        return bool(use)
    from packaging.version import Version

    saved = getattr(getattr(model, "generation_config", None), "transformers_version", None)
    try:
        return Version(Version(saved).base_version) >= Version("4.50.0")
    except (TypeError, ValueError):
        return False


def generation_setting(model, call: dict, name: str, defaults=None):
    """A ``generate`` setting as Hugging Face resolves it: the call's keyword, else the call's
    ``generation_config``, else the model's where Hugging Face would use it (``None`` when none
    sets it). With ``defaults`` (a ``GenerationConfig()``), a config value equal to the default
    does not count as set."""
    if call.get(name) is not None:
        return call[name]
    sources = [call.get("generation_config")]
    if _model_defaults_apply(model, call, name):
        sources.append(getattr(model, "generation_config", None))
    for gc in sources:
        v = getattr(gc, name, None)
        if v is not None and (defaults is None or v != getattr(defaults, name, None)):
            return v
    return None


def padding_mask(model, call: dict, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask ``generate`` infers when none is given: ``input_ids != pad_token_id`` when
    the pad token is not an end-of-sequence token, else ``None`` (all ones)."""
    pad = generation_setting(model, call, "pad_token_id")
    if pad is None:
        return None
    eos = generation_setting(model, call, "eos_token_id")
    if isinstance(eos, torch.Tensor):
        eos = eos.reshape(-1).tolist()
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if int(pad) in [int(e) for e in eos]:
        return None
    return input_ids.ne(int(pad)).long()  # all ones when the pad token is absent (no host read)


_EMBEDS = "the compressed prompt reaches the model as inputs_embeds"
#: generate settings refused on a call with videos: (name, what it is, why, values that leave it off).
REFUSED_SETTINGS = (
    ("assistant_model", "assisted decoding", f"{_EMBEDS}, which it does not extend with its candidate tokens", ()),
    ("prompt_lookup_num_tokens", "assisted decoding", f"{_EMBEDS}, which it does not extend with its candidates", ()),
    ("assistant_early_exit", "assisted decoding", f"{_EMBEDS}, which it does not extend with its candidates", ()),
    ("prefill_chunk_size", "chunked prefill", f"{_EMBEDS}, which Hugging Face does not split into chunks", ()),
    ("encoder_repetition_penalty", "a prompt penalty", f"{_EMBEDS}; Hugging Face would drop the penalty", (1.0,)),
    ("encoder_no_repeat_ngram_size", "a prompt n-gram ban", f"{_EMBEDS}; Hugging Face would drop the ban", (0,)),
)
#: with the inner-LLM merge, which shortens the cache of the layers after it.
MERGE_CACHES = (None, "dynamic", "dynamic_full")


def refuse_unsupported_settings(model, call: dict, llm_merge: bool) -> None:
    """``ValueError`` for a ``generate`` setting (keyword, the call's ``generation_config`` or the
    model's) that cannot work on the compressed prompt, before anything runs: otherwise Hugging Face
    returns wrong tokens without an error (assisted decoding's first step drops its candidates,
    the prompt penalties are dropped with a warning) or fails inside (chunked prefill)."""
    for name, what, why, off in REFUSED_SETTINGS:
        value = generation_setting(model, call, name, _defaults())
        if value is not None and value not in off:
            raise ValueError(
                f"EarlyTom: {what} ({name}) is not supported on a generate call with videos: {why}. "
                f"Leave {name} unset, or call handle.remove() first."
            )
    # Hugging Face switches to continuous batching on the keyword only (not on a generation config's value).
    if call.get("cache_implementation") == "paged":
        raise ValueError(
            f"EarlyTom: continuous batching (cache_implementation='paged') is not supported on a generate call "
            f"with videos: {_EMBEDS}, which that path ignores. Leave cache_implementation unset, or call "
            f"handle.remove() first."
        )
    if llm_merge:
        impl = generation_setting(model, call, "cache_implementation", _defaults())
        if impl not in MERGE_CACHES:
            raise ValueError(
                f"the inner-LLM merge runs on the default DynamicCache only; cache_implementation={impl!r} is not "
                "supported (leave it unset or 'dynamic')"
            )


def shift_lengths(model, call: dict, prompt_len: int, compressed_len: int) -> None:
    """Keep ``max_length`` / ``min_length`` counting the caller's prompt: an explicit value (in the
    call, its ``generation_config`` or the model's) that is not overridden by ``max_new_tokens`` /
    ``min_new_tokens`` is lowered by the number of tokens the compression removed. A value the
    caller gave in a ``generation_config`` is changed in a copy of it (a keyword next to a
    ``generation_config`` is deprecated in Hugging Face)."""
    shift = prompt_len - compressed_len
    if shift == 0:
        return
    defaults = _defaults()
    user_gc = call.get("generation_config")

    def explicit(name):
        return generation_setting(model, call, name, defaults)

    def put(name, value):
        # A keyword also where the value equals the global default: 4.x fills a config's default
        # values from the model's generation_config, which would undo the shift.
        if user_gc is None or call.get(name) is not None or value == getattr(defaults, name, None):
            call[name] = value
            return
        if call["generation_config"] is user_gc:
            call["generation_config"] = copy.deepcopy(user_gc)
        setattr(call["generation_config"], name, value)

    if explicit("max_new_tokens") is None:
        max_length = explicit("max_length")
        if max_length is not None:
            if max_length <= prompt_len:
                raise ValueError(
                    f"max_length must be larger than the prompt length input_ids.shape[1] = {prompt_len} "
                    f"(it counts the prompt), got {max_length}; or give max_new_tokens"
                )
            put("max_length", max_length - shift)
    if explicit("min_new_tokens") is None:
        min_length = explicit("min_length")
        if min_length:
            put("min_length", max(0, min_length - shift))


@functools.cache
def _slow_config_check() -> tuple[Callable, tuple[str, ...]] | None:
    """Hugging Face's ``PreTrainedConfig._get_generation_parameters`` and the keys it looks at, in
    the releases where it builds a default config of the class on every call (5.0 to 5.19: several
    ms per ``generate`` call); ``None`` elsewhere (5.20 reads the dataclass fields, 4.x has none)."""
    try:
        from transformers import GenerationConfig
        from transformers.configuration_utils import PreTrainedConfig
    except ImportError:
        return None
    if not ((5, 0) <= _transformers_release() < (5, 20)):
        return None
    check = getattr(PreTrainedConfig, "_get_generation_parameters", None)
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if check is None or defaults is None:
        return None
    return check, tuple(k for k in defaults() if k != "use_cache")


# Config classes whose default config was built once by the original check (so it can be built).
_BUILDS: weakref.WeakSet = weakref.WeakSet()


def _quick_generation_parameters(config) -> dict:
    """The original check's result without building a default config: empty when none of its keys
    is set on ``config`` (by its definition), once the class's default config is known to build
    (the first check of a class runs the original, which raises where stock would)."""
    original, keys = _slow_config_check()
    if type(config) in _BUILDS and not any(getattr(config, k, None) is not None for k in keys):
        return {}
    result = original(config)
    _BUILDS.add(type(config))
    return result


@contextlib.contextmanager
def quick_config_check(model):
    """Within the block, ``generate``'s check that ``model.config`` holds no generation parameters
    (run in ``_prepare_generation_config`` on every call without a ``generation_config``) gives
    the original's result without building a default config of the class. The config carries the
    quick check only while ``_prepare_generation_config`` runs (no caller code runs then): logits
    processors, streamers and stopping criteria see the config as it is."""
    spec = _slow_config_check()
    config = getattr(model, "config", None)
    prepare = getattr(model, "_prepare_generation_config", None)
    if (
        spec is None
        or config is None
        or prepare is None
        or getattr(type(config), "_get_generation_parameters", None) is not spec[0]
    ):
        yield
        return

    def quick_prepare(*args, **kwargs):
        with swap_attr(config, "_get_generation_parameters", types.MethodType(_quick_generation_parameters, config)):
            return prepare(*args, **kwargs)

    with swap_attr(model, "_prepare_generation_config", quick_prepare):
        yield


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

    return forward


class Continuation(NamedTuple):
    """What a cache filled by a wrapped ``generate`` call holds in place of the caller's prompt."""

    prompt: torch.Tensor  # the caller's input_ids of that call
    compressed: torch.Tensor  # the input_ids the model ran on
    mask: torch.Tensor | None  # their attention mask


# Caches filled by a wrapped generate call (any handle's): what they hold in place of the prompt.
_FILLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def continued_prompt(model, call: dict, input_ids, cont: Continuation):
    """``input_ids`` that start with ``cont.prompt`` (Hugging Face's way to continue from a returned
    cache: the previous sequences plus new text) -> the same with ``cont.compressed`` in its place,
    and the attention mask to match (set in ``call``); ``None`` when they do not start with it (they
    are then passed on as they are). One host read, on this path only."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return None
    rows, n = input_ids.shape
    L = cont.prompt.shape[1]
    if n < L or rows % cont.prompt.shape[0] != 0:
        return None
    like = dict(device=input_ids.device, dtype=input_ids.dtype)
    if not torch.equal(input_ids[:, :L], expand_rows(cont.prompt.to(**like), rows)):
        return None
    ids = torch.cat([expand_rows(cont.compressed.to(**like), rows), input_ids[:, L:]], dim=1)
    mask = call.get("attention_mask")
    if mask is None:
        mask = padding_mask(model, call, input_ids)
    if mask is not None or cont.mask is not None:
        head = cont.mask if cont.mask is not None else torch.ones_like(cont.compressed)
        tail = mask[:, L:] if mask is not None else torch.ones_like(input_ids[:, L:])
        call["attention_mask"] = torch.cat([expand_rows(head.to(tail.device), rows), tail.to(head.dtype)], dim=1)
    return ids


def make_generate(core, orig: Callable) -> Callable:
    """``model.generate`` on the compressed prompt, returning sequences that start with the caller's
    original prompt. A cache such a call filled (passed in, or returned with
    ``return_dict_in_generate``) can be continued as Hugging Face documents it while a handle is
    active: a later call with that cache whose ``input_ids`` start with the caller's prompt runs
    on the compressed one."""
    bind = binder(orig)
    first = next(iter(inspect.signature(orig).parameters))  # "inputs"
    video_arg = core.video_arg

    def prompt_of(call: dict):
        inputs, input_ids = call.pop(first, None), call.pop("input_ids", None)
        if inputs is not None and input_ids is not None:
            raise ValueError(f"give the prompt once: as input_ids or as {first} (positionally), not both")
        return input_ids if input_ids is not None else inputs

    def run(call: dict, input_ids: torch.Tensor, ids: torch.Tensor):
        """Hugging Face's generate on ``ids`` in place of the caller's ``input_ids``."""
        L, L2 = input_ids.shape[1], ids.shape[1]
        try:
            shift_lengths(core.model, call, L, L2)
            if call.get("streamer") is not None:
                call["streamer"] = PromptStreamer(call["streamer"], input_ids, L2)
            with quick_config_check(core.model), callbacks_see_prompt(core.model, call, input_ids, L2):
                out = orig(ids, **call)
        finally:
            core.end_call()
        cache = call_cache(call)
        if cache is None and isinstance(out, Mapping):  # by key: 5.24's past_key_values property warns
            cache = call_cache(out)
        if cache is not None:
            with contextlib.suppress(TypeError):  # a cache that cannot be weakly referenced
                _FILLED[cache] = Continuation(input_ids, ids, call.get("attention_mask"))
        return restore_prompt(out, L2, input_ids)

    def continuation(kwargs: dict):
        if not _FILLED:
            return None
        cache = call_cache(kwargs)
        try:
            return _FILLED.get(cache) if cache is not None else None
        except TypeError:
            return None

    @functools.wraps(orig)
    def generate(*args, **kwargs):
        if kwargs.get(video_arg) is None:
            cont = continuation(kwargs)
            if cont is not None:
                call = bind(args, kwargs)
                input_ids = prompt_of(call)
                ids = continued_prompt(core.model, call, input_ids, cont)
                if ids is not None:
                    return run(call, input_ids, ids)
            with quick_config_check(core.model):
                return orig(*args, **kwargs)
        if continuation(kwargs) is not None and cache_holds_tokens(call_cache(kwargs)):
            raise ValueError(
                f"this cache holds an earlier call's compressed prompt and its videos: continue it without "
                f"{video_arg} (and the other video arguments); input_ids that start with the earlier prompt "
                "run on the compressed one"
            )
        call = bind(args, kwargs)
        input_ids = prompt_of(call)
        refuse_unsupported_settings(core.model, call, core.llm_merge_on)
        if call.get("attention_mask") is None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            call["attention_mask"] = padding_mask(core.model, call, input_ids)
        with torch.no_grad():  # generate is inference only
            ids = core.compress_call(call, input_ids)
        return run(call, input_ids, ids)

    return generate
