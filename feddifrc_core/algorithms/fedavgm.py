"""FedAvgM (Hsu et al. 2019), the server-momentum member of FedOpt (Reddi et al. 2021): clients
train as in FedAvg; the server treats the change of the mean model as a gradient step and keeps a
momentum buffer of it. The update is Flower's `flwr.serverapp.strategy.FedAvgM`'s:

    d_t = w_t - mean_t;  v_t = beta * v_{t-1} + d_t  (v_1 = d_1);  w_{t+1} = w_t - eta * v_t

on the parameters. BatchNorm's running statistics take the clients' mean, unlike in Flower's
FedAvgM (which steps every array): they are measurements, not parameters, and momentum drove a
running variance below zero within 3 rounds (-0.34 in tests/test_simulation.py's tiny run), so
evaluation gave NaN. The momentum buffer is server state: checkpointed, so a resumed run
continues with it. Only the server half is new, so any client objective composes with it by
inheritance (docs/architecture.md, "Adding an algorithm").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feddifrc_core.algorithms.base import Algorithm, AlgorithmParams, Arrays
from feddifrc_core.models import is_running_statistic
from feddifrc_core.options import option


@dataclass(frozen=True)
class FedAvgMParams(AlgorithmParams):
    # eta = 1 with beta = 0 is FedAvg; Hsu et al. find beta = 0.9 with eta = 1 a robust choice
    server_learning_rate: float = option(1.0, lo=0.0, lo_open=True, help="server step size eta")
    server_momentum: float = option(0.9, lo=0.0, hi=1.0, help="server momentum beta")


class FedAvgM(Algorithm):
    name = "fedavgm"
    Params = FedAvgMParams
    params: FedAvgMParams

    def aggregate(self, current: Arrays, mean: Arrays, uploads: Arrays,
                  server_round: int) -> Arrays:
        eta, beta = self.params.server_learning_rate, self.params.server_momentum
        out: Arrays = {}
        for key, avg in mean.items():
            if is_running_statistic(key) or not np.issubdtype(avg.dtype, np.floating):
                out[key] = avg  # BatchNorm's statistics: the clients' mean
                continue
            step = current[key] - avg  # the pseudo-gradient
            if beta > 0:
                buffer = self.state.get(f"momentum.{key}")
                step = step if buffer is None else beta * buffer + step
                self.state[f"momentum.{key}"] = step
            out[key] = (current[key] - eta * step).astype(avg.dtype)
        return out
