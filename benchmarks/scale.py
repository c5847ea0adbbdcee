#!/usr/bin/env python3
"""Scale: peak memory and time per round of a Flower simulation with 10, 50 and 100 clients.

    nice -n 5 .venv/bin/python benchmarks/scale.py [--clients 10,50,100] [--rounds 5]
        [--per-client 12] [--sampled 10] [--out benchmarks/results/scale]

Each point is one complete simulation of the project's ServerApp + ClientApp through
`flwr.simulation.run_simulation` (Ray backend) in a child process: FedDifRC with the tiny
extractor (`tiny-sd`), federated-PCA set-up over ALL clients (every client extracts and caches
its features), then `--rounds` rounds with `--sampled` clients each. Every client holds
`--per-client` digits images (iid), so the work per sampled client is the same at every scale
and only the number of clients changes.

While the child runs, this process samples /proc every 0.25 s over the child's whole process
tree (ServerApp, Ray's raylet / GCS / workers): the sum of RSS and of PSS (proportional set
size: shared pages split between the processes that map them, so it does not double-count
torch's libraries or Ray's shared memory) and the largest single process. Time per round is
`round-seconds` from the run's metrics.jsonl. Writes `<out>/scale.json` and `<out>/scale.png`; logs and run folders go to `<out>/work/`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import inprocess
from feddifrc_core.processes import descendants

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- /proc sampling (no psutil) --------------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    return [root, *descendants(root)]


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) when it has exited."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            values = {
                line.split(":")[0]: int(line.split()[1]) * 1024
                for line in handle
                if line.split(":")[0] in ("Rss", "Pss")
            }
        return values.get("Rss", 0), values.get("Pss", 0)
    except (OSError, ValueError, IndexError):
        try:
            with open(f"/proc/{pid}/statm") as handle:
                rss = int(handle.read().split()[1]) * PAGE
            return rss, rss
        except (OSError, ValueError, IndexError):
            return 0, 0


@dataclass
class MemoryPeak:
    """Peaks over the samples taken so far."""

    rss_sum: int = 0
    pss_sum: int = 0
    largest_process_rss: int = 0
    processes: int = 0
    samples: int = 0
    by_role: dict[str, int] = field(default_factory=dict)  # peak PSS sum per role
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, PSS sum)


def _role(pid: int, driver: int) -> str:
    """server (the ServerApp + Ray driver), client workers (ClientApp actors), ray services."""
    if pid == driver:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return "ray services"
    return "client workers" if b"ClientAppActor" in cmdline else "ray services"


def sample_until_done(proc: subprocess.Popen, interval: float = 0.25) -> MemoryPeak:
    """Sample the child's process tree until it exits."""
    peak, t0 = MemoryPeak(), time.time()
    while proc.poll() is None:
        pids = process_tree(proc.pid)
        sizes = [rss_pss(pid) for pid in pids]
        roles: dict[str, int] = {}
        for pid, (_, pss_one) in zip(pids, sizes, strict=True):
            role = _role(pid, proc.pid)
            roles[role] = roles.get(role, 0) + pss_one
        for role, value in roles.items():
            peak.by_role[role] = max(peak.by_role.get(role, 0), value)
        rss, pss = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
        peak.rss_sum, peak.pss_sum = max(peak.rss_sum, rss), max(peak.pss_sum, pss)
        peak.largest_process_rss = max(peak.largest_process_rss, max(s[0] for s in sizes))
        peak.processes = max(peak.processes, len(pids))
        peak.samples += 1
        peak.timeline.append((round(time.time() - t0, 2), pss))
        time.sleep(interval)
    return peak


# --- one simulation (child process) ----------------------------------------------------------------
def run_config(clients: int, args: argparse.Namespace, out: Path) -> dict[str, object]:
    sampled = min(args.sampled, clients)
    return {
        "algorithm": "feddifrc",
        "dataset": "digits",
        "data-subset": "all",
        "partition": "iid",
        "seed": 7,
        "train-samples": args.per_client * clients,
        "test-samples": 200,
        "num-rounds": args.rounds,
        "fraction-train": sampled / clients,
        "min-train-nodes": sampled,
        "min-available-nodes": clients,
        "model": "small-cnn",
        "model-width": 8,
        "local-epochs": 1,
        "batch-size": 16,
        "diffusion-model": "tiny-sd",
        "diffusion-timestep": 300,
        "up-blocks": "1,2,3",
        "diffusion-image-size": 0,
        "extraction-batch-size": 8,
        "neg-num": 3,
        "torch-threads": 1,
        "device": "cpu",
        "round-timeout": 1800.0,
        "eval-batch-size": 512,
        # scratch: run folders and feature caches (the cache is deleted after each point)
        "output-dir": str(out / "work" / "runs"),
        "run-name": f"clients-{clients}",
        "cache-dir": str(out / "work" / "cache" / f"clients-{clients}"),
    }


