"""Accuracy benchmark: FedDifRC against FedAvg, FedProx, MOON and controls, through the real
Flower app.

Every run is a full Flower simulation of the project's ServerApp + ClientApp (10 SuperNodes; all
of them train each round in the CPU budget, 5 in the paper's) on the Fashion-MNIST PRIVATE split
(the half the offline teacher never saw), with the same partition, seeds and budget for every
method. Methods (`--methods`):

    fedavg, fedprox, moon                      baselines
    fedavg-kd                                  control: FedAvg + distillation toward the teacher's
                                               zero-shot diffusion classifier (its logits)
    feddifrc                                   CE + TDCL + NDCR
    feddifrc-tdcl, feddifrc-ndcr               ablations (lambda-ndcr = 0 / lambda-tdcl = 0)
    feddifrc-ssl, simclr                       self-supervised entry (`--ssl`): linear-probe accuracy;
                                               round 0 of a run is the randomly initialised encoder
    <method>+warm, feddifrc+no-head            variants (VARIANTS): warm start from the public half
                                               (control); FedDifRC aligning without the head

Every run also holds out 2,000 validation images of the test split (disjoint from the 2,000
test images); tables report the primary metric, the last-5 mean, and the test accuracy at the
round validation chose (accuracy_report.py).

    nice -n 5 .venv/bin/python benchmarks/accuracy.py --suite ten-seed --publish docs/results.md
                                      # the ten-seed table with the controls, in its run order
    nice -n 5 .venv/bin/python benchmarks/accuracy.py --seeds 7   # every method, one seed
    nice -n 5 .venv/bin/python benchmarks/accuracy.py --suite ssl-three-seed   # self-supervised
    .venv/bin/python benchmarks/accuracy.py --out benchmarks/results/accuracy/cpu-v2 \\
        --suite five-seed --report-only --publish docs/results.md   # redraw older records
    .venv/bin/python benchmarks/accuracy.py --paper --gpus-per-client 0.2   # paper budget, GPU
    .venv/bin/python benchmarks/accuracy.py --methods feddifrc --set tau=0.1 --tag tau0.1  # a knob

Resumable: each finished (method, alpha, seed) run is recorded in <out>/results.json and skipped on
a rerun; an interrupted run continues from its last checkpoint (the ServerApp's `resume`). The
FedDifRC variants of one (alpha, seed) share their clients' cached diffusion representations
(<out>/cache), and the runs of one seed at another alpha reuse the extracted rows per image (and
fedavg-kd its teacher logits per image); the warm start is trained once per seed and shared.
Outputs in <out>: results.json, table.md, accuracy.png, runs/<run>/ (run folders).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import accuracy_report as report
from accuracy_plan import (
    CONTROLS,
    CPU_BUDGET,
    CPU_FOLDER,
    FEDDIFRC_ARMS,
    PAPER_BUDGET,
    RANDOM_INIT,
    SELF_SUPERVISED,
    SUITES,
    SUPERVISED,
    VARIANTS,
    RunSpec,
    algorithm,
    command_for,
    plan_runs,
    pyproject_defaults,
    suite_specs,
)

from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.provenance import git_revision

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "accuracy"
RESULTS_FORMAT = 1


def launch(spec: RunSpec, out: Path, args: argparse.Namespace) -> Path:
    """Run one simulation in a child process; return its run folder. Raises on failure."""
    runs_dir = out / "runs"
    folder = runs_dir / spec.run_name
    has_checkpoint = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    config = {**spec.overrides, "output-dir": str(runs_dir), "run-name": spec.run_name,
              "cache-dir": str(out / "cache"), "resume": has_checkpoint}
    config_path = out / "pending" / f"{spec.run_name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2))
    log_path = out / "logs" / f"{spec.run_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = loopback_ray_env({**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
                            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                            "RAY_DEDUP_LOGS": "0",
                            "FEDDIFRC_GIT_SHA": os.environ.get("FEDDIFRC_GIT_SHA") or git_revision()})
    if args.engine == "inprocess":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(config_path),
               "--clients", str(args.clients), "--cpus-per-client", str(args.cpus_per_client),
               "--gpus-per-client", str(args.gpus_per_client)]
    else:  # flwr-run: the `flwr run` path with its own SuperLink (scripts/run_simulation.py)
        toml_path = config_path.with_suffix(".toml")
        toml_path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
        cmd = [sys.executable, str(ROOT / "scripts" / "run_simulation.py"),
               "--supernodes", str(args.clients), "--cpus-per-client", str(args.cpus_per_client),
               "--gpus-per-client", str(args.gpus_per_client), "-c", str(toml_path)]
    print(f"[{time.strftime('%H:%M:%S')}] {spec.key}: running ({'resuming' if has_checkpoint else 'new'}"
          f", log {log_path.relative_to(out)})", flush=True)
    with open(log_path, "a", encoding="utf-8") as log, LoadSampler() as load:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.run_timeout)
    if proc.returncode != 0 or not (folder / "summary.json").is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{spec.key} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                           f"{tail}")
    config_path.unlink(missing_ok=True)
    _write_json(folder / LOAD_FILE, load.summary())
    return folder


LOAD_FILE = "machine-load.json"


def loopback_ray_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the settings that keep the child's Ray on 127.0.0.1 (scripts/ray_loopback.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from ray_loopback import WARNING, build, loopback_env

    library = build()
    if library is None:
        print(WARNING, file=sys.stderr)
    return loopback_env(env, library)


class LoadSampler:
    """The machine's 1-minute load average, sampled while a run is going on.

    A run's timings (and, on a contended machine, its round timeouts) depend on what else ran
    beside it: every record carries the load before the run and its mean and max during it.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        import threading

        self.every_s, self.samples = every_s, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        during = self.samples[1:] or self.samples
        return {"cpus": os.cpu_count(), "load1-before": round(self.samples[0], 2),
                "load1-mean": round(sum(during) / len(during), 2),
                "load1-max": round(max(during), 2), "samples": len(during),
                "sampled-every-s": self.every_s}


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def read_run(spec: RunSpec, folder: Path) -> dict[str, Any]:
    """The record of one finished run: per-round test (and validation) accuracy, best/mean,
    timings, config. Records of runs without a validation set have `val-accuracy` None."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    evaluated = [r for r in rows if isinstance(r.get("test-accuracy"), (int, float))]
    trained = [r for r in evaluated if int(r["round"]) > 0]
    accs = [float(r["test-accuracy"]) for r in trained]
    extra_metrics = sorted({k for r in rows for k in r if "knn" in k or "probe" in k})
    start = next((r for r in evaluated if int(r["round"]) == 0), {})  # the initial model

    def curve(key: str) -> list[float] | None:  # a per-round metric beside the test accuracy
        values = [r.get(key) for r in trained]
        return ([float(v) for v in values]
                if values and all(isinstance(v, (int, float)) for v in values) else None)

    def initial(key: str) -> float | None:
        return float(start[key]) if isinstance(start.get(key), (int, float)) else None

    return {
        "key": spec.key,
        "method": spec.method,
        "tag": spec.tag,
        "alpha": spec.alpha,
        "seed": spec.seed,
        "config-hash": spec.config_hash,
        "teacher-weights-sha256": spec.teacher_weights or None,
        "run-config": spec.overrides,
        "resolved-run-config": _resolved_config(folder),
        "run-folder": str(folder),
        "rounds": [int(r["round"]) for r in trained],
        "accuracy": accs,
        "val-accuracy": curve("val-accuracy"),
        "initial-accuracy": initial("test-accuracy"),
        "initial-val-accuracy": initial("val-accuracy"),
        "best": max(accs) if accs else None,
        "mean": sum(accs) / len(accs) if accs else None,
        "final": accs[-1] if accs else None,
        "extra": {k: [r.get(k) for r in rows] for k in extra_metrics},
        # self-supervised runs: the kNN accuracy beside the probe's, on test and validation
        "knn-accuracy": curve("test-knn-accuracy"),
        "val-knn-accuracy": curve("val-knn-accuracy"),
        "initial-knn-accuracy": initial("test-knn-accuracy"),
        "initial-val-knn-accuracy": initial("val-knn-accuracy"),
        # the last round's client losses (train-tdcl, train-ndcr, ...): how close alignment got
        "last-round": {k: v for k, v in (trained[-1] if trained else {}).items()
                       if k.startswith("train-") and isinstance(v, (int, float))},
        "train-seconds-per-round": _mean([r.get("train-seconds") for r in trained]),
        "extract-seconds-first-round": trained[0].get("extract-seconds") if trained else None,
        "round-seconds": _mean([r.get("round-seconds") for r in trained]),
        "wall-seconds": json.loads((folder / "summary.json").read_text()).get("wall-seconds"),
        "machine-load": (json.loads((folder / LOAD_FILE).read_text())
                         if (folder / LOAD_FILE).is_file() else None),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- results store, table, plot --------------------------------------------------------------------
class ResultsStore:
    """<out>/results.json: one record per finished run, rewritten atomically after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the file: several harness processes may share one results folder."""
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("format") != RESULTS_FORMAT:
                raise ValueError(f"{self.path} has format {data.get('format')!r}, expected "
                                 f"{RESULTS_FORMAT}; use another --out")
            self.records = {r["key"]: r for r in data["runs"]}

    def done(self, spec: RunSpec) -> bool:
        self.reload()
        record = self.records.get(spec.key)
        if record is None:
            return False
        if record["config-hash"] != spec.config_hash:
            raise ValueError(
                f"{spec.key} is recorded in {self.path} with another configuration (hash "
                f"{record['config-hash']}, now {spec.config_hash}); give the variant a --tag, "
                "use another --out, or delete that record to rerun it")
        return True

    def add(self, record: dict[str, Any]) -> None:
        """Merge one record into the file under a lock (read, merge, atomic replace)."""
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.reload()
            self.records[record["key"]] = record
            _write_json(self.path, {"format": RESULTS_FORMAT, "runs": sorted(
                self.records.values(), key=lambda r: r["key"])})


def _plots_line(plots: Sequence[Path], where: Path) -> str:
    return "Plots: " + ", ".join(f"`{os.path.relpath(p, where)}`" for p in plots) + ".\n"


def write_reports(store: ResultsStore, out: Path, command: str,
                  publish_to: Path | None = None, earlier: bool = False) -> str:
    """table.md (+ ssl_table.md), the plots and summary.json from every recorded run; with
    `publish_to`, the same tables replace the marked blocks `accuracy:<folder>` and
    `accuracy-ssl:<folder>` of that document (docs/results.md). `earlier`: the records were made
    with other settings than the command plans today (an older version), and the tables say so."""
    store.reload()
    records = list(store.records.values())
    sup = [r for r in records if r["method"] in SUPERVISED]
    ssl = [r for r in records if r["method"] in SELF_SUPERVISED]
    text, summary = "", {}
    for subset, name, is_ssl in ((sup, "table", False), (ssl, "ssl_table", True)):
        if not subset:
            continue
        baseline = SELF_SUPERVISED[-1] if is_ssl else SUPERVISED[0]  # simclr / fedavg
        order = (*SELF_SUPERVISED, *SUPERVISED) if is_ssl else (*SUPERVISED, *SELF_SUPERVISED)
        table = report.table_markdown(
            subset, baseline, order, metric="linear-probe accuracy" if is_ssl else "test accuracy",
            initial_row_of=SELF_SUPERVISED[0] if is_ssl else None)
        target = SELF_SUPERVISED[0] if is_ssl else "feddifrc"
        rivals = [m for m in order if m != target and not algorithm(m).needs_targets]
        rivals += [c for c in CONTROLS if c not in rivals and not is_ssl]  # fedavg+warm
        # a tagged variant of the target (e.g. feddifrc+no-head) against the target itself
        variants = sorted({report.label_of(r) for r in subset if r["method"] == target and r.get("tag")})
        paired, against, metric = subset, rivals, ""
        knn = [v for v in (report.metric_view(r, "knn-accuracy") for r in subset) if v] if is_ssl else []
        if is_ssl:  # paired with the encoder the runs start from, too: does training improve it?
            paired = subset + report.initial_runs(subset, target, RANDOM_INIT)
            against, metric = [*rivals, RANDOM_INIT], "linear-probe accuracy"
        versus = [report.versus_markdown(paired, target, against, metric)]
        if knn:  # the encoder judged a second way: cosine 20-NN on the same features
            table += "\n" + report.table_markdown(
                knn, baseline, order, metric="kNN accuracy (20-NN, cosine)",
                initial_row_of=SELF_SUPERVISED[0])
            versus.append(report.versus_markdown(
                knn + report.initial_runs(knn, target, RANDOM_INIT), target, against,
                "kNN accuracy"))
        controls = "" if is_ssl else report.controls_markdown(subset, FEDDIFRC_ARMS, CONTROLS)
        head_rule = "" if is_ssl else report.head_rule_markdown(subset)
        for extra_table in (*versus, controls,
                            *(report.versus_markdown(subset, v, [target]) for v in variants),
                            head_rule, report.losses_markdown(subset)):
            table += f"\n{extra_table}" if extra_table else ""
        plain = [r for r in subset if not r.get("tag")] or subset  # variants may change budget keys
        budget = {k: v for k, v in plain[0]["run-config"].items()
                  if k in ("num-rounds", "train-samples", "test-samples", "validation-samples",
                           "model", "model-width", "local-epochs", "lr", "batch-size",
                           "fraction-train", "torch-threads")}
        sampled = [r["machine-load"] for r in subset if r.get("machine-load")]
        loads = [m["load1-mean"] for m in sampled]
        load_line = (f"Machine load during the runs (1-min load average, each run's mean): "
                     f"{min(loads):.2f} to {max(loads):.2f} over {len(loads)} runs on "
                     f"{sampled[0]['cpus']} cores (results.json: `machine-load`)."
                     "\n" if loads else "")
        plot = out / f"{'ssl_' if is_ssl else ''}accuracy.png"
        plots = [plot, *([out / "ssl_knn_accuracy.png"] if knn else [])]
        made_by = command_for({r["key"] for r in subset}, command)
        when = (" at an earlier revision of this benchmark, with other settings than it plans "
                "today (results.json: `run-config`); redrawn from its records with "
                "--report-only" if earlier else "")
        head = (f"{table}\nBudget: {json.dumps(budget)}\n{load_line}Command: `{made_by}`{when}\n"
                "Per-run configs: results.json (`run-config`). ")
        body = head + _plots_line(plots, out)
        atomic_write_text(out / f"{name}.md", body)
        report.plot_accuracy(subset, plot, order,
                             "linear-probe accuracy (%)" if is_ssl else "global test accuracy (%)")
        if knn:
            report.plot_accuracy(knn, plots[1], order, "kNN accuracy (%)")
            summary[f"{name}_knn"] = report.summarize(knn, baseline)
        summary[name] = report.summarize(subset, baseline)
        if publish_to is not None:
            block = f"accuracy{'-ssl' if is_ssl else ''}:{out.name}"
            report.publish(publish_to, block, head + _plots_line(plots, publish_to.resolve().parent))
        text += body
    summary["primary-metric"] = (f"mean test accuracy of the last {report.LAST} rounds "
                                 "(docs/results.md, 'Primary metric')")
    _write_json(out / "summary.json", summary)
    return text


# --- the in-process child (one simulation) ---------------------------------------------------------
def child(config_path: Path, clients: int, cpus_per_client: float, gpus_per_client: float) -> int:
    """Run the project's ServerApp + ClientApp with `flwr.simulation.run_simulation` (Ray)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(ROOT))
    from flwr.simulation import run_simulation

    from client_app.app import app as client_app
    from server_app.app import make_server_app

    overrides = {**pyproject_defaults(), **json.loads(config_path.read_text())}
    total_cpus = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": min(cpus_per_client, total_cpus),
                                    "num_gpus": gpus_per_client},
               "init_args": {"num_cpus": total_cpus, "include_dashboard": False}}
    run_simulation(make_server_app(overrides), client_app, num_supernodes=clients,
                   backend_config=backend)
    return 0


