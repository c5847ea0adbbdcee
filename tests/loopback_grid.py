"""An in-process Flower Grid for fast tests: messages go straight to a ClientApp, no Ray.

It runs the real ServerApp logic and the real ClientApp handlers with real Message objects; only
transport is replaced. Every node's context holds `run_config`, as `flwr run` gives each node the
run's config (pass the server's: `cfg.to_flower()`). A ClientApp exception becomes an error reply, as the simulation engine
does; `fail` makes chosen partitions raise in chosen rounds, `silent` makes them not reply (a
timeout); `crash_after=k` raises in round k + 1
after the clients replied (a ServerApp killed mid-round, for resume tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as client_app
from feddifrc_core.config import RunConfig
from server_app.app import run_server


class ServerKilled(RuntimeError):
    """Stands for a ServerApp process killed mid-run."""


class LoopbackGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int,
                 run_config: Mapping[str, Any] | None = None, *,
                 node_id_base: int = 1000, fail: dict[int, set[int]] | None = None,
                 silent: dict[int, set[int]] | None = None,
                 crash_after: int | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        # Node ids differ from partition ids on purpose (as in Flower, where they are random).
        self.contexts = {
            node_id_base + 7 * k: Context(run_id=1, node_id=node_id_base + 7 * k,
                                          node_config={"partition-id": k, "num-partitions": num_nodes},
                                          state=RecordDict(), run_config=dict(run_config or {}))
            for k in range(num_nodes)
        }
        self.fail = fail or {}
        self.silent = silent or {}
        self.crash_after = crash_after
        self.train_rounds = 0
        self._ids = itertools.count()

    # Grid's abstract API; only what the ServerApp uses does real work.
    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated API
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        is_train = any(m.metadata.message_type == "train" for m in messages)
        if is_train:
            self.train_rounds += 1
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            context = self.contexts[msg.metadata.dst_node_id]
            partition = int(context.node_config["partition-id"])
            if is_train and partition in self.silent.get(self.train_rounds, set()):
                continue  # no reply at all: what the server sees when a client times out
            try:
                if is_train and partition in self.fail.get(self.train_rounds, set()):
                    raise RuntimeError(f"injected failure of partition {partition}")
                replies.append(self.client_app(msg, context))
            except Exception as err:  # the simulation engine turns these into error replies
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                                       reply_to=msg))
        if is_train and self.crash_after is not None and self.train_rounds > self.crash_after:
            # The worst moment: clients have trained (and stored state), the server has not.
            raise ServerKilled(f"server killed after the clients of round {self.train_rounds} replied")
        return replies


def run_loopback(cfg: RunConfig, num_nodes: int, **grid_options: Any) -> dict[str, Any]:
    """The real ServerApp run over a LoopbackGrid of the real ClientApp; every node's context holds
    `cfg`'s run config (as `flwr run` gives each node the run's config)."""
    grid = LoopbackGrid(client_app, num_nodes, cfg.to_flower(), **grid_options)
    return run_server(grid, cfg)
