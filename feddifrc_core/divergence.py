"""Divergence guards: a model or a metric that holds NaN or infinity ends the run before it is kept.

Training can blow up (a learning rate far too high, broken inputs) while its loss still looks
finite: at lr=1e6 the clients' mean loss was 4.3e22 while a client's model had 10 of its 24 tensors
NaN or inf. So every party checks what it hands on, not only the loss: the client its trained weights,
the server the aggregate and the round's metrics. No non-finite number then reaches a checkpoint,
`metrics.jsonl` (JSON has no NaN) or the final model, and a resumed run starts from a finite round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

# How many offending names a message lists (a ResNet has dozens of tensors).
_SHOWN = 4


class DivergedError(RuntimeError):
    """Training diverged: a model or a metric holds NaN or infinity."""


def nonfinite_arrays(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays that hold a NaN or an infinity (integer buffers such as
    BatchNorm's step counter cannot)."""
    return [name for name, value in arrays.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating)
            and not bool(np.isfinite(value).all())]


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers that hold NaN or infinity."""
    with torch.no_grad():
        return [name for name, value in model.state_dict().items()
                if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def nonfinite_metrics(row: Mapping[str, Any]) -> list[str]:
    """Keys whose value is a float NaN or infinity."""
    return [key for key, value in row.items()
            if isinstance(value, (float, np.floating)) and not math.isfinite(float(value))]


def describe(names: list[str], total: int, noun: str) -> str:
    """'3 of 24 tensors (conv1.weight, fc.bias, ...)' for messages."""
    shown = ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
    return f"{len(names)} of {total} {noun} ({shown})"


def check_model(arrays: Mapping[str, np.ndarray], what: str, advice: str) -> None:
    """DivergedError naming the non-finite arrays of `what` (e.g. 'round 2: the aggregated
    model'), followed by `advice`."""
    bad = nonfinite_arrays(arrays)
    if bad:
        raise DivergedError(f"{what} holds NaN or inf in {describe(bad, len(arrays), 'arrays')}:"
                            f" training diverged. {advice}")


def check_metrics(row: Mapping[str, Any], what: str, advice: str) -> None:
    """DivergedError naming the metrics of `row` that are NaN or infinite."""
    bad = nonfinite_metrics(row)
    if bad:
        values = ", ".join(f"{key}={row[key]}" for key in bad[:_SHOWN])
        raise DivergedError(f"{what}: {values} is not finite: training diverged. {advice}")


def advice(server_round: int, lr: float) -> str:
    """What to do when the server finds round `server_round` diverged (nothing of it is kept)."""
    if server_round == 0:  # nothing trained yet: the data, not the learning rate
        return "Nothing was saved. Check the test data for NaN/inf."
    return (f"Nothing of round {server_round} was saved. Start a new run with a lower lr (now "
            f"{lr:g}), or check the data for NaN/inf.")
