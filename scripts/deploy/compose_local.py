"""Run the services of docker/compose*.yaml as local processes (no Docker engine needed).

This is how the tests keep the compose demo honest: the merged compose model is read with the
subset of compose semantics these files use (${VAR:-default} interpolation from an env file,
override files, `!reset`, depends_on conditions), and every service's exact entrypoint + command
runs as a local process, with what the container runtime would otherwise provide translated:
  - service hostnames and 0.0.0.0 -> 127.0.0.1; each (service, container port) -> its own free
    local port (containers have separate network stacks, one loopback does not);
  - volume targets (/data, /certs, /state, ...) -> the bind-mount source, or a folder per named
    volume;
  - the image entrypoint -> flower-superlink / flower-supernode for the flwr images, the
    ENTRYPOINT of the Dockerfile for built images.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scripts.deploy import deploy

FLWR_IMAGE_ENTRYPOINTS = {
    "flwr/superlink": ["flower-superlink"],
    "flwr/supernode": ["flower-supernode"],
    "flwr/superexec": ["flower-superexec"],
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$\$")


class ComposeError(ValueError):
    """A compose file uses something this runner does not translate, or is inconsistent."""


# ----------------------------------------------------------------------------------------------
# Loading: env file, interpolation, override merge


class _Reset:
    """Value of a `!reset` tag: removes the key from the merged model."""


class _Override:
    def __init__(self, value: object) -> None:
        self.value = value


class _Loader(yaml.SafeLoader):
    pass


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return _Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> _Override:
    if isinstance(node, yaml.MappingNode):
        return _Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Override(loader.construct_sequence(node, deep=True))
    return _Override(loader.construct_scalar(node))


_Loader.add_constructor("!reset", _construct_reset)
_Loader.add_constructor("!override", _construct_override)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ComposeError(f"{path}: line {line!r} is not KEY=VALUE")
        env[key.strip()] = value.strip().strip('"')
    return env


def interpolate(value: object, env: dict[str, str]) -> object:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            got = env.get(m.group(1))
            return got if got not in (None, "") else (m.group(2) or "")
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _normalise_depends(value: object) -> dict[str, dict]:
    """Short (list) and long (mapping) depends_on forms -> {service: {"condition": ...}}."""
    if isinstance(value, list):
        return {name: {"condition": "service_started"} for name in value}
    if isinstance(value, dict):
        return dict(value)
    if value is None:
        return {}
    raise ComposeError(f"depends_on must be a list or a mapping, got {value!r}")


def _volume_target(spec: str) -> str:
    return spec.split(":")[1]


def _merge_service(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, _Reset):
            out.pop(key, None)
        elif isinstance(value, _Override) or key in ("command", "entrypoint", "image"):
            out[key] = value.value if isinstance(value, _Override) else value
        elif key == "volumes":
            merged = {_volume_target(v): v for v in out.get(key, [])}
            merged.update({_volume_target(v): v for v in value})
            out[key] = list(merged.values())
        elif key == "ports":
            out[key] = list(dict.fromkeys([*out.get(key, []), *value]))
        elif key == "depends_on":
            out[key] = {**_normalise_depends(out.get(key)), **_normalise_depends(value)}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_service(out[key], value)
        else:
            out[key] = value
    return out


def load_compose(files: list[Path], env: dict[str, str]) -> dict:
    """The merged compose model of `files` (later files override earlier ones)."""
    model: dict = {"services": {}, "volumes": {}}
    for path in files:
        doc = yaml.load(path.read_text(), Loader=_Loader) or {}  # noqa: S506 (SafeLoader subclass)
        doc = interpolate(doc, env)
        if not isinstance(doc, dict):
            raise ComposeError(f"{path}: top level must be a mapping")
        for name, svc in (doc.get("services") or {}).items():
            model["services"][name] = _merge_service(model["services"].get(name, {}), svc)
        model["volumes"].update(doc.get("volumes") or {})
    for svc in model["services"].values():
        svc["depends_on"] = _normalise_depends(svc.get("depends_on"))
    return model


def start_order(model: dict) -> list[str]:
    """Services in dependency order (depends_on first); a cycle is an error."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ComposeError(f"depends_on cycle through {name!r}")
        if name not in model["services"]:
            raise ComposeError(f"depends_on names unknown service {name!r}")
        visiting.add(name)
        for dep in model["services"][name]["depends_on"]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in model["services"]:
        visit(name)
    return order


