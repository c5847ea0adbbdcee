"""The wire protocol of the two apps: message types, record and metric keys, pack and unpack.

Both apps import this module and nothing of each other; the core never sees a Flower record.
Every request carries a `Header` (the run's config digest, its name and key, the server's class
names); each ClientApp reads its run config from its own Flower context, once per run and
process, and refuses a request whose digest differs from its own.

    query.node_info  server -> client: header            client -> server: partition id, count
    query.setup      header, stage, rule, payload        arrays (the stage's upload), metrics
    train            header, round, arrays (the model),  arrays (the local model), metrics,
                     payload (the algorithm's arrays)    payload (the algorithm's uploads)

With secure aggregation (server_app/secure_aggregator.py) a set-up stage travels as a `train`
message (Flower's SecAgg+ acts on those only) whose config names the stage and its rule, and the
server's aggregation component hands the strategy ONE reply for the whole stage: the combined
arrays, the merged metrics and a `contributors` record naming the nodes in it and those lost
(`sum_reply`); the strategy reads any reply through `answered_nodes` / `reported_failures`.

`arrays` is what the server's aggregation component combines (Flower's `arrayrecord_key`, which
the DP and robust strategies of `flwr.serverapp.strategy` and Flower's client mods read);
`payload` holds the algorithm's arrays beside it (FedDifRC's shared bases, for one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from feddifrc_core.aggregation import Rule, Upload

# --- message types ---------------------------------------------------------------------------------
NODE_INFO = f"{MessageType.QUERY}.node_info"
SETUP = f"{MessageType.QUERY}.setup"
TRAIN = MessageType.TRAIN

# --- records ---------------------------------------------------------------------------------------
ARRAYS, PAYLOAD, CONFIG, METRICS = "arrays", "payload", "config", "metrics"
CONTRIBUTORS = "contributors"  # a reply that answers for several nodes (a secure sum)

# --- keys in the config record ---------------------------------------------------------------------
CONFIG_DIGEST, RUN_NAME, RUN_KEY, CLASS_NAMES = "config-digest", "run-name", "run-key", "class-names"
STAGE, SERVER_ROUND, RULE = "stage", "server-round", "rule"
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"

# --- keys in the metric record ---------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # the weight of a client's upload
NUM_CLIENTS = "num-clients"  # how many clients merged metrics stand for
SETUP_SECONDS = "setup-seconds"  # a set-up stage's time on the client


@dataclass(frozen=True)
class Header:
    """What every request tells a client about the run."""

    config_digest: str  # RunConfig.digest() of the server's config
    run_name: str = ""
    run_key: str = ""  # unique per run, kept on resume: names the clients' per-run files
    class_names: tuple[str, ...] = ()  # the server's; a node whose data names them otherwise refuses

    def entries(self) -> dict[str, Any]:
        names = {CLASS_NAMES: list(self.class_names)} if self.class_names else {}
        return {CONFIG_DIGEST: self.config_digest, RUN_NAME: self.run_name,
                RUN_KEY: self.run_key, **names}


@dataclass(frozen=True)
class Request:
    """A set-up or train request as a client reads it."""

    header: Header
    stage: str = ""  # set-up stage; "" for train
    server_round: int = 0  # train only
    rule: Rule = "mean"  # how the server combines the answers (train: always the weighted mean)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the global model (train)
    payload: dict[str, np.ndarray] = field(default_factory=dict)


# --- numpy <-> Flower ------------------------------------------------------------------------------
def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """numpy arrays by name -> an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord -> numpy arrays by name."""
    return {k: v.numpy() for k, v in record.items()}


# --- server side: requests, and what the replies carry ---------------------------------------------
def node_info_request(node_id: int) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type=NODE_INFO)


def setup_content(header: Header, stage: str, payload: Mapping[str, np.ndarray],
                  rule: Rule = "sum") -> RecordDict:
    """`rule`: how the answers are combined (a secure sum needs it on the client: a mean is the
    sum of example-weighted arrays)."""
    return RecordDict({CONFIG: ConfigRecord({**header.entries(), STAGE: stage, RULE: rule}),
                       PAYLOAD: to_record(payload)})


def train_content(header: Header, server_round: int, model: ArrayRecord,
                  payload: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None
                  ) -> RecordDict:
    """`config`: entries a Flower strategy adds to the train config (kept, ours win)."""
    entries = {**(config or {}), **header.entries(), SERVER_ROUND: server_round}
    return RecordDict({ARRAYS: model, CONFIG: ConfigRecord(entries), PAYLOAD: to_record(payload)})


def addressed(content: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
    """One message per node, all with the same content."""
    return [Message(content, dst_node_id=node, message_type=message_type) for node in node_ids]


def read_partition(reply: Message) -> int:
    """A node_info reply -> the node's partition id."""
    return int(cast(int, reply.content.config_records[CONFIG][PARTITION_ID]))


