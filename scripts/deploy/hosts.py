"""Separate hosts on one machine: a network namespace per SuperLink/SuperNode, joined by veth links.

Topology (all of it lives inside namespaces this module creates; the root namespace gets no
interface, so two deployments can coexist and nothing leaves the machine):

    fd<tag>-sl  (SuperLink host)   br0 10.77.0.1/24 --+-- veth -- fd<tag>-n1  eth0 10.77.0.11/24
                                                      +-- veth -- fd<tag>-n2  eth0 10.77.0.12/24
                                                      ...

Every SuperNode dials 10.77.0.1:<fleet port> over its own link; the operator's `flwr` CLI runs on
the SuperLink host (inside fd<tag>-sl) and talks to the Control API on its loopback.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass

SUBNET_PREFIX = "10.77.0"
SUPERLINK_IP = f"{SUBNET_PREFIX}.1"
_TIMEOUT_S = 15


class HostsError(RuntimeError):
    """Namespaces or links could not be made (not root, no iproute2, no veth support)."""


def node_ip(index: int) -> str:
    """Address of SuperNode `index` (1-based) on the deployment subnet."""
    if not 1 <= index <= 200:
        raise ValueError(f"node index must be in 1..200, got {index}")
    return f"{SUBNET_PREFIX}.{10 + index}"


@dataclass(frozen=True)
class Topology:
    tag: str
    superlink_ns: str
    node_ns: tuple[str, ...]

    @property
    def all_ns(self) -> tuple[str, ...]:
        return (self.superlink_ns, *self.node_ns)


def wrap(ns: str | None, argv: list[str]) -> list[str]:
    """The command line that runs `argv` inside namespace `ns` (unchanged when ns is None)."""
    return argv if ns is None else ["ip", "netns", "exec", ns, *argv]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT_S)
    if done.returncode != 0:
        raise HostsError(f"'ip {' '.join(args)}' failed: {done.stderr.strip()}")


def create_topology(num_nodes: int, tag: str | None = None) -> Topology:
    """Make the SuperLink host and `num_nodes` SuperNode hosts; undone on any failure."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if shutil.which("ip") is None:
        raise HostsError("iproute2 is missing: apt-get install -y iproute2 (as root)")
    tag = tag or secrets.token_hex(2)
    topo = Topology(
        tag=tag,
        superlink_ns=f"fd{tag}-sl",
        node_ns=tuple(f"fd{tag}-n{i}" for i in range(1, num_nodes + 1)),
    )
    made: list[str] = []
    try:
        # 1. SuperLink host with a bridge that every node link plugs into.
        _ip("netns", "add", topo.superlink_ns)
        made.append(topo.superlink_ns)
        _ip("-n", topo.superlink_ns, "link", "set", "lo", "up")
        _ip("-n", topo.superlink_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", topo.superlink_ns, "addr", "add", f"{SUPERLINK_IP}/24", "dev", "br0")
        _ip("-n", topo.superlink_ns, "link", "set", "br0", "up")
        # 2. One host per node, joined by a veth pair created directly inside the two namespaces.
        for i, ns in enumerate(topo.node_ns, start=1):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", f"sl{i}", "netns", topo.superlink_ns, "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", topo.superlink_ns, "link", "set", f"sl{i}", "master", "br0")
            _ip("-n", topo.superlink_ns, "link", "set", f"sl{i}", "up")
            _ip("-n", ns, "addr", "add", f"{node_ip(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
    except (HostsError, subprocess.TimeoutExpired) as err:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_TIMEOUT_S)
        raise HostsError(f"could not build the namespace topology: {err}") from err
    return topo


def destroy_topology(namespaces: list[str] | tuple[str, ...]) -> list[str]:
    """Delete the namespaces (their veth links go with them); returns those that failed."""
    failed = []
    for ns in namespaces:
        done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                              timeout=_TIMEOUT_S)
        if done.returncode != 0 and "No such file" not in done.stderr:
            failed.append(f"{ns}: {done.stderr.strip()}")
    return failed
