"""An in-process Flower Grid for fast tests: messages go straight to a ClientApp, no Ray.

It runs the real ServerApp logic and the real ClientApp handlers with real Message objects; only
transport is replaced (`send_and_receive` for training rounds, `push_messages`/`pull_messages` for
the set-up stages, which wait for progress). Every node's context holds `run_config`, as `flwr run`
gives each node the run's config (pass the server's: `cfg.to_flower()`). A ClientApp exception
becomes an error reply, as the simulation engine does; `fail` makes chosen partitions raise in
chosen rounds, `silent` makes them not reply (a timeout); `crash_after=k` raises in round k + 1
after the clients replied (a ServerApp killed mid-round, for resume tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import app as client_app
from feddifrc_core.algorithms.feddifrc import PROJECTION_STATS
from feddifrc_core.config import RunConfig
from server_app.app import run_server
from wire import protocol


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
        self._pending: dict[str, Message] = {}  # pushed messages' replies, until pulled

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

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Set-up stages push and pull: the replies are made at once and kept until pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            reply = self.deliver(msg)
            if reply is not None:
                self._pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def deliver(self, msg: Message, silent: bool = False, fail: bool = False) -> Message | None:
        """The ClientApp's reply to `msg` (an error reply when it raises; None when `silent`)."""
        if silent:
            return None  # no reply at all: what the server sees when a client times out
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            if fail:
                raise RuntimeError(f"injected failure of partition {context.node_config['partition-id']}")
            return self.client_app(msg, context)
        except Exception as err:  # the simulation engine turns these into error replies
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        is_train = any(m.metadata.message_type == "train" for m in messages)
        if is_train:
            self.train_rounds += 1
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            partition = int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])
            reply = self.deliver(
                msg, silent=is_train and partition in self.silent.get(self.train_rounds, set()),
                fail=is_train and partition in self.fail.get(self.train_rounds, set()))
            if reply is not None:
                replies.append(reply)
        if is_train and self.crash_after is not None and self.train_rounds > self.crash_after:
            # The worst moment: clients have trained (and stored state), the server has not.
            raise ServerKilled(f"server killed after the clients of round {self.train_rounds} replied")
        return replies


def run_loopback(cfg: RunConfig, num_nodes: int, **grid_options: Any) -> dict[str, Any]:
    """The real ServerApp run over a LoopbackGrid of the real ClientApp; every node's context holds
    `cfg`'s run config (as `flwr run` gives each node the run's config)."""
    grid = LoopbackGrid(client_app, num_nodes, cfg.to_flower(), **grid_options)
    return run_server(grid, cfg)


def straight_and_resumed(cfg: RunConfig, num_nodes: int) -> tuple[Path, Path]:
    """The run made straight (`straight`), and again (`killed`) with the server killed after the
    clients of round 2 replied, then resumed from round 1's checkpoint on new node ids (as after a
    SuperLink restart). Returns both run folders, to be compared."""
    run_loopback(cfg.replace(run_name="straight"), num_nodes)
    killed = cfg.replace(run_name="killed")
    try:
        run_loopback(killed, num_nodes, crash_after=1)
    except ServerKilled:
        pass
    else:
        raise AssertionError("the server was not killed in round 2")
    run_loopback(killed.replace(resume=True), num_nodes, node_id_base=5000)
    runs = cfg.resolved_output_dir()
    return runs / "straight", runs / "killed"


class FakeClock:
    """A clock that moves only when someone sleeps on it (no wall-clock time in tests)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class QueuedGrid(LoopbackGrid):
    """Messages run `slots` at a time in the order they were pushed, as Ray runs ClientApps when
    there are fewer parallel slots than clients; a projection-statistics query takes
    `seconds[partition]` (else `extract_seconds`) of `clock`, every other message no time. A
    client whose time is `math.inf` never replies. The replies are the real ClientApp's, and
    `send_and_receive` waits as Flower's grids do: until all replied or `timeout` has passed."""

    def __init__(self, client_app: ClientApp, num_nodes: int,
                 run_config: Mapping[str, Any] | None = None, *, slots: int, clock: FakeClock,
                 extract_seconds: float, seconds: dict[int, float] | None = None) -> None:
        super().__init__(client_app, num_nodes, run_config)
        self.slots, self.clock = slots, clock
        self.extract_seconds, self.seconds = extract_seconds, seconds or {}
        self._due: dict[str, tuple[float, Message]] = {}  # message id -> (done at, message)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        free = [self.clock.now] * self.slots  # when each slot is next free
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            partition = int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])
            cost = (self.seconds.get(partition, self.extract_seconds)
                    if _stage(msg) == PROJECTION_STATS else 0.0)
            slot = free.index(min(free))
            free[slot] += cost
            self._due[msg.metadata.message_id] = (free[slot], msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        done = [i for i in list(message_ids) if i in self._due and self._due[i][0] <= self.clock.now]
        replies = []
        for i in done:
            reply = self.deliver(self._due.pop(i)[1])
            if reply is not None:
                replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        pending = set(self.push_messages(messages))
        end = self.clock.now + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while pending and self.clock.now < end:
            arrived = self.pull_messages(pending)
            replies.extend(arrived)
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if pending:
                self.clock.sleep(1.0)
        return replies


def _stage(msg: Message) -> str:
    """The set-up stage a message asks for ("" for any other message)."""
    if msg.metadata.message_type != protocol.SETUP:
        return ""
    return str(msg.content.config_records[protocol.CONFIG][protocol.STAGE])
