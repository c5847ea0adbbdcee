"""Simulation only: a ClientApp worker (Ray actor) that dies is replaced, not reused; the
simulation process ends when the process that launched it is gone.

The defect, in flwr 1.39 (`flwr/server/superlink/fleet/vce/backend/raybackend.py`,
`RayBackend.process_message`): when the actor running a message dies (SIGKILL, the kernel's or
Ray's out-of-memory killer, a segfault), `ray.get` raises `RayActorError` and the `except` branch
puts that same dead actor back into the `BasicActorPool` (`add_actor_back_to_pool`). Every later
message that the pool hands to it fails at once with "The actor died unexpectedly", so each later
round gets fewer replies and the run ends `finished:failed` although a single process died.
Reproduction and notes: docs/troubleshooting.md ("A ClientApp worker died"),
tests/test_ray_workers.py.

The work-around: wrap `process_message` so that after a `RayActorError` the dead actor (named by
the error's actor id) is taken out of the idle pool and a new actor with the same resources takes
its place. The message that was running is still reported as failed (its round counts it); the
next messages run on the new actor. The ServerApp runs in the same process as the Ray backend in
simulation, so installing the wrapper from the ServerApp is enough; deployment has no Ray.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from logging import ERROR, WARNING
from typing import Any

from flwr.common import log

from feddifrc_core.processes import descendants

_SIMULATION_ENGINE = "flwr.server.superlink.fleet.vce.vce_api"
_MARK = "_feddifrc_replaces_dead_actors"


def in_simulation() -> bool:
    """True in the process that runs Flower's simulation engine (the ServerApp's process)."""
    return _SIMULATION_ENGINE in sys.modules


def replace_dead_ray_workers() -> bool:
    """Install the wrapper once per process; True when this process runs Flower's simulation
    engine (whose thread imports the Ray backend lazily, possibly after this call)."""
    if not in_simulation():  # deployment: no Ray here
        return False
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend as backend_cls

    if getattr(backend_cls.process_message, _MARK, False):
        return True
    import ray

    original = backend_cls.process_message

    def process_message(self: Any, message: Any, context: Any) -> Any:
        try:
            return original(self, message, context)
        except ray.exceptions.RayActorError as err:
            _replace_actor(self.pool, getattr(err, "actor_id", None))
            raise

    setattr(process_message, _MARK, True)
    setattr(backend_cls, "process_message", process_message)  # noqa: B010 - a patch of a method
    return True


def _replace_actor(pool: Any, actor_id: str | None) -> None:
    """Swap the dead actor in the idle list for a fresh one (same resources, same options)."""
    import ray

    if pool is None or actor_id is None:
        return
    dead = [a for a in list(pool.pool) if a._actor_id.hex() == actor_id]
    for actor in dead:
        try:
            pool.pool.remove(actor)
        except ValueError:  # another worker thread took it meanwhile; its failure replaces it
            continue
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is what we expect
            pass
        pool.pool.append(pool.create_actor_fn())
        log(WARNING, "ClientApp worker %s died; replaced it with a new worker (the message it ran "
            "is reported as failed, later messages run on the new worker)", actor_id[:12])


def exit_with_parent(poll_seconds: float = 1.0) -> bool:
    """Simulation: end this process (ServerApp + Ray backend) when its parent is gone.

    Flower's `--parent-pid` monitor in `flwr-simulation` raises SIGINT when its SuperExec dies,
    but the process then waits for the simulation engine's worker threads and stays alive (seen
    with flwr 1.39: after `kill -9` of the launching script, `flwr-simulation` and Ray's raylet
    were still running a minute later). Ray's own processes share this process's fate, so ending
    it ends them too.
    """
    if not in_simulation():
        return False
    parent = os.getppid()
    if parent == 1:  # in-process simulation started by a daemon-like parent: nothing to watch
        return False

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        log(ERROR, "the process that started this simulation (PID %d) is gone; stopping the "
            "ServerApp and its ClientApp workers", parent)
        for pid in descendants(os.getpid()):  # Ray's raylet, agents and workers
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        os._exit(1)

    threading.Thread(target=watch, name="feddifrc-parent-watch", daemon=True).start()
    return True
