"""Secure aggregation cost: Flower's SecAgg+ through the project's adapter vs a plaintext upload.

10 clients, the proposed defaults (every client a neighbour, threshold 2/3, Q = 2**28), in one
process on the serializing in-process grid of the tests (tests/secure_grid.py: every message
crosses as Flower's protobuf bytes, so the byte counts are what gRPC would carry). Per upload:
- a magnitude round (public bounds: `secure_bounds`) and the secure sum itself (`secure_sum`),
  4 round trips each; bytes down/up per client (median) and the plaintext reply's bytes;
- wall time of one sum (clients run one after another here: the time of the slowest client
  in a real federation is `client s` below, the server's own work `server s`);
- the largest error against the exact sum, beside the stated bound 2 n b / Q.
Uploads: the small-cnn model update (width 32: 127,661 values) and PCA statistics of one block
of C = 128 / 256 / 512 channels (count, sum, upper triangle of the outer products; plaintext:
the project's current full float64 matrix). With `--demo-cache DIR` also the demo's real
statistics (offline teacher, Fashion-MNIST, pyproject defaults, 10 partitions; extracted once
into DIR by the project's feature cache): the federated-PCA basis from the secure sums against
the one from the plaintext sums.

    nice -n 10 .venv/bin/python benchmarks/secagg_cost.py [--demo-cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client_app.secure_upload import secure_sum_reply, secure_upload_mod
from feddifrc_core import projection
from feddifrc_core.secure_encoding import SecAggSettings, sum_error_bound
from feddifrc_core.secure_uploads import pca_from_sums, pca_upload, weighted_update
from server_app.secure_aggregation import secure_bounds, secure_sum
from tests.secure_grid import SecureLoopbackGrid, _wire  # the tests' serializing grid
from wire import protocol
from wire.protocol import secure_sum_request

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "secagg"
NUM_CLIENTS = 10


def model_uploads(num_clients: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(secure uploads, plaintext uploads): the weighted update vs the local model (float32)."""
    import torch

    from feddifrc_core.models import build_model, model_state

    torch.manual_seed(0)
    g = model_state(build_model("small-cnn", 1, 10, 32, align_head="linear"))
    rng = np.random.default_rng(0)
    secure, plain = [], []
    for _ in range(num_clients):
        local = {n: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) if v.dtype.kind == "f"
                 else v + 47 for n, v in g.items()}
        secure.append(weighted_update(local, g, 600))
        plain.append(local)
    return secure, plain


def pca_uploads(stats: list[list[projection.PcaStats]]) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    return [pca_upload(s) for s in stats], [projection.stats_to_arrays(s) for s in stats]


def synthetic_stats(channels: int, num_clients: int) -> list[list[projection.PcaStats]]:
    """Mean-dominated features like the offline teacher's (600 images x 11 prompts per client)."""
    rng = np.random.default_rng(channels)
    mix = rng.normal(size=(channels, channels)) * np.geomspace(0.3, 0.003, channels)
    return [[projection.pca_stats(0.5 + rng.normal(size=(6600, channels)) @ mix)]
            for _ in range(num_clients)]


def demo_stats(cache_dir: Path, num_clients: int) -> list[list[projection.PcaStats]]:
    """The demo's real projection statistics (pyproject defaults), cached by the feature cache."""
    from feddifrc_core.algorithms.feddifrc import PROJECTION_STATS
    from feddifrc_core.client_session import ClientSession
    from feddifrc_core.config import NodeConfig, RunConfig
    from scripts.run_config import app_defaults

    cfg = RunConfig.from_flower({**app_defaults(), "cache-dir": str(cache_dir)})
    out = []
    for p in range(num_clients):
        node = NodeConfig.from_flower({"partition-id": p, "num-partitions": num_clients})
        stats = ClientSession.get(cfg, node).answer(PROJECTION_STATS, {})
        out.append(projection.arrays_to_stats(stats))
    return out


