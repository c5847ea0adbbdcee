"""The validation split: held out from the test split, disjoint from the test set, evaluated by the
server every round; summaries report the test accuracy at the round validation chose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.datasets import load_dataset
from feddifrc_core.evaluation import CentralEvaluator, extract_features
from feddifrc_core.models import model_state
from feddifrc_core.probe import knn_accuracy, linear_probe_accuracy
from feddifrc_core.reporting import format_summary, summarize, validation_choice
from feddifrc_core.run_setup import load_eval_sets
from tests.micro_config import micro_run_config


def _rows_of(ds) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in ds.images}


def test_validation_is_disjoint_stratified_and_leaves_the_test_set_unchanged(tmp_path):
    cfg = micro_run_config(tmp_path, test_samples=100, validation_samples=120)
    test, validation = load_eval_sets(cfg)
    alone, none = load_eval_sets(cfg.replace(validation_samples=0))
    assert none is None and validation is not None and len(validation) == 120
    assert _rows_of(test) == _rows_of(alone)  # runs with and without it score the same images
    assert not _rows_of(test) & _rows_of(validation)  # disjoint (digits images are distinct)
    counts = np.bincount(validation.labels.numpy(), minlength=10)
    assert counts.min() >= 11 and counts.max() <= 13  # 120 over 10 balanced classes
    again = load_eval_sets(cfg)[1]
    assert again is not None and _rows_of(again) == _rows_of(validation)  # seeded
    other_seed = load_eval_sets(cfg.replace(seed=4))[1]
    assert other_seed is not None and _rows_of(other_seed) != _rows_of(validation)


def test_validation_that_does_not_fit_is_a_config_error(tmp_path):
    split = len(load_dataset("digits", "test"))
    cfg = micro_run_config(tmp_path, test_samples=split - 50, validation_samples=51)
    with pytest.raises(ConfigError, match=r"validation-samples=51 \+ test-samples=.* exceed the "
                                          rf"{split} images of digits's test split"):
        load_eval_sets(cfg)
    assert len(load_eval_sets(cfg.replace(validation_samples=50))[1]) == 50  # exactly what is left
    with pytest.raises(ConfigError, match="test-samples=0 takes the whole test split"):
        RunConfig(test_samples=0, validation_samples=10)


def test_server_evaluates_test_and_validation_with_one_model(tmp_path):
    cfg = micro_run_config(tmp_path, validation_samples=60)
    evaluator = CentralEvaluator(cfg)
    metrics = evaluator(model_state(evaluator.model))
    assert set(metrics) == {"test-loss", "test-accuracy", "val-loss", "val-accuracy"}
    assert 0.0 <= metrics["val-accuracy"] <= 1.0 and metrics["val-loss"] > 0


def test_label_free_runs_probe_the_validation_set_with_the_same_fit(tmp_path):
    cfg = micro_run_config(tmp_path, algorithm="simclr", validation_samples=60,
                           probe_train_samples=80)
    evaluator = CentralEvaluator(cfg)
    metrics = evaluator(model_state(evaluator.model))
    assert {"val-accuracy", "val-probe-accuracy", "val-knn-accuracy"} <= set(metrics)
    assert metrics["val-accuracy"] == metrics["val-probe-accuracy"]
    probe, val = evaluator.probe_train, evaluator.validation
    assert probe is not None and val is not None
    train_f = extract_features(evaluator.model, probe.images, 256, "cpu", evaluator.transform)
    val_f = extract_features(evaluator.model, val.images, 256, "cpu", evaluator.transform)
    assert metrics["val-probe-accuracy"] == linear_probe_accuracy(
        train_f, probe.labels, val_f, val.labels, seed=cfg.seed)
    assert metrics["val-knn-accuracy"] == knn_accuracy(train_f, probe.labels, val_f, val.labels)


def test_the_round_is_chosen_on_validation_ties_to_the_earliest():
    rounds, val, test = [1, 2, 3, 4], [0.4, 0.55, 0.55, 0.5], [0.5, 0.6, 0.7, 0.9]
    assert validation_choice(rounds, val, test) == (2, 0.55, 0.6)  # not round 4 (best on test)
    assert validation_choice(rounds, [None] * 4, test) is None
    assert validation_choice([2, 4], [None, 0.3], [0.1, 0.2]) == (4, 0.3, 0.2)


def test_summary_names_the_validation_round_and_says_n_a_without_one(tmp_path):
    curve = [(0.5, 0.4), (0.6, 0.55), (0.55, 0.55), (0.7, 0.5), (0.65, 0.45), (0.6, 0.5)]
    rows = [{"round": 0, "test-accuracy": 0.1, "val-accuracy": 0.9}]  # round 0 never counts
    rows += [{"round": i, "test-accuracy": t, "val-accuracy": v}
             for i, (t, v) in enumerate(curve, start=1)]
    summary = summarize(rows, wall_seconds=2.0)
    assert summary["validation-round"] == 2 and summary["accuracy-at-validation-round"] == 0.6
    assert summary["validation-accuracy"] == 0.55
    assert summary["last-5-mean-accuracy"] == pytest.approx(np.mean([0.6, 0.55, 0.7, 0.65, 0.6]))
    assert summary["best-accuracy"] == 0.7 and summary["best-round"] == 4  # kept, labelled
    text = format_summary(summary, Path("run"))
    assert "at the round chosen on validation: 60.00% (round 2, validation 55.00%)" in text
    assert "best on test 70.00% (round 4, chosen on the test set)" in text

    older = [{k: v for k, v in r.items() if k != "val-accuracy"} for r in rows]  # no validation
    summary = summarize(older, wall_seconds=2.0)
    assert summary["validation-round"] is None and summary["accuracy-at-validation-round"] is None
    assert "at the round chosen on validation: n/a (no validation set)" in format_summary(
        summary, Path("run"))
