"""RunConfig / NodeConfig: pyproject keys == dataclass fields, and every kind of bad value is an
error that names the key, the expected and the received value."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from feddifrc_core import config
from feddifrc_core.algorithms import AlgorithmParams, algorithm_names, get_algorithm
from feddifrc_core.algorithms.feddifrc import FedDifRCParams
from feddifrc_core.config import ConfigError, NodeConfig, RunConfig, resolve_device
from feddifrc_core.diffusion.backbone import DTYPES
from feddifrc_core.diffusion.reduction import REDUCTIONS
from feddifrc_core.models import ALIGN_HEADS
from feddifrc_core.options import option, option_fields

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _app_config() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_keys_equal_the_run_config_keys():
    """The common keys, `algorithm` and every registered algorithm's parameters: a new knob is
    its algorithm's field plus one pyproject line."""
    fields = set(RunConfig.keys())
    keys = set(_app_config())
    assert keys == fields, f"only in pyproject: {keys - fields}; only in RunConfig: {fields - keys}"
    assert len(RunConfig.keys()) == len(fields)  # no key twice


def test_pyproject_repeats_the_algorithms_own_defaults():
    """One source for an algorithm's defaults, its file: the demo profile changes none of them."""
    app = _app_config()
    declared = RunConfig().to_flower()
    own = {k for name in algorithm_names() for k in option_fields(get_algorithm(name).Params)}
    assert own and {k: app[k] for k in own} == {k: declared[k] for k in own}


def test_every_algorithm_declares_its_parameters_with_help():
    for name in algorithm_names():
        params = get_algorithm(name).Params
        assert issubclass(params, AlgorithmParams) and dataclasses.is_dataclass(params)
        for key, f in option_fields(params).items():
            assert f.metadata["help"], f"{name}: {key} has no help line"
    # an algorithm reads its own parameters, typed, through the run config
    algo = RunConfig().replace(algorithm="fedprox", proximal_mu=0.3).new_algorithm()
    assert algo.params.proximal_mu == 0.3