class TimedApp:
    """The ClientApp, timing each call (the client's own compute per message)."""

    def __init__(self, app: ClientApp) -> None:
        self.app, self.seconds = app, 0.0

    def __call__(self, msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        try:
            return self.app(msg, context)
        finally:
            self.seconds += time.perf_counter() - t0


def measure(name: str, uploads: list[dict[str, np.ndarray]], plain: list[dict[str, np.ndarray]],
            settings: SecAggSettings) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    app = ClientApp()

    @app.train(mods=[secure_upload_mod])
    def train(msg: Message, context: Context) -> Message:
        return secure_sum_reply(msg, uploads[int(context.node_config["partition-id"])])

    timed = TimedApp(app)
    grid = SecureLoopbackGrid(timed, len(uploads))  # type: ignore[arg-type]
    nodes = {n: grid.partition(n) for n in grid.contexts}
    row: dict[str, Any] = {"upload": name, "values per client": int(sum(v.size for v in uploads[0].values()))}
    for label in ("bounds", "sum"):
        grid.bytes_down.clear()
        grid.bytes_up.clear()
        timed.seconds, t0 = 0.0, time.perf_counter()
        if label == "bounds":
            bounds, _ = secure_bounds(grid, nodes, RecordDict(), settings, seed=1, stage=name + ".b")
        else:
            result = secure_sum(grid, nodes, RecordDict(), settings, seed=1, stage=name,
                                bounds=bounds)
        wall = time.perf_counter() - t0
        row[f"{label} down B"] = int(statistics.median(grid.bytes_down.values()))
        row[f"{label} up B"] = int(statistics.median(grid.bytes_up.values()))
        row[f"{label} client s"] = round(timed.seconds / len(uploads), 3)
        row[f"{label} server s"] = round(wall - timed.seconds, 3)
    # The plaintext upload the project sends today: one reply with the client's arrays.
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    request.metadata.__dict__["_message_id"] = "m0"
    reply = Message(RecordDict({"arrays": protocol.to_record(plain[0]),
                                "config": ConfigRecord({})}), reply_to=request)
    row["plain up B"] = _wire(reply)[1]
    q = settings.quantization_for(len(uploads))
    exact = {k: np.sum([u[k] for u in uploads], axis=0) for k in uploads[0]}
    row["max error / bound"] = round(max(
        float(np.abs(result.arrays[k] - exact[k]).max()) / sum_error_bound(bounds[k], len(uploads), q)
        for k in exact), 3)
    row["counts exact"] = all(np.array_equal(result.arrays[k], exact[k]) for k in exact
                              if exact[k].dtype.kind == "i")
    return row, result.arrays


def basis_agreement(stats: list[list[projection.PcaStats]], secure_sums: dict[str, np.ndarray],
                    feature_dim: int, probe: list[np.ndarray]) -> list[dict[str, float]]:
    """Per block: the largest principal angle between the secure and plaintext PCA subspaces, and
    the largest difference of projected vectors relative to their largest entry."""
    plain = projection.merge_all(stats)
    secure = pca_from_sums(secure_sums)
    dims = [s.dim for s in plain]
    b_plain = projection.shared_bases("federated-pca", feature_dim, dims, 7, plain)
    b_secure = projection.shared_bases("federated-pca", feature_dim, dims, 7, secure)
    out = []
    for block, (bp, bs, x) in enumerate(zip(b_plain, b_secure, probe, strict=True)):
        cosines = np.linalg.svd(bp.components.T @ bs.components, compute_uv=False)
        yp, ys = (x - bp.mean) @ bp.components, (x - bs.mean) @ bs.components
        # Distances between projected vectors: what the losses see, blind to a rotation of the
        # basis (where all channels are kept, near-equal eigenvalues may swap their directions).
        dp, ds = (np.linalg.norm(y[:, None] - y[None], axis=-1) for y in (yp, ys))
        out.append({"block": block, "channels": bp.in_dim, "kept": bp.out_dim,
                    "max angle deg": float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1)))),
                    "max projected diff / max": float(np.abs(ys - yp).max() / np.abs(yp).max()),
                    "max distance diff / max": float(np.abs(ds - dp).max() / dp.max())})
    return out


