"""Reap the task processes a Flower SuperExec leaves behind.

flwr 1.39's SuperExec starts every ClientApp (and ServerApp) as `subprocess.Popen(...)` and drops
the handle. Python reaps a dropped child only when it starts the next one, so a finished task
process stays a zombie until the next launch: after a run stops, the surviving nodes' ClientApps
finish their work and then stay behind as zombies until the deployment is torn down (each one
holding a PID and its exit status). `bin/flower-superexec` runs Flower's own SuperExec with
`start_reaper()`, a daemon thread that waits for exited `flwr-*` children: only the task
processes, whose exit status Flower never reads (the SuperLink learns a task's outcome over its
API), never another child a caller may still wait for.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

# flwr-clientapp, flwr-serverapp, flwr-simulation: the process names of Flower's task processes
TASK_PREFIX = "flwr-"


def exited_task_children(parent: int) -> list[int]:
    """PIDs of `parent`'s children that have exited (zombies) and are Flower task processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, tail = stat.read_text().rpartition(")")
        except OSError:  # gone meanwhile
            continue
        name = head.partition("(")[2]
        state, ppid = tail.split()[:2]
        if state == "Z" and int(ppid) == parent and name.startswith(TASK_PREFIX):
            found.append(int(stat.parent.name))
    return found


def reap_exited_tasks() -> list[int]:
    """Wait for this process's exited task children; the PIDs reaped."""
    reaped = []
    for pid in exited_task_children(os.getpid()):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else meanwhile
            continue
        if done:
            reaped.append(pid)
    return reaped


def start_reaper(interval: float = 2.0) -> threading.Thread:
    """A daemon thread that reaps exited task children every `interval` seconds."""
    def loop() -> None:
        while True:
            reap_exited_tasks()
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="task-reaper", daemon=True)
    thread.start()
    return thread
