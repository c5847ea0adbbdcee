#!/usr/bin/env python3
"""Keep a local simulation's Ray on the loopback interface.

Ray has no authentication: whoever reaches its ports (GCS, raylet, every worker's gRPC server)
can run code as the user. Ray 2.55.1, which flwr 1.39 pins, binds those servers to every
interface whatever its node IP: `ray.init(_node_ip_address="127.0.0.1")` still listened on
`*:PORT` here, and its C++ servers have no bind setting. Two settings, given to the processes of a
simulation only, keep it on 127.0.0.1:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray's switch for a one-machine Ray; its node IP becomes
  the loopback address, so its parts dial each other there;
- `LD_PRELOAD` of `ray_loopback.c`: a bind() that turns the wildcard address into the loopback
  address (nothing else), built once with the C compiler into the environment's lib/ folder.
The dashboard stays off (Flower's Ray backend starts Ray with `include_dashboard=False`).

    python scripts/ray_loopback.py    # builds the library (make venv does), prints its path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
LIBRARY = Path(sys.prefix) / "lib" / "feddifrc-ray-loopback.so"  # .venv/lib/ under make venv


def build(target: Path = LIBRARY) -> Path | None:
    """The library, compiled from SOURCE when missing or older; None without a C compiler or
    a writable lib/ folder (the caller warns); RuntimeError when the compiler fails."""
    if target.is_file() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not os.access(_existing_parent(target), os.W_OK):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SOURCE), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {target} from {SOURCE} failed: {done.stderr.strip()}")
    os.replace(tmp, target)  # atomic: concurrent runs never load a half-written library
    return target


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def loopback_env(env: Mapping[str, str], library: Path | None) -> dict[str, str]:
    """`env` plus the settings that keep Ray on loopback (`library`: the built bind() shim)."""
    out = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if library is not None:
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != str(library)]
        out["LD_PRELOAD"] = ":".join([str(library), *preload])
    return out


WARNING = ("WARNING: could not build the loopback shim (scripts/ray_loopback.c: no C compiler, or "
           f"{LIBRARY.parent} is not writable): Ray will listen on every network interface during "
           "this simulation. Install a C compiler (e.g. apt-get install gcc) and run `make venv` "
           "(docs/running.md, \"Network exposure\").")

if __name__ == "__main__":
    built = build()
    if built is None:
        sys.exit(WARNING)
    print(built)
