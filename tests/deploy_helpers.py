"""Helpers for the deployment tests: a tiny probe Flower app, namespace checks, port picking.

The probe app has the same shape as FedDifRC's (a ServerApp driving FedAvg, a ClientApp per
message) but no torch, so infrastructure tests (auth refusal, crash reporting) stay fast and do not
depend on the model code. End-to-end tests run the real app from the repository root.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
DEPLOY_SCRIPT = REPO / "scripts" / "deploy" / "deploy.py"

_PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deployprobe"
version = "0.1.0"
dependencies = ["flwr>=1.39,<1.40"]


[tool.flwr.app]
publisher = "feddifrc"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "probe_client:app"

[tool.flwr.app.config]
num-rounds = 2
min-nodes = 2
client-delay = 0.0
"""

_PROBE_SERVER = '''\
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class StrictFedAvg(FedAvg):
    """Fails the run when a round gets fewer replies than min-nodes (FedAvg only logs it)."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [r for r in replies if r.has_content()]
        if len(ok) < self.min_train_nodes:
            raise RuntimeError(
                f"round {server_round}: {len(ok)} of {self.min_train_nodes} required replies"
            )
        return super().aggregate_train(server_round, ok)


@app.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["min-nodes"])
    strategy = StrictFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
        num_rounds=int(context.run_config["num-rounds"]),
        timeout=120,
        train_config=ConfigRecord({"delay": float(context.run_config["client-delay"])}),
    )
    print("PROBE-FINAL", result.arrays.to_numpy_ndarrays()[0].tolist(), flush=True)
'''

_PROBE_CLIENT = '''\
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(float(msg.content["config"]["delay"]))
    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    out = ArrayRecord([a + 1.0 + pid for a in arrays])
    metrics = MetricRecord({"num-examples": 1, "partition-id": pid})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)
'''


def write_probe_app(folder: Path) -> Path:
    """Write the probe app into `folder` and return it (the argument of `flwr run`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(_PROBE_PYPROJECT)
    (folder / "probe_server.py").write_text(textwrap.dedent(_PROBE_SERVER))
    (folder / "probe_client.py").write_text(textwrap.dedent(_PROBE_CLIENT))
    return folder


def load_deploy_module() -> ModuleType:
    """Import scripts/deploy/deploy.py (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("feddifrc_deploy", DEPLOY_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["feddifrc_deploy"] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (tests avoid the shared defaults 8000/9092)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def netns_unavailable_reason() -> str | None:
    """None when network namespaces with veth links can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    name = f"fdprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip() or made.returncode}"
    try:
        veth = subprocess.run(
            ["ip", "-n", name, "link", "add", "fdp0", "type", "veth", "peer", "name", "fdp1"],
            capture_output=True, text=True, timeout=10,
        )
        if veth.returncode != 0:
            return f"veth pairs cannot be made: {veth.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None
