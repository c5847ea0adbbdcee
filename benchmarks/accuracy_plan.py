"""What the accuracy benchmark compares and in which order: methods and named variants, the
budgets, the keys each method reads, the suites, and one run's complete configuration (RunSpec).

Pure planning: nothing here runs a simulation (`accuracy_launch.py` does). A record's
configuration hash is computed here, so a change of what a method reads makes new runs instead of
reusing old ones. What a method reads comes from its algorithm's file: its own parameters (its
`Params`) and its flags (`uses_diffusion`, `reads_teacher`, `label_free`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddifrc_core.algorithms import Algorithm, algorithm_names, get_algorithm
from feddifrc_core.config import BOOKKEEPING_KEYS
from feddifrc_core.options import option_fields
from scripts.run_config import app_defaults

# The CPU budget's records: "cpu-v3" with the validation split ("cpu-v2": the same budget without
# it, five seeds; "cpu": the earlier 15-round budget; both kept, redrawn with --out ... --report-only)
CPU_FOLDER = "cpu-v3"

# --- what is compared ----------------------------------------------------------------------------
# Method name -> run-config overrides: every registered algorithm (feddifrc_core/algorithms/) plus
# FedDifRC's ablations. Only the keys a method reads are set, so a change of the diffusion settings
# never invalidates the baselines' recorded runs.
ABLATIONS: dict[str, dict[str, Any]] = {
    "feddifrc-tdcl": {"algorithm": "feddifrc", "lambda-ndcr": 0.0},
    "feddifrc-ndcr": {"algorithm": "feddifrc", "lambda-tdcl": 0.0},
}
METHODS: dict[str, dict[str, Any]] = {
    **{name: {"algorithm": name} for name in algorithm_names()}, **ABLATIONS}
# Named variants of any method, labelled <method>+<name> (a record's tag). Each pins every key it
# sets, so a change of a default makes new runs instead of reusing old ones.
WARM_START: dict[str, Any] = {"init-model": "public-supervised", "init-epochs": 3}
VARIANTS: dict[str, dict[str, Any]] = {
    "no-head": {"align-head": "none"},  # FedDifRC aligning z itself, as the authors do
    "warm": WARM_START,  # control: start from a model trained on the teacher's public half
}
# What the controls answer (docs/results.md, "Controls", fixed before the runs): does FedDifRC
# add accuracy over the best of the methods that get the public half the teacher saw (and plain
# FedAvg)? The question is about feddifrc+warm, which has all a control has plus the diffusion
# targets; feddifrc from the random start is reported beside it.
CONTROLS = ("fedavg", "fedavg+warm", "fedavg-kd")
FEDDIFRC_ARMS = ("feddifrc+warm", "feddifrc")  # the first is the pre-registered one


def algorithm(method: str) -> type[Algorithm]:
    return get_algorithm(str(METHODS[method]["algorithm"]))


def split_label(label: str) -> tuple[str, str]:
    """'feddifrc+no-head' -> ('feddifrc', 'no-head'); a plain method has the tag ''."""
    method, _, tag = label.partition("+")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {label!r}; choose from {sorted(METHODS)}")
    if tag and tag not in VARIANTS:
        raise ValueError(f"unknown variant {tag!r} in {label!r}; choose from {sorted(VARIANTS)}")
    return method, tag


def _methods(labels: bool) -> tuple[str, ...]:
    """Baselines first, then the methods aligned to diffusion targets (the paper's table order)."""
    chosen = [m for m in METHODS if algorithm(m).label_free != labels]
    return (*(m for m in chosen if not algorithm(m).uses_diffusion),
            *(m for m in chosen if algorithm(m).uses_diffusion))


# fedavg, fedavg-kd, fedavgm, fedprox, moon, feddifrc, its ablations
SUPERVISED = _methods(labels=True)
LABEL_FREE = _methods(labels=False)[::-1]  # feddifrc-ssl, simclr
RANDOM_INIT = "random-init"  # SSL table row: round 0 (the seeded initial encoder) of an SSL run

# The federation and data every run shares (both budgets).
COMMON: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "data-subset": "private",  # the half the offline teacher was not trained on
    "partition": "dirichlet-reference",
    "fraction-train": 0.5,  # 5 of 10 clients per round (paper)
    "min-train-nodes": 5,  # a round with a failed client fails the run instead of skewing it
    "min-available-nodes": 10,
    "batch-size": 64,
    "lr": 0.01,
    "momentum": 0.9,
    "weight-decay": 1e-5,
    "eval-every": 1,
    "augment": True,
}
# CPU budget, chosen by measurement (benchmarks/results/budget, docs/results.md "Choice of the
# budget"): FedAvg's curve at alpha 0.1 must have flattened (mean of its last 5 rounds within 2
# points of its best). With 5 of 10 clients per round it swings by +-8 points even after 50 rounds
# (client sampling under label skew), with 2 local epochs it peaks and then oscillates; all 10
# clients with 1 local epoch on 6,000 images rise smoothly (last 5 within 1.96 of the best at 40).
# Clients train one at a time on both cores (torch-threads: a bookkeeping key): ~3 min per run.
CPU_BUDGET: dict[str, Any] = {
    **COMMON,
    "fraction-train": 1.0,
    "min-train-nodes": 10,
    "num-rounds": 40,
    "train-samples": 6000,
    "test-samples": 2000,
    # held out of the test split, disjoint from the test images: chooses the reported round
    "validation-samples": 2000,
    "model": "small-cnn",
    "model-width": 32,
    "local-epochs": 1,
    "device": "cpu",
    "torch-threads": 2,
    "eval-batch-size": 1000,
    "probe-train-samples": 2000,
}
# Paper budget (reference code defaults): ResNet-10, all private images, 10 local epochs, 50 rounds.
PAPER_BUDGET: dict[str, Any] = {
    **COMMON,
    "num-rounds": 50,
    "train-samples": 0,
    "test-samples": 8000,  # of 10,000: the other 2,000 are the validation set
    "validation-samples": 2000,
    "model": "resnet10",
    "model-width": 64,
    "local-epochs": 10,
    "device": "auto",
    "torch-threads": 0,
    "eval-batch-size": 1000,
    "probe-train-samples": 5000,
}
# Keys only the methods reading the teacher use (kept out of the baselines' configs and hashes).
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "diffusion-model": "offline-teacher",
    "diffusion-image-size": 0,  # the teacher's native 32 px
    "extraction-batch-size": 8,
    "projection": "federated-pca",
}
DIFFUSION_KEYS = ("diffusion-model", "diffusion-timestep", "up-blocks", "diffusion-image-size",
                  "extraction-batch-size", "ensemble-size", "projection", "lambda-tdcl",
                  "lambda-ndcr", "tau", "ndcr-loss", "neg-num", "align-head", "diffusion-dtype", "reduction", "pool-grid",
                  "prompt-template", "ssl-positive-prompt", "ssl-null-prompt", "ssl-vocabulary")
