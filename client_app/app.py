"""ClientApp: one node of the federation. Handlers unpack the Message, call feddifrc_core, reply.

- query.node_info        -> this node's partition id (lets the server sample reproducibly)
- query.projection_stats -> extract + cache this client's diffusion representations, reply only the
                            sufficient statistics (count, sum, outer products) for the shared basis
- query.target_sum       -> (spatial-norm-centred) count and sum of this client's projected targets
- train                  -> local training with the run's algorithm; reply model + metrics
Raw data and raw features never leave the client.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER

from client_app.records import from_flower_arrays, to_flower_arrays
from feddifrc_core.client_session import ClientSession
from feddifrc_core.config import NodeConfig, RunConfig

log = logging.getLogger(__name__)


def _core_logs_to_flower() -> None:
    """The core's INFO lines (extraction progress and rate) go where Flower's own lines go: the
    run's log (`flwr log`), also from simulated ClientApps in Ray's worker processes."""
    core = logging.getLogger("feddifrc_core")
    core.setLevel(logging.INFO)
    for handler in FLOWER_LOGGER.handlers:
        if handler not in core.handlers:
            core.addHandler(handler)


_core_logs_to_flower()
app = ClientApp()


@app.query("node_info")
def node_info(msg: Message, context: Context) -> Message:
    node = NodeConfig.from_flower(context.node_config)
    info = ConfigRecord({"partition-id": node.partition_id, "num-partitions": node.num_partitions})
    return Message(RecordDict({"config": info}), reply_to=msg)


@app.query("projection_stats")
def projection_stats(msg: Message, context: Context) -> Message:
    cfg, node = _configs(msg, context)
    t0 = time.perf_counter()
    client = ClientSession.get(cfg, node)
    client.check_class_names(msg.content.config_records["config"].get("class-names"))
    stats = client.projection_stats()
    metrics = MetricRecord({"num-examples": client.num_examples,
                            "extract-seconds": time.perf_counter() - t0})
    return Message(RecordDict({"arrays": ArrayRecord(to_flower_arrays(stats)),
                               "metrics": metrics}), reply_to=msg)


@app.query("target_sum")
def target_sum(msg: Message, context: Context) -> Message:
    cfg, node = _configs(msg, context)
    client = ClientSession.get(cfg, node)
    client.check_class_names(msg.content.config_records["config"].get("class-names"))
    projection = from_flower_arrays(msg.content.array_records["projection"])
    sums = client.target_sum(projection)
    metrics = MetricRecord({"num-examples": client.num_examples})
    return Message(RecordDict({"arrays": ArrayRecord(to_flower_arrays(sums)),
                               "metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node = _configs(msg, context)
    config = msg.content.config_records["config"]
    server_round, run_name = cast(int, config["server-round"]), str(config["run-name"])
    run_key = str(config.get("run-key", ""))
    global_state = from_flower_arrays(msg.content.array_records["arrays"])
    bases = msg.content.array_records.get("projection")
    projection = from_flower_arrays(bases) if bases is not None else None

    client = ClientSession.get(cfg, node)
    client.check_class_names(config.get("class-names"))
    result = client.train(global_state, server_round, run_name, projection, run_key)

    metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
    return Message(RecordDict({"arrays": ArrayRecord(to_flower_arrays(result.state)),
                               "metrics": metrics}), reply_to=msg)


def _configs(msg: Message, context: Context) -> tuple[RunConfig, NodeConfig]:
    # The server sends its resolved run config: one source of truth, also in deployment.
    cfg = RunConfig.from_flower(dict(msg.content.config_records["run-config"]))
    return cfg, NodeConfig.from_flower(context.node_config)
