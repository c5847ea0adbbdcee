"""Shared projection of pooled diffusion features to the local model's feature size.

METHOD.md: every client must map its diffusion features into the SAME basis. Two choices:
- federated PCA: clients send sufficient statistics (count, sum, sum of outer products) per block;
  the merge is exact (merging two clients equals the statistics of their union), the server
  eigendecomposes the merged covariance once and broadcasts the bases;
- random: a seeded orthogonal projection, identical everywhere, centred with the federated mean
  (the same statistics round, of which it uses only count and sum).
The model's feature size D is split over the blocks 2:1:1 (first block double), as in the paper
(256/128/128 of 512). A block with fewer channels than its share gives the surplus to the others.

Only when all blocks together have fewer channels than D (tiny backbones) are bases padded with
zero columns: the projected vector still has D entries, the extra ones are always 0 (they add
nothing to cosine similarities or distances), so the model's feature size is met exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

from feddifrc_core.seeding import hashed_seed

PROJECTIONS = ("federated-pca", "random")


@dataclass(frozen=True)
class PcaStats:
    """Sufficient statistics of a set of vectors [N, C] (float64): count, sum [C], outer [C, C]."""

    count: int
    sum: np.ndarray  # [C] sum of x
    outer: np.ndarray  # [C, C] sum of x x^T

    def __post_init__(self) -> None:
        c = self.sum.shape[0] if self.sum.ndim == 1 else -1
        if c < 0 or self.outer.shape != (c, c):
            raise ValueError(
                f"PcaStats needs sum [C] and outer [C, C], got {self.sum.shape} and "
                f"{self.outer.shape}"
            )
        if self.count < 0:
            raise ValueError(f"PcaStats count must be >= 0, got {self.count}")

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])


@dataclass(frozen=True)
class Basis:
    """Affine projection of one block: y = (x - mean) @ components."""

    mean: np.ndarray  # [C]
    components: np.ndarray  # [C, d], orthonormal columns (zero columns where d > C)

    @property
    def in_dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.components.shape[1])


def pca_stats(x: torch.Tensor | np.ndarray) -> PcaStats:
    """Statistics of the rows of x [N, C], accumulated in float64."""
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"`x` must be [N, C], got shape {arr.shape}")
    return PcaStats(count=int(arr.shape[0]), sum=arr.sum(axis=0), outer=arr.T @ arr)


def merge_stats(a: PcaStats, b: PcaStats) -> PcaStats:
    """Statistics of the union of the two sets (exact: sums add)."""
    if a.dim != b.dim:
        raise ValueError(f"cannot merge statistics of {a.dim}-d and {b.dim}-d features")
    return PcaStats(count=a.count + b.count, sum=a.sum + b.sum, outer=a.outer + b.outer)


def merge_all(stats_per_client: Sequence[Sequence[PcaStats]]) -> list[PcaStats]:
    """Block-wise merge of several clients' per-block statistics."""
    if not stats_per_client:
        raise ValueError("`stats_per_client` is empty: no client sent statistics")
    n_blocks = {len(s) for s in stats_per_client}
    if len(n_blocks) != 1:
        raise ValueError(
            f"clients sent statistics for different numbers of blocks: {sorted(n_blocks)}"
        )
    return [reduce(merge_stats, blocks) for blocks in zip(*stats_per_client, strict=True)]


def split_feature_dim(
    feature_dim: int, n_blocks: int, channels: Sequence[int] | None = None
) -> list[int]:
    """Per-block output sizes summing to feature_dim, weights 2:1:...:1 (512 -> 256/128/128).

    With `channels`, no block gets more dims than it has channels while another still has room:
    the surplus goes to the blocks with room, by their weights. Only a surplus no block can take
    (sum of channels < feature_dim) stays as zero columns, on the last block.
    """
    if n_blocks < 1:
        raise ValueError(f"`n_blocks` must be >= 1, got {n_blocks}")
    if feature_dim < n_blocks + 1 and n_blocks > 1:
        raise ValueError(
            f"`feature_dim` {feature_dim} is too small to split over {n_blocks} blocks"
        )
    weights = [2] + [1] * (n_blocks - 1)
    dims = _split_by_weights(feature_dim, weights)
    if channels is None:
        return dims
    if len(channels) != n_blocks:
        raise ValueError(f"got {len(channels)} channel counts for {n_blocks} blocks")
    caps = [int(c) for c in channels]
    if sum(caps) <= feature_dim:  # every channel is used; the rest can only be zero columns
        return [*caps[:-1], caps[-1] + feature_dim - sum(caps)]
    while surplus := sum(max(0, d - c) for d, c in zip(dims, caps, strict=True)):
        dims = [min(d, c) for d, c in zip(dims, caps, strict=True)]
        room = [i for i in range(n_blocks) if dims[i] < caps[i]]
        extra = _split_by_weights(surplus, [weights[i] for i in room])
        for i, e in zip(room, extra, strict=True):
            dims[i] += e
    return dims


