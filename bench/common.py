"""Helpers shared by every benchmark: timers (CUDA events, warm-up, median), forward-hook timers,
peak memory, the time budget and its loop over measurement points, and table formatting."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Callable

import torch

__all__ = [
    "is_cuda",
    "sync",
    "free_memory",
    "Stamp",
    "median",
    "gib",
    "timed_calls",
    "time_fn",
    "peak_bytes",
    "peak_memory",
    "wrap_attr",
    "HookTimers",
    "Budget",
    "run_points",
    "gbps",
    "markdown_table",
    "op_bench_main",
    "segments_from_lengths",
]


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def free_memory(device) -> None:
    """Give cached GPU memory back (after a failed or finished measurement)."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------
class Stamp:
    """A point in time: a CUDA event recorded on the current stream, or ``perf_counter``.
    ``host`` is the host's ``perf_counter`` at recording (orders stamps of one stream)."""

    __slots__ = ("ev", "t", "host")

    def __init__(self, cuda: bool):
        self.host = time.perf_counter()
        if cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
            self.t = None
        else:
            self.ev = None
            self.t = time.perf_counter()

    def ms_until(self, other: Stamp) -> float:
        if self.ev is not None:
            other.ev.synchronize()
            return float(self.ev.elapsed_time(other.ev))
        return (other.t - self.t) * 1e3


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the values that are not ``None`` (``None`` when there are none)."""
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


def params_text(n: float | None) -> str:
    """A parameter count as people write it: ``8.03 B parameters``, ``1.42 M parameters``."""
    n = n or 0
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit} parameters"
    return f"{int(n)} parameters"


def timed_calls(
    fn: Callable[[], object],
    device,
    *,
    warmup: int,
    iters: int,
    before: Callable[[], None] | None = None,
    after: Callable[[object], None] | None = None,
) -> list[float]:
    """Milliseconds of ``iters`` calls of ``fn()`` after ``warmup`` untimed ones.

    CUDA: CUDA events on the current stream around each call (the stream time of the call,
    host gaps included); CPU: ``perf_counter``. ``before()`` runs ahead of each timed call
    (untimed), ``after(result)`` after it, once its time is known (e.g. to read statistics).
    """
    cuda = is_cuda(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for _ in range(iters):
        if before is not None:
            before()
        a = Stamp(cuda)
        out = fn()
        b = Stamp(cuda)
        times.append(a.ms_until(b))
        if after is not None:
            after(out)
    return times


def time_fn(fn: Callable[[], object], *, device: str = "cuda", warmup: int = 2, iters: int = 7) -> dict[str, float]:
    """Median and min time of ``fn()`` in milliseconds (see :func:`timed_calls`)."""
    times = timed_calls(fn, device, warmup=warmup, iters=iters)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def peak_bytes(fn: Callable[[], object], device) -> tuple[int, int] | None:
    """``(peak, base)``: ``torch.cuda.max_memory_allocated`` over one more call of ``fn`` and the
    memory allocated before it (weights, inputs). ``None`` off CUDA."""
    if not is_cuda(device):
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device), base


def peak_memory(fn: Callable[[], object], device) -> dict[str, float | None]:
    """``peak_mem_gib`` (all allocated memory at the peak of one call) and ``peak_over_weights_gib``
    (the same minus what was allocated before the call). Empty off CUDA."""
    pb = peak_bytes(fn, device)
    if pb is None:
        return {}
    peak, base = pb
    return {"peak_mem_gib": gib(peak), "peak_over_weights_gib": gib(peak - base)}


def wrap_attr(owner, attr: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set ``owner.attr`` (an instance or module attribute) to ``make(current)``; returns the
    function that puts back exactly what was there (another patch, or nothing)."""
    missing = object()
    prev = vars(owner).get(attr, missing)
    setattr(owner, attr, make(getattr(owner, attr)))

    def restore() -> None:
        if prev is missing:
            vars(owner).pop(attr, None)
        else:
            setattr(owner, attr, prev)

    return restore


