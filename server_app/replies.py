"""What the server makes of a stage's replies: who answered, who failed and why, and whether enough
clients answered for the run to go on."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from wire import protocol


class RoundFailedError(RuntimeError):
    """Fewer than `min-train-nodes` clients replied to a stage; the run cannot go on."""


@dataclass
class RoundReport:
    """What happened to the messages of one stage (for logs and metrics)."""

    sampled: list[int] = field(default_factory=list)  # partition ids
    succeeded: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "partition P (node N): reason"


def ordered_ok(replies: list[Message], partitions: Mapping[int, int]) -> list[Message]:
    """The successful replies of known nodes, in partition order (float sums depend on order)."""
    ok = [m for m in replies if not m.has_error() and m.metadata.src_node_id in partitions]
    return sorted(ok, key=lambda m: partitions[m.metadata.src_node_id])


def succeeded_partitions(ok: list[Message], partitions: Mapping[int, int]) -> list[int]:
    """The partitions whose uploads the successful replies hold (a stage reply holds several)."""
    return sorted(partitions[n] for m in ok for n in protocol.answered_nodes(m))


def describe_failures(replies: list[Message], sent: list[Message], partitions: Mapping[int, int],
                      waited: str) -> list[str]:
    """One entry per failed node: its error, or no reply within `waited` (the stage's deadline,
    as `Wait.describe` says it); logged grouped.

    A reply is matched to the node it was sent to by its reply-to id: when a node is gone, the
    SuperLink answers in its place (source node 1), which is the same node's failure, not a
    second one. A reply that stands for several nodes (secure aggregation's, `protocol.sum_reply`)
    answers for all of them and reports the reason of each node it lost.
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
        else:  # a stage's one reply (secure aggregation) names its nodes and those it lost
            answered.update(protocol.answered_nodes(msg))
            lost = protocol.reported_failures(msg)
            failed.update(lost)
            answered.update(lost)
    for node in set(node_of.values()) - answered:
        failed[node] = f"no reply within {waited}"
    order = sorted(failed, key=lambda n: (partitions.get(n, -1), n))
    failures = [f"partition {partitions.get(n, '?')} (node {n}): {failed[n]}" for n in order]
    for line in group_failures(failures):
        log(WARNING, "client failure: %s", line)
    return failures


def require(stage: str, ok: int, expected: int, min_nodes: int, failures: list[str]) -> None:
    """RoundFailedError unless `ok` replies reach `min_nodes` (or all that were expected)."""
    if ok >= min(min_nodes, expected) and ok > 0:
        return
    raise RoundFailedError(
        f"{stage}: only {ok} of {expected} clients replied successfully, min-train-nodes is "
        f"{min_nodes}. Failures: {'; '.join(group_failures(failures)) or 'none reported'}. "
        "Fix the client error above, raise round-timeout (training) or setup-timeout "
        "(set-up stages), or lower min-train-nodes."
    )


def group_failures(failures: list[str]) -> list[str]:
    """'partition P (node N): reason' lines, one per distinct reason with the clients it hit:
    a set-up error that every client raises (too little data, a model that does not load) is
    reported once, with the number of clients, instead of once per client."""
    by_reason: dict[str, list[str]] = {}
    for line in failures:
        who, _, reason = line.partition(": ")
        by_reason.setdefault(reason, []).append(who)
    out = []
    for reason, names in by_reason.items():
        if len(names) == 1:
            out.append(f"{names[0]}: {reason}")
        else:
            parts = ", ".join(w.split(" (")[0].removeprefix("partition ") for w in names)
            out.append(f"{len(names)} clients (partitions {parts}): {reason}")
    return out


def simulated_nodes(grid: Grid, timeout: float = 60.0) -> list[int]:
    """The simulation engine registers all its nodes in one go, in a thread that may start just
    after the ServerApp: wait for the first ones, then until the count stops changing."""
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        now = sorted(grid.get_node_ids())
        if now and now == nodes:
            return now
        nodes = now
        time.sleep(0.5)
    return nodes


def wait_for_nodes(grid: Grid, count: int, poll: float = 1.0) -> list[int]:
    """Every connected node once at least `count` are (deployment: nodes join over time)."""
    while len(nodes := sorted(grid.get_node_ids())) < count:
        log(INFO, "waiting for nodes to connect: %d connected, %d needed", len(nodes), count)
        time.sleep(poll)
    return nodes