# Of these, what the distillation control's zero-shot classifier reads (the teacher and its input).
TEACHER_KEYS = ("diffusion-model", "diffusion-image-size", "diffusion-dtype", "prompt-template")
# Keys outside the hash: where files go, the run's name, resume, and a timeout. The other
# bookkeeping keys are hashed: on a CPU the number of torch threads changes the order of float
# sums, and so the curves (two FedAvg runs differing only in torch-threads 1 / 2 differ by up to
# 0.45 points per round: docs/running.md "Reproducibility"). Same hash = bit-identical curves on
# the same machine.
FREE_KEYS = ("cache-dir", "data-path", "output-dir", "resume", "round-timeout", "run-name")
assert set(FREE_KEYS) <= BOOKKEEPING_KEYS


# Keys an algorithm declares as its own (its `Params`): set only for the methods that read them.
OWNED_KEYS = {key for name in algorithm_names() for key in option_fields(get_algorithm(name).Params)}


def uses_diffusion(method: str) -> bool:
    return algorithm(method).uses_diffusion


def reads_teacher(method: str) -> bool:
    """The method runs the diffusion teacher: its targets, or its zero-shot logits (fedavg-kd)."""
    return uses_diffusion(method) or algorithm(method).reads_teacher


def key_applies(key: str, method: str) -> bool:
    """Whether the run-config key `key` is read by `method` (only then is it set and hashed)."""
    if key in OWNED_KEYS and key not in method_keys(method):
        return False
    if key in DIFFUSION_KEYS:
        return uses_diffusion(method) or (key in TEACHER_KEYS and reads_teacher(method))
    return True


def method_keys(method: str) -> set[str]:
    """The run-config keys this method's algorithm declares as its own (its `Params`)."""
    return set(option_fields(algorithm(method).Params))


def teacher_info(model: str) -> dict[str, Any]:
    """The offline teacher's teacher.json for `model`; empty for other backbones or while no
    teacher exists (the run config's defaults apply)."""
    if model != "offline-teacher" and not model.startswith("offline-teacher:"):
        return {}
    from feddifrc_core.diffusion.teacher_backbone import TEACHER_JSON, resolve_teacher_path

    try:
        folder = resolve_teacher_path(model.partition(":")[2] or "offline-teacher")
    except (ValueError, FileNotFoundError):
        return {}
    info_path = Path(folder) / TEACHER_JSON
    return dict(json.loads(info_path.read_text())) if info_path.is_file() else {}


