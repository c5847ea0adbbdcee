"""The FedDifRC strategy: FedAvg on Flower's Message API plus the federated projection set-up.

Differences from `flwr.serverapp.strategy.FedAvg`, each for a reason:
- sampling is by partition id with a per-round seed (node ids are random per run, so Flower's
  `random.sample` over node ids cannot reproduce a run or resume one exactly);
- the train message carries the whole resolved run config (the server's config is the one truth,
  also where a ClientApp gets no run_config) and the shared projection bases;
- aggregation sums in partition order (float sums are order dependent) and fails the run loudly
  when fewer than `min-train-nodes` clients replied; failures are logged with node and reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from client_app.records import from_flower_arrays, to_flower_arrays
from feddifrc_core import projection
from feddifrc_core.aggregation import sample_partitions, weighted_average
from feddifrc_core.config import RunConfig
from feddifrc_core.targets import TARGET_COUNT, TARGET_OFFSET, TARGET_SUM

# Message types and record keys shared with client_app/app.py.
QUERY_NODE_INFO = f"{MessageType.QUERY}.node_info"
QUERY_PROJECTION_STATS = f"{MessageType.QUERY}.projection_stats"
QUERY_TARGET_SUM = f"{MessageType.QUERY}.target_sum"
ARRAYS, METRICS, CONFIG, RUN_CONFIG, PROJECTION = "arrays", "metrics", "config", "run-config", "projection"


class RoundFailedError(RuntimeError):
    """Fewer than `min-train-nodes` clients replied to a stage; the run cannot go on."""


@dataclass
class RoundReport:
    """What happened to the messages of one stage (for logs and metrics)."""

    sampled: list[int] = field(default_factory=list)  # partition ids
    succeeded: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "partition P (node N): reason"


class FedDifRCStrategy(FedAvg):
    """FedAvg with seeded partition sampling, failure tolerance and the projection set-up."""

    def __init__(self, cfg: RunConfig, run_name: str, class_names: tuple[str, ...] = (),
                 run_key: str = "") -> None:
        # Central evaluation on the test set replaces federated evaluation: fraction_evaluate=0.
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.min_train_nodes,
            min_available_nodes=cfg.min_available_nodes,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.cfg = cfg
        self.run_name = run_name
        self.run_key = run_key  # unique per run (kept on resume): names the clients' per-run files
        self.node_partitions: dict[int, int] = {}  # node id -> partition id (this connection)
        self.projection: dict[str, np.ndarray] = {}  # shared bases; empty = none
        self.last_report = RoundReport()
        # The server's class names travel with every request: a node whose data set names its
        # classes differently (same count, other order or names) is refused, not silently trained.
        self.class_names = tuple(class_names)

    def _class_names_entry(self) -> dict[str, list[str]]:
        return {"class-names": list(self.class_names)} if self.class_names else {}

    # --- set-up stages -------------------------------------------------------------------------
    def discover_nodes(self, grid: Grid) -> dict[int, int]:
        """Ask every connected node for its partition id (query.node_info)."""
        node_ids = self._wait_for_nodes(grid)
        replies = self._query(grid, node_ids, QUERY_NODE_INFO, RecordDict())
        mapping: dict[int, int] = {}
        for msg in replies:
            if not msg.has_error():
                info = msg.content.config_records[CONFIG]
                mapping[msg.metadata.src_node_id] = cast(int, info["partition-id"])
        self.node_partitions = mapping
        self._require("node discovery", len(mapping), len(node_ids),
                      self._describe_failures(replies, node_ids))
        duplicates = len(mapping) - len(set(mapping.values()))
        if duplicates:
            raise RoundFailedError(
                f"{duplicates} nodes report a partition id that another node has; give every "
                "SuperNode a distinct partition-id in --node-config"
            )
        log(INFO, "nodes: %d connected, partitions %s", len(mapping), sorted(mapping.values()))
        return mapping

    def setup_projection(self, grid: Grid, feature_dim: int) -> dict[str, np.ndarray]:
        """The shared basis: merge every client's sufficient statistics (exact), build the
        federated-PCA or mean-centred random bases; for spatial-norm-centred also merge the
        clients' target sums into the mean target that every client subtracts."""
        record = RecordDict({RUN_CONFIG: ConfigRecord(self.cfg.to_flower()),
                             CONFIG: ConfigRecord({"run-name": self.run_name,
                                                   **self._class_names_entry()})})
        ok = self._query_all(grid, QUERY_PROJECTION_STATS, record, "projection set-up")
        stats = [projection.arrays_to_stats(from_flower_arrays(msg.content.array_records[ARRAYS])) for msg in ok]
        merged = projection.merge_all(stats)  # exact: sums of counts, sums and outer products
        bases = projection.shared_bases(self.cfg.projection, feature_dim, [s.dim for s in merged],
                                        self.cfg.seed, merged)
        self.projection = {k: np.asarray(v) for k, v in projection.bases_to_arrays(bases).items()}
        slowest = max(cast(float, m.content.metric_records[METRICS].get("extract-seconds", 0.0))
                      for m in ok)
        log(INFO, "projection: %s (%s) from %d clients (slowest extraction %.1f s), output dims %s",
            self.cfg.projection, self.cfg.reduction, len(ok), slowest, [b.out_dim for b in bases])
        if self.cfg.reduction == "spatial-norm-centred":
            record[PROJECTION] = ArrayRecord(to_flower_arrays(self.projection))
            ok = self._query_all(grid, QUERY_TARGET_SUM, record, "target-mean set-up")
            sums = [from_flower_arrays(m.content.array_records[ARRAYS]) for m in ok]
            count = sum(int(np.asarray(a[TARGET_COUNT]).reshape(-1)[0]) for a in sums)
            total = np.sum([np.asarray(a[TARGET_SUM], dtype=np.float64) for a in sums], axis=0)
            self.projection[TARGET_OFFSET] = (total / max(count, 1)).astype(np.float32)  # [D]
            log(INFO, "target mean from %d clients (%d vectors), norm %.3f", len(ok), count,
                float(np.linalg.norm(self.projection[TARGET_OFFSET])))
        return self.projection

    # --- training ------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample partitions with the round's seed and send model, config and projection."""
        partitions = sample_partitions(list(self.node_partitions.values()), self.fraction_train,
                                       self.min_train_nodes, self.cfg.seed, server_round)
        by_partition = {p: n for n, p in self.node_partitions.items()}
        self.last_report = RoundReport(sampled=partitions)
        log(INFO, "round %d: training partitions %s", server_round, partitions)
        config = ConfigRecord({**config, "server-round": server_round, "run-name": self.run_name,
                               "run-key": self.run_key,
                               **self._class_names_entry()})
        record = RecordDict({ARRAYS: arrays, CONFIG: config,
                             RUN_CONFIG: ConfigRecord(self.cfg.to_flower())})
        if self.projection:
            record[PROJECTION] = ArrayRecord(to_flower_arrays(self.projection))
        return self._construct_messages(record, [by_partition[p] for p in partitions], MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the replies in partition order; too few replies end the run."""
        replies = list(replies)
        ok = self._ordered_ok(replies)
        report = self.last_report
        report.succeeded = [self.node_partitions[m.metadata.src_node_id] for m in ok]
        by_partition = {p: n for n, p in self.node_partitions.items()}
        report.failures = self._describe_failures(replies, [by_partition[p] for p in report.sampled])
        self._require(f"round {server_round}", len(ok), len(report.sampled), report.failures)

        weights = [cast(float, m.content.metric_records[METRICS]["num-examples"]) for m in ok]
        model = weighted_average([from_flower_arrays(m.content.array_records[ARRAYS]) for m in ok], weights)
        metrics = aggregate_client_metrics([dict(m.content.metric_records[METRICS]) for m in ok])
        return ArrayRecord(to_flower_arrays(model)), MetricRecord(dict(metrics))

    # --- state for checkpoints ------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return dict(self.projection)

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.projection = {k: np.asarray(v) for k, v in arrays.items()}

    # --- helpers --------------------------------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        from flwr.serverapp.strategy.strategy_utils import sample_nodes

        _, all_nodes = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        return sorted(all_nodes)

    def _query_all(self, grid: Grid, message_type: str, record: RecordDict,
                   stage: str) -> list[Message]:
        """Send a set-up query to every known node; the successful replies in partition order."""
        node_ids = sorted(self.node_partitions, key=self.node_partitions.__getitem__)
        replies = self._query(grid, node_ids, message_type, record)
        ok = self._ordered_ok(replies)
        self._require(stage, len(ok), len(node_ids), self._describe_failures(replies, node_ids))
        return ok

    def _query(self, grid: Grid, node_ids: list[int], message_type: str,
               record: RecordDict) -> list[Message]:
        messages = self._construct_messages(record, node_ids, message_type)
        return list(grid.send_and_receive(messages, timeout=self.cfg.round_timeout))

    def _ordered_ok(self, replies: list[Message]) -> list[Message]:
        ok = [m for m in replies if not m.has_error()
              and m.metadata.src_node_id in self.node_partitions]
        return sorted(ok, key=lambda m: self.node_partitions[m.metadata.src_node_id])

    def _describe_failures(self, replies: list[Message], sent_to: list[int]) -> list[str]:
        """One line per failed node: its error, or no reply before round-timeout."""
        failures = []
        for msg in replies:
            if msg.has_error():
                node = msg.metadata.src_node_id
                part = self.node_partitions.get(node, "?")
                reason = (msg.error.reason or "").strip().splitlines()
                failures.append(f"partition {part} (node {node}): {reason[-1] if reason else 'error'}")
        replied = {msg.metadata.src_node_id for msg in replies}
        for node in sorted(set(sent_to) - replied, key=lambda n: self.node_partitions.get(n, -1)):
            failures.append(f"partition {self.node_partitions.get(node, '?')} (node {node}): no reply "
                            f"within round-timeout ({self.cfg.round_timeout:g} s)")
        for line in failures:
            log(WARNING, "client failure: %s", line)
        return failures

    def _require(self, stage: str, ok: int, expected: int, failures: list[str]) -> None:
        if ok >= min(self.min_train_nodes, expected) and ok > 0:
            return
        raise RoundFailedError(
            f"{stage}: only {ok} of {expected} clients replied successfully, min-train-nodes is "
            f"{self.min_train_nodes}. Failures: {'; '.join(failures) or 'none reported'}. Fix the "
            "client error above, raise round-timeout, or lower min-train-nodes."
        )


def aggregate_client_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Client metrics of one round: num-examples summed, *-seconds max (the slowest client
    bounds the round), everything else weighted by num-examples."""
    weights = np.asarray([float(m["num-examples"]) for m in metrics])
    out: dict[str, Any] = {"num-examples": int(weights.sum()), "num-clients": len(metrics)}
    keys = sorted({k for m in metrics for k in m} - {"num-examples"})
    for key in keys:
        values = [float(m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
        if len(values) != len(metrics):
            continue  # a key only some clients report is not comparable
        if key.endswith("-seconds"):
            out[key] = max(values)
        else:
            out[key] = float(np.dot(weights, values) / weights.sum())
    return out