def _split_by_weights(total: int, weights: Sequence[int]) -> list[int]:
    parts = [total * w // sum(weights) for w in weights]
    parts[0] += total - sum(parts)  # rounding remainder to the first (largest) part
    return parts


def _fixed_signs(components: np.ndarray) -> np.ndarray:
    """Flip columns so their largest-magnitude entry is positive (eigenvector signs vary)."""
    idx = np.abs(components).argmax(axis=0)
    signs = np.sign(components[idx, np.arange(components.shape[1])])
    signs[signs == 0] = 1.0
    oriented: np.ndarray = components * signs
    return oriented


def _pad_columns(components: np.ndarray, out_dim: int) -> np.ndarray:
    c, d = components.shape
    if d >= out_dim:
        return components[:, :out_dim]
    return np.concatenate([components, np.zeros((c, out_dim - d))], axis=1)


def pca_bases(stats: Sequence[PcaStats], out_dims: Sequence[int]) -> list[Basis]:
    """Per block: mean and the top-d principal directions of the (merged) statistics."""
    if len(stats) != len(out_dims):
        raise ValueError(f"got statistics for {len(stats)} blocks but {len(out_dims)} output sizes")
    bases = []
    for block, (s, d) in enumerate(zip(stats, out_dims, strict=True)):
        if s.count < 2:
            raise ValueError(f"block {block}: PCA needs at least 2 feature vectors, got {s.count}")
        mean = s.sum / s.count  # [C]
        cov = s.outer / s.count - np.outer(mean, mean)  # [C, C]
        cov = (cov + cov.T) / 2  # exact symmetry for eigh
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigval)[::-1][: min(d, s.dim)]
        comps = _fixed_signs(eigvec[:, order])  # [C, min(d, C)]
        bases.append(Basis(mean=mean, components=_pad_columns(comps, d)))
    return bases


def random_bases(
    in_dims: Sequence[int],
    out_dims: Sequence[int],
    seed: int,
    means: Sequence[np.ndarray] | None = None,
) -> list[Basis]:
    """Seeded orthogonal projections, centred with `means` (the federated mean; None = zeros).

    Uncentred, every target shares the mean feature's projection and cosines between targets
    are all high: the losses would barely see the differences between images and prompts.
    """
    if len(in_dims) != len(out_dims):
        raise ValueError(f"got {len(in_dims)} input sizes but {len(out_dims)} output sizes")
    if means is not None and [len(m) for m in means] != list(in_dims):
        raise ValueError(f"means are {[len(m) for m in means]}-d but the blocks have {list(in_dims)}")
    bases = []
    for block, (c, d) in enumerate(zip(in_dims, out_dims, strict=True)):
        gen = torch.Generator().manual_seed(hashed_seed(seed, "random-basis", block))
        gauss = torch.randn(c, min(c, d), generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)  # [C, min(C, d)] orthonormal columns
        signs = torch.sign(torch.diagonal(r))
        q = q * torch.where(
            signs == 0, torch.ones_like(signs), signs
        )  # unique QR: Haar-distributed
        mean = np.zeros(c) if means is None else np.asarray(means[block], dtype=np.float64)
        bases.append(Basis(mean=mean, components=_pad_columns(q.numpy(), d)))
    return bases


