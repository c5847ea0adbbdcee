#!/usr/bin/env python3
"""FedDifRC on the docker compose deployment, for real: `make docker-demo`.

    python scripts/docker/compose_demo.py [--rounds N] [-c "key=value ..."] [--keep]

1. Docker: engine, compose v2 and daemon (scripts/docker/setup.sh --base: installs them where the
   user is root on Debian, says what to install otherwise); 2. images (scripts/docker/build.sh:
   official Flower images where a registry answers, our own on the Debian base otherwise);
3. `docker compose up` of docker/compose.yaml + compose.tls.yaml + compose.cpu.yaml: certificates,
   SuperLink with TLS and SuperNode authentication, key registration, the ServerApp executor and
   2 SuperNodes with their ClientApp executors; waits until every healthcheck passes and both
   SuperNodes are online; 4. `flwr run` of this repository from the host (Control API published
   on 127.0.0.1), watching every container; the run must end `finished:completed`;
5. the run folder is copied out of its volume and summarised; 6. `docker compose down -v`, also on
   failure and Ctrl-C (--keep leaves the deployment up and prints how to stop it).
Exits non-zero when a step fails, with the failing service's last log lines.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from feddifrc_core.reporting import format_summary
from scripts.deploy import deploy  # flwr CLI helpers shared with the process deployment

REPO = Path(__file__).resolve().parents[2]

DOCKER_DIR = REPO / "docker"
COMPOSE_FILES = [DOCKER_DIR / f for f in ("compose.yaml", "compose.tls.yaml", "compose.cpu.yaml")]
CONNECTION = "feddifrc-docker"
LONG_RUNNING = ("superlink", "serverapp", "supernode-1", "clientapp-1", "supernode-2",
                "clientapp-2")
ONE_SHOT = ("certs", "register")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
# The demo: FedDifRC with the offline teacher on Fashion-MNIST, small enough for 2 cores.
DEMO_RUN_CONFIG = ("fraction-train=1.0 min-train-nodes=2 min-available-nodes=2 "
                   "train-samples=1000 test-samples=1000 local-epochs=1 data-path='/data' "
                   "diffusion-model='offline-teacher'")

EXIT_SETUP = 3
EXIT_BUILD = 4
EXIT_UP = 5
EXIT_RUN = 6
EXIT_INTERRUPTED = 130


class StepError(RuntimeError):
    """A step failed; `code` is the exit status, `services` those whose logs explain it."""

    def __init__(self, message: str, code: int, services: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.services = services


def say(text: str) -> None:
    print(f"docker-demo: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Steps 1-2: Docker and the images


def setup_docker() -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "docker" / "setup.sh"), "--base"],
                          cwd=REPO)
    if done.returncode != 0:
        raise StepError("Docker is not usable here (see the lines above)", EXIT_SETUP)


def build_images() -> dict[str, str]:
    """Build (or reuse) every image; returns the compose variables that select them."""
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "scripts" / "docker" / "build.sh")], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise StepError("building the images failed (see the lines above)", EXIT_BUILD)
    say(f"images ready in {time.monotonic() - started:.0f} s")
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {k: found[k] for k in ("FLWR_REPOSITORY", "CERTS_BASE_IMAGE")}


# ----------------------------------------------------------------------------------------------
# Step 3-6: the deployment


@dataclass
class ComposeDeployment:
    """One compose project: its name, variables, certificates and `flwr` connection."""

    project: str
    work_dir: Path  # certificates, FLWR_HOME, logs
    env: dict[str, str]
    control_port: int
    files: list[Path] = field(default_factory=lambda: list(COMPOSE_FILES))

    @property
    def certs_dir(self) -> Path:
        return self.work_dir / "certs"

    @property
    def flwr_home(self) -> Path:
        return self.work_dir / "flwr-home"

    def compose(self, *args: str, check: bool = True, capture: bool = True,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "compose", "-p", self.project]
        for f in self.files:
            argv += ["-f", str(f)]
        done = subprocess.run([*argv, *args], cwd=REPO, env={**os.environ, **self.env},
                              capture_output=capture, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise StepError(f"`docker compose {' '.join(args)}` failed (exit {done.returncode}): "
                            f"{(done.stderr or '')[-1500:]}", EXIT_UP)
        return done

    def states(self) -> dict[str, dict]:
        """service -> {State, Health, ExitCode} of every container of the project."""
        out = self.compose("ps", "--all", "--format", "json").stdout
        rows = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
        if len(rows) == 1 and isinstance(rows[0], list):  # older compose: one JSON array
            rows = rows[0]
        return {r["Service"]: r for r in rows}

    def logs(self, service: str, lines: int = 25) -> str:
        done = self.compose("logs", "--no-color", "--tail", str(lines), service, check=False)
        text = (done.stdout or "") + (done.stderr or "")
        return "\n".join("    " + ln for ln in text.splitlines()[-lines:])

    def dep(self) -> deploy.Deployment:
        """The process deployment's view (for its `flwr` helpers): no processes, one CLI home."""
        return deploy.Deployment(
            state_dir=str(self.work_dir), flwr_home=str(self.flwr_home), num_nodes=2,
            secure=True, hosts="docker", isolation="process", fleet_address="superlink:9092",
            control_address=f"127.0.0.1:{self.control_port}", certs_dir=str(self.certs_dir))


