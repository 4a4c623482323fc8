"""Instance-attribute patches (a method replaced on one model object, never on its class) and
their exact restoration: what was in the instance ``__dict__`` before goes back, and a name that
was not there is removed again.

A patched object refuses to be copied or pickled: its patches are closures over this object and
its handle, so a copy would run the original model (``copy.deepcopy`` copies functions by
reference) and could never be restored."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

__all__ = ["MISSING", "InstancePatches", "restore_attr", "set_attr", "swap_attr"]

#: marks "the instance had no attribute of that name" (the class's one was used).
MISSING: Any = object()

# Active patches per object; the copy guards stay while at least one is active.
_active: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__")  # copy.deepcopy; pickle, torch.save and copy.copy


def _refuse_copy(*args: Any, **kwargs: Any) -> Any:
    raise TypeError(
        "this model is patched by earlytom_ext (apply, fast_pooling or fast_window_attention) and cannot be "
        "copied or pickled: call the handle's remove() first, copy or save the model, then apply again to "
        "each (state_dict() and save_pretrained() work while patched)"
    )


def set_attr(obj: object, name: str, value: Any, guard: bool = True) -> Any:
    """``obj.<name> = value`` in the instance ``__dict__``; returns what was there (or :data:`MISSING`).
    ``guard=False`` for a patch undone within the same call (nothing can copy the object meanwhile):
    no copy guard, no bookkeeping."""
    prev = obj.__dict__.get(name, MISSING)
    obj.__dict__[name] = value
    if not guard:
        return prev
    count = _active.get(obj, 0)
    if count == 0:
        for hook in _COPY_HOOKS:
            obj.__dict__[hook] = _refuse_copy
    _active[obj] = count + 1
    return prev


def restore_attr(obj: object, name: str, prev: Any, guard: bool = True) -> None:
    """Undo :func:`set_attr` given the value it returned (and the same ``guard``)."""
    if prev is MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = prev
    if not guard:
        return
    count = _active.get(obj, 0) - 1
    if count > 0:
        _active[obj] = count
        return
    _active.pop(obj, None)
    for hook in _COPY_HOOKS:
        if obj.__dict__.get(hook) is _refuse_copy:
            del obj.__dict__[hook]


@contextlib.contextmanager
def swap_attr(obj: object, name: str, value: Any):
    """``obj.<name> = value`` in the instance ``__dict__`` within the block, for calls that may
    overlap (threads): nothing is done when something is there already (an overlapping call's swap,
    or the caller's own attribute), and afterwards only this swap is removed, so overlapping calls
    end clean in any order. No copy guard (nothing outlives the block)."""
    if name in obj.__dict__:
        yield
        return
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if obj.__dict__.get(name) is value:
            del obj.__dict__[name]


class InstancePatches:
    """A removable set of instance-attribute patches; ``remove()`` (idempotent, also on leaving a
    ``with`` block) restores them in reverse order."""

    made_by = ""  # the public function that returns this kind of handle (for messages)

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, Any]] = []
        self._removed = False

    def _set(self, obj: object, name: str, value: Any) -> None:
        self._saved.append((obj, name, set_attr(obj, name, value)))

    def remove(self) -> None:
        if self._removed:
            return
        for obj, name, prev in reversed(self._saved):
            restore_attr(obj, name, prev)
        self._saved.clear()
        self._removed = True

    def __enter__(self):
        if self._removed:
            raise RuntimeError(f"this {type(self).__name__} was removed: call earlytom_ext.{self.made_by}(model) again")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'removed' if self._removed else 'active'})"
