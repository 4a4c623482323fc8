"""The package logger: ``logging.getLogger("earlytom_ext")``, quiet by default.

A library does not configure logging for its user: the logger has a ``NullHandler`` only, so its
records go wherever the application's logging sends them (nowhere, and no "No handlers" warning,
when the application configures nothing). ``set_verbosity`` is a shortcut for scripts and the
command line.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["logger", "set_verbosity"]

logger = logging.getLogger("earlytom_ext")
logger.addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (looked up per record, so a redirected stderr is honoured)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# The handler set_verbosity adds (at most one, so repeated calls do not duplicate output).
_handler: logging.Handler | None = None


def set_verbosity(level: int | str) -> None:
    """Show earlytom_ext's log records of at least ``level`` on stderr.

    Args:
        level: a ``logging`` level (``logging.INFO``) or its name (``"info"``, case-insensitive).

    Raises:
        TypeError: level is neither an int nor a str.
        ValueError: level is an unknown name or a negative int.
    """
    global _handler
    if isinstance(level, bool) or not isinstance(level, (int, str)):
        raise TypeError(f"level must be a logging level (int) or its name (str), got {type(level).__name__}")
    if isinstance(level, str):
        if level.lower() not in _LEVELS:
            raise ValueError(f"level must be one of {sorted(_LEVELS)} (or a logging level int), got {level!r}")
        level = _LEVELS[level.lower()]
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    logger.setLevel(level)
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(logging.Formatter("earlytom_ext: %(levelname)s: %(message)s"))
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    _handler.setLevel(level)
