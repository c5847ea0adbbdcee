"""The run config and the node config: frozen, typed, parsed once at the Flower edge.

`RunConfig` = the common settings (`common_config.py`) + the chosen algorithm + every registered
algorithm's own parameters (declared in its file, `algorithms/<name>.py`). The run config is one
flat mapping of kebab-case keys, as Flower and `pyproject.toml` `[tool.flwr.app.config]` spell
it; the pyproject must list exactly `RunConfig.keys()` (its values are the offline demo's). A
parameter name that clashes with another key fails when this module is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from feddifrc_core.algorithms import (
    Algorithm,
    AlgorithmParams,
    algorithm_names,
    get_algorithm,
    params_classes,
)
from feddifrc_core.common_config import (
    BOOKKEEPING_KEYS,
    RESUMABLE_KEYS,
    CommonConfig,
    resolve_device,
)
from feddifrc_core.options import (
    ConfigError,
    kebab,
    option,
    option_fields,
    parse_fields,
    parse_value,
)

__all__ = ["BOOKKEEPING_KEYS", "RESUMABLE_KEYS", "ConfigError", "NodeConfig", "RunConfig",
           "resolve_device"]

P = TypeVar("P", bound=AlgorithmParams)


def _default_params() -> tuple[AlgorithmParams, ...]:
    return tuple(cls() for cls in params_classes())


@dataclass(frozen=True)
class RunConfig(CommonConfig):
    algorithm: str = option("feddifrc", choices=algorithm_names())  # algorithms/, one file each
    # Every registered algorithm's parameters, one object per parameter class: the run config is
    # complete whichever algorithm runs (a resumed run, a benchmark hash and config.json see the
    # same keys). Read them with `params_of` or through the algorithm (`new_algorithm`).
    params: tuple[AlgorithmParams, ...] = field(default_factory=_default_params)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every run-config key: the common ones, `algorithm`, then the algorithms' parameters."""
        return (*option_fields(cls), *_PARAM_KEYS)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run_config (kebab-case keys); every problem raises ConfigError."""
        own = option_fields(cls)
        unknown = sorted(set(run_config) - set(own) - set(_PARAM_KEYS))
        if unknown:
            raise ConfigError(f"run config: unknown key(s) {unknown}; known keys are "
                              f"{sorted(cls.keys())}")
        values = parse_fields(cls, {k: v for k, v in run_config.items() if k in own},
                              what="run config")
        params = tuple(
            p(**parse_fields(p, {k: run_config[k] for k in option_fields(p) if k in run_config},
                             what="run config"))
            for p in params_classes())
        return cls(**values, params=params)

    @classmethod
    def parse_text(cls, key: str, text: str) -> Any:
        """A value typed on a command line (`--set lr=0.1`) as the key's type, checked."""
        fields = {**option_fields(cls), **{k: fs[0] for k, fs in _PARAM_KEYS.items()}}
        if key not in fields:
            raise ConfigError(f"run config: unknown key {key!r}; known keys are {sorted(fields)}")
        return parse_value(fields[key], key, text, "run config", coerce_strings=True)

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (inverse of `from_flower`)."""
        out = {key: getattr(self, f.name) for key, f in option_fields(RunConfig).items()}
        for p in self.params:
            out.update({key: getattr(p, f.name) for key, f in option_fields(type(p)).items()})
        return out

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some keys changed (snake_case names, algorithm parameters too)."""
        return RunConfig.from_flower({**self.to_flower(), **{kebab(k): v for k, v in changes.items()}})

    def digest(self) -> str:
        """A short hash of the whole config: the server sends it, each client checks its own."""
        text = json.dumps(self.to_flower(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # --- the algorithm ------------------------------------------------------------------------------
    @property
    def algorithm_class(self) -> type[Algorithm]:
        """The registered class of `algorithm` (its flags, hooks and parameter class)."""
        return get_algorithm(self.algorithm)

    def params_of(self, cls: type[P]) -> P:
        """This run's values of one parameter class."""
        for p in self.params:
            if type(p) is cls:
                return p
        raise KeyError(f"{cls.__name__} is not the parameter class of a registered algorithm")

    def new_algorithm(self) -> Algorithm:
        """An object of the run's algorithm with its parameters (one per run on the server, one
        per message on a client)."""
        cls = self.algorithm_class
        return cls(self, self.params_of(cls.Params))

    def __post_init__(self) -> None:
        super().__post_init__()
        # Caught here, on the server, instead of in every ClientApp of round 1.
        problem = self.new_algorithm().config_problem()
        if problem:
            raise ConfigError(problem)


@dataclass(frozen=True)
class NodeConfig:
    """Per-node settings: simulation gives partition-id/num-partitions; deployment adds the rest."""

    partition_id: int = option(0, lo=0)
    num_partitions: int = option(1, lo=1)
    data_path: str = option("")  # overrides the run's data-path on this node
    device: str = option("")  # overrides the run's device on this node
    cache_dir: str = option("")  # overrides the run's cache-dir on this node

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        cfg = cls(**parse_fields(cls, node_config, what="node config", coerce_strings=True))
        if cfg.partition_id >= cfg.num_partitions:
            raise ConfigError(
                f"node config: partition-id must be < num-partitions ({cfg.num_partitions}), "
                f"got {cfg.partition_id}"
            )
        return cfg


def _param_keys() -> dict[str, list[dataclasses.Field[Any]]]:
    """Parameter key -> its field in each parameter class that has it. A key may appear in
    several classes only as one inherited declaration (same default and rule); a key that is
    also a common run-config key, or that two algorithms declare differently, fails here, at
    import, instead of in the first training step."""
    own = option_fields(RunConfig)
    keys: dict[str, list[dataclasses.Field[Any]]] = {}
    for cls in params_classes():
        for key, f in option_fields(cls).items():
            if key in own:
                raise TypeError(f"{cls.__qualname__}.{f.name}: {key!r} is already a run-config key")
            first = keys.setdefault(key, [f])[0]
            if f is not first and (f.default, dict(f.metadata)) != (first.default, dict(first.metadata)):
                raise TypeError(f"{cls.__qualname__}.{f.name}: {key!r} is declared by another "
                                "algorithm with another default or rule; give it another name")
            if f is not first:
                keys[key].append(f)
    return keys


_PARAM_KEYS = _param_keys()
