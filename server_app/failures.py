"""Failures the ServerApp expects, reported as one line instead of Flower's traceback.

When a ServerApp raises, Flower logs "ServerApp (or Simulation) raised an exception" with the full
traceback (about 30 lines for a run-config typo, most of them Flower's own frames) and ends the run
`finished:failed` with the exception's text as the run's status details. For the failures below
the message already says what happened and what to do, so the traceback only hides it: a filter
on Flower's logger folds them into that one line. The run still fails, with the same status
details (`flwr ls --run-id ID --format json`), and any other exception keeps its traceback.
"""

from __future__ import annotations

import logging

from flwr.common.logger import LOGGER_NAME

from feddifrc_core.checkpoint import WriteError
from feddifrc_core.config import ConfigError
from feddifrc_core.divergence import DivergedError
from server_app.run_lock import RunFolderBusyError
from server_app.strategy import RoundFailedError

EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    ConfigError, RoundFailedError, RunFolderBusyError, DivergedError, WriteError)


class OneLineFailures(logging.Filter):
    """Turns a log record that carries an expected failure into one line without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, EXPECTED_FAILURES):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def report_expected_failures_in_one_line() -> None:
    """Install the filter on Flower's logger once per process (the ServerApp's process)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, OneLineFailures) for f in logger.filters):
        logger.addFilter(OneLineFailures())
