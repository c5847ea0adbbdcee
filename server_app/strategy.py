"""The strategy of every algorithm: FedAvg on Flower's Message API, with the run's algorithm's server
half (`feddifrc_core/algorithms/<name>.py`) for what differs between algorithms.

It knows no algorithm: the set-up stages, the arrays that travel with the model and the step from
the clients' mean model to the next global model are the algorithm's hooks; every upload is
combined by the one `Aggregator`. Differences from `flwr.serverapp.strategy.FedAvg`, each for a
reason:
- sampling is by partition id with a per-round seed (node ids are random per run, so Flower's
  `random.sample` over node ids cannot reproduce a run or resume one exactly);
- aggregation sums in partition order (float sums are order dependent) and fails the run loudly
  when fewer than `min-train-nodes` clients replied; failures are logged with node and reason.
It overrides `configure_train` and `aggregate_train` only. Differential privacy is not a wrapper
around it but part of the aggregation component (server_app/private_aggregation.py): Flower's DP
wrapper then acts on the clients' mean model, before the algorithm's server step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from feddifrc_core import divergence
from feddifrc_core.aggregation import (
    Gathered,
    Rule,
    aggregate_client_metrics,
    num_sampled,
    sample_partitions,
)
from feddifrc_core.algorithms import Algorithm
from feddifrc_core.config import RunConfig
from server_app.aggregator import Aggregator
from server_app.progress_wait import Wait
from server_app.ray_workers import in_simulation
from server_app.replies import (
    RoundFailedError,
    RoundReport,
    describe_failures,
    ordered_ok,
    require,
    simulated_nodes,
    succeeded_partitions,
    wait_for_nodes,
)
from wire import protocol
from wire.protocol import Header

__all__ = ["AlgorithmStrategy", "RoundFailedError", "RoundReport"]


class AlgorithmStrategy(FedAvg):
    """FedAvg with seeded partition sampling, failure tolerance and the algorithm's server half."""

    def __init__(self, cfg: RunConfig, algorithm: Algorithm, header: Header,
                 aggregator: Aggregator | None = None) -> None:
        # Central evaluation on the test set replaces federated evaluation: fraction_evaluate=0.
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.min_train_nodes,
            min_available_nodes=cfg.min_available_nodes,
            arrayrecord_key=protocol.ARRAYS,
            configrecord_key=protocol.CONFIG,
        )
        self.cfg, self.algorithm, self.header = cfg, algorithm, header
        self.aggregator = aggregator or Aggregator()
        self.node_partitions: dict[int, int] = {}  # node id -> partition id (this connection)
        self.last_report = RoundReport()
        self._sent: list[Message] = []  # the last train messages (their ids match the replies)
        self._current: dict[str, np.ndarray] = {}  # the global model the last round started from

    # --- set-up --------------------------------------------------------------------------------
    def discover_nodes(self, grid: Grid) -> dict[int, int]:
        """Ask every connected node for its partition id (query.node_info)."""
        node_ids = self._wait_for_nodes(grid)
        sent = [protocol.node_info_request(node) for node in node_ids]
        replies = self.aggregator.exchange(grid, sent, self.setup_wait)
        mapping = {m.metadata.src_node_id: protocol.read_partition(m)
                   for m in replies if not m.has_error()}
        self.node_partitions = mapping
        require("node discovery", len(mapping), len(node_ids), self.min_train_nodes,
                describe_failures(replies, sent, mapping, self.setup_wait.describe()))
        duplicates = len(mapping) - len(set(mapping.values()))
        if duplicates:
            raise RoundFailedError(
                f"{duplicates} nodes report a partition id that another node has; give every "
                "SuperNode a distinct partition-id in --node-config"
            )
        log(INFO, "nodes: %d connected, partitions %s", len(mapping), sorted(mapping.values()))
        self.aggregator.prepare(num_sampled(len(mapping), self.fraction_train,
                                            self.min_train_nodes))
        return mapping

    def setup(self, grid: Grid, feature_dim: int) -> None:
        """The algorithm's set-up stages (FedDifRC: the shared basis), before round 1."""
        self.algorithm.setup(_Federation(self, grid), feature_dim)

    def gather(self, grid: Grid, stage: str, payload: Mapping[str, np.ndarray],
               rule: Rule) -> Gathered:
        """One set-up stage: every known node answers; the uploads combined by `rule`."""
        node_ids = sorted(self.node_partitions, key=self.node_partitions.__getitem__)
        content = protocol.setup_content(self.header, stage, payload, rule)
        sent = protocol.addressed(content, node_ids, protocol.SETUP)
        replies = self.aggregator.exchange(grid, sent, self.setup_wait)
        ok = ordered_ok(replies, self.node_partitions)
        succeeded = succeeded_partitions(ok, self.node_partitions)
        require(f"set-up stage {stage!r}", len(succeeded), len(node_ids), self.min_train_nodes,
                describe_failures(replies, sent, self.node_partitions, self.setup_wait.describe()))
        uploads = [protocol.read_upload(m, self._partition(m)) for m in ok]
        return Gathered(self.aggregator.combine(uploads, rule), len(succeeded),
                        aggregate_client_metrics([protocol.read_metrics(m) for m in ok]))

    # --- training ------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample partitions with the round's seed; send the model and the algorithm's payload."""
        partitions = sample_partitions(list(self.node_partitions.values()), self.fraction_train,
                                       self.min_train_nodes, self.cfg.seed, server_round)
        by_partition = {p: n for n, p in self.node_partitions.items()}
        self.last_report = RoundReport(sampled=partitions)
        log(INFO, "round %d: training partitions %s", server_round, partitions)
        self._current = protocol.from_record(arrays)
        entries = {**dict(config), **self.aggregator.train_config(server_round, arrays, grid)}
        content = protocol.train_content(self.header, server_round, arrays,
                                         self.algorithm.train_payload(), entries)
        # Kept: the grid gives them their ids on sending; error replies are matched by those ids.
        self._sent = protocol.addressed(content, [by_partition[p] for p in partitions],
                                        protocol.TRAIN)
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The next global model from the replies in partition order; too few end the run."""
        replies = list(replies)
        ok = ordered_ok(replies, self.node_partitions)
        report = self.last_report
        report.succeeded = succeeded_partitions(ok, self.node_partitions)
        report.failures = describe_failures(replies, self._sent, self.node_partitions,
                                            self.round_wait.describe())
        require(f"round {server_round}", len(report.succeeded), len(report.sampled),
                self.min_train_nodes, report.failures)

        mean = self.aggregator.combine_models(
            server_round, [protocol.read_upload(m, self._partition(m)) for m in ok])
        extra = [u for m in ok if (u := protocol.read_payload_upload(m, self._partition(m)))]
        uploads = self.aggregator.combine(extra, "mean") if extra else {}
        model = self.algorithm.aggregate(self._current, mean, uploads, server_round)
        # a NaN anywhere fails the run here, before this round reaches the run folder
        divergence.check_model(model, f"round {server_round}: the aggregated model",
                               divergence.advice(server_round, self.cfg.lr))
        metrics: dict[str, Any] = aggregate_client_metrics([protocol.read_metrics(m) for m in ok])
        return protocol.to_record(model), MetricRecord(metrics)

    # --- helpers --------------------------------------------------------------------------------
    @property
    def setup_wait(self) -> Wait:
        """Set-up stages wait while clients make progress: with fewer parallel slots than
        clients, queued clients start only when others finish (progress_wait.py)."""
        return Wait("setup-timeout", self.cfg.setup_timeout, from_last_reply=True)

    @property
    def round_wait(self) -> Wait:
        return Wait("round-timeout", self.cfg.round_timeout)

    def _partition(self, reply: Message) -> int:
        return self.node_partitions[reply.metadata.src_node_id]

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        if in_simulation():  # every simulated node exists from the start: never wait for more
            nodes = simulated_nodes(grid)
            if len(nodes) < self.min_available_nodes:
                raise RoundFailedError(
                    f"the simulation has {len(nodes)} SuperNode(s) but min-available-nodes is "
                    f"{self.min_available_nodes}: the run would wait forever. Simulate more nodes "
                    f"(flwr run . --federation-config \"num-supernodes={self.min_available_nodes}\""
                    ", or run_simulation.py --supernodes N), or lower min-available-nodes and "
                    "min-train-nodes.")
        return wait_for_nodes(grid, self.min_available_nodes)


@dataclass(frozen=True)
class _Federation:
    """The strategy and the run's Grid as the algorithm's set-up sees them (`Federation`)."""

    strategy: AlgorithmStrategy
    grid: Grid

    def gather(self, stage: str, payload: Mapping[str, np.ndarray], rule: Rule) -> Gathered:
        return self.strategy.gather(self.grid, stage, payload, rule)
