"""Self-supervised FedDifRC at the apps' edges: a label-free client never reads its labels, and
the server judges the encoder by a linear probe and kNN on the test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feddifrc_core import projection
from feddifrc_core.algorithms import UpdateInfo
from feddifrc_core.algorithms.feddifrc import PROJECTION_STATS
from feddifrc_core.client_session import ClientSession
from feddifrc_core.config import NodeConfig, RunConfig
from feddifrc_core.evaluation import CentralEvaluator, extract_features
from feddifrc_core.models import model_state
from feddifrc_core.probe import knn_accuracy, linear_probe_accuracy
from feddifrc_core.run_setup import build_global_model


def _cfg(tmp_path: Path, algorithm: str, **changes: object) -> RunConfig:
    base = dict(
        seed=3, torch_threads=1, device="cpu", dataset="digits", train_samples=150,
        test_samples=100, partition="iid", model="small-cnn", model_width=8, local_epochs=1,
        batch_size=16, eval_batch_size=256, diffusion_model="tiny-sd", diffusion_image_size=0,
        extraction_batch_size=64, projection="random", neg_num=3, probe_train_samples=100,
        cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs"), algorithm=algorithm,
    )
    return RunConfig().replace(**{**base, **changes})


class LabelFreeData:
    """A client's data whose labels cannot be read: any access fails the test."""

    def __init__(self, data: object) -> None:
        self.images = data.images  # type: ignore[attr-defined]
        self.class_names = data.class_names  # type: ignore[attr-defined]
        self.name = data.name  # type: ignore[attr-defined]
        self._n = len(data)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._n

    @property
    def labels(self) -> object:
        raise AssertionError("the client read its labels")


@pytest.mark.parametrize("algorithm", ["feddifrc-ssl", "simclr"])
def test_label_free_client_session_never_reads_labels(tmp_path, algorithm):
    """The ClientApp's whole path (diffusion representations, targets, local training, metrics)
    runs on a client whose labels raise on access."""
    cfg = _cfg(tmp_path, algorithm)
    node = NodeConfig(partition_id=0, num_partitions=2)
    session = ClientSession(cfg, node)  # not .get(): the process cache must not keep this one
    poisoned = LabelFreeData(session.data)
    session.data = session.view.diffusion.data = poisoned  # type: ignore[assignment]
    model = build_global_model(cfg, *session.shape)
    bases = {}
    if cfg.algorithm_class.uses_diffusion:
        reps = session.view.diffusion.representations()
        assert sum(s.count for s in reps.pca_stats()) > 0
        # the server's set-up stage, for this one client: its statistics -> the shared bases
        stats = projection.arrays_to_stats(session.answer(PROJECTION_STATS, {}))
        bases = projection.bases_to_arrays(projection.shared_bases(
            cfg.projection, model.feature_dim, [st.dim for st in stats], cfg.seed, stats))
    update = session.train(model_state(model), UpdateInfo(1, "run", "", bases))
    assert update.num_examples == len(session.data) > 0
    assert np.isfinite(update.metrics["train-loss"]) and "train-ce" not in update.metrics
    assert "train-accuracy" not in update.metrics  # nothing to count without labels
    parts = {"feddifrc-ssl": ("train-tdcl", "train-ndcr"), "simclr": ("train-ntxent",)}[algorithm]
    assert all(update.metrics[p] > 0 for p in parts)

    # The guard is live: a supervised client on the same poisoned data fails on the first read.
    supervised = ClientSession(cfg.replace(algorithm="fedavg"), node)
    supervised.data = LabelFreeData(supervised.data)  # type: ignore[assignment]
    with pytest.raises(AssertionError, match="read its labels"):
        supervised.train(model_state(build_global_model(supervised.cfg, *supervised.shape)),
                         UpdateInfo(1, "run", "", {}))


def test_server_scores_a_label_free_encoder_by_linear_probe_and_knn(tmp_path):
    cfg = _cfg(tmp_path, "simclr", probe_train_samples=120)
    evaluator = CentralEvaluator(cfg)
    assert evaluator.probe_train is not None and len(evaluator.probe_train) == 120
    metrics = evaluator(model_state(evaluator.model))
    assert set(metrics) == {"test-accuracy", "test-probe-accuracy", "test-knn-accuracy",
                            "probe-train-examples"}
    assert metrics["test-accuracy"] == metrics["test-probe-accuracy"]
    assert metrics["probe-train-examples"] == 120

    # The numbers are the probe module's on the global encoder's frozen features of that subset.
    probe, test = evaluator.probe_train, evaluator.test
    train_f = extract_features(evaluator.model, probe.images, 256, "cpu", evaluator.transform)
    test_f = extract_features(evaluator.model, test.images, 256, "cpu", evaluator.transform)
    assert metrics["test-probe-accuracy"] == linear_probe_accuracy(
        train_f, probe.labels, test_f, test.labels, seed=cfg.seed)
    assert metrics["test-knn-accuracy"] == knn_accuracy(train_f, probe.labels, test_f, test.labels)
    # Even a random CNN's features separate the 10 digits far above chance (0.1).
    assert metrics["test-probe-accuracy"] > 0.3 and metrics["test-knn-accuracy"] > 0.3

    # Supervised algorithms keep the classifier's own loss and accuracy, no probe.
    supervised = CentralEvaluator(cfg.replace(algorithm="fedavg"))
    assert supervised.probe_train is None
    assert set(supervised(model_state(supervised.model))) == {"test-loss", "test-accuracy"}