# --- command line ---------------------------------------------------------------------------------
def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` -> typed run-config overrides (types of the pyproject defaults)."""
    defaults = pyproject_defaults()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"--set expects key=value with a run-config key (pyproject "
                             f"[tool.flwr.app.config]), got {item!r}")
        kind = type(defaults[key])
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(f"--set {key} expects true/false, got {text!r}")
            out[key] = text.lower() == "true"
        else:
            try:
                out[key] = kind(text)
            except ValueError:
                raise ValueError(f"--set {key} expects {kind.__name__}, got {text!r}") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default: {','.join(SUPERVISED)}; with --ssl: "
                        f"{','.join(SELF_SUPERVISED)})")
    p.add_argument("--alphas", default="0.1,0.5", help="Dirichlet alphas (default 0.1,0.5)")
    p.add_argument("--seeds", default=None, help="seeds (default 7, the reference seed; with "
                   "--suite the suite's seeds)")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a whole benchmark in its run order (instead of --methods/--alphas/--tag)")
    p.add_argument("--rounds", type=int, default=None, help="override num-rounds of the budget")
    p.add_argument("--paper", action="store_true", help="paper budget (ResNet-10, 50 rounds, GPU)")
    p.add_argument("--ssl", action="store_true", help="self-supervised table (linear probe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for every run (repeatable), e.g. tau=0.1")
    p.add_argument("--tag", default="", help="label of a variant (--set) in the table; "
                   f"a named one ({', '.join(VARIANTS)}) brings its settings")
    p.add_argument("--engine", choices=("inprocess", "flwr-run"), default="inprocess",
                   help="inprocess: flwr.simulation.run_simulation in a child process; "
                        "flwr-run: scripts/run_simulation.py (`flwr run` with its own SuperLink)")
    p.add_argument("--clients", type=int, default=10, help="SuperNodes (default 10)")
    p.add_argument("--cpus-per-client", type=float, default=float(os.cpu_count() or 1),
                   help="Ray CPUs per ClientApp (default: all cores = clients train one at a time)")
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--run-timeout", type=float, default=4 * 3600, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite table/plot from results.json")
    p.add_argument("--publish", type=Path, default=None, metavar="DOC",
                   help="also write the tables into DOC's marked blocks (e.g. docs/results.md)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.clients, args.cpus_per_client, args.gpus_per_client)

    # 1. what to run
    suite = SUITES[args.suite] if args.suite else None
    results_folder = ("paper" if args.paper else CPU_FOLDER) + (suite.folder_suffix if suite else "")
    out = (args.out or DEFAULT_OUT / results_folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = dict(PAPER_BUDGET if args.paper else CPU_BUDGET)
    if args.rounds:
        budget["num-rounds"] = args.rounds
    extra = parse_set(args.set)
    if suite:
        if args.methods or args.tag:
            raise SystemExit("--suite plans its own methods and tags: drop --methods/--tag")
        if suite.superseded_by and not args.report_only:
            raise SystemExit(f"--suite {args.suite} is superseded by --suite "
                             f"{suite.superseded_by}, which makes its runs; --report-only "
                             "redraws its older records (with --out)")
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        specs = suite_specs(suite, seeds, budget, extra)
    else:
        methods = [m.strip() for m in (args.methods or ",".join(
            SELF_SUPERVISED if args.ssl else SUPERVISED)).split(",") if m.strip()]
        alphas = [float(a) for a in args.alphas.split(",")]
        seeds = [int(s) for s in (args.seeds or "7").split(",")]
        # a named variant's tag brings its settings (--set still wins)
        specs = plan_runs(methods, alphas, seeds, budget, {**VARIANTS.get(args.tag, {}), **extra},
                          args.tag)
    store = ResultsStore(out / "results.json")
    # the command that makes the runs: --report-only only redraws what it recorded
    command = "nice -n 5 .venv/bin/python benchmarks/accuracy.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only")
    # --report-only reads what is recorded; it neither plans nor checks the runs
    todo = [] if args.report_only else [s for s in specs if not store.done(s)]
    earlier = any(store.records.get(s.key, {}).get("config-hash", s.config_hash) != s.config_hash
                  for s in specs)  # only possible with --report-only: done() refuses it
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already recorded in {store.path}")
    if args.dry_run:
        for s in specs:
            print(f"  {'done' if s not in todo else 'todo'}  {s.key}  {s.run_name}")
        return 0

    # 2. run what is missing; a failed run is reported and the others go on
    failed = []
    for spec in todo:
        if store.done(spec):  # another harness process sharing this folder recorded it meanwhile
            continue
        folder = out / "runs" / spec.run_name
        if (folder / "summary.json").is_file():  # finished earlier but not recorded: read it back
            store.add(read_run(spec, folder))
            continue
        if not args.report_only:
            try:
                folder = launch(spec, out, args)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"ERROR: {err}", file=sys.stderr, flush=True)
                failed.append(spec.key)
                continue
            record = read_run(spec, folder)
            store.add(record)
            at_val = report.at_validation_round(record)
            print(f"[{time.strftime('%H:%M:%S')}] {spec.key}: last {report.LAST} "
                  f"{100 * report.last_mean(record):.2f}%, at the validation round "
                  f"{'n/a' if at_val is None else f'{100 * at_val:.2f}%'}, "
                  f"{record['wall-seconds']:.0f} s", flush=True)
            write_reports(store, out, command, args.publish)

    # 3. reports over everything recorded in this folder
    print(write_reports(store, out, command, args.publish, earlier))
    print(f"Results: {out}")
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


def _resolved_config(folder: Path) -> dict[str, Any] | None:
    """The complete run config the ServerApp used (pyproject defaults + overrides), if written."""
    path = folder / "config.json"
    return json.loads(path.read_text()).get("run-config") if path.is_file() else None


def _mean(values: Sequence[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(nums) / len(nums) if nums else None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


if __name__ == "__main__":
    sys.exit(main())
