#!/usr/bin/env python3
"""Soak run on a live deployment: many rounds, one SuperNode killed and restarted in the middle.

    python scripts/deploy/soak.py [--nodes 4] [--rounds 20] [--kill-node 2] [--kill-at-round 5]
        [--hosts loopback|netns] [--app scripts/deploy/probe_app] [-c "extra=run config"]

1. `deploy.py up` (TLS + SuperNode auth); 2. the app runs `--rounds` rounds with min-nodes =
nodes - 1, so a round may lose one node; 3. when round `--kill-at-round` starts, node
`--kill-node` is killed (SIGKILL, like a crash) and restarted with the same key and partition
(it is refused until the SuperLink's heartbeat timeout marks its old session offline, then
rejoins with the same node id); 4. the run must complete every round and the restarted node
must train again. Prints a JSON summary; exits non-zero naming what failed. Everything is torn
down at the end (also on failure or Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.deploy import deploy

HERE = Path(__file__).resolve().parent


def _deploy_cli(state: Path, flwr_home: Path, *args: str, timeout: float = 300.0
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HERE / "deploy.py"), "--state-dir", str(state),
                           "--flwr-home", str(flwr_home), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=deploy.REPO)


def soak(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="feddifrc-soak-"))
    state, flwr_home = work / "state", work / "flwr-home"
    up_args = ["up", "--nodes", str(args.nodes), "--hosts", args.hosts]
    if args.hosts == "loopback":
        up_args += ["--fleet-port", str(args.fleet_port), "--control-port", str(args.control_port),
                    "--node-port", str(args.node_port)]
    t0 = time.monotonic()
    done = _deploy_cli(state, flwr_home, *up_args, timeout=240)
    if done.returncode != 0:
        raise deploy.DeployError("up", done.stderr.strip(), done.returncode)
    summary: dict = {"nodes": args.nodes, "rounds": args.rounds, "hosts": args.hosts,
                     "up-seconds": round(time.monotonic() - t0, 1)}
    run = None
    try:
        dep = deploy.Deployment.load(state)
        victim = dep.component(f"sn{args.kill_node}")
        # 1. The run, tolerating the node loss (the ServerApp decides with min-nodes).
        config = (f"num-rounds={args.rounds} min-nodes={args.nodes - 1} "
                  f"round-timeout={args.round_timeout}")
        run_cmd = [sys.executable, str(HERE / "deploy.py"), "--state-dir", str(state),
                   "--flwr-home", str(flwr_home), "run", str(Path(args.app).resolve()),
                   "-c", config, *[a for c in args.run_config for a in ("-c", c)],
                   "--tolerate-node-failures", "--timeout", str(args.timeout)]
        t_run = time.monotonic()
        run = subprocess.Popen(run_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=deploy.REPO)
        # 2. Kill the node when round `kill_at_round` starts, then restart it.
        logs = state / "logs"
        marker = f"[ROUND {args.kill_at_round}/{args.rounds}]"
        deadline = time.monotonic() + args.timeout
        while not any(marker in p.read_text(errors="replace") for p in logs.glob("run-*.log")):
            if run.poll() is not None:
                raise deploy.DeployError("run", f"ended before {marker}: {run.communicate()[1]}",
                                         run.returncode or deploy.EXIT_RUN_FAILED)
            if time.monotonic() > deadline:
                raise deploy.DeployError("run", f"{marker} not reached", deploy.EXIT_TIMEOUT)
            time.sleep(0.5)
        killed_at = time.monotonic()
        node_log = Path(victim.log)
        done = _deploy_cli(state, flwr_home, "kill-node", str(args.kill_node))
        if done.returncode != 0:
            raise deploy.DeployError("kill-node", done.stderr, done.returncode)
        time.sleep(args.down_seconds)
        offset = node_log.stat().st_size
        done = _deploy_cli(state, flwr_home, "restart-node", str(args.kill_node), timeout=240)
        if done.returncode != 0:
            raise deploy.DeployError(victim.label, f"did not rejoin: {done.stderr}",
                                     done.returncode)
        summary["rejoin-seconds"] = round(time.monotonic() - killed_at, 1)
        # 3. The run must finish every round; the restarted node must train again.
        out, err = run.communicate(timeout=args.timeout)
        summary["run-seconds"] = round(time.monotonic() - t_run, 1)
        if run.returncode != 0:
            raise deploy.DeployError("run", err.strip()[-3000:], run.returncode)
        found = re.search(r"\(log: (.+?)\)", err)
        if found is None:
            raise deploy.DeployError("run", f"no run log named in: {err[-500:]}",
                                     deploy.EXIT_RUN_FAILED)
        run_log = Path(found.group(1)).read_text(errors="replace")
        rounds_seen = sorted({int(r) for r in re.findall(r"\[ROUND (\d+)/", run_log)})
        summary["rounds-completed"] = len(rounds_seen)
        summary["failures-logged"] = len(re.findall(r"Received \d+ results and [1-9]\d* failures",
                                                    run_log))
        after = node_log.read_bytes()[offset:].decode(errors="replace")
        summary["restarted-node-trained"] = after.count("Receiving: train message")
        before = node_log.read_bytes()[:offset].decode(errors="replace")
        first_id = re.findall(r"SuperNode ID: (\d+)", before)[:1]
        summary["node-id-before-and-after"] = first_id + re.findall(r"SuperNode ID: (\d+)",
                                                                   after)[-1:]
        if rounds_seen != list(range(1, args.rounds + 1)):
            raise deploy.DeployError("run", f"rounds seen {rounds_seen}", deploy.EXIT_RUN_FAILED)
        if len(set(summary["node-id-before-and-after"])) != 1:
            raise deploy.DeployError(victim.label, "rejoined under another node id "
                                     f"{summary['node-id-before-and-after']}",
                                     deploy.EXIT_RUN_FAILED)
        if summary["restarted-node-trained"] < 1:
            raise deploy.DeployError(victim.label, "rejoined but never trained again",
                                     deploy.EXIT_RUN_FAILED)
        return summary
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(timeout=10)
        down = _deploy_cli(state, flwr_home, "down", timeout=120)
        if down.returncode != 0:
            print(f"soak: down: {down.stderr}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--kill-node", type=int, default=2)
    p.add_argument("--kill-at-round", type=int, default=5)
    p.add_argument("--down-seconds", type=float, default=2.0, help="time the node stays dead")
    p.add_argument("--round-timeout", type=float, default=90.0)
    p.add_argument("--hosts", choices=("loopback", "netns"), default="loopback")
    p.add_argument("--app", default=str(HERE / "probe_app"))
    p.add_argument("-c", "--run-config", action="append", default=[])
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--work-dir", default="")
    p.add_argument("--fleet-port", type=int, default=9192)
    p.add_argument("--control-port", type=int, default=8100)
    p.add_argument("--node-port", type=int, default=9194)
    args = p.parse_args(argv)
    if not 1 <= args.kill_node <= args.nodes or not 1 <= args.kill_at_round < args.rounds:
        p.error("need 1 <= --kill-node <= --nodes and 1 <= --kill-at-round < --rounds")
    try:
        summary = soak(args)
    except deploy.DeployError as err:
        print(f"soak: FAILED: {err}", file=sys.stderr)
        return err.code if 0 < err.code < 256 else 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
