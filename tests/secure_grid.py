"""The in-process grid of tests/loopback_grid.py, for the secure-aggregation tests.

Differences, each for a reason:
- every message crosses as Flower's protobuf bytes both ways (as over gRPC): the server and the
  clients never share an object (Flower's mod edits the records it receives), and the bytes
  each way are counted per partition;
- everything that reaches the server is recorded (`replies`: (SecAgg+ stage, Message)), so a
  test can look at exactly what the ServerApp holds;
- `kill={partition: stage}`: that node answers nothing from that SecAgg+ stage on (a client
  process killed mid-protocol); `revive()` brings the killed nodes back.
Node discovery and the set-up stages' push/pull go through `deliver` too: everything is recorded.
ClientApp mods run as in Flower (ClientApp.__call__ applies them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import message_from_proto, message_to_proto

from tests.loopback_grid import LoopbackGrid


def secagg_stage(msg: Message) -> str:
    """The SecAgg+ stage a server message starts ("setup", ... "unmask"), or "" for others."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return str(configs.get("stage", "")) if configs is not None else ""


def _wire(msg: Message) -> tuple[Message, int]:
    data = message_to_proto(msg).SerializeToString()
    proto = type(message_to_proto(msg))()
    proto.ParseFromString(data)
    return message_from_proto(proto), len(data)


class SecureLoopbackGrid(LoopbackGrid):
    def __init__(self, client_app: ClientApp, num_nodes: int,
                 run_config: Mapping[str, Any] | None = None, *,
                 kill: dict[int, str] | None = None, node_id_base: int = 1000) -> None:
        super().__init__(client_app, num_nodes, run_config, node_id_base=node_id_base)
        self.kill = dict(kill or {})
        self.dead: set[int] = set()
        self.replies: list[tuple[str, Message]] = []
        self.bytes_down: dict[int, int] = defaultdict(int)  # server -> client, per partition
        self.bytes_up: dict[int, int] = defaultdict(int)

    def partition(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def revive(self) -> None:
        self.dead.clear()
        self.kill.clear()

    def deliver(self, msg: Message, silent: bool = False, fail: bool = False) -> Message | None:
        """Both ways as protobuf bytes, counted and recorded; None from a killed node.

        `kill[partition]` is a SecAgg+ stage ("collect_masked_vectors"), or a secure sum's
        group and stage ("round-2.sum/collect_masked_vectors": the server's sums name the
        messages' group)."""
        stage = secagg_stage(msg)
        node = msg.metadata.dst_node_id
        part = self.partition(node)
        if self.kill.get(part) in (stage, f"{msg.metadata.group_id}/{stage}"):
            self.dead.add(part)
        if part in self.dead:
            return None  # no reply at all, as from a killed process
        delivered, size = _wire(msg)
        self.bytes_down[part] += size
        try:
            reply = self.client_app(delivered, self.contexts[node])
        except Exception as err:  # the simulation engine turns these into error replies
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                            reply_to=delivered)
        received, size = _wire(reply)
        self.bytes_up[part] += size
        self.replies.append((stage, received))
        return received

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            reply = self.deliver(msg)
            if reply is not None:
                replies.append(reply)
        return replies