def dockerfile_entrypoint(path: Path) -> list[str]:
    """The last ENTRYPOINT of a Dockerfile in exec (JSON) form."""
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", path.read_text(), flags=re.M)
    if not found:
        raise ComposeError(f"{path} has no ENTRYPOINT in exec form")
    return list(json.loads(found[-1]))


# ----------------------------------------------------------------------------------------------
# Translating a service into a local process


@dataclass
class LocalPlan:
    """How the services map onto this machine."""

    compose_dir: Path
    work_dir: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def port(self, service: str, port: int) -> int:
        if (service, port) not in self.ports:
            while True:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    free = int(s.getsockname()[1])
                if free not in self.ports.values():
                    break
            self.ports[(service, port)] = free
        return self.ports[(service, port)]

    def mounts(self, svc: dict) -> dict[str, Path]:
        """Container path -> host path for every volume of the service."""
        out = {}
        for spec in svc.get("volumes", []):
            src, dst = spec.split(":")[:2]
            if src.startswith((".", "/")):
                host = (self.compose_dir / src).resolve()
            else:
                host = self.work_dir / "volumes" / src
            host.mkdir(parents=True, exist_ok=True)
            out[dst] = host
        return out


def _translate(text: str, service: str, services: set[str], mounts: dict[str, Path],
               plan: LocalPlan) -> str:
    # 1. host:port of another service (or of this one's 0.0.0.0) -> 127.0.0.1:<its local port>.
    def addr(m: re.Match[str]) -> str:
        host, port = m.group(1), int(m.group(2))
        owner = service if host == "0.0.0.0" else host
        return f"127.0.0.1:{plan.port(owner, port)}"
    names = "|".join(re.escape(s) for s in sorted(services, key=len, reverse=True))
    text = re.sub(rf"\b({names}|0\.0\.0\.0):(\d+)\b", addr, text)
    # 2. container paths -> host paths (longest mount first, whole path components only).
    for dst in sorted(mounts, key=len, reverse=True):
        text = re.sub(rf"(?<![\w/.]){re.escape(dst)}(?=/|\"|'|\s|$)", str(mounts[dst]), text)
    return text


def service_argv(name: str, svc: dict, model: dict, plan: LocalPlan) -> list[str]:
    if "entrypoint" in svc:
        entry = list(svc["entrypoint"])
    elif "build" in svc:
        build = svc["build"]
        context = (plan.compose_dir / build.get("context", ".")).resolve()
        entry = dockerfile_entrypoint(context / build.get("dockerfile", "Dockerfile"))
    else:
        image = str(svc.get("image", "")).split(":")[0]
        if image not in FLWR_IMAGE_ENTRYPOINTS:
            raise ComposeError(f"service {name!r}: no known entrypoint for image {image!r}")
        entry = FLWR_IMAGE_ENTRYPOINTS[image]
    command = svc.get("command", [])
    if isinstance(command, str):
        raise ComposeError(f"service {name!r}: write `command` as a list (exact argv)")
    argv = [*entry, *[str(c) for c in command]]
    services = set(model["services"])
    mounts = plan.mounts(svc)
    # A SuperNode's node config names paths in its ClientApp executors' containers (services whose
    # command dials its Runtime API), since that is where the ClientApps read data and caches.
    for other in model["services"].values():
        if any(str(arg).startswith(f"{name}:") for arg in other.get("command") or []):
            mounts = {**plan.mounts(other), **mounts}
    out = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev == "--host" and arg == "0.0.0.0":
            arg = "127.0.0.1"
        elif prev == "--port" and arg.isdigit():
            arg = str(plan.port(name, int(arg)))
        out.append(_translate(arg, name, services, mounts, plan))
    return out