class HookTimers:
    """Stamps at entry and exit of modules (forward hooks) and methods (temporary wrappers).

    ``modules``: ``{name: module}``; ``first_only``: names whose first call alone counts (the
    language model: its first call is the prefill); the others sum all calls. ``methods``:
    ``{name: (owner, attribute)}``, wrapped as an instance attribute while the timers are
    installed (e.g. ``apply_pooling``; the wrapper calls whatever was in place, so another
    patch of the same method is timed too). ``remove()`` restores everything, last in first out.
    The first call of ``first_only[0]`` also records its sequence length (``prefill_len``).
    """

    def __init__(
        self,
        device,
        modules: dict[str, torch.nn.Module],
        *,
        first_only: Sequence[str] = (),
        methods: dict[str, tuple[object, str]] | None = None,
    ):
        self.cuda = is_cuda(device)
        self.first_only = tuple(first_only)
        self.names = list(modules) + list(methods or {})
        self._handles: list = []
        self._restore: list[Callable[[], None]] = []
        self.reset()
        for name, mod in modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        for name, (owner, attr) in (methods or {}).items():
            self._wrap(name, owner, attr)

    def reset(self) -> None:
        self._open: dict[str, Stamp] = {}
        self.spans: dict[str, list[tuple]] = {n: [] for n in self.names}
        self.prefill_len: int | None = None

    def _pre(self, name):
        def hook(module, args, kwargs):
            self._open[name] = Stamp(self.cuda)
            if self.first_only and name == self.first_only[0] and self.prefill_len is None:
                t = kwargs.get("inputs_embeds")
                if t is None:
                    t = kwargs.get("input_ids")
                if t is None and args:
                    t = args[0]
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    self.prefill_len = int(t.shape[1])
            return None

        return hook

    def _post(self, name):
        def hook(module, args, output):
            start = self._open.pop(name, None)
            if start is not None:
                self.spans[name].append((start, Stamp(self.cuda)))
            return None

        return hook

    def _wrap(self, name: str, owner, attr: str) -> None:
        def make(current):
            def timed(*args, **kwargs):
                start = Stamp(self.cuda)
                out = current(*args, **kwargs)
                self.spans[name].append((start, Stamp(self.cuda)))
                return out

            return timed

        self._restore.append(wrap_attr(owner, attr, make))

    def ended_before(self, name: str, stamp: Stamp) -> bool:
        """Whether ``name`` ran (at least once) and every call of it ended before ``stamp``."""
        spans = self.spans.get(name) or []
        return bool(spans) and all(b.host <= stamp.host for _, b in spans)

    def collect(self) -> dict[str, float | None]:
        """Milliseconds per name (``None`` when it did not run)."""
        out: dict[str, float | None] = {}
        for name, spans in self.spans.items():
            if not spans:
                out[name] = None
            elif name in self.first_only:
                out[name] = spans[0][0].ms_until(spans[0][1])
            else:
                out[name] = sum(a.ms_until(b) for a, b in spans)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._restore:
            self._restore.pop()()


# ---------------------------------------------------------------------------------------------
# Time budget
# ---------------------------------------------------------------------------------------------
class Budget:
    """A deadline on ``time.monotonic()`` (``seconds=None``: no limit).

    ``share(weight, weights_left)`` gives a section its slice: ``weight / weights_left`` of the
    time left now, so time a section leaves unused flows to the sections after it.
    """

    def __init__(self, seconds: float | None = None, *, _deadline: float | None = None):
        if seconds is not None and _deadline is None:
            if seconds <= 0:
                raise ValueError(f"time budget must be > 0 seconds, got {seconds}")
            _deadline = time.monotonic() + float(seconds)
        self.deadline = _deadline

    @property
    def limited(self) -> bool:
        return self.deadline is not None

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def share(self, weight: float, weights_left: float) -> Budget:
        if self.deadline is None:
            return Budget()
        left = max(0.0, self.left())
        frac = 1.0 if weights_left <= 0 else min(1.0, weight / weights_left)
        return Budget(_deadline=time.monotonic() + left * frac)


def run_points(
    points: Sequence[dict],
    measure: Callable[[dict], None],
    *,
    budget: Budget,
    device,
    log: Callable[[str], None] = print,
    label: Callable[[dict], str] = str,
) -> list[dict]:
    """One row per point: ``measure(row)`` fills a copy of the point.

    Points past the budget get ``row["skipped"] = "time budget"``; a point whose measurement
    raises gets ``row["error"]`` (the others still run) and the GPU memory it held is released.
    ``measure`` may set ``row["skipped"]`` itself (e.g. a feature that does not exist).
    """
    rows: list[dict] = []
    for point in points:
        row = dict(point)
        if budget.expired():
            row["skipped"] = "time budget"
            log(f"  {label(row)}: skipped (time budget)")
            rows.append(row)
            continue
        try:
            measure(row)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
        except Exception as e:  # report and go on with the other points
            row["error"] = f"{type(e).__name__}: {e}"
        if row.get("error"):
            log(f"  {label(row)}: ERROR {row['error']}")
            # Outside the except block: the traceback no longer holds the failed call's tensors.
            free_memory(device)
        elif row.get("skipped"):
            log(f"  {label(row)}: skipped ({row['skipped']})")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def gbps(n_bytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes) for ``n_bytes`` moved in ``ms`` milliseconds."""
    return n_bytes / (ms * 1e-3) / 1e9


def markdown_table(rows: list[dict[str, object]], columns: list[str], headers: list[str] | None = None) -> str:
    """Rows (dicts) as a GitHub markdown table over ``columns`` (shown as ``headers`` when given);
    floats get 4 significant digits, ``None`` is blank."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def op_bench_main(name: str, benchmark, columns: list[str], doc: str, argv=None) -> None:
    """Command line of an op microbenchmark: ``--device``, ``--quick``; prints a markdown table."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or name).split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (smoke test)")
    args = ap.parse_args(argv)
    rows = benchmark(device=args.device, quick=args.quick)
    print(f"{name} on {rows[0]['device'] if rows else args.device}")
    print(markdown_table(rows, columns))


def segments_from_lengths(lengths) -> list[tuple[int, int]]:
    """Consecutive inclusive ``(start, end)`` segments of the given lengths, from frame 0."""
    segs, s = [], 0
    for n in lengths:
        segs.append((s, s + n - 1))
        s += n
    return segs
