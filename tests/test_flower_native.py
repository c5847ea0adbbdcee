"""Flower's own commands in the project's activated environment, and the convenience script's
processes: they end with it, however it ends, and it cleans what it made.

These start real SuperLinks: run them (and the whole suite) under the machine-wide lock
(`flock /tmp/feddifrc-heavy.lock make test`) on a shared machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feddifrc_core.processes import alive, descendants
from scripts.run_config import to_toml
from tests.sockets import ListenerSampler, process_tree

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_simulation.py"
TINY = {"num-rounds": 1, "dataset": "digits", "model": "small-cnn", "model-width": 8,
        "diffusion-model": "tiny-sd", "train-samples": 150, "test-samples": 60,
        "validation-samples": 60, "local-epochs": 1, "fraction-train": 1.0, "partition": "iid", "data-subset": "all", "eval-batch-size": 256,
        "extraction-batch-size": 8}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """pid and every process below it."""
    return [pid, *descendants(pid)]


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_our_superlink(cmdline: Path, home: Path) -> bool:
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(a.endswith("flower-superlink") for a in args) and any(str(home) in a for a in args)


@pytest.mark.slow
def test_plain_flwr_run_in_the_activated_environment(tmp_path):
    """`source .venv/bin/activate && flwr run . --stream` in a fresh FLWR_HOME: the local SuperLink
    that flwr starts installs nothing (no `uv sync` per run), Ray listens on loopback only, the
    run completes; a bad setting ends a second run with one line, in `flwr log` and `flwr ls`."""
    home = tmp_path / "flwr-home"
    conf = tmp_path / "tiny.toml"
    conf.write_text(to_toml({**TINY, "output-dir": str(tmp_path / "runs"),
                           "cache-dir": str(tmp_path / "cache")}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLWR_", "FEDDIFRC_", "VIRTUAL_ENV"))}  # what the user has
    # Free ports instead of Flower's fixed local ones (39091/39093): other runs may hold those.
    env.update(FLWR_HOME=str(home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))

    def flwr(command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", f"source .venv/bin/activate && {command}"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)

    def ours() -> list[int]:
        return [int(cmd.parent.name) for cmd in Path("/proc").glob("[0-9]*/cmdline")
                if _is_our_superlink(cmd, home)]

    try:
        with ListenerSampler(lambda: [pid for link in ours() for pid in process_tree(link)]) as seen:
            run = flwr(f"flwr run . --run-config {conf} --federation-config 'num-supernodes=3' "
                       "--stream")
        assert run.returncode == 0, run.stdout + run.stderr
        assert {"gcs_server", "raylet"} <= {name for name, _ in seen.found}, seen.found
        assert not seen.exposed(), seen.exposed()  # Ray has no authentication: loopback only
        assert "Successfully started run" in run.stdout, run.stdout + run.stderr
        listed = flwr("flwr ls --format json", timeout=60)
        runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], run.stdout[-3000:]
        log = flwr(f"flwr log {runs[0]['run-id']}", timeout=60)
        assert "nodes: 3 connected" in log.stdout + log.stderr
        assert not (home / "runtime-envs").exists()  # no per-run dependency installation
        summary = next((tmp_path / "runs").glob("*/summary.json"))
        assert json.loads(summary.read_text())["rounds"] == 1

        bad = flwr("flwr run . --run-config \"num-rounds='abc'\" --stream")
        run_id = bad.stdout.split("Successfully started run ")[1].split()[0]
        listed = flwr(f"flwr ls --run-id {run_id} --format json", timeout=60)
        (entry,) = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        expected = "run config: 'num-rounds' expects an integer, got 'abc' (str)"
        assert entry["status"] == "finished:failed" and expected in entry["status-details"]
        log = flwr(f"flwr log {run_id}", timeout=60).stdout
        assert f"raised an exception: ConfigError: {expected}" in log, log
        assert "Traceback" not in log, log  # one line, not Flower's 30-line traceback
    finally:  # the local SuperLink keeps running after `flwr run`: stop the one we started
        _kill_all([pid for superlink in ours() for pid in _tree(superlink)])


@pytest.mark.slow
def test_killing_the_run_script_ends_everything_it_started(tmp_path):
    """kill -9 of run_simulation.py mid-run: SuperLink, SuperExec, ServerApp and Ray end with it.
    Before the kill, every socket its processes listen on is a loopback one."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FEDDIFRC_RUNS_DIR": str(tmp_path / "runs")}
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                         for k, v in {**TINY, "num-rounds": 200}.items())
    script = subprocess.Popen([sys.executable, str(SCRIPT), "--supernodes", "2", "-c", overrides],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: list[int] = []
    try:
        assert script.stdout is not None
        with ListenerSampler(lambda: process_tree(script.pid)) as seen:
            for line in script.stdout:  # until the rounds run: every process is up by then
                if "round 2:" in line:
                    break
        # while it ran, Ray (which has no authentication) listened on loopback only
        assert {"gcs_server", "raylet", "flwr-simulation"} <= {n for n, _ in seen.found}, seen.found
        assert not seen.exposed(), seen.exposed()
        started = [pid for pid in _tree(script.pid) if pid != script.pid]
        names = " ".join(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                         for pid in started if alive(pid))
        assert "flower-superlink" in names and "flower-superexec" in names, names
        script.send_signal(signal.SIGKILL)
        script.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(pid) for pid in started):
            time.sleep(0.5)
        left = [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
                for pid in started if alive(pid)]
        assert not left, left
    finally:
        script.kill()
        _kill_all(started)


@pytest.mark.slow
def test_the_run_script_removes_the_flower_home_and_ray_folders_it_made(
        tmp_path, _private_ray_and_flower_folders):
    base = tmp_path / "flwr-home"
    ray_tmp = _private_ray_and_flower_folders  # the script's Ray folder goes below it
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--supernodes", "2", "-c",
         " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in TINY.items())],
        env={**os.environ, "FLWR_HOME": str(base), "FEDDIFRC_RUNS_DIR": str(tmp_path / "runs")},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(base.iterdir()) == []  # no sim-<port> folder left
    assert list(ray_tmp.iterdir()) == []
