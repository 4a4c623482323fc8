"""Wall-clock timing of one call, with a device sync around it."""

from __future__ import annotations

import time
from typing import Callable


def time_ms(
    fn: Callable[[], object], sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Milliseconds of one call of ``fn`` (``sync`` waits for the device before the clock is read)."""
    sync()
    t0 = clock()
    fn()
    sync()
    return (clock() - t0) * 1000.0
