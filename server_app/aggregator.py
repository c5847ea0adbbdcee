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
- `contributors(uploads)`: the partitions in them (a secure sum's one upload stands for many);
- `metrics()` (added to the round's row), `state()` / `load_state()` (checkpointed).

`RobustAggregator` is the robust one: Flower's own FedMedian, FedTrimmedAvg, Krum or Bulyan
for every "mean" (`make_aggregator` picks by the run config's `aggregator`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum

from feddifrc_core.aggregation import Rule, Upload, combine
from feddifrc_core.config import RunConfig
from server_app.progress_wait import Wait, send_and_receive_with_progress
from wire import protocol


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

    def contributors(self, uploads: Sequence[Upload]) -> list[int]:
        """The partitions whose data went into `uploads` (the last stage's, from `exchange`)."""
        return [u.partition for u in uploads]

    def metrics(self) -> dict[str, Any]:
        """What this component reports after each round (none)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """What the component keeps between rounds (saved with every checkpoint): nothing."""
        return {}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore `state()` from a checkpoint (resume)."""


class RobustAggregator(Aggregator):
    """Every "mean" by one of Flower's robust strategies; sums stay exact sums.

    The strategy's own `aggregate_train` does the work, on replies made from the uploads in
    partition order, so the result is Flower's rule exactly (and as deterministic: a resumed run
    recomputes the same bits). Flower's rules ignore the example weights (Krum's one selected
    update needs none): a client's num-examples is its own claim, and a robust rule trusts no
    single client's claim.
    """

    def __init__(self, strategy: FedAvg) -> None:
        self.strategy = strategy

    def combine(self, uploads: Sequence[Upload], rule: Rule) -> dict[str, np.ndarray]:
        if rule == "sum":
            # Set-up statistics (FedDifRC's count, sum and outer products per block, its target
            # sums) are sufficient statistics: the shared basis is a function of their exact sums,
            # and a median or trimmed mean of them is no statistic of the pooled data. Robustness
            # there is out of scope (docs/privacy.md, "Robust aggregation").
            return combine(uploads, rule)
        if not uploads:
            raise ValueError("a robust rule needs at least one upload")
        arrays, _ = self.strategy.aggregate_train(0, [_as_reply(u) for u in uploads])
        if arrays is None:  # Bulyan below 4f + 3 replies; the run config rules this out
            raise RuntimeError(
                f"{type(self.strategy).__name__} did not aggregate {len(uploads)} updates "
                "(too few for num-malicious-nodes; see the log)")
        # Flower returns float64 for integer buffers (a median of counts): back to each dtype,
        # integers rounded as the weighted mean rounds them.
        first = uploads[0].arrays
        return {key: _as_dtype(arrays[key].numpy(), np.asarray(first[key]).dtype) for key in first}


def make_aggregator(cfg: RunConfig) -> Aggregator:
    """The run's aggregation component, by `aggregator` (validated with the run config)."""
    f, key = cfg.num_malicious_nodes, protocol.NUM_EXAMPLES
    strategies: dict[str, Callable[[], FedAvg]] = {
        "fedmedian": lambda: FedMedian(weighted_by_key=key),
        "fedtrimmedavg": lambda: FedTrimmedAvg(weighted_by_key=key, beta=cfg.trimmed_avg_beta),
        "krum": lambda: Krum(weighted_by_key=key, num_malicious_nodes=f),
        "bulyan": lambda: Bulyan(weighted_by_key=key, num_malicious_nodes=f),
    }
    if cfg.aggregator == "fedavg":
        return Aggregator()
    return RobustAggregator(strategies[cfg.aggregator]())


def _as_reply(upload: Upload) -> Message:
    """An upload as the train reply Flower's strategies read: one ArrayRecord and one MetricRecord
    with the weight. Made as the SuperLink makes received messages (`make_message`, explicit
    metadata): no Grid sends it, and the rules read no metadata."""
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in upload.arrays.items()}),
        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: float(upload.weight)}),
    })
    metadata = Metadata(run_id=0, message_id=f"upload-{upload.partition}",
                        src_node_id=upload.partition, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=0.0, message_type=protocol.TRAIN)
    return make_message(metadata, content)


def _as_dtype(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.asarray: rint of a 0-d array (BatchNorm's step counter) is a numpy scalar
    return np.asarray(np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)
