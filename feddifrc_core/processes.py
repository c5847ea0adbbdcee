"""The process tree below a PID (Linux /proc): what a launcher or a ServerApp must stop.

A leaf module (standard library only): `scripts/run_simulation.py` and the ServerApp's
parent watch both use it.
"""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; Linux). Launchers need the whole tree: the
    SuperLink starts its executor (and that one the ServerApp and Ray) in new sessions, so
    killing a process group would orphan them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