def free_subnet(candidates: str = "10.78.0.0/16", prefix: int = 24) -> str:
    """A /`prefix` of `candidates` that no Docker network and no host route overlaps (a fixed
    subnet fails with "Pool overlaps" while another network holds it), drawn at random: two
    checkouts testing at once (each with its own dockerd) would otherwise both take the first
    free one and one of them fail with "Pool overlaps"."""
    taken = [ipaddress.ip_network(line.split()[0], strict=False) for line in subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, timeout=30,
    ).stdout.splitlines() if line.split() and line.split()[0][0].isdigit()]
    ids = subprocess.run(["docker", "network", "ls", "-q"], capture_output=True, text=True,
                         timeout=60).stdout.split()
    if ids:
        inspected = json.loads(subprocess.run(
            ["docker", "network", "inspect", *ids], capture_output=True, text=True,
            timeout=60).stdout or "[]")
        taken += [ipaddress.ip_network(c["Subnet"], strict=False) for net in inspected
                  for c in (net.get("IPAM") or {}).get("Config") or [] if "Subnet" in c]
    free = [subnet for subnet in ipaddress.ip_network(candidates).subnets(new_prefix=prefix)
            if not any(subnet.overlaps(other) for other in taken if other.version == 4)]
    if free:
        return str(random.SystemRandom().choice(free))
    raise StepError(f"no free /{prefix} subnet in {candidates} for the compose network", EXIT_UP)


def new_deployment(project: str, work_dir: Path, images: dict[str, str], data_dir: str,
                   subnet: str, control_port: int, fleet_port: int) -> ComposeDeployment:
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **images,
        "FLWR_VERSION": "1.39.0",
        "NUM_SUPERNODES": "2",
        "CLIENT_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "DATA_DIR": str(Path(data_dir).resolve()),
        "CERTS_DIR": str((work_dir / "certs").resolve()),
        "SUPERLINK_SANS": "DNS:localhost",
        "COMPOSE_SUBNET": subnet,
        "CONTROL_PORT": str(control_port),
        "FLEET_PORT": str(fleet_port),
        "CONTROL_BIND": "127.0.0.1",
        "FLEET_BIND": "127.0.0.1",
    }
    return ComposeDeployment(project=project, work_dir=work_dir, env=env,
                             control_port=control_port)