def service_env(name: str, svc: dict, model: dict, plan: LocalPlan) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    mounts = plan.mounts(svc)
    services = set(model["services"])
    return {k: _translate(str(v), name, services, mounts, plan) for k, v in env.items()}


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class LocalCompose:
    model: dict
    plan: LocalPlan
    dep: deploy.Deployment
    one_shot: dict[str, int] = field(default_factory=dict)  # service -> exit code


def up(files: list[Path], env: dict[str, str], work_dir: Path, ready_timeout: float = 90.0
       ) -> LocalCompose:
    """Start every service in dependency order; one-shot services run to completion first."""
    model = load_compose(files, env)
    plan = LocalPlan(compose_dir=files[0].parent.resolve(), work_dir=work_dir)
    flwr_home = work_dir / "flwr-home"
    dep = deploy.Deployment(
        state_dir=str(work_dir), flwr_home=str(flwr_home), num_nodes=0, secure=False,
        hosts="loopback", isolation="process", fleet_address="",
        control_address=f"127.0.0.1:{plan.port('superlink', 8000)}", certs_dir="",
    )
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    dep.save()
    local = LocalCompose(model=model, plan=plan, dep=dep)
    waits_for_exit = {d for s in model["services"].values() for d, c in s["depends_on"].items()
                      if c.get("condition") == "service_completed_successfully"}
    try:
        for name in start_order(model):
            svc = model["services"][name]
            env_vars = deploy.child_env(str(flwr_home))
            env_vars.update(service_env(name, svc, model, plan))
            comp = deploy.Component(
                name=name, argv=service_argv(name, svc, model, plan),
                log=str(work_dir / "logs" / f"{name}.log"),
                index=int(name.rsplit("-", 1)[1]) if name.startswith("supernode-") else 0,
            )
            deploy.start(comp, env_vars)
            if name in waits_for_exit:
                local.one_shot[name] = _wait_exit(comp, ready_timeout)
                continue
            dep.components.append(comp)
            dep.save()
            if name == "superlink":
                deploy.wait_for_log(comp, "Starting Fleet API", ready_timeout)
        for comp in dep.components:
            if comp.name.startswith("supernode-"):
                deploy.wait_for_log(comp, "SuperNode ID:", ready_timeout)
    except BaseException:
        down(local)
        raise
    return local


def _wait_exit(comp: deploy.Component, timeout: float) -> int:
    proc = deploy.child_process(comp.pid)
    if proc is None:
        raise deploy.DeployError(comp.name, "not started by this process", deploy.EXIT_USAGE)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        deploy.stop(comp, timeout=3)
        raise deploy.DeployError(comp.name, f"one-shot service still running after {timeout:.0f} s",
                                 deploy.EXIT_TIMEOUT) from None
    if code != 0:
        raise deploy.DeployError(comp.name, "one-shot service failed: "
                                 + deploy.describe_death(comp), deploy.EXIT_START_FAILED)
    return code


def connect(local: LocalCompose, root_cert: Path | None) -> None:
    """Write the `flwr` connection the README gives for the compose deployment."""
    deploy.write_connection(Path(local.dep.flwr_home), deploy.CONNECTION,
                            local.dep.control_address, root_cert)


def down(local: LocalCompose) -> None:
    for comp in reversed(local.dep.components):
        deploy.stop(comp, timeout=10)
    deadline = time.monotonic() + 10
    comps = local.dep.components
    while time.monotonic() < deadline and any(deploy.pid_alive(c.pid) for c in comps):
        time.sleep(0.2)


def log_of(local: LocalCompose, service: str) -> str:
    return Path(local.dep.state_dir, "logs", f"{service}.log").read_text(errors="replace")


def env_for(env_file: Path, **overrides: str) -> dict[str, str]:
    """The variables compose would see: the env file, then explicit overrides (e.g. CERTS_DIR)."""
    return {**read_env_file(env_file), **overrides}