def shared_bases(
    method: str,
    feature_dim: int,
    in_dims: Sequence[int],
    seed: int,
    stats: Sequence[PcaStats] | None = None,
) -> list[Basis]:
    """The bases every client uses, from the merged `stats`: "federated-pca" (top principal
    directions) or "random" (seeded from `seed`, centred with the federated mean)."""
    out_dims = split_feature_dim(feature_dim, len(in_dims), in_dims)
    if method not in PROJECTIONS:
        raise ValueError(f"`projection` must be one of {list(PROJECTIONS)}, got {method!r}")
    if stats is None:
        raise ValueError(f"projection {method!r} needs the merged statistics (`stats`)")
    if [s.dim for s in stats] != list(in_dims):
        raise ValueError(
            f"statistics are {[s.dim for s in stats]}-d but the blocks have "
            f"{list(in_dims)} channels"
        )
    if method == "federated-pca":
        return pca_bases(stats, out_dims)
    for block, s in enumerate(stats):
        if s.count < 1:
            raise ValueError(f"block {block}: the federated mean needs at least 1 feature vector")
    return random_bases(in_dims, out_dims, seed, [s.sum / s.count for s in stats])


def project(per_block: Sequence[torch.Tensor], bases: Sequence[Basis]) -> torch.Tensor:
    """Centre, project and concatenate: per block [..., C_l] -> [..., sum d_l] (float32)."""
    if len(per_block) != len(bases):
        raise ValueError(f"got features of {len(per_block)} blocks but {len(bases)} bases")
    parts = []
    for block, (x, basis) in enumerate(zip(per_block, bases, strict=True)):
        if x.shape[-1] != basis.in_dim:
            raise ValueError(
                f"block {block}: features have {x.shape[-1]} channels, basis expects {basis.in_dim}"
            )
        mean = torch.as_tensor(basis.mean, dtype=torch.float32, device=x.device)
        comps = torch.as_tensor(basis.components, dtype=torch.float32, device=x.device)
        parts.append((x.float() - mean) @ comps)  # [..., d_l]
    return torch.cat(parts, dim=-1)  # [..., D]


# --- array records for the Flower messages --------------------------------------------------------
def stats_to_arrays(stats: Sequence[PcaStats], prefix: str = "stats") -> dict[str, np.ndarray]:
    """Block i -> "stats.{i}.count" int64 [1], "stats.{i}.sum" [C], "stats.{i}.outer" [C, C]."""
    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(stats):
        out[f"{prefix}.{i}.count"] = np.array([s.count], dtype=np.int64)
        out[f"{prefix}.{i}.sum"] = np.ascontiguousarray(s.sum, dtype=np.float64)
        out[f"{prefix}.{i}.outer"] = np.ascontiguousarray(s.outer, dtype=np.float64)
    return out


def arrays_to_stats(arrays: dict[str, np.ndarray], prefix: str = "stats") -> list[PcaStats]:
    n = _count_blocks(arrays, prefix, ("count", "sum", "outer"))
    return [
        PcaStats(
            count=int(np.asarray(arrays[f"{prefix}.{i}.count"]).reshape(-1)[0]),
            sum=np.asarray(arrays[f"{prefix}.{i}.sum"], dtype=np.float64),
            outer=np.asarray(arrays[f"{prefix}.{i}.outer"], dtype=np.float64),
        )
        for i in range(n)
    ]


def bases_to_arrays(bases: Sequence[Basis], prefix: str = "basis") -> dict[str, np.ndarray]:
    """{"basis.{i}.mean": [C], "basis.{i}.components": [C, d]} for block i (float32 on the wire)."""
    out: dict[str, np.ndarray] = {}
    for i, b in enumerate(bases):
        out[f"{prefix}.{i}.mean"] = np.ascontiguousarray(b.mean, dtype=np.float32)
        out[f"{prefix}.{i}.components"] = np.ascontiguousarray(b.components, dtype=np.float32)
    return out


def arrays_to_bases(arrays: dict[str, np.ndarray], prefix: str = "basis") -> list[Basis]:
    n = _count_blocks(arrays, prefix, ("mean", "components"))
    return [
        Basis(
            mean=np.asarray(arrays[f"{prefix}.{i}.mean"], dtype=np.float64),
            components=np.asarray(arrays[f"{prefix}.{i}.components"], dtype=np.float64),
        )
        for i in range(n)
    ]


def _count_blocks(arrays: dict[str, np.ndarray], prefix: str, parts: tuple[str, ...]) -> int:
    n = 0
    while all(f"{prefix}.{n}.{p}" in arrays for p in parts):
        n += 1
    if n == 0:
        raise ValueError(
            f"no '{prefix}.0.{{{','.join(parts)}}}' arrays found; got keys {sorted(arrays)[:8]}"
        )
    return n
