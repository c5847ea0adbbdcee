"""ClientApp: one node of the federation. Handlers unpack the Message, call feddifrc_core, reply.

- query.node_info -> this node's partition id (lets the server sample reproducibly)
- query.setup     -> this client's upload for a set-up stage of the run's algorithm (FedDifRC:
                     extract + cache the diffusion representations, reply only the sufficient
                     statistics for the shared basis; then the sums of its targets)
- train           -> local training with the run's algorithm; reply model + metrics (with
                     client-side differential privacy, clipped by Flower's mod: dp_clipping.py)
With secure aggregation every answer leaves as a share of a SecAgg+ secure sum instead
(client_app/secure_upload.py): the server learns only the sums.
Raw data and raw features never leave the client. The run config comes from this node's Flower
context, parsed once per run and process; every request names the server's config digest, and a
node whose config differs refuses to work.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.logger import FLOWER_LOGGER

from client_app.dp_clipping import clip_for_secure_sum, make_clipping_mod
from client_app.secure_upload import respond, secure_upload_mod
from feddifrc_core.algorithms import UpdateInfo
from feddifrc_core.caches import ProcessCache
from feddifrc_core.client_session import ClientSession
from feddifrc_core.config import NodeConfig, RunConfig
from feddifrc_core.progress import route_core_logs
from wire import protocol

_configs = ProcessCache(max_items=8)  # parsed run and node configs, by their raw values


def make_client_app(overrides: Mapping[str, Any] | None = None,
                    mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp whose run config is `context.run_config` updated with `overrides`, with
    Flower mods `mods` around its handlers (outermost first).

    `flwr run` fills run_config from pyproject + `--run-config`, on every node alike;
    `flwr.simulation.run_simulation` leaves it empty, so in-process runs give both apps the
    same `overrides`.
    """
    route_core_logs(FLOWER_LOGGER.handlers)  # extraction progress, in the run's log
    app = ClientApp(mods=list(mods))

    def run_config(context: Context) -> RunConfig:
        return _run_config({**context.run_config, **(overrides or {})})

    def session(context: Context, request: protocol.Request) -> ClientSession:
        return _session(run_config(context), context, request)

    @app.query("node_info")
    def node_info(msg: Message, context: Context) -> Message:
        node = _node(context)
        return protocol.node_info_reply(msg, node.partition_id, node.num_partitions)

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        request = protocol.read_request(msg)
        return respond(msg, context, lambda: _setup_answer(session(context, request), request))

    # SecAgg+ (secure-aggregation = "secaggplus") acts on train messages only: a set-up stage then
    # comes as one too, its stage named in the config. `respond` replies in plaintext, or with
    # this client's share of the stage's secure sum when the message asks for one.
    # With client-side differential privacy, Flower's clipping mod clips the model first.
    @app.train(mods=[secure_upload_mod, make_clipping_mod(run_config)])
    def train(msg: Message, context: Context) -> Message:
        request = protocol.read_request(msg)

        def compute() -> protocol.Answer:
            client = session(context, request)
            if request.stage:
                return _setup_answer(client, request)
            # with client-side DP and SecAgg+: clipped by Flower's mod before it is encoded
            return clip_for_secure_sum(msg, context, run_config(context),
                                       _train_answer(client, request))

        return respond(msg, context, compute)

    return app


def _setup_answer(client: ClientSession, request: protocol.Request) -> protocol.Answer:
    t0 = time.perf_counter()
    arrays = client.answer(request.stage, request.payload)
    return protocol.Answer(arrays, {protocol.NUM_EXAMPLES: client.num_examples,
                                    protocol.SETUP_SECONDS: time.perf_counter() - t0})


def _train_answer(client: ClientSession, request: protocol.Request) -> protocol.Answer:
    update = client.train(request.arrays, UpdateInfo(
        request.server_round, request.header.run_name, request.header.run_key, request.payload))
    return protocol.Answer(update.state, {protocol.NUM_EXAMPLES: update.num_examples,
                                          **update.metrics}, update.uploads)


# Module-level (not in the handlers' closure): Ray pickles the ClientApp, but not these caches.
def _run_config(run: Mapping[str, Any]) -> RunConfig:
    return _configs.get(("run", *sorted(run.items())), lambda: RunConfig.from_flower(run))


def _session(cfg: RunConfig, context: Context, request: protocol.Request) -> ClientSession:
    """This node's client of the run, once its run config matches the server's."""
    if cfg.digest() != request.header.config_digest:
        raise ValueError(
            f"this node's run config (digest {cfg.digest()}) differs from the server's "
            f"({request.header.config_digest}): both apps must run the same app and "
            "--run-config (in-process: give make_client_app the server's overrides)")
    client = ClientSession.get(cfg, _node(context))
    client.check_class_names(request.header.class_names or None)
    return client


def _node(context: Context) -> NodeConfig:
    raw = dict(context.node_config)
    return _configs.get(("node", *sorted(raw.items())), lambda: NodeConfig.from_flower(raw))


app = make_client_app()
