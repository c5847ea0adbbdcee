"""A ClientApp worker process killed in simulation costs the round it was in, not the run.

flwr 1.39's Ray backend returns a dead actor to its pool, so every later message it gets fails at
once (server_app/ray_workers.py explains the defect and the work-around). This test is also the
minimal reproduction: drop the `replace_dead_ray_workers()` call and the rounds after the kill
report failures too.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from server_app.ray_workers import replace_dead_ray_workers


@pytest.mark.slow
def test_a_killed_ray_worker_costs_only_its_round(tmp_path):
    from flwr.simulation import run_simulation

    marker = tmp_path / "killed-pid"
    client = ClientApp()

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        # Partition 0 in round 2 kills the worker process running it, as `kill -9` or the OOM
        # killer would.
        if int(context.node_config["partition-id"]) == 0 and \
                int(msg.content.config_records["c"]["round"]) == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return Message(RecordDict({"m": MetricRecord({"pid": os.getpid()})}), reply_to=msg)

    failures: list[int] = []
    pids: list[set[int]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr.app import ConfigRecord

        assert replace_dead_ray_workers()  # what the project's ServerApp does first
        # The simulation registers its nodes concurrently with this thread's start: wait for all
        # four (pytest's timeout bounds the wait), else the rounds would go to no node at all.
        while len(grid.get_node_ids()) < 4:
            time.sleep(0.05)
        nodes = sorted(grid.get_node_ids())
        for server_round in range(1, 6):
            messages = [Message(RecordDict({"c": ConfigRecord({"round": server_round})}),
                                dst_node_id=node, message_type="query") for node in nodes]
            # no timeout: the killed worker's message still gets its error reply (pytest's own
            # timeout bounds the test), so a slow machine cannot turn a round into a failure
            replies = list(grid.send_and_receive(messages, timeout=None))
            failures.append(sum(m.has_error() for m in replies))
            pids.append({int(m.content.metric_records["m"]["pid"]) for m in replies
                         if not m.has_error()})

    run_simulation(server_app=server, client_app=client, num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2}})

    killed = int(marker.read_text())
    assert failures == [0, 1, 0, 0, 0], failures  # only the round of the kill lost a reply
    assert killed in pids[0] and all(killed not in p for p in pids[2:])
    assert all(len(p) == 2 for p in pids[2:])  # still two workers: the dead one was replaced
