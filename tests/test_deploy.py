"""Deployment: SuperLink + SuperNodes as separate processes, on separate (namespace) hosts, TLS and
SuperNode authentication, the real FedDifRC app over the gRPC Fleet API, and failures that name
the component that failed. The slow tests share one deployment (module fixture) to stay short.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy_helpers import (
    DEPLOY_SCRIPT,
    REPO,
    established_tcp,
    free_ports,
    load_deploy_module,
    missing_tls_tools,
    netns_unavailable_reason,
    write_probe_app,
)
from tests.sockets import process_tree

deploy = load_deploy_module()

# The real app, as small as it gets: 2 rounds, digits, small CNN, the tiny SD-shaped extractor.
TINY_RUN = ("num-rounds=2 dataset='digits' model='small-cnn' model-width=8 "
            "diffusion-model='tiny-sd' train-samples=120 test-samples=60 validation-samples=60 "
            "local-epochs=1 batch-size=32 fraction-train=1.0 "
            "min-train-nodes=2 partition='iid' data-subset='all' eval-batch-size=60 "
            "extraction-batch-size=32 projection='random' torch-threads=1")


# ----------------------------------------------------------------------------------------------
# Fast checks of the command lines and files the scripts produce


def test_node_config_string_quotes_paths_and_keeps_ints_bare():
    text = deploy.node_config_string({"partition-id": 1, "num-partitions": 4,
                                      "data-path": "/data sets/x", "device": "cuda:0"})
    assert text == 'partition-id=1 num-partitions=4 data-path="/data sets/x" device="cuda:0"'


def test_secure_command_lines_have_certificates_auth_and_no_insecure(tmp_path):
    link = deploy.superlink_argv("10.77.0.1:9092", "127.0.0.1", 8000, tmp_path)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    node = deploy.supernode_argv("10.77.0.1:9092", 9094, "partition-id=0 num-partitions=2",
                                 tmp_path, tmp_path / "sn1")
    assert "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "sn1")
    # Insecure only when asked for.
    assert "--insecure" in deploy.superlink_argv("127.0.0.1:9092", "127.0.0.1", 8000, None)


@pytest.mark.skipif(missing_tls_tools() is not None, reason=str(missing_tls_tools()))
def test_make_certs_gives_sans_for_the_dialled_address_and_node_keys(tmp_path):
    deploy.make_certs(tmp_path, 2, ["IP:10.77.0.1", "DNS:superlink"])
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout",
                           "-ext", "subjectAltName"], capture_output=True, text=True,
                          check=True).stdout
    for san in ("IP Address:10.77.0.1", "DNS:superlink", "IP Address:127.0.0.1", "DNS:localhost"):
        assert san in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"),
                             str(tmp_path / "server.pem")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    for i in (1, 2):
        pub = (tmp_path / "supernodes" / f"sn{i}.pub").read_text()
        assert pub.startswith("ecdsa-sha2-nistp384 ")
        assert oct((tmp_path / "supernodes" / f"sn{i}").stat().st_mode)[-3:] == "600"
    # Re-running keeps the CA (nodes keep trusting it) and adds only missing keys.
    ca = (tmp_path / "ca.crt").read_bytes()
    deploy.make_certs(tmp_path, 3, ["IP:10.77.0.1"])
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "supernodes" / "sn3.pub").is_file()


def test_make_certs_rejects_a_malformed_san(tmp_path):
    with pytest.raises(deploy.DeployError, match="SAN must look like"):
        deploy.make_certs(tmp_path, 1, ["10.77.0.1"])


def test_write_connection_keeps_flowers_default_and_other_entries(tmp_path):
    deploy.write_connection(tmp_path, "a", "127.0.0.1:8000", None)
    deploy.write_connection(tmp_path, "b", "10.0.0.1:8000", tmp_path / "ca.crt")
    text = (tmp_path / "config.toml").read_text()
    import tomli

    conf = tomli.loads(text)["superlink"]
    assert conf["default"] == "local" and "local" in conf  # `flwr run .` still simulates
    assert conf["a"] == {"address": "127.0.0.1:8000", "insecure": True}
    assert conf["b"] == {"address": "10.0.0.1:8000", "root-certificates": str(tmp_path / "ca.crt")}


def test_commands_without_a_deployment_say_how_to_start_one(tmp_path, capsys):
    code = deploy.main(["--state-dir", str(tmp_path), "run"])
    assert code == deploy.EXIT_USAGE
    assert "start one with `up`" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# A live deployment: namespaces when possible, else loopback


def _hosts_mode() -> tuple[str, str | None]:
    forced = os.environ.get("FEDDIFRC_DEPLOY_HOSTS", "")
    if forced == "loopback":
        return "loopback", "FEDDIFRC_DEPLOY_HOSTS=loopback"
    reason = netns_unavailable_reason()
    return ("loopback", reason) if reason else ("netns", None)


def _cli(fed: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDDIFRC_RUNS_DIR": str(fed["runs"])}
    return subprocess.run([sys.executable, str(DEPLOY_SCRIPT), "--state-dir", str(fed["state"]),
                           "--flwr-home", str(fed["flwr_home"]), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    if missing_tls_tools():
        pytest.skip(f"TLS deployment needs {missing_tls_tools()}")
    mode, reason = _hosts_mode()
    if reason:
        print(f"\n[deploy tests] network namespaces unavailable ({reason}); loopback variant")
    root = tmp_path_factory.mktemp("deployment")
    fed = {"mode": mode, "state": root / "state", "flwr_home": root / "flwr-home",
           "runs": root / "runs", "probe": write_probe_app(root / "probe")}
    fleet, control, node = free_ports(3)
    args = ["up", "--nodes", "2", "--hosts", mode, "--cache-dir", str(root / "cache")]
    if mode == "loopback":  # one shared stack: avoid the default ports other runs may hold
        args += ["--fleet-port", str(fleet), "--control-port", str(control),
                 "--node-port", str(node)]
    done = _cli(fed, *args, timeout=180)
    assert done.returncode == 0, done.stderr
    fed["dep"] = deploy.Deployment.load(fed["state"])
    try:
        yield fed
    finally:
        down = _cli(fed, "down", timeout=120)
        dep = deploy.Deployment.load(fed["state"])
        left = [c.name for c in fed["dep"].components + dep.components if deploy.pid_alive(c.pid)]
        for comp in fed["dep"].components + dep.components:  # last resort, by our own PIDs
            if deploy.pid_alive(comp.pid):
                os.killpg(comp.pid, signal.SIGKILL)
        for ns in fed["dep"].namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
        assert down.returncode == 0 and not left, (down.stderr, left)


def _fleet_connections(fed: dict) -> list[tuple[str, str, int]]:
    """(namespace, peer address, pid) of every established connection to the Fleet API port."""
    dep: deploy.Deployment = fed["dep"]
    host, port = dep.fleet_address.rsplit(":", 1)
    if not dep.namespaces:  # one loopback: read /proc directly (no iproute2 needed)
        return [("", local, pid) for local, _, pid in established_tcp(int(port))]
    found = []
    for ns in dep.namespaces[1:]:
        out = subprocess.run(deploy.hosts.wrap(ns, ["ss", "-tnpH", "state", "established"]),
                             capture_output=True, text=True, timeout=15, check=True).stdout
        for line in out.splitlines():
            cols = line.split()
            local, peer = cols[2], cols[3]
            if peer.endswith(f"{host}]:{port}") or peer == f"{host}:{port}":
                pid = int(re.search(r"pid=(\d+)", line).group(1))
                found.append((ns, local, pid))
    return found


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_feddifrc_runs_two_rounds_over_tls_across_hosts(fed):
    dep: deploy.Deployment = fed["dep"]
    assert dep.secure and "--insecure" not in dep.component("superlink").argv
    done = _cli(fed, "run", "-c", TINY_RUN, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished:completed" in done.stderr
    # The ServerApp's run folder holds both rounds, trained by both partitions.
    rows = [json.loads(line) for folder in fed["runs"].iterdir()
            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] >= 1]
    assert [r["round"] for r in trained] == [1, 2]
    assert all(r["clients"].split() == ["0", "1"] and r["failures"] == 0 for r in trained)
    # Each SuperNode holds a connection to the gRPC Fleet port; across hosts it leaves from its
    # own namespace and address over the veth link.
    conns = _fleet_connections(fed)
    node_pids = {dep.component(f"sn{i}").pid: i for i in (1, 2)}
    assert sorted(node_pids[pid] for _, _, pid in conns if pid in node_pids) == [1, 2], conns
    if fed["mode"] == "netns":
        for ns, local, pid in conns:
            i = node_pids[pid]
            assert ns == dep.namespaces[i] and deploy.hosts.node_ip(i) in local
    # What travels on that link is TLS (HTTP/2, gRPC) with the deployment's CA-signed certificate.
    hello = subprocess.run(
        deploy.hosts.wrap(dep.namespaces[1] if dep.namespaces else None,
                          ["openssl", "s_client", "-connect", dep.fleet_address, "-alpn", "h2",
                           "-CAfile", str(Path(dep.certs_dir) / "ca.crt"), "-verify_return_error"]),
        input="", capture_output=True, timeout=30)
    out = hello.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out and "ALPN protocol: h2" in out, out[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secure_aggregation_runs_over_tls_across_hosts(fed):
    """`secure-aggregation='secaggplus'` in the TLS deployment: each set-up stage and round is
    two SecAgg+ sums of four round trips, every message a fresh ClientApp process that must find
    its SecAgg+ keys (and its answer, kept between the two sums) in the node's state."""
    run_config = (TINY_RUN.replace("num-rounds=2", "num-rounds=1")
                  + " secure-aggregation='secaggplus'")
    done = _cli(fed, "run", "-c", run_config, timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished:completed" in done.stderr
    rows = [json.loads(line) for folder in fed["runs"].iterdir()
            if json.loads((folder / "config.json").read_text())["run-config"]
            ["secure-aggregation"] == "secaggplus"
            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"], r["failures"]) for r in rows if r["round"] >= 1] == [
        (1, "0 1", 0)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unregistered_supernode_is_refused(fed, tmp_path):
    rogue = tmp_path / "rogue"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(rogue)],
                   check=True, timeout=30)
    done = _cli(fed, "add-node", "--index", "3", "--key", str(rogue), timeout=100)
    assert done.returncode == deploy.EXIT_START_FAILED
    assert "SuperNode sn3" in done.stderr
    assert "Flower exit code 305" in done.stderr and "Failed to activate SuperNode" in done.stderr
    # The federation still has exactly its two registered nodes.
    nodes = deploy.flwr_json(fed["dep"], ["supernode", "list", deploy.CONNECTION])["nodes"]
    assert sorted(n["status"] for n in nodes) == ["online", "online"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_node_crash_fails_the_run_naming_the_node(fed):
    env = {**os.environ, "FEDDIFRC_RUNS_DIR": str(fed["runs"])}
    sn2_log = Path(fed["dep"].component("sn2").log)
    since = sn2_log.stat().st_size  # earlier runs left their own lines
    run = subprocess.Popen(
        [sys.executable, str(DEPLOY_SCRIPT), "--state-dir", str(fed["state"]), "--flwr-home",
         str(fed["flwr_home"]), "run", str(fed["probe"]), "-c", "client-delay=30.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        # Kill node 2 while it trains (its ClientApp sleeps in the first round).
        deadline = time.monotonic() + 90
        while b"Start `flwr-clientapp` process" not in sn2_log.read_bytes()[since:]:
            assert time.monotonic() < deadline, "round 1 never reached sn2"
            assert run.poll() is None, run.communicate()
            time.sleep(0.5)
        assert _cli(fed, "kill-node", "2").returncode == 0
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == deploy.EXIT_COMPONENT_DIED, err
    assert "FAILED: SuperNode sn2" in err and "died during run" in err
    # The run was stopped on the SuperLink, not left waiting for the dead node.
    run_id = re.search(r"died during run (\d+)", err).group(1)
    runs = deploy.flwr_json(fed["dep"], ["ls", "--run-id", run_id, deploy.CONNECTION])["runs"]
    assert runs[0]["status"].startswith("finished:") and runs[0]["status"] != "finished:completed"
    status = _cli(fed, "status")
    assert status.returncode == deploy.EXIT_COMPONENT_DIED
    assert re.search(r"sn2 .* DEAD", status.stdout)
    # The surviving node's ClientApp finishes its 30 s of work after the stop and is reaped
    # then; before, it stayed a zombie until the deployment was torn down.
    sn1 = fed["dep"].component("sn1").pid
    deadline = time.monotonic() + 90
    while _task_processes(sn1) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert _task_processes(sn1) == [], _task_processes(sn1)
    # (Restarting a crashed node waits for its heartbeat to expire: see test_deploy_soak.py.)


def _task_processes(root: int) -> list[str]:
    """'pid state' of the ClientApp processes below `root`, zombies included."""
    found = []
    for pid in process_tree(root):
        try:
            head, _, tail = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
        except OSError:
            continue
        if head.partition("(")[2].startswith("flwr-clientapp"):
            found.append(f"{pid} {tail.split()[0]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_unreachable_superlink_fails_the_run_naming_it(fed):
    # A SuperLink this machine does not manage (nothing to watch): `flwr run` cannot reach it.
    dep: deploy.Deployment = fed["dep"]
    remote = dataclasses.replace(dep, components=[], control_address="127.0.0.1:9")
    deploy.write_connection(Path(dep.flwr_home), deploy.CONNECTION, "127.0.0.1:9",
                            Path(dep.certs_dir) / "ca.crt")
    try:
        with pytest.raises(deploy.DeployError) as err:
            deploy.run_app(remote, str(fed["probe"]), [], timeout=60)
        assert err.value.component == "SuperLink" and "unreachable" in str(err.value)
        assert err.value.code == deploy.EXIT_SUPERLINK_UNREACHABLE
    finally:
        deploy.write_connection(Path(dep.flwr_home), deploy.CONNECTION, dep.control_address,
                                Path(dep.certs_dir) / "ca.crt")
    # The managed SuperLink dies: the next run names it before submitting anything.
    link = dep.component("superlink")
    os.killpg(link.pid, signal.SIGKILL)
    done = _cli(fed, "run", str(fed["probe"]), timeout=60)
    assert done.returncode == deploy.EXIT_COMPONENT_DIED
    assert "FAILED: SuperLink" in done.stderr and "down before the run" in done.stderr
