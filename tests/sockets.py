"""The listening TCP sockets of a set of processes, read from /proc (what `ss -ltnp` shows)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp{,6}


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _address(hex_address: str) -> str:
    """'0100007F:1F90' (IPv4) or a 32-digit IPv6 address -> '127.0.0.1:8080' / '[::1]:8080'."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # the kernel prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    return f"{ip}:{int(port, 16)}" if ip.version == 4 else f"[{ip}]:{int(port, 16)}"


def listening_sockets(pids: list[int]) -> list[tuple[int, str, str]]:
    """(pid, process name, local address) of every listening TCP socket the processes hold."""
    found = []
    for pid in pids:
        try:
            inodes = {os.readlink(fd)[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
                      if os.readlink(fd).startswith("socket:[")}
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            tables = [Path(f"/proc/{pid}/net/tcp").read_text(),
                      Path(f"/proc/{pid}/net/tcp6").read_text()]
        except OSError:  # ended meanwhile
            continue
        for table in tables:
            for line in table.splitlines()[1:]:
                fields = line.split()
                if fields[3] == _LISTEN and fields[9] in inodes:
                    found.append((pid, name, _address(fields[1])))
    return found


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ::ffff:127.x.x.x (IPv4 loopback on a dual-stack socket)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class ListenerSampler:
    """Collects the listening sockets of `pids()` (called anew each time) every `interval` s in
    a thread, while a run goes on: `with ListenerSampler(lambda: process_tree(p.pid)) as s: ...`,
    then `s.found` maps (process name, address) to the first PID seen with it."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.5) -> None:
        self.pids, self.interval = pids, interval
        self.found: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for pid, name, address in listening_sockets(self.pids()):
                self.found.setdefault((name, address), pid)

    def __enter__(self) -> ListenerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def exposed(self) -> list[str]:
        """'name address' of every socket seen that listens beyond loopback."""
        return [f"{name} {address}" for (name, address) in self.found if not is_loopback(address)]
