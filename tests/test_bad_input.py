"""Bad input along the paths a user's run takes (ServerApp entry, ClientSession, CentralEvaluator,
the run script): each is an error naming the problem and the fix.

Unit-level checks that already exist elsewhere (not repeated here):
- every config key's type / range / choices, prompt template without '{}': tests/test_config.py
- partition arguments: tests/test_partition.py; data set files: tests/test_datasets.py
- hub id offline: tests/test_diffusion_extractor.py::test_offline_hub_error_says_what_to_do
- server/client model mismatch: tests/test_strategy.py
  (test_a_model_mismatch_between_server_and_client_is_named);
  resume with changed settings: tests/test_simulation.py
- a failing ClientApp fails the run / the run script's exit code: tests/test_simulation.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from PIL import Image

from client_app.app import app as client_app
from feddifrc_core import client_session, evaluation, run_setup
from feddifrc_core.algorithms.feddifrc import PROJECTION_STATS
from feddifrc_core.config import ConfigError, NodeConfig, RunConfig
from feddifrc_core.datasets import DatasetFormatError, DatasetNotFoundError, clear_dataset_cache
from server_app.app import make_server_app, run_server
from server_app.replies import RoundFailedError
from tests.loopback_grid import LoopbackGrid
from tests.micro_config import micro_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_datasets():
    clear_dataset_cache()  # data sets are memoised per process by root
    yield
    clear_dataset_cache()


def tiny(tmp_path: Path, **changes) -> RunConfig:
    return micro_run_config(tmp_path, **{"probe_train_samples": 20, **changes})


def image_folder(
    root: Path, classes: list[str], per_class: int = 4, test_classes: list[str] | None = None
) -> Path:
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / name / f"{i}.png")
    return root


def server_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


# --- config: unknown keys, wrong types ------------------------------------------------------------
def test_server_app_rejects_an_unknown_key_naming_the_known_ones(tmp_path):
    app = make_server_app()
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) \['learnig-rate'\]; known keys are .*'lr'"
    ):
        app(LoopbackGrid(client_app, 2, {}), server_context({"learnig-rate": 0.1}))


def test_server_app_rejects_a_wrong_type_naming_key_expected_and_received(tmp_path):
    app = make_server_app()
    with pytest.raises(ConfigError, match=r"'num-rounds' expects an integer, got '5' \(str\)"):
        app(LoopbackGrid(client_app, 2, {}), server_context({"num-rounds": "5"}))


def test_node_config_with_a_wrong_type_is_named():
    # what `flower-supernode --node-config "partition-id=one"` delivers to the ClientApp
    with pytest.raises(ConfigError, match=r"node config: 'partition-id' expects int, got 'one'"):
        NodeConfig.from_flower({"partition-id": "one", "num-partitions": "2"})


# --- impossible partitions ------------------------------------------------------------------------
def test_more_clients_than_samples_names_the_fix(tmp_path):
    cfg = tiny(tmp_path, train_samples=20)
    with pytest.raises(
        ValueError, match=r"num_clients=50 is more than the 20 samples.*train-samples=0"
    ):
        client_session.ClientSession(cfg, NodeConfig(partition_id=0, num_partitions=50))


@pytest.mark.parametrize("partition", ["dirichlet-reference", "flwr-dirichlet"])
def test_tiny_alpha_with_two_classes_cannot_give_every_client_data(tmp_path, partition):
    cfg = tiny(tmp_path, partition=partition, dirichlet_alpha=1e-3)
    labels = np.arange(200) % 2  # 2 classes, 10 clients: most clients would get nothing
    with pytest.raises(ValueError, match=r"(?i)increase dirichlet-alpha"):
        run_setup.client_indices(cfg, labels, 2, partition_id=0, num_partitions=10)


# --- missing data sets ----------------------------------------------------------------------------
def test_missing_data_set_on_the_server_names_the_path_and_the_fix(tmp_path):
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    cfg = tiny(tmp_path, dataset="fashion-mnist", data_path=str(empty))
    with pytest.raises(DatasetNotFoundError) as info:
        evaluation.CentralEvaluator(cfg)
    message = str(info.value)
    assert str(empty) in message and ("data-path" in message or "make data" in message), message


def test_missing_data_path_on_a_node_names_the_path(tmp_path):
    cfg = tiny(
        tmp_path, dataset="image-folder", data_path=str(image_folder(tmp_path / "d", ["a", "b"]))
    )
    node = NodeConfig(partition_id=0, num_partitions=2, data_path=str(tmp_path / "typo"))
    with pytest.raises(DatasetNotFoundError, match=r"typo.*Expected layout"):
        client_session.ClientSession(cfg, node)


# --- a diffusion model that cannot be loaded offline ----------------------------------------------
def test_unloadable_model_id_fails_the_client_naming_the_offline_choices(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    cfg = tiny(
        tmp_path,
        algorithm="feddifrc",
        diffusion_model="no-such-org/no-such-model",
        diffusion_image_size=0,
        neg_num=3,
    )
    client = client_session.ClientSession(cfg, NodeConfig(partition_id=0, num_partitions=2))
    with pytest.raises(RuntimeError, match="offline-teacher") as info:
        client.answer(PROJECTION_STATS, {})
    assert "no-such-org/no-such-model" in str(info.value)


# --- class names that do not match the data -------------------------------------------------------
def test_image_folder_test_class_unknown_to_train_names_the_fix(tmp_path):
    root = image_folder(tmp_path / "d", ["cat", "dog"], test_classes=["cat", "dgo"])
    cfg = tiny(tmp_path, dataset="image-folder", data_path=str(root))
    with pytest.raises(
        DatasetFormatError, match=r"dgo has no counterpart.*same class folder name under train/"
    ):
        evaluation.CentralEvaluator(cfg)


@pytest.mark.parametrize(
    ("node_classes", "expected"),
    [
        (["cat", "dog", "fox"], r"\['cat', 'dog', 'fox'\] differ from the server's \['cat', 'dog'\]"),
        (["cat", "fox"], r"\['cat', 'fox'\] differ from the server's \['cat', 'dog'\]"),
    ],
    ids=["more-classes", "same-count-other-names"],
)
def test_a_node_with_other_classes_fails_the_round_naming_both_lists(tmp_path, node_classes, expected):
    """A node's data-path names its classes unlike the server's data set (another count, or the
    same count with other names, where the model would still fit but prompts and labels would
    not): the node refuses to train, the round fails (min-train-nodes = all) and the reason
    reaches the user."""
    server_data = image_folder(tmp_path / "server", ["cat", "dog"])
    other = image_folder(tmp_path / "other", node_classes)
    cfg = tiny(
        tmp_path,
        dataset="image-folder",
        data_path=str(server_data),
        train_samples=0,
        test_samples=0,
        min_train_nodes=2,
    )
    grid = LoopbackGrid(client_app, 2, cfg.to_flower())
    odd_node = sorted(grid.contexts)[1]
    grid.contexts[odd_node].node_config["data-path"] = str(other)
    with pytest.raises(RoundFailedError, match=expected):
        run_server(grid, cfg)


def test_run_script_names_unknown_keys_before_submitting():
    # The SuperLink rejects them too, but only as "[code: 15] Invalid run configuration."
    from scripts.run_config import check_run_config_keys, merge_run_config

    check_run_config_keys(merge_run_config(["num-rounds=2 lr=0.1"]))
    with pytest.raises(
        SystemExit, match=r"unknown run-config key\(s\) \['num-round'\].*'num-rounds'"
    ):
        check_run_config_keys(merge_run_config(["num-round=2 lr=0.1"]))


# --- the run script: the one end-to-end check (the others above are unit-level) -------------------
@pytest.mark.slow
def test_run_script_with_an_unknown_key_exits_nonzero_naming_it(tmp_path):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FEDDIFRC_RUNS_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/run_simulation.py"),
            "--supernodes",
            "2",
            "-c",
            "learnig-rate=0.1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "learnig-rate" in proc.stderr and "pyproject" in proc.stderr, proc.stderr
