"""docker/ for real: images built, the compose deployment (TLS + SuperNode authentication) brought
up with Docker, a 2-round FedDifRC run, an unregistered SuperNode container refused, torn down.

Runs wherever Docker works or can be installed (root with apt-get: scripts/docker/setup.sh
installs the engine, the compose plugin and the Debian base image, and starts the daemon);
skipped with the reason otherwise. Images are reused while their inputs are unchanged
(scripts/docker/build.sh), so only the first run on a machine pays for the builds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from scripts.docker import compose_demo as cd
from tests.deploy_helpers import REPO, free_ports

TINY_RUN = ("num-rounds=2 dataset='digits' model='small-cnn' diffusion-model='tiny-sd' "
            "train-samples=200 test-samples=100 validation-samples=100 local-epochs=1 "
            "fraction-train=1.0 min-train-nodes=2 partition='iid' data-subset='all'")


def _docker_works() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def docker_unavailable_reason() -> str | None:
    """None when Docker works here or setup.sh can install/start it (root with apt-get)."""
    if _docker_works():
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None
    if shutil.which("docker") is None:
        return ("no Docker engine and not root with apt-get to install one (install Docker "
                "Engine + the compose v2 plugin, see docs/deploy.md)")
    return "the Docker daemon does not answer and only root could start it here"


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Docker ready and every image built (or reused); stops a daemon that it started itself."""
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    started_here = not _docker_works()
    cd.setup_docker()  # root on Debian: a failure here is a failure, not a skip
    try:
        yield cd.build_images()
    finally:
        if started_here:
            subprocess.run(["bash", str(REPO / "scripts" / "docker" / "setup.sh"),
                            "--stop-daemon"], timeout=120)


def _project_leftovers(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind in ("ps -aq", "network ls -q", "volume ls -q"):
        out = subprocess.run(["docker", *kind.split(), "--filter", label], capture_output=True,
                             text=True, timeout=60).stdout.split()
        found += [f"{kind.split()[0]}:{x}" for x in out]
    return found


def _intruder_key(folder: Path) -> Path:
    """An ECDSA key the SuperLink never saw, readable by the images' user (uid 49999)."""
    folder.mkdir(parents=True)
    key = folder / "intruder"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                   check=True, timeout=30)
    if os.geteuid() == 0:
        for path in (folder, key, key.with_suffix(".pub")):
            os.chown(path, 49999, 49999)
    return key


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first run on a machine builds every image
def test_compose_tls_deployment_runs_feddifrc_and_refuses_an_unregistered_node(images, tmp_path):
    control_port, fleet_port = free_ports(2)
    subnet = cd.free_subnet()  # free here, drawn at random: concurrent checkouts rarely collide
    (tmp_path / "data").mkdir()  # digits ship with scikit-learn: the /data mount stays empty
    dc = cd.new_deployment(f"feddifrc-test-{uuid.uuid4().hex[:8]}", tmp_path / "compose", images,
                           str(tmp_path / "data"), subnet, control_port, fleet_port)
    try:
        # 1. Up: certificates, TLS SuperLink, registration, 2 authenticated SuperNodes, executors.
        cd.up(dc, timeout=240)
        states = dc.states()
        assert {s: states[s]["Health"] for s in cd.LONG_RUNNING} == dict.fromkeys(
            cd.LONG_RUNNING, "healthy")
        assert all(int(states[s]["ExitCode"]) == 0 for s in cd.ONE_SHOT)
        network = json.loads(subprocess.run(
            ["docker", "network", "inspect", f"{dc.project}_default"], capture_output=True,
            text=True, check=True).stdout)[0]
        assert network["IPAM"]["Config"][0]["Subnet"] == subnet
        assert all(ipaddress.ip_address(c["IPv4Address"].split("/")[0])
                   in ipaddress.ip_network(subnet) for c in network["Containers"].values())
        # The published Fleet API speaks TLS with the compose CA's certificate.
        hello = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{fleet_port}", "-CAfile",
             str(dc.certs_dir / "ca.crt"), "-servername", "localhost", "-alpn", "h2"],
            input="", capture_output=True, text=True, errors="replace", timeout=30)
        assert "Verify return code: 0 (ok)" in hello.stdout, hello.stdout[-800:]

        # 2. A 2-round FedDifRC run (tiny extractor) through the containers; status completed.
        run_name = f"docker-test-{uuid.uuid4().hex[:6]}"
        result = cd.run(dc, [f"{TINY_RUN} run-name='{run_name}'"], timeout=600, echo=False)
        assert result["status"] == "finished:completed"
        folder = cd.copy_run_folder(dc, run_name, tmp_path / "run")
        rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rows if int(r["round"]) > 0]
        assert [int(r["round"]) for r in trained] == [1, 2]
        assert all(int(r.get("failures", 0)) == 0 for r in trained)
        for client in ("clientapp-1", "clientapp-2"):  # process isolation: the executors ran them
            assert "Start `flwr-clientapp` process" in dc.logs(client, lines=400)

        # 3. A SuperNode container with a key that was never registered is refused.
        key = _intruder_key(tmp_path / "intruder")
        refused = dc.compose(
            "run", "--rm", "--no-deps", "-v", f"{key.parent}:/intruder:ro", "supernode-1",
            "--superlink", "superlink:9092", "--root-certificates", "/certs/ca.crt",
            "--auth-supernode-private-key", "/intruder/intruder", "--isolation", "process",
            "--port", "9096", "--max-wait-time", "30", check=False, timeout=180)
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0, output[-1500:]
        assert "Failed to activate SuperNode" in output or "Exit Code: 305" in output, output[-1500:]
        nodes = cd.deploy.flwr_json(dc.dep(), ["supernode", "list", cd.CONNECTION])["nodes"]
        assert sorted(n["status"] for n in nodes) == ["online", "online"]  # still only those two
    finally:
        cd.down(dc)
    assert _project_leftovers(dc.project) == []


def test_free_subnet_avoids_routes_and_docker_networks_and_spreads_its_choice(monkeypatch):
    """Two checkouts testing at once each ask for a free subnet: a fixed first choice would make
    them collide ("Pool overlaps"); the draw avoids every route and Docker network it sees."""
    routes = "default via 10.0.0.1 dev eth0\n10.78.0.0/24 dev br-a proto kernel\n10.78.0.0/18 dev x\n"
    networks = [{"IPAM": {"Config": [{"Subnet": "10.78.64.0/19"}, {"Gateway": "10.78.64.1"}]}},
                {"IPAM": None}]

    def fake_run(cmd, **kwargs):
        out = {"ip": routes, "docker": "n1 n2\n" if cmd[1:3] == ["network", "ls"]
               else json.dumps(networks)}[cmd[0]]
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(cd.subprocess, "run", fake_run)
    taken = [ipaddress.ip_network(n) for n in ("10.78.0.0/18", "10.78.64.0/19")]
    drawn = {cd.free_subnet() for _ in range(40)}
    assert all(not ipaddress.ip_network(s).overlaps(t) for s in drawn for t in taken), drawn
    assert all(ipaddress.ip_network(s).subnet_of(ipaddress.ip_network("10.78.0.0/16"))
               for s in drawn)
    assert len(drawn) > 1  # not always the first free one
    routes = "10.78.0.0/16 dev everything\n"
    with pytest.raises(cd.StepError, match="no free /24"):
        cd.free_subnet()