def read_upload(reply: Message, partition: int) -> Upload:
    """A set-up or train reply -> its arrays, weighted by the client's num-examples."""
    metrics = read_metrics(reply)
    return Upload(partition, from_record(reply.content.array_records[ARRAYS]),
                  float(cast(float, metrics[NUM_EXAMPLES])), metrics)


def read_payload_upload(reply: Message, partition: int) -> Upload | None:
    """A train reply -> the algorithm's extra uploads (None when it sent none)."""
    record = reply.content.array_records.get(PAYLOAD)
    if record is None or len(record) == 0:
        return None
    return Upload(partition, from_record(record), float(cast(float, read_metrics(reply)[NUM_EXAMPLES])))


def read_metrics(reply: Message) -> dict[str, Any]:
    return dict(reply.content.metric_records[METRICS])


def sum_reply(reply_to: Message, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any],
              payload: Mapping[str, np.ndarray], nodes: list[int],
              failures: Mapping[int, str]) -> Message:
    """One reply for a whole stage (the aggregation component's, not a client's): `arrays` and
    `payload` already combined by the stage's rule, `metrics` merged (with num-examples and
    num-clients), the node ids in it and the reason each other node was lost."""
    content = RecordDict({
        ARRAYS: to_record(arrays), METRICS: MetricRecord(dict(metrics)),
        CONTRIBUTORS: ConfigRecord({"nodes": list(nodes), "lost-nodes": list(failures),
                                    "lost-reasons": list(failures.values())})})
    if payload:
        content[PAYLOAD] = to_record(payload)
    return Message(content, reply_to=reply_to)


def answered_nodes(reply: Message) -> list[int]:
    """The node ids a successful reply answers for: its source, or a stage reply's contributors."""
    record = reply.content.config_records.get(CONTRIBUTORS)
    if record is None:
        return [reply.metadata.src_node_id]
    return [int(n) for n in cast(list[int], record["nodes"])]


def reported_failures(reply: Message) -> dict[int, str]:
    """Node id -> reason for the nodes a stage reply says were lost ({} for a client's reply)."""
    if reply.has_error() or CONTRIBUTORS not in reply.content.config_records:
        return {}
    record = reply.content.config_records[CONTRIBUTORS]
    nodes, reasons = cast(list[int], record["lost-nodes"]), cast(list[str], record["lost-reasons"])
    return {int(n): str(r) for n, r in zip(nodes, reasons, strict=True)}


