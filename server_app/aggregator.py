"""The server's one aggregation component: how the uploads of clients reach the server and become
one set of arrays.

Every number the server takes from clients passes through one `Aggregator`: the set-up stages'
uploads (FedDifRC's projection statistics and target sums, rule "sum"), the clients' models of
every round (`combine_models`, weighted by num-examples) and any algorithm's extra uploads
beside the model (rule "mean"). The plain one sends with the Grid and combines with
`feddifrc_core.aggregation.combine`. A replacement keeps this contract (docs/architecture.md,
"Aggregation"):

- `prepare(clients_per_round)` once the nodes are known, before the set-up stages (settings
  that depend on the federation's size fail here, before any work);
- `train_config(server_round, model, grid)`: entries for the round's train config (Flower's
  client-side DP wrappers send the clipping norm this way);
- `exchange(grid, messages, wait)` delivers a stage's messages and returns the replies within
  `wait` (a round's fixed deadline, or a set-up stage's that restarts with every reply: queued
  clients keep the stage alive; `progress_wait.py`); secure aggregation runs its own round trips
  here and returns replies whose arrays are the masked sum's share, or one reply carrying the sum;
- `combine(uploads, rule)` turns the uploads, in partition order, into the stage's result (a
  robust rule replaces the mean here); `combine_models(server_round, uploads)` is the round's
  mean model, the release that differential privacy protects (server_app/private_aggregation.py);
- `metrics()` (added to the round's row), `state()` / `load_state()` (checkpointed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from feddifrc_core.aggregation import Rule, Upload, combine
from server_app.progress_wait import Wait, send_and_receive_with_progress


class Aggregator:
    """Plain aggregation: the Grid's own delivery, exact sums and weighted means."""

    def prepare(self, clients_per_round: int) -> None:
        """The federation is known (`clients_per_round` train each round); nothing to check."""

    def train_config(self, server_round: int, model: ArrayRecord, grid: Grid) -> dict[str, Any]:
        """Entries this component adds to the round's train config: none."""
        return {}

    def exchange(self, grid: Grid, messages: Iterable[Message], wait: Wait) -> list[Message]:
        """Send a stage's messages and collect the replies that come within `wait`."""
        if wait.from_last_reply:
            return send_and_receive_with_progress(grid, messages, wait.seconds)
        return list(grid.send_and_receive(messages, timeout=wait.seconds))

    def combine(self, uploads: Sequence[Upload], rule: Rule) -> dict[str, np.ndarray]:
        """The stage's result from its uploads (in partition order)."""
        return combine(uploads, rule)

    def combine_models(self, server_round: int, uploads: Sequence[Upload]
                       ) -> dict[str, np.ndarray]:
        """The clients' mean model of `server_round` (uploads in partition order)."""
        return self.combine(uploads, "mean")

    def metrics(self) -> dict[str, Any]:
        """What this component reports after each round (none)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """What the component keeps between rounds (saved with every checkpoint): nothing."""
        return {}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore `state()` from a checkpoint (resume)."""
