"""Differential privacy of the model updates: the modes, what they cover, their static checks.

The clipping and the noise are Flower's (the strategy wrappers of `flwr.serverapp.strategy` and
the client mods of `flwr.clientapp.mod`, driven by server_app/private_aggregation.py and
client_app/dp_clipping.py); this module only names the modes and says which arrays of a model
Flower's arithmetic sees. The accountant is `privacy_accounting.py`. docs/privacy.md has the
threat model.

What the mechanism covers, and why:
- the model's floating-point arrays (weights and BatchNorm's running statistics): each client's
  update to them is clipped to L2 norm C and their unweighted mean gets Gaussian noise;
- not the integer buffers (BatchNorm's step counters): under DP no client's counter leaves its
  node (the client-side mods send the global model's back) and the server keeps its own. The
  models use a fixed BatchNorm momentum, so the counters never change what a model computes;
  counted into the clipping norm they would dwarf the weights (flwr 1.39 counts a 0-d array in
  the norm but cannot scale it in place).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from feddifrc_core.common_config import CommonConfig

NONE = "none"
SERVER_FIXED = "server-fixed-clipping"
CLIENT_FIXED = "client-fixed-clipping"
SERVER_ADAPTIVE = "server-adaptive-clipping"
CLIENT_ADAPTIVE = "client-adaptive-clipping"
MODES = (NONE, SERVER_FIXED, CLIENT_FIXED, SERVER_ADAPTIVE, CLIENT_ADAPTIVE)
# What a DP run reports per round (metrics.jsonl) and at the end (summary.json): the run's
# (epsilon, delta) so far, the busiest client's number of noised means, the next clipping norm.
EPSILON, DELTA, RELEASES, CLIPPING_NORM = "dp-epsilon", "dp-delta", "dp-releases", "dp-clipping-norm"
REPORT_KEYS = (EPSILON, DELTA, RELEASES, CLIPPING_NORM)
CLIENT_SIDE = frozenset({CLIENT_FIXED, CLIENT_ADAPTIVE})  # clipped by Flower's mod on the client
ADAPTIVE = frozenset({SERVER_ADAPTIVE, CLIENT_ADAPTIVE})  # the clipping norm follows a quantile


def split_private(arrays: Mapping[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the floating arrays: what DP clips and noises, by sorted name; the rest: integer buffers).

    Sorted, because Flower's arithmetic depends on the order: its noise is drawn array after
    array, its norm summed so; a model's arrays come in another order from a checkpoint (a
    resumed run) than from a state_dict."""
    private = {k: arrays[k] for k in sorted(arrays)
               if np.issubdtype(np.asarray(arrays[k]).dtype, np.floating)}
    return private, {k: v for k, v in arrays.items() if k not in private}


def config_problem(cfg: CommonConfig) -> str | None:
    """A rule of the DP settings that the run config breaks (static: before any node is known;
    the rules that need the number of clients per round are Flower's, checked after node
    discovery and before the set-up stages), or None."""
    if cfg.differential_privacy == NONE:
        return None
    if cfg.aggregator != "fedavg":
        # The noise z * C / m is calibrated to the mean: one client moves it by at most C / m.
        # A median or trimmed mean of clipped updates moves by more, so the epsilon would be wrong.
        return (f"differential-privacy={cfg.differential_privacy!r} noises the clients' mean "
                f"and cannot be combined with aggregator={cfg.aggregator!r}: "
                "use aggregator='fedavg' or differential-privacy='none'")
    if cfg.secure_aggregation != "none" and cfg.differential_privacy != CLIENT_FIXED:
        # Flower's pairing with SecAgg+ is client-side fixed clipping: the server never sees one
        # update to clip, and the adaptive wrappers read each client's clipped bit in clear.
        why = ("server-side clipping needs each client's update"
               if cfg.differential_privacy not in CLIENT_SIDE
               else "Flower's adaptive clipping reads each client's clipped bit in clear")
        return (f"differential-privacy={cfg.differential_privacy!r} cannot run with "
                f"secure-aggregation={cfg.secure_aggregation!r} ({why}): use "
                f"differential-privacy={CLIENT_FIXED!r}, Flower's pairing with SecAgg+")
    if not cfg.dp_delta < 1.0:
        return f"'dp-delta' must be < 1, got {cfg.dp_delta!r}"
    z, stddev = cfg.dp_noise_multiplier, cfg.dp_clipped_count_stddev
    if cfg.differential_privacy in ADAPTIVE and z > 0 and stddev > 0 and z >= 2 * stddev:
        # Flower splits z between the update and the clipped-count query (Andrew et al. 2021):
        # the count's noise alone must stay below what z allows, z < 2 * stddev.
        return (f"'dp-noise-multiplier' must be < 2 * 'dp-clipped-count-stddev' "
                f"({2 * stddev:g}) with {cfg.differential_privacy!r}, got {z!r}: raise "
                "dp-clipped-count-stddev or lower dp-noise-multiplier")
    return None
