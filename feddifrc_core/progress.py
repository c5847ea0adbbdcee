"""Progress of long work as log lines (rate and ETA), readable in `flwr log` and in files.

Progress bars redraw one terminal line; in a Flower run the ClientApps' output is collected from
other processes and replayed line by line, so a bar becomes noise. A log line every `interval`
seconds says how far the work is, how fast it goes and when it will end; the caller logs the
summary when the work is done.
"""

from __future__ import annotations

import logging
import time


def format_seconds(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLog:
    """Counts finished units of `total` and logs 'what: done/total (pct), rate, ETA'."""

    def __init__(self, logger: logging.Logger, what: str, total: int, *, unit: str = "img",
                 initial: int = 0, interval: float = 30.0) -> None:
        if total < 0 or not 0 <= initial <= max(total, 0):
            raise ValueError(f"progress needs 0 <= initial <= total, got {initial} of {total}")
        self.logger, self.what, self.total, self.unit = logger, what, total, unit
        self.initial = self.done = initial  # units done before this process (resumed work)
        self.interval = interval
        self.started = self._last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self.logger.info("%s", self.line(now))

    def skip(self, n: int) -> None:
        """Units done without work here (reused from elsewhere): they shorten the ETA only."""
        self.done += n
        self.initial += n

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {rate:.1f} {self.unit}/s"
        if self.done < self.total and rate > 0:
            return f"{text}, ETA {format_seconds((self.total - self.done) / rate)}"
        return f"{text}, {format_seconds(elapsed)} in all"


def route_core_logs(handlers: list[logging.Handler]) -> None:
    """The core's INFO lines (set-up stages, extraction progress) go to `handlers` too: the apps
    pass Flower's, so the lines reach the run's log (`flwr log`), also from Ray's workers."""
    core = logging.getLogger("feddifrc_core")
    core.setLevel(logging.INFO)
    for handler in handlers:
        if handler not in core.handlers:
            core.addHandler(handler)
