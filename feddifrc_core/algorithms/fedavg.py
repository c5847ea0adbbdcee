"""FedAvg (McMahan et al. 2017): local cross-entropy only; the server averages the models."""

from __future__ import annotations

from feddifrc_core.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
