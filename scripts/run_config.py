"""The run config as the launchers see it, before any Flower process starts: the app's defaults
(pyproject `[tool.flwr.app.config]`, where `flwr run` starts from), `-c` items merged in order,
the whole checked by `RunConfig` itself, and TOML for `flwr run --run-config FILE`.

Used by `scripts/run_simulation.py` and by the benchmarks' launchers.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.reporting import RunFolder
from server_app.run_lock import RunFolderBusyError, RunFolderLock

ROOT = Path(__file__).resolve().parents[1]
_PAIR = r"([A-Za-z0-9_-]+)=('[^']*'|\"[^\"]*\"|[^\s'\"]+)"


def app_defaults() -> dict[str, Any]:
    """pyproject `[tool.flwr.app.config]`: the offline demo's values of every key."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def merge_run_config(items: list[str]) -> dict[str, object]:
    """Merge -c arguments in order: TOML files and 'k=v k2=v2' strings (later ones win).

    `flwr run` takes one TOML file or key-value strings, never both; merging here lets settings
    files stack (conf/paper-cifar10.toml + conf/paper-cifar10-fedavg.toml + a one-off change).
    Text that is neither is an error naming it, never silently dropped.
    """
    merged: dict[str, object] = {}
    for item in items:
        if item.endswith(".toml"):
            path = Path(item).expanduser()
            if not path.is_file():
                raise SystemExit(f"ERROR: run-config file {item} does not exist")
            try:
                merged.update(tomllib.loads(path.read_text()))
            except tomllib.TOMLDecodeError as err:
                raise SystemExit(f"ERROR: run-config file {item} is not valid TOML: {err}") from None
            continue
        if not re.fullmatch(rf"\s*{_PAIR}(\s+{_PAIR})*\s*", item):
            hint = (f"; did you mean the file {item}.toml?" if Path(f"{item}.toml").is_file() else
                    "; a settings file must end in .toml" if "=" not in item else
                    "; write key=value without spaces around '=', strings in quotes")
            raise SystemExit(f"ERROR: cannot read -c {item!r}: expected key=value pairs (e.g. "
                             f"-c \"algorithm='moon' num-rounds=3\") or a .toml file{hint}")
        pairs = re.findall(_PAIR, item)  # values are TOML literals, as for `flwr run`
        try:
            merged.update(tomllib.loads("\n".join(f"{k} = {v}" for k, v in pairs)))
        except tomllib.TOMLDecodeError as err:
            raise SystemExit(f"ERROR: cannot parse run-config {item!r} ({err}); write strings "
                             "in quotes, e.g. -c \"algorithm='moon' num-rounds=3\"") from None
    return merged


def runs_dir() -> Path:
    """Where the ServerApp puts run folders without an output-dir (it gets this in its env)."""
    return Path(os.environ.get("FEDDIFRC_RUNS_DIR") or ROOT / "runs").expanduser()


def check_run_config(overrides: Mapping[str, object], supernodes: int,
                     runs: Path | None = None) -> RunConfig:
    """Everything the ServerApp would refuse, said before a SuperLink starts: unknown keys (with
    the closest known ones), wrong types and ranges, too few SuperNodes for the run, SecAgg+
    settings that cannot work with that many, and (with `runs`, the default folder of run
    folders) a named run folder that another run writes into or that does not fit `resume`."""
    check_run_config_keys(overrides)  # the SuperLink only answers "Invalid run configuration"
    try:
        cfg = RunConfig.from_flower({**app_defaults(), **overrides})
    except ConfigError as err:
        raise SystemExit(f"ERROR: {err}") from None
    if supernodes < cfg.min_available_nodes:
        raise SystemExit(
            f"ERROR: --supernodes {supernodes} is below min-available-nodes "
            f"({cfg.min_available_nodes}): the run would wait for nodes forever. Use "
            f"--supernodes {cfg.min_available_nodes} or more, or lower min-available-nodes and "
            "min-train-nodes (-c \"min-available-nodes=1 min-train-nodes=1\").")
    try:  # e.g. a SecAgg+ threshold above the clients a round samples
        cfg.check_secure_aggregation(supernodes)
    except ConfigError as err:
        raise SystemExit(f"ERROR: {err} (with --supernodes {supernodes})") from None
    if runs is not None:
        check_run_folder(cfg, runs)
    return cfg


def check_run_folder(cfg: RunConfig, runs: Path) -> None:
    """SystemExit when the run's named folder is locked by another run or does not fit
    `resume`; creates nothing (the ServerApp's own lock stays the authority)."""
    if not cfg.run_name:  # a default name is new by construction (it holds the start time)
        return
    folder = (Path(cfg.output_dir).expanduser() if cfg.output_dir else runs) / cfg.run_name
    try:
        RunFolderLock.check_free(folder)
        RunFolder.check_resume(folder, cfg.resume, cfg.run_name)
    except (RunFolderBusyError, ConfigError) as err:
        raise SystemExit(f"ERROR: {err}") from None


def check_run_config_keys(values: Mapping[str, object]) -> None:
    """Name unknown run-config keys (with the closest known ones) before submitting."""
    known = RunConfig.keys()
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = "; ".join(f"{key!r}: did you mean {difflib.get_close_matches(key, known, n=2)}?"
                          for key in unknown)
        raise SystemExit(f"ERROR: unknown run-config key(s) {unknown} ({hints}). The keys are "
                         "those of pyproject.toml [tool.flwr.app.config] (docs/running.md).")


def to_toml(values: Mapping[str, object]) -> str:
    """Run-config values as TOML lines (`flwr run --run-config FILE`)."""
    def literal(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string

    return "".join(f"{key} = {literal(value)}\n" for key, value in values.items())
