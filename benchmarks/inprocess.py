"""One Flower simulation of the project's apps in a child process: the benchmarks' launcher.

    python -m benchmarks.inprocess CONFIG.json --clients 10 [--cpus-per-client 2]
        [--gpus-per-client 0] [--ray-cpus N]

The child runs the project's ServerApp and ClientApp with `flwr.simulation.run_simulation` (Ray)
in its own process, so a benchmark's parent can time it, sample its memory and survive its
crash. The run config starts where `flwr run` starts, pyproject `[tool.flwr.app.config]`,
updated with the JSON file's keys; both apps get the same overrides (in-process, Flower gives the
apps no run config of their own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.ray_loopback import WARNING, build, loopback_env
from scripts.run_config import app_defaults


def command(config_path: Path, clients: int, cpus_per_client: float,
            gpus_per_client: float = 0.0, ray_cpus: int | None = None) -> list[str]:
    """The child's command line (run it with the repository as the working directory)."""
    cmd = [sys.executable, "-m", "benchmarks.inprocess", str(config_path), "--clients",
           str(clients), "--cpus-per-client", str(cpus_per_client), "--gpus-per-client",
           str(gpus_per_client)]
    return cmd + (["--ray-cpus", str(ray_cpus)] if ray_cpus else [])


def loopback_ray_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the settings that keep the child's Ray on 127.0.0.1 (scripts/ray_loopback.py);
    a warning on stderr where the bind() shim cannot be built."""
    library = build()
    if library is None:
        print(WARNING, file=sys.stderr)
    return loopback_env(env, library)


def simulate(overrides: Mapping[str, Any], clients: int, cpus_per_client: float,
             gpus_per_client: float = 0.0, ray_cpus: int | None = None) -> None:
    """The whole run, here: `clients` SuperNodes, Ray sized to `ray_cpus` (default all cores)."""
    from flwr.simulation import run_simulation

    from client_app.app import make_client_app
    from server_app.app import make_server_app

    warnings.filterwarnings("ignore", category=FutureWarning)
    run_config = {**app_defaults(), **overrides}
    total = ray_cpus or os.cpu_count() or 1
    backend: dict[str, dict[str, Any]] = {
        "client_resources": {"num_cpus": min(cpus_per_client, total), "num_gpus": gpus_per_client},
        "init_args": {"num_cpus": total, "include_dashboard": False}}
    run_simulation(make_server_app(run_config), make_client_app(run_config),
                   num_supernodes=clients, backend_config=backend)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="JSON file of run-config overrides")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--ray-cpus", type=int, default=None, help="Ray's CPUs (default: all cores)")
    args = p.parse_args(argv)
    simulate(json.loads(args.config.read_text()), args.clients, args.cpus_per_client,
             args.gpus_per_client, args.ray_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