def ray_timing(uploads: list[dict[str, np.ndarray]], plain: list[dict[str, np.ndarray]],
               settings: SecAggSettings, repeats: int = 3) -> dict[str, float]:
    """Wall seconds per upload inside a ServerApp on Flower's Ray simulation (10 nodes, 2 CPUs):
    a plaintext train round trip vs the magnitude round and the secure sum (medians)."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    times: dict[str, list[float]] = {"plain s": [], "bounds s": [], "sum s": []}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        node_ids: list[int] = []
        while len(node_ids) < len(uploads):
            node_ids = sorted(grid.get_node_ids())
        asks = [Message(RecordDict(), dst_node_id=n, message_type="query.partition")
                for n in node_ids]
        nodes = {m.metadata.src_node_id: int(cast(int, m.content.config_records["p"]["id"]))
                 for m in grid.send_and_receive(asks)}
        for r in range(repeats):
            t0 = time.perf_counter()
            replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n,
                                                     message_type="train") for n in nodes])
            assert all(not m.has_error() for m in replies)
            t1 = time.perf_counter()
            bounds, _ = secure_bounds(grid, nodes, RecordDict(), settings, seed=1, stage=f"b{r}")
            t2 = time.perf_counter()
            secure_sum(grid, nodes, RecordDict(), settings, seed=1, stage=f"s{r}", bounds=bounds)
            t3 = time.perf_counter()
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(value)

    client = ClientApp()

    @client.train(mods=[secure_upload_mod])
    def train(msg: Message, context: Context) -> Message:
        p = int(context.node_config["partition-id"])
        if secure_sum_request(msg) is None:  # the plaintext round trip
            return Message(RecordDict({"arrays": protocol.to_record(plain[p])}),
                           reply_to=msg)
        return secure_sum_reply(msg, uploads[p])

    @client.query("partition")
    def partition(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"p": ConfigRecord({"id": pid})}), reply_to=msg)

    run_simulation(server_app=server, client_app=client, num_supernodes=len(uploads),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2}})
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--demo-cache", type=Path, default=None,
                        help="feature-cache folder for the demo's real statistics (extracts once)")
    parser.add_argument("--quantization-range", type=int, default=0,
                        help="secagg-quantization-range (0 = auto: 2**28 for 10 clients)")
    parser.add_argument("--ray", action="store_true",
                        help="also time the model update on Flower's Ray simulation (10 nodes)")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    settings = SecAggSettings(quantization_range=args.quantization_range)
    rows, agreement = [], []
    rows.append(measure("small-cnn update", *model_uploads(NUM_CLIENTS), settings)[0])
    for channels in (128, 256, 512):
        stats = synthetic_stats(channels, NUM_CLIENTS)
        row, sums = measure(f"PCA stats C={channels}", *pca_uploads(stats), settings)
        rows.append(row)
    if args.demo_cache is not None:
        stats = demo_stats(args.demo_cache, NUM_CLIENTS)
        row, sums = measure("PCA stats, demo (128/64/32)", *pca_uploads(stats), settings)
        rows.append(row)
        rng = np.random.default_rng(0)  # probe vectors: draws around each block's mean
        probe = [s.sum / s.count + rng.normal(size=(256, s.dim)) * 0.2
                 for s in projection.merge_all(stats)]
        agreement = basis_agreement(stats, sums, 128, probe)
    ray = ray_timing(*model_uploads(NUM_CLIENTS), settings) if args.ray else {}
    args.out.mkdir(parents=True, exist_ok=True)
    command = "nice -n 10 .venv/bin/python benchmarks/secagg_cost.py " + " ".join(sys.argv[1:])
    record = {"clients": NUM_CLIENTS, "settings": settings.__dict__,
              "quantization": settings.quantization_for(NUM_CLIENTS), "rows": rows,
              "demo basis": agreement, "ray": ray, "command": command.strip()}
    (args.out / "secagg_cost.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "secagg_cost.md").write_text(report(record))
    print(report(record))


def report(record: dict[str, Any]) -> str:
    cols = ["upload", "values per client", "plain up B", "sum down B", "sum up B",
            "bounds down B", "bounds up B", "sum client s", "sum server s", "bounds client s",
            "bounds server s", "max error / bound", "counts exact"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in record["rows"]]
    if record["demo basis"]:
        lines += ["", "| block | channels | kept | max principal angle (deg) | max projected diff "
                  "/ max | max distance diff / max |", "|---|---|---|---|---|---|"]
        lines += [f"| {b['block']} | {b['channels']} | {b['kept']} | {b['max angle deg']:.2e} | "
                  f"{b['max projected diff / max']:.2e} | {b['max distance diff / max']:.2e} |"
                  for b in record["demo basis"]]
    if record["ray"]:
        lines += ["", "Ray simulation, " + ", ".join(f"{k}: {v}" for k, v in record["ray"].items())]
    lines += ["", f"{record['clients']} clients, Q = {record['quantization']}. "
              f"Command: `{record['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