# --- client side -----------------------------------------------------------------------------------
def read_request(msg: Message) -> Request:
    """A set-up or train request (a set-up stage may come as a `train` message: its config names
    the stage)."""
    config = msg.content.config_records[CONFIG]
    names = config.get(CLASS_NAMES)
    header = Header(str(config[CONFIG_DIGEST]), str(config.get(RUN_NAME, "")),
                    str(config.get(RUN_KEY, "")), tuple(cast(list[str], names or ())))
    model = msg.content.array_records.get(ARRAYS)
    payload = msg.content.array_records.get(PAYLOAD)
    rule = str(config.get(RULE, "mean"))
    if rule not in ("mean", "sum"):
        raise ValueError(f"request rule must be 'mean' or 'sum', got {rule!r}")
    return Request(header, str(config.get(STAGE, "")), int(cast(int, config.get(SERVER_ROUND, 0))),
                   cast(Rule, rule), from_record(model) if model is not None else {},
                   from_record(payload) if payload is not None else {})


@dataclass(frozen=True)
class Answer:
    """A client's answer to a set-up or train request, before it is packed: a plain reply
    (`reply`), or a share of a secure sum (client_app/secure_upload.py)."""

    arrays: dict[str, np.ndarray]  # the stage's upload, or the local model
    metrics: dict[str, float | int]  # holds num-examples (the answer's weight)
    payload: dict[str, np.ndarray] = field(default_factory=dict)  # the algorithm's uploads


def node_info_reply(msg: Message, partition_id: int, num_partitions: int) -> Message:
    info = ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(RecordDict({CONFIG: info}), reply_to=msg)


def reply(msg: Message, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float | int],
          payload: Mapping[str, np.ndarray] | None = None) -> Message:
    """A set-up or train reply: `metrics` must hold num-examples (the upload's weight)."""
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"a reply's metrics must hold {NUM_EXAMPLES!r}, got {sorted(metrics)}")
    content = RecordDict({ARRAYS: to_record(arrays), METRICS: MetricRecord(dict(metrics))})
    if payload:
        content[PAYLOAD] = to_record(payload)
    return Message(content, reply_to=msg)


# --- secure sums (Flower's SecAgg+; server_app/secure_aggregation.py, client_app/secure_upload.py)
# The masked-vector stage's content carries a `secure-sum` ConfigRecord; the reply's FitRes names
# its arrays' layout (names, shapes, dtypes: public) in the metric `secure-sum-layout`.
REQUEST = "secure-sum"
LAYOUT = "secure-sum-layout"
MODE_BOUNDED, MODE_OCTAVES, MODE_ENCODED = "bounded", "octaves", "encoded"


@dataclass(frozen=True)
class SecureSumRequest:
    stage: str  # the server's id of this sum, e.g. "round-3.model-update"
    mode: str  # bounded: scale by `bounds`; octaves: magnitude round; encoded: already in [-c, c]
    clipping_range: float
    rounding_seed: int  # per (run seed, stage, partition): Flower's stochastic rounding
    bounds: dict[str, float]  # public bound per array name (mode "bounded")


def request_record(stage: str, mode: str, clipping_range: float, rounding_seed: int,
                   bounds: Mapping[str, float] | None = None) -> ConfigRecord:
    """The `secure-sum` record the server adds to a node's masked-vector-stage content."""
    names = list(bounds or {})
    return ConfigRecord({"stage": stage, "mode": mode, "clipping-range": float(clipping_range),
                         "rounding-seed": int(rounding_seed), "bound-names": names,
                         "bound-values": [float((bounds or {})[n]) for n in names]})


def secure_sum_request(msg: Message) -> SecureSumRequest | None:
    """The secure-sum request in `msg`, or None for any other message (plain training)."""
    if msg.metadata.message_type != MessageType.TRAIN or REQUEST not in msg.content.config_records:
        return None
    rec = msg.content.config_records[REQUEST]
    names = cast(list[str], rec.get("bound-names", []))
    values = cast(list[float], rec.get("bound-values", []))
    return SecureSumRequest(stage=str(rec["stage"]), mode=str(rec["mode"]),
                            clipping_range=float(cast(float, rec["clipping-range"])),
                            rounding_seed=int(cast(int, rec["rounding-seed"])),
                            bounds=dict(zip(names, values, strict=True)))
