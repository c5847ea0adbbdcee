"""docker/: the compose files and Dockerfiles parse, agree with each other and with the project,
and every service's exact command line works as a local process (no Docker engine needed;
tests/test_docker_compose.py runs the same files in real containers).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from scripts.deploy import compose_local as cl
from scripts.deploy import deploy
from tests.deploy_helpers import REPO, missing_tls_tools, write_probe_app

DOCKER = REPO / "docker"
BASE, TLS, CPU = DOCKER / "compose.yaml", DOCKER / "compose.tls.yaml", DOCKER / "compose.cpu.yaml"
CLIENTS = ("clientapp-1", "clientapp-2")
NODES = ("supernode-1", "supernode-2")


def _env(tmp_path: Path) -> dict[str, str]:
    return cl.env_for(DOCKER / ".env.example", CERTS_DIR=str(tmp_path / "certs"),
                      DATA_DIR=str(tmp_path / "data"))


_PLANS: dict[Path, cl.LocalPlan] = {}


def _argv(model: dict, name: str, tmp_path: Path) -> list[str]:
    """The local argv of a service; one plan (port map) per test, as in a real deployment."""
    plan = _PLANS.setdefault(tmp_path, cl.LocalPlan(compose_dir=DOCKER, work_dir=tmp_path))
    return cl.service_argv(name, model["services"][name], model, plan)


def test_env_example_covers_every_variable_the_compose_files_use():
    used = set()
    for path in (BASE, TLS, CPU):
        used |= set(re.findall(r"\$\{([A-Za-z_]+)", path.read_text()))
    assert used <= set(cl.read_env_file(DOCKER / ".env.example")), used


def test_images_pin_the_installed_flower_version(tmp_path):
    version = importlib.metadata.version("flwr")
    assert cl.read_env_file(DOCKER / ".env.example")["FLWR_VERSION"] == version
    model = cl.load_compose([BASE], _env(tmp_path))
    assert model["services"]["superlink"]["image"] == f"flwr/superlink:{version}"
    for name in NODES:
        assert model["services"][name]["image"] == f"flwr/supernode:{version}"
    for dockerfile in ("server", "client", "client-cpu"):
        text = (DOCKER / f"{dockerfile}.Dockerfile").read_text()
        assert f"ARG FLWR_VERSION={version}" in text
        assert cl.dockerfile_entrypoint(DOCKER / f"{dockerfile}.Dockerfile") == ["flower-superexec"]
        assert "torchvision" not in text  # does not import beside the pinned torch
        assert "pyproject.toml" in text  # dependencies come from the project, not a copy


def test_base_compose_is_process_isolated_with_gpu_clients_and_volumes(tmp_path):
    model = cl.load_compose([BASE], _env(tmp_path))
    svc = model["services"]
    assert {"superlink", "serverapp", *NODES, *CLIENTS} == set(svc)
    assert "process" in _argv(model, "superlink", tmp_path)
    for i, (node, client) in enumerate(zip(NODES, CLIENTS, strict=True)):
        argv = _argv(model, node, tmp_path)
        assert argv[argv.index("--isolation") + 1] == "process"
        node_config = argv[argv.index("--node-config") + 1]
        assert f"partition-id={i} num-partitions=2" in node_config
        # The node config's paths are those of the ClientApp executor's volumes.
        assert f'data-path="{tmp_path / "data"}"' in node_config
        assert f'cache-dir="{tmp_path / "volumes" / "feature-cache"}"' in node_config
        # Its executor dials this node's Runtime API port.
        port = argv[argv.index("--port") + 1]
        assert _argv(model, client, tmp_path)[-1] == f"127.0.0.1:{port}"
        gpu = svc[client]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
        targets = {v.split(":")[1] for v in svc[client]["volumes"]}
        assert {"/data", "/cache", "/hf-cache"} <= targets
        assert svc[client]["environment"]["HF_HOME"] == "/hf-cache"
        assert svc[client]["build"]["dockerfile"] == "docker/client.Dockerfile"
    link = _argv(model, "superlink", tmp_path)
    assert _argv(model, "serverapp", tmp_path)[-1] == f"127.0.0.1:{link[link.index('--port') + 1]}"


def test_cpu_overlay_drops_gpu_reservations_and_uses_the_cpu_image(tmp_path):
    model = cl.load_compose([BASE, TLS, CPU], _env(tmp_path))
    for client in CLIENTS:
        assert "deploy" not in model["services"][client]
        assert model["services"][client]["build"]["dockerfile"] == "docker/client-cpu.Dockerfile"


def test_tls_overlay_orders_certs_register_and_authenticated_nodes(tmp_path):
    model = cl.load_compose([BASE, TLS], _env(tmp_path))
    order = cl.start_order(model)
    assert order.index("certs") < order.index("superlink") < order.index("register")
    for node in NODES:
        assert order.index("register") < order.index(node)
        assert model["services"][node]["depends_on"]["register"]["condition"] == (
            "service_completed_successfully")
        argv = _argv(model, node, tmp_path)
        assert "--insecure" not in argv and "--auth-supernode-private-key" in argv
    link = _argv(model, "superlink", tmp_path)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert "--insecure" not in _argv(model, "serverapp", tmp_path)
    # The overlay keeps the base volumes (merge by target) and adds the certificates.
    targets = {v.split(":")[1] for v in model["services"]["superlink"]["volumes"]}
    assert targets == {"/app", "/certs"}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(missing_tls_tools() is not None, reason=str(missing_tls_tools()))
def test_compose_tls_services_run_a_federation_as_local_processes(tmp_path):
    """base + TLS overlay: every service's command line as a local process, then a 2-round run."""
    app = write_probe_app(tmp_path / "app")
    local = cl.up([BASE, TLS], _env(tmp_path), tmp_path / "compose")
    try:
        assert local.one_shot == {"certs": 0, "register": 0}
        assert (tmp_path / "certs" / "supernodes" / "sn2.pub").is_file()
        cl.connect(local, tmp_path / "certs" / "ca.crt")  # what docs/deploy.md tells users
        run = deploy.run_app(local.dep, str(app), ["num-rounds=2"], timeout=150)
        assert run["status"] == "finished:completed"
        # Both partitions trained in both rounds: 2 x ((1 + 0) + (1 + 1)) / 2 = 3 per entry.
        assert "PROBE-FINAL [3.0, 3.0, 3.0, 3.0]" in Path(run["log"]).read_text()
        # The separate executors ran the apps (process isolation): the SuperLink started no
        # SuperExec of its own, so the ServerApp ran through the `serverapp` service.
        assert "Starting Flower SuperExec" not in cl.log_of(local, "superlink")
        assert "Starting Flower SuperExec" in cl.log_of(local, "serverapp")
        for name in CLIENTS:
            assert "Start `flwr-clientapp` process" in cl.log_of(local, name)
    finally:
        cl.down(local)
    assert not any(deploy.pid_alive(c.pid) for c in local.dep.components)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compose_insecure_base_services_start_and_nodes_join(tmp_path):
    """The base file's own command lines (the TLS overlay replaces most): all start, nodes join."""
    local = cl.up([BASE], _env(tmp_path), tmp_path / "compose")
    try:
        cl.connect(local, None)
        nodes = deploy.flwr_json(local.dep, ["supernode", "list", deploy.CONNECTION])["nodes"]
        assert sorted(n["status"] for n in nodes) == ["online", "online"]
        assert all(deploy.pid_alive(c.pid) for c in local.dep.components)
    finally:
        cl.down(local)
    assert not any(deploy.pid_alive(c.pid) for c in local.dep.components)