def test_a_parameter_that_clashes_with_another_key_fails_at_import(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Clash(AlgorithmParams):
        lr: float = option(0.1, help="a second learning rate")

    @dataclasses.dataclass(frozen=True)
    class OtherTau(AlgorithmParams):
        tau: float = option(0.5, help="another temperature")

    monkeypatch.setattr(config, "params_classes", lambda: (Clash,))
    with pytest.raises(TypeError, match="'lr' is already a run-config key"):
        config._param_keys()
    monkeypatch.setattr(config, "params_classes", lambda: (FedDifRCParams, OtherTau))
    with pytest.raises(TypeError, match="'tau' is declared by another algorithm"):
        config._param_keys()


def test_choice_lists_are_their_owners():
    fields = {**option_fields(RunConfig), **option_fields(FedDifRCParams)}
    assert fields["align-head"].metadata["choices"] is ALIGN_HEADS
    assert fields["reduction"].metadata["choices"] is REDUCTIONS
    assert fields["diffusion-dtype"].metadata["choices"] is DTYPES


def test_command_line_text_is_typed_by_the_key():
    assert RunConfig.parse_text("tau", "0.1") == 0.1
    assert RunConfig.parse_text("augment", "false") is False
    assert RunConfig.parse_text("dataset", "digits") == "digits"
    with pytest.raises(ConfigError, match="'num-rounds' expects int, got 'x'"):
        RunConfig.parse_text("num-rounds", "x")
    with pytest.raises(ConfigError, match="unknown key 'learnig-rate'"):
        RunConfig.parse_text("learnig-rate", "0.1")


def test_pyproject_defaults_are_valid_and_round_trip():
    cfg = RunConfig.from_flower(_app_config())
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert RunConfig.from_flower({}) == RunConfig()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning-rate'\]"):
        RunConfig.from_flower({"learning-rate": 0.1})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("num-rounds", "5", "'num-rounds' expects an integer, got '5' \\(str\\)"),
        ("num-rounds", 2.5, "'num-rounds' expects an integer, got 2.5 \\(float\\)"),
        ("num-rounds", True, "'num-rounds' expects an integer, got True \\(bool\\)"),
        ("lr", "0.1", "'lr' expects a number, got '0.1'"),
        ("augment", 1, "'augment' expects true/false, got 1"),
        ("dataset", 3, "'dataset' expects a string, got 3"),
    ],
)
def test_wrong_types_name_key_expected_and_received(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flower({key: value})


def test_int_is_accepted_where_a_number_is_expected():
    assert RunConfig.from_flower({"lr": 1}).lr == 1.0
    assert isinstance(RunConfig.from_flower({"lr": 1}).lr, float)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("dirichlet-alpha", 0.0, "'dirichlet-alpha' must be > 0.0, got 0.0"),
        ("fraction-train", 1.5, "'fraction-train' must be <= 1.0, got 1.5"),
        ("num-rounds", 0, "'num-rounds' must be >= 1, got 0"),
        ("imb-factor", 0.0, "'imb-factor' must be > 0.0"),
        ("diffusion-timestep", 1000, "'diffusion-timestep' must be <= 999"),
        ("dataset", "svhn", "'dataset' must be one of .*'fashion-mnist'.*, got 'svhn'"),
        ("partition", "shards", "'partition' must be one of"),
        ("data-subset", "public", "'data-subset' must be one of \\['all', 'private'\\]"),
    ],
)
def test_out_of_range_and_choices(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flower({key: value})


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"up-blocks": "1,x"}, "up-blocks must be comma-separated integers"),
        ({"up-blocks": "1,1"}, "distinct non-negative"),
        ({"prompt-template": "a photo"}, "must contain '\\{\\}'"),
        (
            {"min-train-nodes": 3, "min-available-nodes": 2},
            "min-available-nodes \\(2\\) must be >=",
        ),
    ],
)
def test_cross_field_checks(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flower(changes)


def test_config_error_is_a_value_error_and_replace_validates():
    assert issubclass(ConfigError, ValueError)
    cfg = RunConfig().replace(num_rounds=3, dataset="digits")
    assert (cfg.num_rounds, cfg.dataset) == (3, "digits")
    with pytest.raises(ConfigError, match="'num-rounds' must be >= 1"):
        RunConfig().replace(num_rounds=0)
    assert RunConfig(up_blocks="3, 1").up_block_ids == (1, 3)


def test_node_config_casts_strings_from_flower():
    cfg = NodeConfig.from_flower({"partition-id": "3", "num-partitions": "10", "data-path": "/d"})
    assert (cfg.partition_id, cfg.num_partitions, cfg.data_path) == (3, 10, "/d")
    assert NodeConfig.from_flower({"partition-id": 0, "num-partitions": 2}).num_partitions == 2


@pytest.mark.parametrize(
    "node,match",
    [
        ({"partition-id": "x"}, "'partition-id' expects int, got 'x'"),
        ({"partition-id": "-1"}, "'partition-id' must be >= 0"),
        ({"partition-id": "2", "num-partitions": "2"}, "partition-id must be < num-partitions"),
        ({"num-partitions": "0"}, "'num-partitions' must be >= 1"),
        ({"gpu": "0"}, "node config: unknown key"),
    ],
)
def test_node_config_errors(node, match):
    with pytest.raises(ConfigError, match=match):
        NodeConfig.from_flower(node)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda"):
        resolve_device("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"algorithm": "simclr", "augment": False}, "simclr.*augment=true"),
        ({"algorithm": "feddifrc-ssl", "lambda-tdcl": 0.0, "lambda-ndcr": 0.0},
         "feddifrc-ssl.*cannot both be 0"),
    ],
)
def test_label_free_settings_that_would_learn_nothing_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flower(changes)
    assert RunConfig.from_flower({**changes, "algorithm": "fedavg"}).algorithm == "fedavg"


def test_reduction_and_head_choices_and_pool_grid_only_for_mean_pool():
    cfg = RunConfig(reduction="spatial-norm-centred").replace(align_head="mlp")
    assert cfg.reduction == "spatial-norm-centred"
    assert cfg.params_of(FedDifRCParams).align_head == "mlp"
    with pytest.raises(ConfigError, match="pool-grid=2 applies to reduction 'mean-pool' only"):
        RunConfig(reduction="spatial-norm", pool_grid=2)
    with pytest.raises(ConfigError, match="'reduction' must be one of"):
        RunConfig.from_flower({"reduction": "max-pool"})
