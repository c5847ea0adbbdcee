"""Running one planned run of the accuracy benchmark: a whole Flower simulation in a child process
(the in-process engine, or `flwr run` through scripts/run_simulation.py), with the machine's load
sampled beside it. A run that was interrupted continues from its last checkpoint (`resume`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import inprocess
from benchmarks.accuracy_plan import RunSpec
from benchmarks.accuracy_store import LOAD_FILE, write_json
from feddifrc_core.provenance import git_revision
from scripts.run_config import to_toml

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("inprocess", "flwr-run")


@dataclass(frozen=True)
class Launcher:
    """How every run of one benchmark command is started."""

    engine: str = "inprocess"  # inprocess: run_simulation in a child; flwr-run: run_simulation.py
    clients: int = 10
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    run_timeout: float = 4 * 3600.0  # seconds per run


def launch(spec: RunSpec, out: Path, how: Launcher) -> Path:
    """Run one simulation in a child process; return its run folder. Raises on failure."""
    runs_dir = out / "runs"
    folder = runs_dir / spec.run_name
    has_checkpoint = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    config = {**spec.overrides, "output-dir": str(runs_dir), "run-name": spec.run_name,
              "cache-dir": str(out / "cache"), "resume": has_checkpoint}
    config_path = out / "pending" / f"{spec.run_name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2))
    log_path = out / "logs" / f"{spec.run_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = inprocess.loopback_ray_env({
        **os.environ, "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
        "FEDDIFRC_GIT_SHA": os.environ.get("FEDDIFRC_GIT_SHA") or git_revision()})
    if how.engine == "inprocess":
        cmd = inprocess.command(config_path, how.clients, how.cpus_per_client,
                                how.gpus_per_client)
    else:  # flwr-run: the `flwr run` path with its own SuperLink (scripts/run_simulation.py)
        toml_path = config_path.with_suffix(".toml")
        toml_path.write_text(to_toml(config))
        cmd = [sys.executable, str(ROOT / "scripts" / "run_simulation.py"),
               "--supernodes", str(how.clients), "--cpus-per-client", str(how.cpus_per_client),
               "--gpus-per-client", str(how.gpus_per_client), "-c", str(toml_path)]
    print(f"[{time.strftime('%H:%M:%S')}] {spec.key}: running ({'resuming' if has_checkpoint else 'new'}"
          f", log {log_path.relative_to(out)})", flush=True)
    with open(log_path, "a", encoding="utf-8") as log, LoadSampler() as load:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=how.run_timeout)
    if proc.returncode != 0 or not (folder / "summary.json").is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{spec.key} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                           f"{tail}")
    config_path.unlink(missing_ok=True)
    write_json(folder / LOAD_FILE, load.summary())
    return folder


class LoadSampler:
    """The machine's 1-minute load average, sampled while a run is going on.

    A run's timings (and, on a contended machine, its round timeouts) depend on what else ran
    beside it: every record carries the load before the run and its mean and max during it.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.samples = every_s, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        during = self.samples[1:] or self.samples
        return {"cpus": os.cpu_count(), "load1-before": round(self.samples[0], 2),
                "load1-mean": round(sum(during) / len(during), 2),
                "load1-max": round(max(during), 2), "samples": len(during),
                "sampled-every-s": self.every_s}
