"""Helpers for the deployment tests: the probe Flower app, namespace checks, port picking.

The probe app (scripts/deploy/probe_app) has the shape of FedDifRC's apps (a ServerApp driving
FedAvg, a ClientApp per message) but no torch, so infrastructure tests (auth refusal, crash
reporting, compose) stay fast and independent of the model code. The end-to-end deployment test
runs the real app from the repository root.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
DEPLOY_SCRIPT = REPO / "scripts" / "deploy" / "deploy.py"

PROBE_APP = REPO / "scripts" / "deploy" / "probe_app"


def write_probe_app(folder: Path) -> Path:
    """A copy of the probe app in `folder` (the argument of `flwr run`)."""
    shutil.copytree(PROBE_APP, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def load_deploy_module() -> ModuleType:
    """Import scripts/deploy/deploy.py (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("feddifrc_deploy", DEPLOY_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["feddifrc_deploy"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests avoid the shared defaults 8000/9092)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def netns_unavailable_reason() -> str | None:
    """None when network namespaces with veth links can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    name = f"fdprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip() or made.returncode}"
    try:
        veth = subprocess.run(
            ["ip", "-n", name, "link", "add", "fdp0", "type", "veth", "peer", "name", "fdp1"],
            capture_output=True, text=True, timeout=10,
        )
        if veth.returncode != 0:
            return f"veth pairs cannot be made: {veth.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


def missing_tls_tools() -> str | None:
    """Why certificates/keys cannot be made here (None when openssl and ssh-keygen exist)."""
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} missing (apt-get install openssl openssh-client)"


def established_tcp(port: int) -> list[tuple[str, str, int]]:
    """(local, peer, pid) of established TCP connections to `port`, from /proc (no `ss` needed)."""
    sockets: dict[str, tuple[str, str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            local, peer, state, inode = cols[1], cols[2], cols[3], cols[9]
            if state == "01" and int(peer.rsplit(":", 1)[1], 16) == port:  # 01 = ESTABLISHED
                sockets[inode] = (local, peer)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        for link in links:
            inode = link[8:-1] if link.startswith("socket:[") else ""
            if inode in sockets:
                found.append((*sockets[inode], int(proc.name)))
    return found
