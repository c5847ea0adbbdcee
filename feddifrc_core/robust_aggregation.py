"""Robust aggregation of the model updates: the rules a run can choose and what each needs.

The rules themselves are Flower's (`flwr.serverapp.strategy` FedMedian, FedTrimmedAvg, Krum,
Bulyan), called by the server's aggregation component (`server_app/aggregator.py`) in place of
the weighted mean. This module holds only the arithmetic the run config checks before a run
starts, so the core stays free of Flower: how many replies a round needs for a rule to tolerate
`num-malicious-nodes` attackers, and which settings cannot go together.
"""

from __future__ import annotations

# "fedavg" is the plain weighted mean (feddifrc_core.aggregation); the others are Flower's rules.
AGGREGATORS = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "bulyan")
ROBUST = AGGREGATORS[1:]


def replies_needed(aggregator: str, num_malicious_nodes: int, beta: float) -> int | None:
    """The fewest replies per round with which `aggregator` tolerates `num_malicious_nodes`
    attackers; None when no number of replies is enough.

    - fedavg: tolerates none (one scaled update moves the mean anywhere);
    - fedmedian: a majority of honest values per coordinate, n >= 2f + 1;
    - fedtrimmedavg: each tail cut must hold f values, int(beta * n) >= f (Flower's cut);
    - krum: n >= 2f + 3 (Blanchard et al. 2017: 2f + 2 < n);
    - bulyan: n >= 4f + 3 (El Mhamdi et al. 2018; Flower's Bulyan skips smaller rounds).
    """
    f = num_malicious_nodes
    if aggregator == "fedavg":
        return 1 if f == 0 else None
    if aggregator == "fedmedian":
        return 2 * f + 1
    if aggregator == "fedtrimmedavg":
        if f == 0:
            return 1
        if beta <= 0:
            return None
        n = max(1, int(f / beta) - 1)  # int(beta * n) grows with n: the first n that cuts f
        while int(beta * n) < f:
            n += 1
        return n
    if aggregator == "krum":
        return 2 * f + 3
    if aggregator == "bulyan":
        return 4 * f + 3
    raise ValueError(f"aggregator must be one of {list(AGGREGATORS)}, got {aggregator!r}")


def aggregator_problem(aggregator: str, num_malicious_nodes: int, beta: float,
                       min_train_nodes: int, secure_aggregation: str = "none") -> str | None:
    """Why these settings cannot run, naming key, expected and received value; None if they can.

    A round aggregates at least `min-train-nodes` replies (fewer fail the round), and a rule's
    tolerance only grows with more replies, so checking `min-train-nodes` covers every round.
    """
    if secure_aggregation != "none" and aggregator != "fedavg":
        # A robust rule compares the clients' updates one by one; secure aggregation shows the
        # server only their sum.
        return (f"run config: 'aggregator' must be 'fedavg' with secure-aggregation="
                f"{secure_aggregation!r} (the server sees only the sum of the updates, a robust "
                f"rule needs each one), got {aggregator!r}; or set secure-aggregation='none'")
    needed = replies_needed(aggregator, num_malicious_nodes, beta)
    if needed is None:
        fix = ("trimmed-avg-beta > 0" if aggregator == "fedtrimmedavg"
               else f"an aggregator among {list(ROBUST)}")
        return (f"run config: 'num-malicious-nodes' must be 0 for aggregator={aggregator!r}"
                f"{f' with trimmed-avg-beta={beta}' if aggregator == 'fedtrimmedavg' else ''}, "
                f"which tolerates no attacker, got {num_malicious_nodes}; choose {fix}")
    if min_train_nodes < needed:
        return (f"run config: 'min-train-nodes' must be >= {needed} for aggregator="
                f"{aggregator!r} to tolerate num-malicious-nodes={num_malicious_nodes} in every "
                f"round it aggregates, got {min_train_nodes}; raise min-train-nodes (and "
                "fraction-train / the number of nodes) or lower num-malicious-nodes")
    return None