def teacher_recommendation(model: str) -> dict[str, Any]:
    """`diffusion-timestep`, `up-blocks` and `pool-grid` recommended by the teacher probe."""
    return recommended_settings(teacher_info(model))


def recommended_settings(info: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config keys of a teacher.json's `recommended` section."""
    rec = info.get("recommended") or {}
    out: dict[str, Any] = {}
    if "timestep" in rec:
        out["diffusion-timestep"] = int(rec["timestep"])
    if "up_blocks" in rec:
        out["up-blocks"] = str(rec["up_blocks"])
    if "pool_grid" in rec:
        out["pool-grid"] = int(rec["pool_grid"])
    return out


# Whole benchmarks, in the order their runs are worth having (a partial table is still useful):
# seeds are outermost within a phase, so the pairs of the first comparison complete first.
@dataclass(frozen=True)
class Phase:
    arms: tuple[str, ...]  # labels: a method, or <method>+<variant> (VARIANTS)
    alphas: tuple[float, ...]
    seeds: tuple[int, ...] = ()  # () = the suite's seeds


@dataclass(frozen=True)
class Suite:
    seeds: tuple[int, ...]
    phases: tuple[Phase, ...]
    # appended to the budget's results folder: a suite with its own question keeps its own table
    # (docs/results.md block `accuracy:<folder>`) instead of mixing seeds into another's
    folder_suffix: str = ""
    # a suite whose question another answers now: --report-only redraws its records, no new runs
    superseded_by: str = ""


ALPHA_01_ARMS = ("fedavg", "feddifrc", "fedavg+warm", "fedavg-kd", "feddifrc+warm",
                 "feddifrc+no-head")
SEEDS_10, SEEDS_5 = tuple(range(7, 17)), tuple(range(7, 12))
SUITES: dict[str, Suite] = {
    # Issue 22's evidence, with the validation split: at alpha 0.1 ten seeds (7-16) of FedAvg,
    # FedDifRC and the controls that get the teacher's public data (warm start, distillation),
    # FedDifRC from the warm start and without the head; at alpha 0.5 five seeds of the same;
    # FedProx and MOON five seeds at both. Each seed runs every arm before the next seed starts
    # (the first comparison, FedDifRC vs FedAvg, first within a seed), so a partial table holds
    # whole seeds. Seeds 12-16 of fedavg, feddifrc and feddifrc+no-head at alpha 0.1 are the
    # head-confirmation runs (the rule below is computed by the report).
    "ten-seed": Suite(SEEDS_10, (
        Phase(ALPHA_01_ARMS, (0.1,)),
        Phase(ALPHA_01_ARMS, (0.5,), SEEDS_5),
        Phase(("fedprox", "moon"), (0.1, 0.5), SEEDS_5),
    )),
    "five-seed": Suite(SEEDS_5, (
        Phase(("fedavg", "feddifrc"), (0.1,)),  # the target's comparison first
        Phase(("fedprox", "moon"), (0.1,)),
        # ablations next: same partitions as the first comparison, so they reuse its cached
        # features (about 3 min per run instead of 12)
        Phase(("feddifrc-tdcl", "feddifrc-ndcr"), (0.1,)),
        Phase(("feddifrc+no-head",), (0.1,)),  # the earlier default targets
        Phase(("fedavg", "fedprox", "moon", "feddifrc"), (0.5,)),
    )),
    "ssl-three-seed": Suite((7, 8, 9), (Phase(("feddifrc-ssl", "simclr"), (0.1,)),)),
    # The alignment head on fresh seeds: five-seed's 7-11 could not tell the linear head from none
    # (paired -0.41 best, [-6.4, +5.6]); choosing the default on those same seeds would select on
    # them. Decision rule, fixed before these runs (docs/results.md, "Confirmation"): `align-head`
    # becomes "none" if on seeds 12-16 feddifrc+no-head's paired best-accuracy gain over FedAvg has
    # its 95 % interval above 0 and its mean is not below the linear head's; otherwise it stays.
    # Its runs are now part of ten-seed (with validation); its 4 records without it stay in
    # cpu-v2-confirm.
    "confirm-head": Suite((12, 13, 14, 15, 16), (
        Phase(("fedavg", "feddifrc"), (0.1,)),
        Phase(("feddifrc+no-head",), (0.1,)),  # reuses feddifrc's features
    ), folder_suffix="-confirm", superseded_by="ten-seed"),
}


def suite_specs(suite: Suite, seeds: Sequence[int] | None, budget: Mapping[str, Any],
                extra: Mapping[str, Any]) -> list[RunSpec]:
    """A suite's runs in its order, with `extra` run-config overrides for every run. `seeds`
    (None: the suite's own) restricts the phases that name their seeds and replaces the others'."""
    specs = []
    for phase in suite.phases:
        chosen = (phase.seeds or suite.seeds) if seeds is None else (
            [s for s in phase.seeds if s in seeds] if phase.seeds else list(seeds))
        for seed in chosen:
            for alpha in phase.alphas:
                for arm in phase.arms:
                    method, tag = split_label(arm)
                    specs += plan_runs([method], [alpha], [seed], budget,
                                       {**extra, **VARIANTS.get(tag, {})}, tag)
    return specs


def command_for(keys: set[str], command: str) -> str:
    """The command that makes the runs `keys`: where the running suite does not cover them (a
    table of the same folder that another suite fills), the suite that does."""
    words = command.split()
    if "--suite" not in words[:-1]:
        return command
    running = words[words.index("--suite") + 1]
    for name, suite in sorted(SUITES.items(), key=lambda item: item[0] != running):
        if keys <= {s.key for s in suite_specs(suite, None, CPU_BUDGET, {})}:
            return command.replace(f"--suite {running}", f"--suite {name}")
    return command


# --- one run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One (method, alpha, seed) run with its complete run-config overrides."""

    method: str
    alpha: float
    seed: int
    overrides: dict[str, Any] = field(hash=False)
    tag: str = ""  # variant label for knob sweeps ("" = the benchmark's setting)
    # The offline teacher's weights (sha256), when a diffusion method uses it: a retrained
    # teacher makes new runs instead of reusing the old teacher's records.
    teacher_weights: str = ""

    @property
    def label(self) -> str:
        return f"{self.method}+{self.tag}" if self.tag else self.method

    @property
    def key(self) -> str:
        return f"{self.label}/alpha={self.alpha:g}/seed={self.seed}"

    @property
    def config_hash(self) -> str:
        relevant = {k: v for k, v in sorted(self.overrides.items()) if k not in FREE_KEYS}
        if self.teacher_weights:
            relevant["teacher-weights-sha256"] = self.teacher_weights
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_name(self) -> str:
        return f"{self.label}-a{self.alpha:g}-s{self.seed}-{self.config_hash}"


def plan_runs(methods: Sequence[str], alphas: Sequence[float], seeds: Sequence[int],
              budget: Mapping[str, Any], extra: Mapping[str, Any], tag: str = "") -> list[RunSpec]:
    """The runs of the table, seeds outermost (a partial table then has whole seeds first)."""
    unknown = [m for m in methods if m not in METHODS and m != RANDOM_INIT]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    defaults = app_defaults()
    specs = []
    for seed in seeds:
        for alpha in alphas:
            for method in methods:
                if method == RANDOM_INIT:
                    continue  # read from round 0 of the SSL runs
                # the method's own settings are pinned (a changed default makes new runs)
                cfg: dict[str, Any] = {**budget,
                                       **{k: defaults[k] for k in sorted(method_keys(method))},
                                       **METHODS[method],  # an ablation's own values win
                                       "seed": int(seed), "dirichlet-alpha": float(alpha)}
                weights = ""
                if reads_teacher(method):
                    model = str(extra.get("diffusion-model", DIFFUSION_DEFAULTS["diffusion-model"]))
                    info = teacher_info(model)  # one read gives the settings and the weights
                    teacher = {**DIFFUSION_DEFAULTS, **target_defaults(),
                               **recommended_settings(info)}
                    cfg.update({k: v for k, v in teacher.items() if key_applies(k, method)})
                    weights = str(info.get("weights_sha256", ""))
                for key, value in extra.items():
                    if key_applies(key, method):
                        cfg[key] = value
                specs.append(RunSpec(method, float(alpha), int(seed), cfg, tag, weights))
    return specs


def target_defaults() -> dict[str, Any]:
    """The run config's target settings (reduction, align-head, the negatives per sample),
    written into every diffusion run's overrides: a change of these defaults changes the run's
    hash instead of silently reusing runs recorded under the old default."""
    defaults = app_defaults()
    return {key: defaults[key] for key in TARGET_KEYS}


# neg-num: the negative class prompts per sample, a common diffusion setting that every method
# aligned to diffusion targets reads (FedDifRC's negatives; the label-free variant's vocabulary)
TARGET_KEYS = ("reduction", "align-head", "neg-num")
