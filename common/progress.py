"""Progress bars: tqdm on a terminal, periodic plain lines in a log.

`progress_bar` makes the one choice every caller needs: when the stream is a terminal, a
tqdm bar redrawn in place; when it is not (a log file, a pipe, a test's ``StringIO``), the
same text as whole lines — one each time another ``log_fraction`` of the work is done or
``log_interval_s`` has passed, and one at the end — since carriage returns make a log
unreadable. Both are `tqdm.tqdm` objects: ``update``, ``n``, ``set_postfix_str``, ``close``.
"""

from __future__ import annotations

import io
import sys
import time
from typing import IO, Any

from tqdm import tqdm

#: Bar characters from empty to full: plain ASCII, so logs and old terminals read it.
ASCII_BAR = "-#"


class _TerminalBar(tqdm):
    monitor_interval = 0  # no monitor thread: the bars are short-lived and redraw often


class _LogBar(tqdm):
    """A tqdm whose display is a whole line now and then, written to ``log``."""

    monitor_interval = 0

    def __init__(
        self,
        *args: Any,
        log: IO[str],
        log_fraction: float,
        log_interval_s: float,
        **kwargs: Any,
    ) -> None:
        self._log = log
        self._log_fraction = log_fraction
        self._log_interval_s = log_interval_s
        self._next_fraction = 0.0
        self._last_line_t = time.monotonic()
        self._last_line_n: float | None = None
        self._started = False  # tqdm draws once in __init__: no line for "0 done" yet
        # tqdm's own writes (carriage returns, the closing newline) go nowhere
        super().__init__(*args, file=io.StringIO(), mininterval=0, **kwargs)
        self._started = True

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None or not self._started:  # tqdm clearing its line: not in a log
            return True
        now = time.monotonic()
        total = self.total or 0
        frac = self.n / total if total else 0.0
        done = bool(total) and self.n >= total
        due = (
            done
            or self._closing
            or frac + 1e-9 >= self._next_fraction
            or now - self._last_line_t >= self._log_interval_s
        )
        if not due or self._last_line_n == self.n:
            return True
        if self._log_fraction > 0:
            self._next_fraction = (int(frac / self._log_fraction + 1e-9) + 1) * self._log_fraction
        self._last_line_t = now
        self._last_line_n = self.n
        self._log.write(self.format_meter(**self.format_dict) + "\n")
        self._log.flush()
        return True

    _closing = False

    def close(self) -> None:
        self._closing = True
        super().close()


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed stream
        return False


def progress_bar(
    total: float,
    desc: str,
    *,
    stream: IO[str] | None = None,
    enabled: bool = True,
    bar_format: str | None = None,
    log_fraction: float = 0.1,
    log_interval_s: float = 15.0,
    min_redraw_s: float = 0.2,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar for ``total`` units on ``stream`` (default: stderr at call time).

    On a terminal it is redrawn at most every ``min_redraw_s``; elsewhere see the module
    docstring. ``enabled=False`` gives a bar that shows nothing (tqdm's ``disable``).
    Other keyword arguments go to `tqdm.tqdm` (``unit``, ``ascii``, ``postfix``...).
    """
    stream = sys.stderr if stream is None else stream
    kwargs.setdefault("ascii", ASCII_BAR)
    kwargs.setdefault("dynamic_ncols", False)
    # every update may draw (time or the log's tenths decide): totals can be fractions (1.0)
    kwargs.setdefault("miniters", 0)
    if is_terminal(stream) or not enabled:
        return _TerminalBar(
            total=total,
            desc=desc,
            file=stream,
            disable=not enabled,
            bar_format=bar_format,
            mininterval=min_redraw_s,
            **kwargs,
        )
    return _LogBar(
        total=total,
        desc=desc,
        bar_format=bar_format,
        log=stream,
        log_fraction=log_fraction,
        log_interval_s=log_interval_s,
        **kwargs,
    )