def measure(clients: int, args: argparse.Namespace, out: Path) -> dict[str, object]:
    """Run one simulation in a child process, sampling its memory; return the record."""
    import shutil

    config = run_config(clients, args, out)
    run_dir = Path(str(config["output-dir"])) / str(config["run-name"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (the feature cache is kept apart)
    shutil.rmtree(str(config["cache-dir"]), ignore_errors=True)  # cold: extraction included
    config_path = out / "work" / f"clients-{clients}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1))
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    env = inprocess.loopback_ray_env(env)  # Ray on 127.0.0.1 only (scripts/ray_loopback.py)
    log_path = out / "work" / f"clients-{clients}.log"
    t0, load_start = time.time(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            # 2 Ray CPUs, 1 per ClientApp: two worker processes serve all clients in turn
            inprocess.command(config_path, clients, cpus_per_client=1, ray_cpus=2),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        result: dict[str, MemoryPeak] = {}
        sampler = threading.Thread(
            target=lambda: result.setdefault("peak", sample_until_done(proc))
        )
        sampler.start()
        proc.wait()
        sampler.join()
    wall = time.time() - t0
    load = [round(load_start, 1), round(os.getloadavg()[0], 1)]  # other jobs on the machine
    metrics_path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(x) for x in metrics_path.read_text().splitlines()]
        if metrics_path.is_file()
        else []
    )
    shutil.rmtree(str(config["cache-dir"]), ignore_errors=True)  # ~0.5 MB per client
    rounds = [r for r in rows if r.get("round", 0) >= 1]
    if proc.returncode != 0 or len(rounds) != args.rounds:
        raise RuntimeError(
            f"{clients} clients: the simulation did not complete "
            f"(exit {proc.returncode}, {len(rounds)} rounds); see {log_path}"
        )
    peak = result["peak"]
    seconds = [float(r["round-seconds"]) for r in rounds]
    mib = 1 << 20
    return {
        "clients": clients,
        "sampled-per-round": min(args.sampled, clients),
        "samples-per-client": args.per_client,
        "rounds": len(rounds),
        "peak-pss-mib": round(peak.pss_sum / mib, 1),
        "peak-rss-sum-mib": round(peak.rss_sum / mib, 1),
        "largest-process-rss-mib": round(peak.largest_process_rss / mib, 1),
        "peak-pss-mib-by-role": {k: round(v / mib, 1) for k, v in sorted(peak.by_role.items())},
        "max-processes": peak.processes,
        "memory-samples": peak.samples,
        "round-seconds": [round(s, 2) for s in seconds],
        "mean-round-seconds": round(sum(seconds) / len(seconds), 2),
        "wall-seconds": round(wall, 1),
        "load-average-1min": load,
        "test-accuracy": rounds[-1].get("test-accuracy"),
        "pss-timeline": peak.timeline[:: max(1, len(peak.timeline) // 200)],
    }


def plot(records: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(str(r["clients"])) for r in records]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_mem.plot(xs, [r["peak-pss-mib"] for r in records], "o-", label="process tree, PSS sum")
    ax_mem.plot(xs, [r["peak-rss-sum-mib"] for r in records], "s--", label="process tree, RSS sum")
    ax_mem.plot(
        xs, [r["largest-process-rss-mib"] for r in records], "^:", label="largest process RSS"
    )
    ax_mem.set(
        xlabel="clients (10 sampled per round)",
        ylabel="peak memory (MiB)",
        ylim=(0, None),
        title="Peak memory of the simulation",
    )
    ax_mem.legend(fontsize=8)
    ax_time.plot(xs, [r["mean-round-seconds"] for r in records], "o-", label="mean round")
    ax_time.set(
        xlabel="clients (10 sampled per round)",
        ylabel="seconds per round",
        ylim=(0, None),
        title="Time",
    )
    ax_wall = ax_time.twinx()
    ax_wall.plot(
        xs,
        [r["wall-seconds"] for r in records],
        "s--",
        color="tab:orange",
        label="whole run (Ray start, set-up over all clients)",
    )
    ax_wall.set(ylabel="seconds per run", ylim=(0, None))
    lines = ax_time.get_lines() + ax_wall.get_lines()
    ax_time.legend(lines, [str(line.get_label()) for line in lines], fontsize=8, loc="lower right")
    for ax in (ax_mem, ax_time):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="10,50,100", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=12, help="training images per client")
    parser.add_argument("--sampled", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--replot", action="store_true", help="redraw the plot from scale.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((args.out / "scale.json").read_text())["records"], args.out / "scale.png")
        return 0

    counts = [int(c) for c in args.clients.split(",")]
    if args.per_client * max(counts) > 1347:  # the digits training split
        parser.error(
            f"--per-client {args.per_client} x {max(counts)} clients exceeds the 1347 "
            "digits training images; lower --per-client"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for clients in counts:
        record = measure(clients, args, args.out)
        print(json.dumps({k: v for k, v in record.items() if k != "pss-timeline"}), flush=True)
        records.append(record)
        meta = {
            "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
            "command": " ".join(sys.argv),
            "records": records,
        }
        (args.out / "scale.json").write_text(json.dumps(meta, indent=1))
    plot(records, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.json'} and {args.out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
