#!/usr/bin/env python3
"""Run the Flower app on the local simulation engine and fail loudly when the run fails.

    .venv/bin/python scripts/run_simulation.py [--supernodes 10] [--cpus-per-client 1]
        [-c "key=value ..." | -c conf/file.toml] ...

Plain `flwr run . --stream` works too (README, docs/running.md). This script is the convenience
on top of it:
- it checks the settings before anything starts (unknown keys, wrong types and ranges, fewer
  SuperNodes than min-available-nodes, malformed -c text or TOML files): one message, at once;
- `flwr run` exits 0 even when the run fails; this script asks `flwr ls` for the run's status
  and exits 1 unless it is `finished:completed`;
- `flwr run` starts a local SuperLink on fixed ports and leaves it running; this script starts
  its own SuperLink on free ports (several runs can share a machine), with runtime dependency
  installation disabled (else uv installs the dependencies again for every run), and stops it
  and everything below it at the end, also when the script itself is killed (parent-death
  signal); it removes the Flower home and Ray session folders it made;
- the installed copy of the app is not a git checkout, so the git revision travels in
  $FEDDIFRC_GIT_SHA;
- Ray, which has no authentication, listens on 127.0.0.1 only (scripts/ray_loopback.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from feddifrc_core.processes import descendants, stop_tree
from feddifrc_core.provenance import git_revision
from scripts.ray_loopback import WARNING as NO_LOOPBACK_WARNING
from scripts.ray_loopback import build as build_loopback
from scripts.ray_loopback import loopback_env
from scripts.run_config import check_run_config, merge_run_config, runs_dir, to_toml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr and flower-superlink of the same environment
CONNECTION = "feddifrc-sim"
FAILED_LOG = "superlink-last-failed-run.log"  # beside the per-run homes, which are removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=10, help="simulated clients (default 10)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0,
                        help="Ray CPUs per ClientApp; cores / this = clients training at once")
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="run-config overrides, 'k=v k2=v2' or a TOML file (repeatable)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before giving up")
    args = parser.parse_args()
    # 0. the settings (and the run folder they name), checked before anything starts
    overrides = merge_run_config(args.run_config)
    check_run_config(overrides, args.supernodes, runs_dir())

    # 1. environment: a private Flower home per invocation, offline, no dependency installation
    port = _free_port()
    home = Path(os.environ.get("FLWR_HOME") or ROOT / ".flwr-home") / f"sim-{port}"
    home.mkdir(parents=True, exist_ok=True)
    # Ray's session folders (logs, object spill) of this run only, below $RAY_TMPDIR if set;
    # removed at the end. A short path: Ray's socket paths inside must stay below the 107-byte
    # limit of Unix sockets.
    ray_tmp = Path(tempfile.mkdtemp(prefix="feddifrc-ray-", dir=os.environ.get("RAY_TMPDIR")))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FEDDIFRC_GIT_SHA": os.environ.get("FEDDIFRC_GIT_SHA") or git_revision(),
           "FEDDIFRC_RUNS_DIR": str(runs_dir()),
           "FEDDIFRC_CACHE_DIR": os.environ.get("FEDDIFRC_CACHE_DIR") or str(ROOT / ".cache" / "feddifrc"),
           # The app bundle (FAB) carries only code: the offline teacher's weights stay here.
           "FEDDIFRC_MODELS_DIR": os.environ.get("FEDDIFRC_MODELS_DIR") or str(ROOT / "models")}
    # Quieter logs from every ClientApp process: library advisories and progress bars.
    for key, value in (("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
        env.setdefault(key, value)
    # Ray listens on loopback only: every process below the SuperLink gets the bind() shim
    library = build_loopback()
    if library is None:
        print(NO_LOOPBACK_WARNING, file=sys.stderr)
    env = loopback_env(env, library)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')

    # 2. our own SuperLink in simulation mode; it starts `flower-superexec` from PATH (stopped in `finally`, also on Ctrl-C)
    log_file = home / "superlink.log"
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port),  # Runtime and Control API (HTTP)
         "--disable-runtime-dependency-installation", "--log-file", str(log_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    active: dict[str, int] = {}  # the submitted run while it is not finished
    status = 1
    try:
        _wait_for_port(port, superlink, log_file)
        status = _run(args, overrides, env, home, active)
        return status
    finally:
        if "run-id" in active:  # interrupted mid-run: let Flower stop the run cleanly first
            _flwr_stop(env, active["run-id"])
        _stop(superlink)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if status != 0 and log_file.is_file():  # keep the log that the error message names
            log_file.replace(home.parent / FAILED_LOG)
        shutil.rmtree(home, ignore_errors=True)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """SIGTERM the child when this script dies, however it dies (Linux PR_SET_PDEATHSIG).

    The SuperLink's own children follow it: SuperExec and the simulation process watch their
    parent's PID (Flower's `--parent-pid`) and stop with it, and Ray's workers with the simulation.
    """
    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the finally-block cleanup only
            return
        if os.getppid() != parent:  # the script died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _run(args: argparse.Namespace, overrides: dict[str, object], env: dict[str, str], home: Path,
         active: dict[str, int]) -> int:
    flwr = str(BIN / "flwr")
    # 3. submit the run
    federation = (f"num-supernodes={args.supernodes} "
                  f"client-resources-num-cpus={_number(args.cpus_per_client)} "
                  f"client-resources-num-gpus={_number(args.gpus_per_client)}")
    cmd = [flwr, "run", str(_stage_app(home)), CONNECTION, "--format", "json",
           "--federation-config", federation]
    if overrides:
        overrides_file = home / "run-config.toml"
        overrides_file.write_text(to_toml(overrides))
        cmd += ["--run-config", str(overrides_file)]
    submitted = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    run_id = _run_id(submitted.stdout)
    if submitted.returncode != 0 or run_id is None:
        print(submitted.stdout + submitted.stderr, file=sys.stderr)
        print("ERROR: the run could not be submitted (see above; run-config keys must exist in "
              "pyproject [tool.flwr.app.config]).", file=sys.stderr)
        return 1
    active["run-id"] = run_id
    print(f"Submitted run {run_id}; streaming its logs ...", flush=True)

    # 4. follow the logs until the run ends; keep the lines to find the run folder
    lines: list[str] = []
    stream = subprocess.Popen([flwr, "log", str(run_id), CONNECTION, "--stream"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=_die_with_parent(os.getpid()))
    try:
        deadline = time.time() + args.timeout
        assert stream.stdout is not None
        for line in stream.stdout:
            sys.stdout.write(line)
            lines.append(line)
            if time.time() > deadline:
                print(f"ERROR: run {run_id} did not finish within {args.timeout:.0f} s", file=sys.stderr)
                return 1
    finally:  # also on Ctrl-C / SIGTERM: never leave the log follower behind
        if stream.poll() is None:
            stream.terminate()
        stream.wait()

    # 5. the verdict comes from the SuperLink, not from `flwr run`'s exit code
    status = _status(flwr, env, run_id)
    active.pop("run-id")  # finished: nothing to stop
    folder = next((m.group(1) for line in lines if (m := re.search(r"Run folder: (\S+)", line))), None)
    if status != "finished:completed":
        print(f"\nERROR: Flower run {run_id} ended with status {status!r}. "
              f"{failure_hint(lines)} (SuperLink log: {home.parent / FAILED_LOG}).", file=sys.stderr)
        return 1
    print(f"\nRun {run_id} completed.")
    if folder:
        print(f"Results: {folder}\nPlot:    {Path(folder) / 'metrics.png'}\n"
              f"Summary: {Path(folder) / 'summary.json'}")
    return 0


APP_PARTS = ("pyproject.toml", "README.md", "feddifrc_core", "wire", "server_app", "client_app")


def _stage_app(home: Path) -> Path:
    """A copy of just the app's code for the FAB.

    `flwr run DIR` packs every non-ignored *.py/*.json/*.md/... file under DIR (10 MB at most), so
    untracked outputs in the checkout (benchmark results, caches) could break or bloat the bundle.
    """
    app = home / "feddifrc"  # the folder name must be a valid Flower app name
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    for part in APP_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, app / part)
    return app


def failure_hint(lines: list[str]) -> str:
    """Where the user finds why the run failed: the ServerApp's error in the streamed log, or,
    when the log shows none, that the ServerApp process ended without one (killed, OOM)."""
    if any(re.search(r"ERROR|Traceback|Error:", line) for line in lines):
        return "The ServerApp's error is in the log above"
    return ("The log shows no error: the ServerApp process ended without reporting one (killed, "
            "e.g. by the out-of-memory killer or `kill`?)")


def _status(flwr: str, env: dict[str, str], run_id: int) -> str:
    for _ in range(30):  # the status can lag the end of the log stream by a moment
        out = subprocess.run([flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                             env=env, capture_output=True, text=True, cwd=ROOT)
        try:
            status = str(json.loads(out.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            status = f"unknown ({out.stdout.strip() or out.stderr.strip()})"
        if status.startswith("finished"):
            return status
        time.sleep(1)
    return status


def _run_id(stdout: str) -> int | None:
    try:
        return int(json.loads(stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        match = re.search(r'"run-id":\s*(\d+)', stdout)
        return int(match.group(1)) if match else None


def _number(value: float) -> int | float:
    """Flower wants integers where the value is whole ('1', not '1.0')."""
    return int(value) if float(value).is_integer() else value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, log_file: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ERROR: flower-superlink exited with code {process.returncode}; see "
                             f"{log_file.parent.parent / FAILED_LOG}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise SystemExit(f"ERROR: flower-superlink did not open port {port} within {timeout:.0f} s; "
                     f"see {log_file.parent.parent / FAILED_LOG}")


def _flwr_stop(env: dict[str, str], run_id: int) -> None:
    print(f"Stopping run {run_id} ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([str(BIN / "flwr"), "stop", str(run_id), CONNECTION], env=env, cwd=ROOT,
                       capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink and every process it started (executor, ServerApp, Ray)."""
    if process.poll() is None:
        stop_tree([process.pid, *descendants(process.pid)], reap=process.poll)


if __name__ == "__main__":
    sys.exit(main())
