"""Algorithms, one file each (both halves and their parameters), found by name.

Importing this package imports every module in it: an algorithm's file registers its class, so
adding an algorithm adds one file here (plus its `pyproject.toml` lines and tests) and edits no
other file.
"""

from __future__ import annotations

import importlib
import pkgutil

from feddifrc_core.algorithms.base import (
    Algorithm,
    AlgorithmParams,
    Arrays,
    Batch,
    ClientView,
    Federation,
    NoParams,
    Parts,
    TrainTransform,
    UpdateInfo,
    algorithm_names,
    frozen_copy,
    get_algorithm,
    params_classes,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Algorithm", "AlgorithmParams", "Arrays", "Batch", "ClientView", "Federation",
           "NoParams", "Parts", "TrainTransform", "UpdateInfo", "algorithm_names", "frozen_copy",
           "get_algorithm", "params_classes"]