def up(dc: ComposeDeployment, timeout: float = 300.0) -> float:
    """Start every service and wait for the healthchecks and both SuperNodes online; seconds."""
    started = time.monotonic()
    dc.compose("up", "--detach", "--no-build", "--pull", "never", timeout=timeout)
    deadline = started + timeout
    while True:
        states = dc.states()
        bad = [s for s in ONE_SHOT if states.get(s, {}).get("State") == "exited"
               and int(states[s].get("ExitCode", 0)) != 0]
        bad += [s for s in LONG_RUNNING
                if states.get(s, {}).get("State") in ("exited", "dead", "restarting")]
        if bad:
            raise StepError(f"service(s) {', '.join(bad)} failed to start", EXIT_UP, tuple(bad))
        healthy = [s for s in LONG_RUNNING if states.get(s, {}).get("Health") == "healthy"]
        if len(healthy) == len(LONG_RUNNING):
            break
        if time.monotonic() > deadline:
            waiting = [s for s in LONG_RUNNING if s not in healthy]
            raise StepError(f"not healthy after {timeout:.0f} s: {', '.join(waiting)}", EXIT_UP,
                            tuple(waiting))
        time.sleep(2)
    # The host's `flwr` CLI: the Control API on 127.0.0.1, verified with the compose CA.
    deploy.write_connection(dc.flwr_home, CONNECTION, f"127.0.0.1:{dc.control_port}",
                            dc.certs_dir / "ca.crt")
    while True:  # healthy ports do not yet mean activated nodes
        nodes = deploy.flwr_json(dc.dep(), ["supernode", "list", CONNECTION])["nodes"]
        if sorted(n["status"] for n in nodes) == ["online", "online"]:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise StepError(f"SuperNodes not online after {timeout:.0f} s: {nodes}", EXIT_UP,
                            ("supernode-1", "supernode-2", "superlink"))
        time.sleep(2)


