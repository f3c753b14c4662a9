"""Progress output that suits its destination: a live tqdm bar on a terminal, plain throttled lines elsewhere.

Modes (``--progress``): ``bar`` (tqdm), ``log`` (a plain ``desc: i/total [elapsed, rate] key=value`` line on
stderr at most every ``interval`` seconds, default ``PYSEG_PROGRESS_INTERVAL`` or 60 — no carriage returns, so a
log file holds a handful of lines per epoch at most, none for a short loop), ``none``, and ``auto`` = ``bar`` when
stderr is a terminal, else ``log``. ``True``/``False`` mean ``auto``/``none``.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

__all__ = ["progress", "resolve_mode", "LineProgress"]

INTERVAL_ENV = "PYSEG_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "log", "none")


def resolve_mode(mode, stream=None) -> str:
    """``bar``, ``log`` or ``none`` for ``mode`` (one of ``MODES``, or a bool) writing to ``stream`` (stderr)."""
    if mode is True or mode is None:
        mode = "auto"
    elif mode is False:
        mode = "none"
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)} (or a bool), got {mode!r}")
    if mode == "auto":
        stream = sys.stderr if stream is None else stream
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return "bar" if tty else "log"
    return mode


def _interval() -> float:
    v = os.environ.get(INTERVAL_ENV, "")
    try:
        return float(v) if v else 60.0
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {v!r}") from None


class LineProgress:
    """Iterate ``iterable``; every ``interval`` seconds print one line ``desc: i/total [12s, 3.4 it/s] k=v``."""

    def __init__(self, iterable, desc: str = "", total: int | None = None, interval: float | None = None,
                 file=None):
        self.iterable = iterable
        self.desc = desc
        if total is None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total = total
        self.interval = _interval() if interval is None else float(interval)
        self.file = file
        self.postfix = ""
        self.n = 0

    def set_postfix(self, **kw) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self, elapsed: float) -> str:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        rate = self.n / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {count} [{elapsed:.0f}s, {rate:.2f} it/s]"
        return f"{line} {self.postfix}" if self.postfix else line

    def __iter__(self):
        start = last = time.monotonic()
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if now - last >= self.interval and (self.total is None or self.n < self.total):
                print(self._line(now - start), file=self.file or sys.stderr, flush=True)
                last = now

    def __len__(self):
        return self.total


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def set_postfix(self, **kw) -> None:
        pass

    def __iter__(self):
        return iter(self.iterable)


def progress(iterable, desc: str = "", mode="auto", enabled: bool = True, **kw):
    """``iterable`` wrapped for progress output per ``mode`` (see the module docstring); ``enabled=False`` (e.g.
    on ranks other than 0) silences it. The result has ``set_postfix(**kw)`` in every mode."""
    mode = resolve_mode(mode)
    if not enabled or mode == "none":
        return _Silent(iterable)
    if mode == "log":
        return LineProgress(iterable, desc=desc, **kw)
    return tqdm(iterable, desc=desc, dynamic_ncols=True, leave=False, **kw)
