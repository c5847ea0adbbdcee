"""Progress lines of long work: rate and ETA from the work done here, at most one per interval."""

from __future__ import annotations

import logging

import pytest

from feddifrc_core import progress
from feddifrc_core.progress import ProgressLog, format_seconds


def test_lines_give_rate_and_eta_and_skip_reused_work(monkeypatch, caplog) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = logging.getLogger("test-progress")
    bar = ProgressLog(log, "features", 1000, initial=100, interval=30.0)
    bar.skip(300)  # reused rows: done, but not part of the rate
    with caplog.at_level(logging.INFO, logger="test-progress"):
        clock[0] += 10
        bar.update(100)  # within the interval: no line
        clock[0] += 30
        bar.update(100)  # 200 images in 40 s = 5 img/s; 400 left -> 80 s
    assert [r.getMessage() for r in caplog.records] == [
        "features: 600/1000 img (60%), 5.0 img/s, ETA 1m20s"]
    clock[0] += 10
    bar.update(400)
    assert bar.line(clock[0]) == "features: 1000/1000 img (100%), 12.0 img/s, 50s in all"


def test_format_seconds_and_bad_counts() -> None:
    assert [format_seconds(s) for s in (0.4, 59, 61, 3599, 3725)] == [
        "0s", "59s", "1m01s", "59m59s", "1h02m"]
    with pytest.raises(ValueError, match="initial <= total"):
        ProgressLog(logging.getLogger("x"), "w", 5, initial=6)