def run(dc: ComposeDeployment, run_config: list[str], timeout: float, echo: bool) -> dict:
    """`flwr run` this repository; every container must keep running; status must be completed."""
    log_path = dc.work_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    cfg = [a for c in run_config for a in ("-c", c)]
    argv = [str(deploy.flwr_bin_dir() / "flwr"), "run", str(REPO), CONNECTION, "--stream", *cfg]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=deploy.child_env(str(dc.flwr_home)),
                            start_new_session=True)
    pump = threading.Thread(target=deploy._pump, args=(proc.stdout, log_path, echo), daemon=True)
    pump.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            states = dc.states()
            down_now = [s for s in LONG_RUNNING if states.get(s, {}).get("State") != "running"]
            if down_now:
                raise StepError(f"{', '.join(down_now)} stopped during the run", EXIT_RUN,
                                tuple(down_now))
            if time.monotonic() > deadline:
                raise StepError(f"the run did not finish within {timeout:.0f} s (output in "
                                f"{log_path})", EXIT_RUN, ("serverapp",))
            time.sleep(2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        pump.join(timeout=10)
    output = log_path.read_text(errors="replace") if log_path.exists() else ""
    match = re.search(r"started run (\d+)", output)
    if match is None:
        raise StepError(f"`flwr run` did not start a run (exit {proc.returncode}): "
                        f"{output[-1500:]}", EXIT_RUN, ("superlink",))
    run_id = match.group(1)
    runs = deploy.flwr_json(dc.dep(), ["ls", "--run-id", run_id, CONNECTION])["runs"]
    status = str(runs[0].get("status", "")) if runs else "unknown"
    if status != "finished:completed":
        raise StepError(f"run {run_id} ended {status} (output in {log_path})", EXIT_RUN,
                        ("serverapp", "clientapp-1", "clientapp-2"))
    return {**runs[0], "run-id": run_id, "log": str(log_path), "status": status}


def copy_run_folder(dc: ComposeDeployment, run_name: str, dest: Path) -> Path:
    """The run folder from the `runs` volume (through the serverapp container) to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dc.compose("cp", f"serverapp:/runs/{run_name}", str(dest))
    return dest


def down(dc: ComposeDeployment) -> None:
    """Containers, network and volumes of the project; raises if anything is left."""
    dc.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False,
               timeout=180)
    left = subprocess.run(["docker", "ps", "-aq", "--filter",
                           f"label=com.docker.compose.project={dc.project}"],
                          capture_output=True, text=True).stdout.split()
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True)
        raise StepError(f"`down` left {len(left)} container(s); removed them", EXIT_UP)


def report_failure(dc: ComposeDeployment | None, err: StepError) -> None:
    say(f"FAILED: {err}")
    if dc is None:
        return
    for service in err.services:
        say(f"last lines of {service}:\n{dc.logs(service)}")


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--project", default="feddifrc-demo", help="compose project name")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "docker" / "demo"))
    p.add_argument("--data-dir", default=FMNIST_DIR, help="mounted read-only at /data")
    p.add_argument("--subnet", default="10.78.0.0/24", help="fixed subnet of the compose network")
    p.add_argument("--control-port", type=int, default=18000, help="Control API on 127.0.0.1")
    p.add_argument("--fleet-port", type=int, default=19092, help="Fleet API on 127.0.0.1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-c", "--run-config", action="append", default=[],
                   help="extra run config (after the demo's own settings)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    p.add_argument("--keep", action="store_true", help="leave the deployment up afterwards")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM (e.g. a CI time-out) tears down like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    dc: ComposeDeployment | None = None
    timings: dict[str, float] = {}
    try:
        if not any(Path(args.data_dir, f).is_file()
                   for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")):
            raise StepError(f"Fashion-MNIST is missing from {args.data_dir} (make data)",
                            EXIT_SETUP)
        t0 = time.monotonic()
        setup_docker()
        images = build_images()
        timings["setup + images"] = time.monotonic() - t0
        dc = new_deployment(args.project, Path(args.work_dir), images, args.data_dir,
                            args.subnet, args.control_port, args.fleet_port)
        down(dc)  # a deployment left by an interrupted demo
        say(f"compose up (project {dc.project}, subnet {args.subnet}, TLS + SuperNode auth) ...")
        timings["up"] = up(dc)
        say(f"all services healthy, both SuperNodes online ({timings['up']:.0f} s)")
        run_name = f"docker-demo-{time.strftime('%Y%m%d-%H%M%S')}"
        config = [f"{DEMO_RUN_CONFIG} num-rounds={args.rounds} run-name='{run_name}'",
                  *args.run_config]
        t1 = time.monotonic()
        result = run(dc, config, args.timeout, echo=True)
        timings["run"] = time.monotonic() - t1
        dest = copy_run_folder(dc, run_name, REPO / "runs" / "docker" / run_name)
        summary = json.loads((dest / "summary.json").read_text())
        print(f"\nRun {result['run-id']}: {result['status']}")
        # the accuracy at the round validation chose, then the rest; the summary's first and last
        # lines name paths inside the container (the copy's path follows)
        print("\n".join(format_summary(summary, Path("/runs") / run_name).splitlines()[1:-1]))
        print(f"Run folder: /runs/{run_name} in volume {dc.project}_runs (service serverapp)")
        print(f"Copied to:  {dest}  with  docker compose -p {dc.project} "
              + " ".join(f"-f {f.relative_to(REPO)}" for f in dc.files)
              + f" cp serverapp:/runs/{run_name} {dest.relative_to(REPO)}")
        print("Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
        return 0
    except StepError as err:
        report_failure(dc, err)
        return err.code
    except deploy.DeployError as err:
        report_failure(dc, StepError(str(err), EXIT_RUN, ("superlink", "serverapp")))
        return EXIT_RUN
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if dc is not None and not args.keep:
            say("compose down -v ...")
            try:
                down(dc)
            except StepError as err:
                say(f"FAILED: {err}")
        elif dc is not None:
            say(f"left up; stop it with: docker compose -p {dc.project} "
                + " ".join(f"-f {f.relative_to(REPO)}" for f in dc.files) + " down -v")


if __name__ == "__main__":
    sys.exit(main())
