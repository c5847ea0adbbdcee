"""The deployment's processes and its saved state: one Component per long-running process
(SuperLink, SuperNode, SuperExec), started in its own session and stopped by process group; the
Deployment `up` decided, saved as JSON for the later commands; the script's exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.processes import alive
from scripts.deploy import hosts

REPO = Path(__file__).resolve().parents[2]

# Exit codes of this script (Flower's own codes, e.g. 305 for a refused SuperNode, pass through).
EXIT_USAGE = 2
EXIT_START_FAILED = 3
EXIT_COMPONENT_DIED = 4
EXIT_RUN_FAILED = 5
EXIT_TIMEOUT = 6
EXIT_SUPERLINK_UNREACHABLE = 7


class DeployError(RuntimeError):
    """A deployment step failed; `component` names the part that failed, `code` the exit code."""

    def __init__(self, component: str, message: str, code: int) -> None:
        super().__init__(f"{component}: {message}")
        self.component = component
        self.code = code


@dataclass
class Component:
    """One long-running process of the deployment (a SuperLink, SuperNode or SuperExec)."""

    name: str  # "superlink", "sn1", "sn1-superexec", ...
    argv: list[str]
    log: str
    netns: str | None = None
    pid: int = 0
    index: int = 0  # SuperNode index (1-based); 0 for the SuperLink side

    @property
    def label(self) -> str:
        """How messages name it: 'SuperLink', 'SuperNode sn2', 'SuperExec sn2-superexec'."""
        if self.name == "superlink":
            return "SuperLink"
        return ("SuperExec " if self.name.endswith("superexec") else "SuperNode ") + self.name


@dataclass
class Deployment:
    """Everything `up` decided; saved as JSON so later commands (run, down) find it."""

    state_dir: str
    flwr_home: str
    num_nodes: int
    secure: bool
    hosts: str  # "loopback" | "netns"
    isolation: str  # "subprocess" | "process"
    fleet_address: str  # what SuperNodes dial
    control_address: str  # what the `flwr` CLI dials (from cli_netns)
    certs_dir: str
    node_config: dict[str, str] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    cli_netns: str | None = None
    components: list[Component] = field(default_factory=list)

    def save(self) -> None:
        # atomic: a kill never leaves a half-written state file
        atomic_write_text(Path(self.state_dir) / "deployment.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> Deployment:
        path = state_dir / "deployment.json"
        if not path.is_file():
            raise DeployError("deployment", f"no deployment in {state_dir}; start one with `up`",
                              EXIT_USAGE)
        data = json.loads(path.read_text())
        data["components"] = [Component(**c) for c in data["components"]]
        return cls(**data)

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise DeployError(name, f"no such component (have {[c.name for c in self.components]})",
                          EXIT_USAGE)


# ----------------------------------------------------------------------------------------------
# Processes


pid_alive = alive  # True while `pid` runs (a zombie counts as dead)


_CHILDREN: dict[int, subprocess.Popen] = {}


def child_process(pid: int) -> subprocess.Popen | None:
    """The Popen of a process this Python process started with `start` (None if it did not)."""
    return _CHILDREN.get(pid)


def exit_code(pid: int) -> int | None:
    """Exit status of a process this Python process started (None when unknown or running)."""
    proc = _CHILDREN.get(pid)
    return None if proc is None else proc.poll()


def start(comp: Component, env: dict[str, str]) -> Component:
    """Start `comp` in its own session (so stop() can end its children too); logs to comp.log."""
    Path(comp.log).parent.mkdir(parents=True, exist_ok=True)
    with open(comp.log, "ab") as log:
        proc = subprocess.Popen(hosts.wrap(comp.netns, comp.argv), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    comp.pid = proc.pid
    return comp


def stop(comp: Component, timeout: float = 10.0) -> None:
    """SIGTERM the component's process group, then SIGKILL what is left after `timeout`."""
    if comp.pid <= 0:
        return
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(comp.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc = _CHILDREN.get(comp.pid)
            if proc is not None:
                proc.poll()
            if not pid_alive(comp.pid) and not _group_alive(comp.pid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies in the group still answer signal 0: look at the real states.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def log_tail(comp: Component, lines: int = 15) -> str:
    try:
        text = Path(comp.log).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def flower_exit_code(comp: Component) -> int | None:
    """Flower's own exit code ("Exit Code: 305") from the log; the process itself exits 1."""
    found = re.findall(r"Exit Code: (\d+)", log_tail(comp, 60))
    return int(found[-1]) if found else None


def describe_death(comp: Component) -> str:
    code = exit_code(comp.pid)
    how = f"exited with code {code}" if code is not None else "is no longer running"
    if (flower_code := flower_exit_code(comp)) is not None:
        how += f" (Flower exit code {flower_code})"
    return f"{comp.label} (pid {comp.pid}) {how}; last lines of {comp.log}:\n{log_tail(comp)}"


def wait_for_log(comp: Component, needle: str, timeout: float, since: int = 0) -> None:
    """Wait until `needle` appears in comp.log after byte `since`; fail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(comp.log, "rb") as fh:
                fh.seek(since)
                if needle.encode() in fh.read():
                    return
        except FileNotFoundError:
            pass
        if not pid_alive(comp.pid):
            raise DeployError(comp.label, describe_death(comp), EXIT_START_FAILED)
        time.sleep(0.2)
    raise DeployError(comp.label, f"not ready after {timeout:.0f} s (waited for '{needle}'); "
                      f"last lines of {comp.log}:\n{log_tail(comp)}", EXIT_START_FAILED)
