"""The process tree below a PID (Linux /proc): what a launcher or a ServerApp must stop.

A leaf module (standard library only): the ServerApp's parent watch, `scripts/run_simulation.py`,
the deployment scripts, the scale benchmark's memory sampler and the tests use it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; Linux). Launchers need the whole tree: the
    SuperLink starts its executor (and that one the ServerApp and Ray) in new sessions, so
    killing a process group would orphan them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    if pid <= 0:
        return False
    try:  # the command name may hold spaces and parentheses: the state follows the last ')'
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(pids: list[int], grace: float = 20.0,
              reap: Callable[[], object] | None = None) -> list[int]:
    """SIGTERM every pid, wait up to `grace` s, then SIGKILL what is left (and wait again).
    `reap` is called while waiting (a parent polls its own child so that it does not stay a
    zombie). Returns the pids still alive at the end (none, normally)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.3)
            if reap is not None:
                reap()
        pids = [pid for pid in pids if alive(pid)]
        if not pids:
            break
    return pids
