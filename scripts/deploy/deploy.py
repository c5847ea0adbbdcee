#!/usr/bin/env python3
"""Run FedDifRC on a real Flower deployment: a SuperLink and N SuperNodes as separate processes.

    python scripts/deploy/deploy.py up --nodes 2 [--insecure] [--hosts netns] [--data-path P]
    python scripts/deploy/deploy.py run [APP] [-c "num-rounds=2 ..."]
    python scripts/deploy/deploy.py status | add-node | kill-node I | restart-node I | down

`up` makes certificates (unless --insecure), starts the SuperLink (gRPC Fleet API, TLS, SuperNode
auth), registers one ECDSA key per node, starts the SuperNodes with their node config and writes a
`flwr` connection; `run` submits the app with `flwr run`, follows it with `flwr ls` and watches
every process, so a failed run exits non-zero with the component that failed; `down` stops
everything by PID (process groups) and deletes the namespaces of `--hosts netns`.
State (PIDs, logs, certificates) lives in --state-dir (default .cache/deploy).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

# The modules beside this script; their names are re-exported here: `deploy.X` is the script's
# interface for soak.py, compose_demo.py and the tests.
from scripts.deploy import hosts
from scripts.deploy.components import (  # noqa: F401
    EXIT_COMPONENT_DIED,
    EXIT_RUN_FAILED,
    EXIT_START_FAILED,
    EXIT_SUPERLINK_UNREACHABLE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    REPO,
    Component,
    DeployError,
    Deployment,
    child_process,
    describe_death,
    exit_code,
    flower_exit_code,
    log_tail,
    pid_alive,
    start,
    stop,
    wait_for_log,
)
from scripts.deploy.flwr_commands import (  # noqa: F401
    CONNECTION,
    child_env,
    flwr_bin_dir,
    flwr_cli,
    flwr_json,
    make_certs,
    node_config_string,
    register_node,
    superexec_argv,
    superlink_argv,
    supernode_argv,
    tls_hint,
    wait_superlink_ready,
    write_connection,
)

# ----------------------------------------------------------------------------------------------
# up / down / nodes


def node_component(dep: Deployment, index: int, key: Path | None = None) -> list[Component]:
    """The SuperNode `index` (and its SuperExec under process isolation), not yet started."""
    state = Path(dep.state_dir)
    certs = Path(dep.certs_dir) if dep.secure else None
    # Nodes beyond --nodes (add-node) share the host of node ((index - 1) % N) + 1 and hold the
    # same partition; every node on one host needs its own Runtime API port.
    host = (index - 1) % dep.num_nodes + 1
    netns = dep.namespaces[host] if dep.hosts == "netns" else None
    base = 9094 if netns else int(dep.node_config.get("_node_port_base", 9094))
    port = base + (host - 1 if netns is None else 0) + (index - host)
    values: dict[str, object] = {"partition-id": host - 1, "num-partitions": dep.num_nodes}
    values.update({k: v for k, v in dep.node_config.items() if not k.startswith("_")})
    if key is None and certs is not None:
        key = certs / "supernodes" / f"sn{index}"
    node = Component(
        name=f"sn{index}", index=index, netns=netns, log=str(state / "logs" / f"sn{index}.log"),
        argv=supernode_argv(dep.fleet_address, port, node_config_string(values), certs, key,
                            dep.isolation),
    )
    comps = [node]
    if dep.isolation == "process":
        comps.append(Component(name=f"sn{index}-superexec", index=index, netns=netns,
                               log=str(state / "logs" / f"sn{index}-superexec.log"),
                               argv=superexec_argv(f"127.0.0.1:{port}", None)))
    return comps


# A SuperNode that crashed stays "online" on the SuperLink until its heartbeat expires
# (flwr 1.39: 30 s interval x patience 2); until then its key is refused (Flower exit code 305).
REJOIN_WAIT_S = 90.0


def start_node(dep: Deployment, index: int, key: Path | None = None, timeout: float = 60.0,
               rejoin_wait: float = 0.0) -> list[Component]:
    """Start SuperNode `index` and wait until the SuperLink activated it (or it gave up).

    With `rejoin_wait` > 0 a refusal (305) is retried for that long: the case of a node that
    restarts after a crash while the SuperLink still holds its previous session.
    """
    comps = node_component(dep, index, key)
    env = child_env(dep.flwr_home)
    node = comps[0]
    deadline = time.monotonic() + rejoin_wait
    while True:
        since = Path(node.log).stat().st_size if Path(node.log).exists() else 0
        start(node, env)
        try:
            wait_for_log(node, "SuperNode ID:", timeout, since=since)
            break
        except DeployError:
            stop(node, timeout=3)
            if flower_exit_code(node) != 305 or time.monotonic() > deadline:
                raise
            print(f"deploy: {node.label} refused while the SuperLink still holds its previous "
                  "session (heartbeat timeout); retrying in 5 s", file=sys.stderr)
            time.sleep(5.0)
    for extra in comps[1:]:
        start(extra, env)
    return comps


def up(args: argparse.Namespace) -> Deployment:
    state = Path(args.state_dir).resolve()
    if (state / "deployment.json").exists():
        old = Deployment.load(state)
        alive = [c.name for c in old.components if pid_alive(c.pid)]
        if alive or old.namespaces:
            raise DeployError("deployment", f"one is already up in {state} (running: {alive}, "
                              f"namespaces: {old.namespaces}); run `down` first", EXIT_USAGE)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = Path(args.flwr_home).resolve()
    secure = not args.insecure
    certs_dir = Path(args.certs_dir).resolve() if args.certs_dir else state / "certs"

    # 1. Hosts: one loopback, or a namespace per component joined by veth links.
    topo = None
    if args.hosts == "netns":
        topo = hosts.create_topology(args.nodes)
        fleet_host, sans = hosts.SUPERLINK_IP, [f"IP:{hosts.SUPERLINK_IP}"]
    else:
        fleet_host, sans = "127.0.0.1", []
    sans += [f"DNS:{s}" if not s[0].isdigit() else f"IP:{s}" for s in args.san]
    node_config: dict[str, str] = {"_node_port_base": str(args.node_port)}
    for key in ("data_path", "device", "cache_dir"):
        if getattr(args, key):
            value = getattr(args, key)
            node_config[key.replace("_", "-")] = (str(Path(value).resolve()) if key != "device"
                                                  else value)
    dep = Deployment(
        state_dir=str(state), flwr_home=str(flwr_home), num_nodes=args.nodes, secure=secure,
        hosts=args.hosts, isolation=args.isolation,
        fleet_address=f"{fleet_host}:{args.fleet_port}",
        control_address=f"127.0.0.1:{args.control_port}", certs_dir=str(certs_dir),
        # namespaces[0] is the SuperLink host, namespaces[i] SuperNode i's host.
        node_config=node_config, namespaces=list(topo.all_ns) if topo else [],
        cli_netns=topo.superlink_ns if topo else None,
    )
    dep.save()
    try:
        # 2. Certificates (kept across runs) and the CLI connection.
        if secure:
            make_certs(certs_dir, args.nodes, sans)
        write_connection(flwr_home, CONNECTION, dep.control_address,
                         certs_dir / "ca.crt" if secure else None)
        env = child_env(str(flwr_home))
        # 3. SuperLink (+ its SuperExec for ServerApps under process isolation).
        link = Component(name="superlink", netns=dep.cli_netns,
                         log=str(state / "logs" / "superlink.log"),
                         argv=superlink_argv(dep.fleet_address, "127.0.0.1", args.control_port,
                                             certs_dir if secure else None, args.isolation))
        dep.components.append(start(link, env))
        dep.save()
        wait_superlink_ready(dep, link, args.ready_timeout)
        if args.isolation == "process":
            dep.components.append(start(Component(
                name="superlink-superexec", netns=dep.cli_netns,
                log=str(state / "logs" / "superlink-superexec.log"),
                argv=superexec_argv(dep.control_address, certs_dir / "ca.crt" if secure else None),
            ), env))
        # 4. Register every node's public key, then start the nodes.
        for i in range(1, args.nodes + 1):
            if secure:
                node_id = register_node(dep, certs_dir / "supernodes" / f"sn{i}.pub")
                print(f"deploy: registered sn{i} as node {node_id}", file=sys.stderr)
            dep.components.extend(start_node(dep, i, timeout=args.ready_timeout))
            dep.save()
    except BaseException:
        down(dep)
        raise
    dep.save()
    return dep


def down(dep: Deployment) -> None:
    for comp in reversed(dep.components):
        stop(comp)
    failed = hosts.destroy_topology(dep.namespaces) if dep.namespaces else []
    dep.components = [c for c in dep.components if pid_alive(c.pid)]
    dep.namespaces = []
    dep.save()
    if failed or dep.components:
        raise DeployError("down", f"left behind: {[c.name for c in dep.components]} {failed}",
                          EXIT_START_FAILED)


# ----------------------------------------------------------------------------------------------
# run


def _pump(stream: IO[str], log_path: Path, echo: bool) -> None:
    """Copy the `flwr run --stream` output to its log (and to our stdout when asked)."""
    with open(log_path, "a") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()


def run_app(dep: Deployment, app: str, run_config: list[str], timeout: float,
            tolerate_node_failures: bool = False, echo: bool = False) -> dict:
    """Submit `app` with `flwr run --stream`, watch every process until the run ends, return the
    run's `flwr ls` entry; raise DeployError naming the failed component otherwise."""
    # 1. Everything must be up before submitting.
    for comp in dep.components:
        if not pid_alive(comp.pid):
            raise DeployError(comp.label, "is down before the run: " + describe_death(comp),
                              EXIT_COMPONENT_DIED)
    # 2. Submit and stream the run's logs (one long-lived CLI process instead of polling).
    cfg_args = [arg for cfg in run_config for arg in ("-c", cfg)]
    log_path = Path(dep.state_dir) / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch()
    argv = hosts.wrap(dep.cli_netns, [str(flwr_bin_dir() / "flwr"), "run", str(Path(app).resolve()),
                                      CONNECTION, "--stream", *cfg_args])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=child_env(dep.flwr_home), start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, log_path, echo), daemon=True)
    pump.start()
    deadline = time.monotonic() + timeout
    run_id: int | None = None

    def abort(component: str, message: str, code: int) -> DeployError:
        if run_id is not None:
            flwr_cli(dep, ["stop", str(run_id), CONNECTION], timeout=30)
        return DeployError(component, message, code)

    # 3. Watch: a component that dies fails the run (unless node failures are tolerated).
    try:
        while proc.poll() is None:
            if run_id is None:
                found = re.search(r"started run (\d+)", log_path.read_text(errors="replace"))
                run_id = int(found.group(1)) if found else None
            for comp in dep.components:
                if pid_alive(comp.pid) or (tolerate_node_failures and comp.index > 0):
                    continue
                raise abort(comp.label, f"died during run {run_id}: {describe_death(comp)}",
                            EXIT_COMPONENT_DIED)
            if time.monotonic() > deadline:
                raise abort("run", f"run {run_id} not finished after {timeout:.0f} s; stopped "
                            f"it (output in {log_path})", EXIT_TIMEOUT)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # e.g. Ctrl-C: do not leave the streaming CLI behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    pump.join(timeout=10)
    output = log_path.read_text(errors="replace")
    found = re.search(r"started run (\d+)", output)
    if found is None:
        tail = "\n".join("    " + ln for ln in output.splitlines()[-15:])
        if "unavailable" in output.lower():
            raise DeployError("SuperLink", f"Control API at {dep.control_address} is unreachable; "
                              f"`flwr run` said:\n{tail}{tls_hint(dep)}", EXIT_SUPERLINK_UNREACHABLE)
        raise DeployError("flwr run", f"the run was not started (exit {proc.returncode}):\n{tail}",
                          EXIT_RUN_FAILED)
    run_id = int(found.group(1))
    # 4. `flwr run` exits 0 even for a failed run: the SuperLink's status decides.
    runs = flwr_json(dep, ["ls", "--run-id", str(run_id), CONNECTION], timeout=60)["runs"]
    status = str(runs[0].get("status", "")) if runs else "unknown"
    if status != "finished:completed":
        tail = "\n".join("    " + ln for ln in output.splitlines()[-20:])
        raise DeployError("ServerApp", f"run {run_id} ended {status}; end of its log "
                          f"({log_path}):\n{tail}", EXIT_RUN_FAILED)
    print(f"deploy: run {run_id} {status} (log: {log_path})", file=sys.stderr)
    return {**runs[0], "log": str(log_path)}


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--state-dir", default=str(REPO / ".cache" / "deploy"))
    p.add_argument("--flwr-home", default=os.environ.get("FLWR_HOME", str(REPO / ".flwr-home")))
    sub = p.add_subparsers(dest="cmd", required=True)

    u = sub.add_parser("up", help="start SuperLink + SuperNodes")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--insecure", action="store_true", help="no TLS, no node auth (only on request)")
    u.add_argument("--hosts", choices=("loopback", "netns"), default="loopback",
                   help="netns: SuperLink and each SuperNode in their own network namespace")
    u.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                   help="process: separate flower-superexec processes, as in docker/compose.yaml")
    u.add_argument("--data-path", default="")
    u.add_argument("--device", default="")
    u.add_argument("--cache-dir", default="")
    u.add_argument("--certs-dir", default="", help="default: <state-dir>/certs")
    u.add_argument("--san", action="append", default=[],
                   help="extra address in the server certificate (IP or DNS name)")
    u.add_argument("--fleet-port", type=int, default=9092)
    u.add_argument("--control-port", type=int, default=8000)
    u.add_argument("--node-port", type=int, default=9094, help="first SuperNode Runtime API port")
    u.add_argument("--ready-timeout", type=float, default=60.0)

    r = sub.add_parser("run", help="flwr run the app and follow it to the end")
    r.add_argument("app", nargs="?", default=str(REPO))
    r.add_argument("-c", "--run-config", action="append", default=[])
    r.add_argument("--timeout", type=float, default=1800.0)
    r.add_argument("--tolerate-node-failures", action="store_true",
                   help="a SuperNode that dies does not fail the run (the ServerApp decides)")

    a = sub.add_parser("add-node", help="start one more SuperNode (e.g. with an unregistered key)")
    a.add_argument("--index", type=int, required=True, help="> --nodes of `up`")
    a.add_argument("--key", default="", help="private key (default: sn<index> of the certs)")
    a.add_argument("--register", action="store_true", help="register its public key first")
    for name in ("kill-node", "restart-node"):
        k = sub.add_parser(name)
        k.add_argument("index", type=int)
    sub.add_parser("status")
    sub.add_parser("down")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state = Path(args.state_dir).resolve()
    try:
        if args.cmd == "up":
            dep = up(args)
            print(f"deploy: up: {', '.join(f'{c.name}={c.pid}' for c in dep.components)}; "
                  f"connection '{CONNECTION}' in {dep.flwr_home}/config.toml")
            return 0
        dep = Deployment.load(state)
        if args.cmd == "run":
            run_app(dep, args.app, args.run_config, args.timeout, args.tolerate_node_failures,
                    echo=True)
        elif args.cmd == "add-node":
            if args.index <= dep.num_nodes:
                raise DeployError("add-node", f"--index must be > {dep.num_nodes} (the nodes of "
                                  "`up`); use restart-node for those", EXIT_USAGE)
            key = Path(args.key).resolve() if args.key else None
            if args.register and dep.secure:
                pub = (Path(f"{key}.pub") if key
                       else Path(dep.certs_dir) / "supernodes" / f"sn{args.index}.pub")
                register_node(dep, pub)
            dep.components.extend(start_node(dep, args.index, key))
            dep.save()
        elif args.cmd == "kill-node":
            comp = dep.component(f"sn{args.index}")
            os.killpg(comp.pid, signal.SIGKILL)
        elif args.cmd == "restart-node":
            comp = dep.component(f"sn{args.index}")
            stop(comp, timeout=5)
            dep.components = [c for c in dep.components if c.index != args.index]
            dep.components.extend(start_node(dep, args.index, rejoin_wait=REJOIN_WAIT_S))
            dep.save()
        elif args.cmd == "status":
            for comp in dep.components:
                state_text = "running" if pid_alive(comp.pid) else "DEAD"
                print(f"{comp.name:22s} pid {comp.pid:<8d} {state_text:8s} {comp.netns or ''}")
            return 0 if all(pid_alive(c.pid) for c in dep.components) else EXIT_COMPONENT_DIED
        elif args.cmd == "down":
            down(dep)
            print("deploy: down")
    except DeployError as err:
        print(f"deploy: FAILED: {err}", file=sys.stderr)
        return err.code
    except hosts.HostsError as err:
        print(f"deploy: FAILED: hosts: {err}", file=sys.stderr)
        return EXIT_START_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
