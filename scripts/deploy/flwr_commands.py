"""Flower's side of a deployment: the command lines of SuperLink, SuperNode and SuperExec
(pure: the same argv the docs and compose.yaml use), their environment, the certificates, and
the `flwr` CLI (Control API) with errors that name the unreachable part."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.provenance import git_revision
from scripts.deploy import hosts
from scripts.deploy.components import (
    EXIT_RUN_FAILED,
    EXIT_START_FAILED,
    EXIT_SUPERLINK_UNREACHABLE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    REPO,
    Component,
    DeployError,
    Deployment,
    describe_death,
    pid_alive,
    wait_for_log,
)

CERTS_SCRIPT = Path(__file__).resolve().parent / "make_certs.sh"
REAPING_BIN = Path(__file__).resolve().parent / "bin"  # flower-superexec that reaps (reaper.py)
CONNECTION = "feddifrc-deployment"

# ----------------------------------------------------------------------------------------------
# Command lines (pure): the same argv the docs and compose.yaml use.


def flwr_bin_dir() -> Path:
    """Folder with flower-superlink & co.; SuperLink/SuperNode spawn `flower-superexec` by name."""
    venv = REPO / ".venv" / "bin"
    if (venv / "flower-superlink").exists():
        return venv
    found = shutil.which("flower-superlink")
    if found is None:
        raise DeployError("flwr", "flower-superlink not found: run `make venv` first", EXIT_USAGE)
    return Path(found).parent


def child_env(flwr_home: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_HOME=flwr_home,
        # A SuperLink otherwise runs `uv sync` per run, which pulls a multi-GB CUDA torch.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        TOKENIZERS_PARALLELISM="false",
        # bin/ first: its `flower-superexec` (Flower's, plus a reaper of finished ClientApps)
        # is what SuperLink and SuperNodes start by name, and what process isolation runs
        PATH=os.pathsep.join([str(REAPING_BIN), str(flwr_bin_dir()), env.get("PATH", "")]),
    )
    # The ServerApp runs from an installed copy of the app (no .git): its run folder records
    # the revision from here. Runs and caches default to the repository's folders.
    env.setdefault("FEDDIFRC_GIT_SHA", git_revision())
    env.setdefault("FEDDIFRC_RUNS_DIR", str(REPO / "runs"))
    env.setdefault("FEDDIFRC_CACHE_DIR", str(REPO / ".cache" / "feddifrc"))
    return env


def node_config_string(values: dict[str, object]) -> str:
    """`--node-config` text: ints bare, strings TOML-quoted (paths may contain spaces)."""
    parts = []
    for key, value in values.items():
        text = str(value) if isinstance(value, int) else json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def superlink_argv(fleet_address: str, control_host: str, control_port: int, certs: Path | None,
                   isolation: str = "subprocess") -> list[str]:
    argv = ["flower-superlink", "--fleet-api-address", fleet_address, "--host", control_host,
            "--port", str(control_port), "--isolation", isolation,
            "--disable-runtime-dependency-installation"]
    if certs is None:
        return [*argv, "--insecure"]
    return [*argv, "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
            "--enable-supernode-auth"]


def supernode_argv(superlink: str, runtime_port: int, node_config: str, certs: Path | None,
                   auth_key: Path | None, isolation: str = "subprocess",
                   max_wait_time: float = 60.0) -> list[str]:
    # max-wait-time bounds how long a node keeps redialling an unreachable SuperLink.
    argv = ["flower-supernode", "--superlink", superlink, "--port", str(runtime_port),
            "--isolation", isolation, "--node-config", node_config,
            "--max-wait-time", str(max_wait_time)]
    if certs is None:
        return [*argv, "--insecure"]
    argv += ["--root-certificates", str(certs / "ca.crt")]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    return argv


def superexec_argv(runtime_address: str, root_cert: Path | None) -> list[str]:
    argv = ["flower-superexec", "--runtime-api-address", runtime_address]
    if root_cert is None:
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(root_cert)]


def make_certs(certs_dir: Path, num_nodes: int, sans: list[str]) -> None:
    done = subprocess.run(["bash", str(CERTS_SCRIPT), str(certs_dir), str(num_nodes), *sans],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DeployError("certificates", done.stderr.strip() or done.stdout, EXIT_START_FAILED)


# ----------------------------------------------------------------------------------------------
# The flwr CLI (Control API)


def write_connection(flwr_home: Path, name: str, address: str, root_cert: Path | None) -> None:
    """Add/replace [superlink.<name>] in $FLWR_HOME/config.toml, keeping every other entry."""
    import tomli  # both are dependencies of flwr (tomllib needs Python 3.11)
    import tomli_w

    path = flwr_home / "config.toml"
    flwr_home.mkdir(parents=True, exist_ok=True)
    if not path.is_file():  # flwr's own default first, so `flwr run .` keeps its local SuperLink
        with warnings.catch_warnings():  # flwr.cli pulls in typer, which warns about click
            warnings.simplefilter("ignore", DeprecationWarning)
            from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

        path.write_text(DEFAULT_FLOWER_CONFIG_TOML)
    config = tomli.loads(path.read_text())
    superlinks = config.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if root_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_cert.resolve())
    superlinks[name] = entry
    atomic_write_text(path, tomli_w.dumps(config))


def tls_hint(dep: Deployment, name: str = CONNECTION) -> str:
    """Why a TLS SuperLink is 'unavailable' to the CLI: flwr says only "Connection unavailable"
    when the connection has no root certificate (or is insecure) and the SuperLink expects TLS."""
    if not dep.secure:
        return ""
    import tomli

    path = Path(dep.flwr_home) / "config.toml"
    try:
        entry = tomli.loads(path.read_text()).get("superlink", {}).get(name, {})
    except (OSError, tomli.TOMLDecodeError):
        entry = {}
    ca = Path(dep.certs_dir) / "ca.crt"
    if entry.get("insecure") or not entry.get("root-certificates"):
        return (f"\nThe SuperLink expects TLS, but the connection [superlink.{name}] in {path} "
                f"has {'insecure = true' if entry.get('insecure') else 'no root-certificates'}: "
                f"set root-certificates = \"{ca}\" (the deployment's CA) and remove insecure.")
    return (f"\nThe SuperLink expects TLS: check that root-certificates ({entry['root-certificates']}) "
            f"is the deployment's CA ({ca}) and that the certificate names {dep.control_address}.")


def flwr_cli(dep: Deployment, args: list[str], timeout: float = 120.0
             ) -> subprocess.CompletedProcess[str]:
    argv = hosts.wrap(dep.cli_netns, [str(flwr_bin_dir() / "flwr"), *args])
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=child_env(dep.flwr_home))
    except subprocess.TimeoutExpired:
        raise DeployError("flwr CLI", f"`flwr {' '.join(args)}` did not answer within "
                          f"{timeout:.0f} s", EXIT_TIMEOUT) from None


def flwr_json(dep: Deployment, args: list[str], timeout: float = 120.0) -> dict:
    """Run a `flwr ... --format json` command; raise naming the SuperLink when it is unreachable."""
    done = flwr_cli(dep, [*args, "--format", "json"], timeout)
    try:
        # flwr prints some lines before the JSON document (e.g. a created config).
        out = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise DeployError("flwr CLI", f"`flwr {' '.join(args)}` gave no JSON (exit "
                          f"{done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}",
                          EXIT_RUN_FAILED) from None
    if not out.get("success", False):
        message = str(out.get("error-message", out))
        if "unavailable" in message.lower():
            raise DeployError("SuperLink", f"Control API at {dep.control_address} is unreachable "
                              f"(`flwr {args[0]} {args[1] if len(args) > 1 else ''}`): {message}"
                              f"{tls_hint(dep)}", EXIT_SUPERLINK_UNREACHABLE)
        raise DeployError("flwr CLI", f"`flwr {' '.join(args)}` failed: {message}", EXIT_RUN_FAILED)
    return dict(out)


def register_node(dep: Deployment, public_key: Path) -> str:
    out = flwr_json(dep, ["supernode", "register", str(public_key), CONNECTION])
    return str(out["node-id"])


def wait_superlink_ready(dep: Deployment, link: Component, timeout: float) -> None:
    wait_for_log(link, "Starting Fleet API", timeout)
    deadline = time.monotonic() + timeout
    while True:  # the Control API (HTTP) answers a little after the Fleet API starts
        try:
            flwr_json(dep, ["supernode", "list", CONNECTION], timeout=30)
            return
        except DeployError as err:
            if not pid_alive(link.pid):
                raise DeployError("SuperLink", describe_death(link), EXIT_START_FAILED) from err
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
