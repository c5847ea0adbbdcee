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
from server_app.progress_wait import send_and_receive_with_progress

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
        self._sent: list[Message] = []  # the last train messages (their ids match the replies)
        # The server's class names travel with every request: a node whose data set names its
        # classes differently (same count, other order or names) is refused, not silently trained.
        self.class_names = tuple(class_names)

    def _class_names_entry(self) -> dict[str, list[str]]:
        return {"class-names": list(self.class_names)} if self.class_names else {}

    # --- set-up stages -------------------------------------------------------------------------
    def discover_nodes(self, grid: Grid) -> dict[int, int]:
        """Ask every connected node for its partition id (query.node_info)."""
        node_ids = self._wait_for_nodes(grid)
        sent, replies = self._query(grid, node_ids, QUERY_NODE_INFO, RecordDict())
        mapping: dict[int, int] = {}
        for msg in replies:
            if not msg.has_error():
                info = msg.content.config_records[CONFIG]
                mapping[msg.metadata.src_node_id] = cast(int, info["partition-id"])
        self.node_partitions = mapping
        self._require("node discovery", len(mapping), len(node_ids),
                      self._describe_failures(replies, sent, self._setup_wait))
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
        # Kept: the grid gives them their ids on sending; error replies are matched by those ids.
        self._sent = list(self._construct_messages(record, [by_partition[p] for p in partitions],
                                                   MessageType.TRAIN))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the replies in partition order; too few replies end the run."""
        replies = list(replies)
        ok = self._ordered_ok(replies)
        report = self.last_report
        report.succeeded = [self.node_partitions[m.metadata.src_node_id] for m in ok]
        report.failures = self._describe_failures(
            replies, self._sent, f"round-timeout ({self.cfg.round_timeout:g} s)")
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

        from server_app.ray_workers import in_simulation

        if in_simulation():  # every simulated node exists from the start: never wait for more
            nodes = _simulated_nodes(grid)
            if len(nodes) < self.min_available_nodes:
                raise RoundFailedError(
                    f"the simulation has {len(nodes)} SuperNode(s) but min-available-nodes is "
                    f"{self.min_available_nodes}: the run would wait forever. Simulate more nodes "
                    f"(flwr run . --federation-config \"num-supernodes={self.min_available_nodes}\""
                    ", or run_simulation.py --supernodes N), or lower min-available-nodes and "
                    "min-train-nodes.")
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        return sorted(all_nodes)

    def _query_all(self, grid: Grid, message_type: str, record: RecordDict,
                   stage: str) -> list[Message]:
        """Send a set-up query to every known node; the successful replies in partition order."""
        node_ids = sorted(self.node_partitions, key=self.node_partitions.__getitem__)
        sent, replies = self._query(grid, node_ids, message_type, record)
        ok = self._ordered_ok(replies)
        self._require(stage, len(ok), len(node_ids),
                      self._describe_failures(replies, sent, self._setup_wait))
        return ok

    @property
    def _setup_wait(self) -> str:
        return f"setup-timeout ({self.cfg.setup_timeout:g} s) after the stage's last reply"

    def _query(self, grid: Grid, node_ids: list[int], message_type: str,
               record: RecordDict) -> tuple[list[Message], list[Message]]:
        """(the messages sent, the replies). Set-up stages wait while clients make progress:
        queued clients (fewer parallel slots than clients) start only when others finish."""
        messages = list(self._construct_messages(record, node_ids, message_type))
        return messages, send_and_receive_with_progress(grid, messages, self.cfg.setup_timeout)

    def _ordered_ok(self, replies: list[Message]) -> list[Message]:
        ok = [m for m in replies if not m.has_error()
              and m.metadata.src_node_id in self.node_partitions]
        return sorted(ok, key=lambda m: self.node_partitions[m.metadata.src_node_id])

    def _describe_failures(self, replies: list[Message], sent: list[Message],
                           waited: str) -> list[str]:
        """One entry per failed node: its error, or no reply within `waited` (the deadline).

        A reply is matched to the node it was sent to by its reply-to id: when a node is gone,
        the SuperLink answers in its place (source node 1), which is the same node's failure,
        not a second one.
        """
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        failed: dict[int, str] = {}
        answered: set[int] = set()
        for msg in replies:
            node = node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            if msg.has_error():
                reason = (msg.error.reason or "").strip().splitlines()
                failed[node] = reason[-1] if reason else f"error code {msg.error.code}"
        for node in set(node_of.values()) - answered:
            failed[node] = f"no reply within {waited}"
        order = sorted(failed, key=lambda n: (self.node_partitions.get(n, -1), n))
        failures = [f"partition {self.node_partitions.get(n, '?')} (node {n}): {failed[n]}"
                    for n in order]
        for line in group_failures(failures):
            log(WARNING, "client failure: %s", line)
        return failures

    def _require(self, stage: str, ok: int, expected: int, failures: list[str]) -> None:
        if ok >= min(self.min_train_nodes, expected) and ok > 0:
            return
        raise RoundFailedError(
            f"{stage}: only {ok} of {expected} clients replied successfully, min-train-nodes is "
            f"{self.min_train_nodes}. Failures: {'; '.join(group_failures(failures)) or 'none reported'}. "
            "Fix the client error above, raise round-timeout (training) or setup-timeout "
            "(set-up stages), or lower min-train-nodes."
        )


def _simulated_nodes(grid: Grid, timeout: float = 60.0) -> list[int]:
    """The simulation engine registers all its nodes in one go, in a thread that may start just
    after the ServerApp: wait for the first ones, then until the count stops changing."""
    import time

    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        now = sorted(grid.get_node_ids())
        if now and now == nodes:
            return now
        nodes = now
        time.sleep(0.5)
    return nodes


def group_failures(failures: list[str]) -> list[str]:
    """'partition P (node N): reason' lines, one per distinct reason with the clients it hit:
    a set-up error that every client raises (too little data, a model that does not load) is
    reported once, with the number of clients, instead of once per client."""
    by_reason: dict[str, list[str]] = {}
    for line in failures:
        who, _, reason = line.partition(": ")
        by_reason.setdefault(reason, []).append(who)
    out = []
    for reason, who in by_reason.items():
        if len(who) == 1:
            out.append(f"{who[0]}: {reason}")
        else:
            parts = ", ".join(w.split(" (")[0].removeprefix("partition ") for w in who)
            out.append(f"{len(who)} clients (partitions {parts}): {reason}")
    return out


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
