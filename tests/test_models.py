"""Models: the (features, logits) contract for 1/3 channels at 28/32/64 px, the reference
ResNet-10 layout, configurable widths, and argument errors."""

from __future__ import annotations

import pytest
import torch

from feddifrc_core.models import (
    MODEL_NAMES,
    SmallCNN,
    build_model,
    is_running_statistic,
    resnet10,
)


@pytest.mark.parametrize("name,width,dim", [("resnet10", 8, 64), ("small-cnn", 8, 128)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_shapes(name, width, dim, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 7, width, align_head="none").eval()
    with torch.no_grad():
        features, logits = model(torch.randn(2, channels, size, size))
    assert model.feature_dim == dim
    assert features.shape == (2, dim) and logits.shape == (2, 7)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()


def test_resnet10_matches_the_reference_layout():
    # resnet10(10) of the authors' model/resnet_cnn.py: 3x3 stride-1 stem, no max-pool, one
    # BasicBlock per stage, 512-d features, classifier `cls`; 4,903,242 parameters.
    model = resnet10(10)
    assert model.feature_dim == 512
    assert sum(p.numel() for p in model.parameters()) == 4_903_242
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        1,
        1,
        1,
        1,
    ]
    keys = set(model.state_dict())
    assert {"conv1.weight", "layer2.0.shortcut.0.weight", "cls.weight", "cls.bias"} <= keys
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut in the first stage


def test_resnet_spatial_resolution_per_stage():
    model = resnet10(10, in_channels=1, width=4).eval()
    x = torch.randn(1, 1, 32, 32)
    out = model.conv1(x)
    sizes = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        out = layer(out)
        sizes.append(tuple(out.shape[1:]))
    assert sizes == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]


def test_small_cnn_feature_dim_and_width():
    model = SmallCNN(10, in_channels=3, width=16, feature_dim=32)
    assert model.feature_dim == 32 and model.fc.in_features == 64
    built = build_model("small-cnn", 1, 10, 16, feature_dim=48, align_head="none")
    assert built.feature_dim == 48


def test_gradients_reach_the_stem():
    model = build_model("resnet10", 3, 5, 4, align_head="none")
    features, logits = model(torch.randn(4, 3, 32, 32))
    (logits.logsumexp(1).mean() + features.pow(2).mean()).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "resnet18"}, "model must be one of"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"width": 2.5}, "width must be a positive integer"),
        ({"image_size": 4}, "image_size must be >= 8"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"name": "resnet10", "in_channels": 3, "num_classes": 10, "width": 4, "align_head": "none"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_align_head_is_a_linear_map_on_the_features_and_absent_by_default():
    from feddifrc_core.models import alignment_features

    plain = build_model("small-cnn", 1, 10, 8, align_head="none")
    headed = build_model("small-cnn", 1, 10, 8, align_head="linear")
    z = torch.randn(4, plain.feature_dim)
    assert torch.equal(alignment_features(plain, z), z)
    expected = z @ headed.align_head.weight.T + headed.align_head.bias
    torch.testing.assert_close(alignment_features(headed, z), expected)
    assert "align_head.weight" in headed.state_dict() and "align_head.weight" not in plain.state_dict()


def test_every_party_builds_the_align_head_when_the_run_asks_for_it():
    from feddifrc_core.config import RunConfig
    from feddifrc_core.run_setup import build_global_model

    cfg = RunConfig(model="small-cnn", model_width=4).replace(align_head="none")
    plain = build_global_model(cfg, 1, 10, 28)
    headed = build_global_model(cfg.replace(align_head="linear"), 1, 10, 28)
    assert getattr(plain, "align_head", None) is None
    # baselines have no alignment loss, so no head whatever align-head says
    for baseline in ("fedavg", "fedprox", "moon", "simclr"):
        model = build_global_model(cfg.replace(align_head="linear", algorithm=baseline), 1, 10, 28)
        assert getattr(model, "align_head", None) is None
    assert headed.align_head.in_features == headed.feature_dim
    # seeded: server and every client start from the same weights
    again = build_global_model(cfg.replace(align_head="linear"), 1, 10, 28)
    assert all(torch.equal(a, b) for a, b in zip(headed.state_dict().values(),
                                                 again.state_dict().values(), strict=True))


def test_mlp_align_head_is_two_layers_with_a_relu_and_reaches_signed_vectors():
    from feddifrc_core.models import alignment_features

    headed = build_model("small-cnn", 1, 10, 8, align_head="mlp")
    first, act, second = headed.align_head
    assert isinstance(act, torch.nn.ReLU)
    assert (first.in_features, first.out_features, second.out_features) == (128, 128, 128)
    z = torch.rand(16, headed.feature_dim)  # post-ReLU features are >= 0
    expected = second(torch.relu(first(z)))
    out = alignment_features(headed, z)
    torch.testing.assert_close(out, expected)
    assert (out < 0).any()  # the aligned space has both signs, unlike z
    with pytest.raises(ValueError, match="align_head"):
        build_model("small-cnn", 1, 10, 8, align_head="conv")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_model_state_splits_into_parameters_and_running_statistics(name):
    """Server optimisers step the parameters only (FedAvgM); a new kind of buffer must be named
    in RUNNING_STATISTICS or it would be stepped like a parameter."""
    model = build_model(name, 3, 10, 8, align_head="mlp")
    buffers = {k for k, _ in model.named_buffers()}
    assert buffers and all(is_running_statistic(k) for k in buffers)
    assert not any(is_running_statistic(k) for k, _ in model.named_parameters())
    assert set(model.state_dict()) == buffers | {k for k, _ in model.named_parameters()}
