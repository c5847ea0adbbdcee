"""Shared projection: exact statistics merge, PCA bases, seeded random bases, 2:1:1 split."""

import numpy as np
import pytest
import torch

from feddifrc_core.projection import (
    arrays_to_bases,
    arrays_to_stats,
    bases_to_arrays,
    merge_all,
    merge_stats,
    pca_bases,
    pca_stats,
    project,
    random_bases,
    shared_bases,
    split_feature_dim,
    stats_to_arrays,
)


def _data(n: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.1, c)  # distinct variances -> well-defined components
    return torch.randn(n, c, generator=gen, dtype=torch.float64) * scales + 5.0


def test_merge_is_exact_union() -> None:
    a, b = _data(40, 6, 0), _data(25, 6, 1)
    merged = merge_stats(pca_stats(a), pca_stats(b))
    union = pca_stats(torch.cat([a, b]))
    assert merged.count == union.count == 65
    np.testing.assert_allclose(merged.sum, union.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, union.outer, rtol=1e-12)


def test_pca_from_merged_stats_equals_pca_of_pooled_data() -> None:
    clients = [_data(n, 8, s) for s, n in enumerate((30, 50, 20))]
    merged = merge_all([[pca_stats(x)] for x in clients])
    (basis,) = pca_bases(merged, [3])
    pooled = torch.cat(clients).numpy()
    mean = pooled.mean(axis=0)
    _, _, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    np.testing.assert_allclose(basis.mean, mean, rtol=1e-10)
    for k in range(3):  # same directions up to sign
        assert abs(abs(float(basis.components[:, k] @ vt[k])) - 1.0) < 1e-8
    # centred projections have decreasing variance and are uncorrelated
    y = project([torch.cat(clients).float()], [basis]).double().numpy()
    cov = np.cov(y, rowvar=False)
    assert np.all(np.diff(np.diag(cov)) < 0)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-3 * cov.max()


def test_pca_pads_when_block_has_fewer_channels_than_its_share() -> None:
    (basis,) = pca_bases([pca_stats(_data(20, 4, 0))], [10])
    assert basis.components.shape == (4, 10)
    assert np.all(basis.components[:, 4:] == 0)
    y = project([_data(5, 4, 1).float()], [basis])
    assert y.shape == (5, 10) and torch.all(y[:, 4:] == 0)


def test_random_bases_are_seeded_and_orthonormal() -> None:
    a = random_bases([16, 8], [6, 12], seed=3)
    b = random_bases([16, 8], [6, 12], seed=3)
    c = random_bases([16, 8], [6, 12], seed=4)
    assert np.array_equal(a[0].components, b[0].components)
    assert not np.allclose(a[0].components, c[0].components)
    np.testing.assert_allclose(a[0].components.T @ a[0].components, np.eye(6), atol=1e-12)
    assert a[1].components.shape == (8, 12)
    np.testing.assert_allclose(
        a[1].components[:, :8].T @ a[1].components[:, :8], np.eye(8), atol=1e-12
    )


@pytest.mark.parametrize(
    ("dim", "n", "expected"),
    [
        (512, 3, [256, 128, 128]),
        (128, 3, [64, 32, 32]),
        (100, 3, [50, 25, 25]),
        (103, 3, [53, 25, 25]),
        (90, 2, [60, 30]),
        (7, 1, [7]),
    ],
)
def test_split_feature_dim(dim: int, n: int, expected: list[int]) -> None:
    assert split_feature_dim(dim, n) == expected


@pytest.mark.parametrize(
    ("dim", "channels", "expected"),
    [
        (512, [1280, 640, 320], [256, 128, 128]),  # SD 2.1: every block has room
        (128, [16, 64, 64], [16, 56, 56]),  # block 0's surplus of 48 goes to the others, 1:1
        (128, [80, 40, 20], [72, 36, 20]),  # block 2's surplus of 12 goes 2:1 to blocks 0 and 1
        (128, [90, 33, 20], [75, 33, 20]),  # ... and what block 1 cannot take then to block 0
        (128, [64, 32, 16], [64, 32, 32]),  # 112 channels < 128: 16 zero columns remain
    ],
)
def test_split_feature_dim_gives_a_small_blocks_surplus_to_the_others(
    dim: int, channels: list[int], expected: list[int]
) -> None:
    dims = split_feature_dim(dim, len(channels), channels)
    assert dims == expected and sum(dims) == dim
    if sum(channels) >= dim:
        assert all(d <= c for d, c in zip(dims, channels, strict=True))


def test_random_bases_are_centred_with_the_federated_mean() -> None:
    feats = _data(50, 6, 0).float() + 5.0
    stats = [pca_stats(feats)]
    (basis,) = shared_bases("random", 4, [6], seed=1, stats=stats)
    np.testing.assert_allclose(basis.mean, feats.double().mean(0).numpy(), atol=1e-9)
    y = project([feats], [basis])  # [50, 4]
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    (uncentred,) = random_bases([6], [4], seed=1)
    np.testing.assert_array_equal(uncentred.components, basis.components)  # same seeded directions
    with pytest.raises(ValueError, match="statistics"):
        shared_bases("random", 4, [6], seed=1)


def test_project_concatenates_blocks_and_checks_channels() -> None:
    feats = [_data(7, 12, 0).float(), _data(7, 6, 1).float()]
    bases = pca_bases([pca_stats(f) for f in feats], [4, 2])
    out = project(feats, bases)
    assert out.shape == (7, 6) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="channels"):
        project(feats[::-1], bases)


def test_array_round_trips() -> None:
    stats = [pca_stats(_data(9, 5, 0)), pca_stats(_data(9, 3, 1))]
    back = arrays_to_stats(stats_to_arrays(stats))
    assert [s.count for s in back] == [9, 9]
    np.testing.assert_array_equal(back[1].outer, stats[1].outer)
    bases = pca_bases(stats, [2, 2])
    back_b = arrays_to_bases(bases_to_arrays(bases))
    np.testing.assert_allclose(back_b[0].components, bases[0].components, atol=1e-6)
    with pytest.raises(ValueError, match="stats.0"):
        arrays_to_stats({})
