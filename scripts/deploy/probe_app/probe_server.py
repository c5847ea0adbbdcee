"""Probe ServerApp: FedAvg that fails the run when a round gets too few replies."""

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class StrictFedAvg(FedAvg):
    """Fails the run when a round gets fewer replies than min-nodes (FedAvg only logs it)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if r.has_content()]
        if len(ok) < self.min_train_nodes:
            raise RuntimeError(
                f"round {server_round}: {len(ok)} of {self.min_train_nodes} required replies"
            )
        return super().aggregate_train(server_round, ok)


@app.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["min-nodes"])
    strategy = StrictFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]),
        num_rounds=int(context.run_config["num-rounds"]),
        timeout=float(context.run_config["round-timeout"]),
        train_config=ConfigRecord({"delay": float(context.run_config["client-delay"])}),
    )
    print("PROBE-FINAL", result.arrays.to_numpy_ndarrays()[0].tolist(), flush=True)
