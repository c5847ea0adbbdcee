"""Typed settings with their rule beside their default, and the one parser for all of them.

A settings class is a frozen dataclass whose fields are made with `option(...)`: the default
(with a comment that says why), the allowed choices or bounds, and a line of help. The run
config, the node config and every algorithm's own parameters (`algorithms/<name>.py`) are
such classes; `parse_fields` turns Flower's kebab-case mapping into their typed values, and
every problem is a `ConfigError` that names the key, what it expects and what it got.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def option(default: Any, *, choices: tuple[Any, ...] = (), lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, help: str = "") -> Any:
    """A settings field with its validation rule (and its help line) kept beside its default."""
    return dataclasses.field(default=default, metadata={
        "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "help": help})


def kebab(name: str) -> str:
    """Field name -> Flower key (`proximal_mu` -> `proximal-mu`)."""
    return name.replace("_", "-")


def option_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The option fields of a settings class by Flower key, in declaration order."""
    return {kebab(f.name): f for f in dataclasses.fields(cls) if "choices" in f.metadata}


def parse_fields(cls: type, raw: Mapping[str, Any], *, what: str,
                 coerce_strings: bool = False) -> dict[str, Any]:
    """Validated values by field name for the keys of `raw` (all must be `cls`'s options).

    `coerce_strings`: values may come as text (node configs, command lines) and are cast to
    the field's type first.
    """
    fields = option_fields(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    return {fields[key].name: parse_value(fields[key], key, value, what, coerce_strings)
            for key, value in raw.items()}


def parse_value(f: dataclasses.Field[Any], key: str, value: Any, what: str,
                coerce_strings: bool = False) -> Any:
    """One value checked against its field: type, then choices, then bounds."""
    expected = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
    value = _coerce(key, value, expected, what, coerce_strings)
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{what}: '{key}' must be one of {list(meta['choices'])}, got {value!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        bound = f"> {lo}" if meta["lo_open"] else f">= {lo}"
        raise ConfigError(f"{what}: '{key}' must be {bound}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{what}: '{key}' must be <= {hi}, got {value!r}")
    return value


def int_list(text: str, key: str, example: str, sort: bool = True) -> tuple[int, ...]:
    """A text setting of comma-separated distinct non-negative integers (`up-blocks`,
    `zero-shot-timesteps`), sorted unless `sort` is False; ConfigError naming `key` otherwise."""
    try:
        ids = tuple(int(part) for part in str(text).split(",") if part.strip() != "")
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated integers like {example}, got {text!r}") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"{key} must be distinct non-negative integers like {example}, got {text!r}")
    return tuple(sorted(ids)) if sort else ids


def _coerce(key: str, value: Any, expected: type, what: str, coerce_strings: bool) -> Any:
    if coerce_strings and isinstance(value, str) and expected is not str:
        text = value.strip()
        try:
            if expected is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            return expected(text)
        except ValueError:
            raise ConfigError(f"{what}: '{key}' expects {expected.__name__}, got {value!r}") from None
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: '{key}' expects true/false, got {value!r} ({type(value).__name__})")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what}: '{key}' expects an integer, got {value!r} ({type(value).__name__})")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what}: '{key}' expects a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: '{key}' expects a string, got {value!r} ({type(value).__name__})")
    return value
