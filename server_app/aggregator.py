"""The server's one aggregation component: how the uploads of clients reach the server and become
one set of arrays.

Every number the server takes from clients passes through one `Aggregator`: the set-up stages'
uploads (FedDifRC's projection statistics and target sums, rule "sum") and the model updates of
every round (rule "mean", weighted by num-examples), and any algorithm's extra uploads beside the
model. The plain one sends with the Grid and combines with `feddifrc_core.aggregation.combine`.
A replacement keeps this contract (docs/architecture.md, "Aggregation"):

- `exchange(grid, messages, wait)` delivers a stage's messages and returns the replies within
  `wait` (a round's fixed deadline, or a set-up stage's that restarts with every reply: queued
  clients keep the stage alive; `progress_wait.py`); secure aggregation runs its own round trips
  here and returns replies whose arrays are the masked sum's share, or one reply carrying the sum;
- `combine(uploads, rule)` turns the uploads, in partition order, into the stage's result (a
  robust rule or server-side differential privacy replaces the mean here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from feddifrc_core.aggregation import Rule, Upload, combine
from server_app.progress_wait import Wait, send_and_receive_with_progress


class Aggregator:
    """Plain aggregation: the Grid's own delivery, exact sums and weighted means."""

    def exchange(self, grid: Grid, messages: Iterable[Message], wait: Wait) -> list[Message]:
        """Send a stage's messages and collect the replies that come within `wait`."""
        if wait.from_last_reply:
            return send_and_receive_with_progress(grid, messages, wait.seconds)
        return list(grid.send_and_receive(messages, timeout=wait.seconds))

    def combine(self, uploads: Sequence[Upload], rule: Rule) -> dict[str, np.ndarray]:
        """The stage's result from its uploads (in partition order)."""
        return combine(uploads, rule)
