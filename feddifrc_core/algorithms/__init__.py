"""Local-training algorithms, one file each, found by name (`get_algorithm`, `algorithm_names`).

Importing this package imports every module in it: an algorithm's file registers its class, so
adding an algorithm adds one file here (plus its tests) and edits no other file.
"""

from __future__ import annotations

import importlib
import pkgutil

from feddifrc_core.algorithms.base import (
    Algorithm,
    Batch,
    Parts,
    TrainTransform,
    algorithm_names,
    frozen_copy,
    get_algorithm,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Algorithm", "Batch", "Parts", "TrainTransform", "algorithm_names", "frozen_copy",
           "get_algorithm"]
