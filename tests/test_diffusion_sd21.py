"""The full SD-2.1 architecture (random weights) on CPU: one 64 px image through the extractor."""

from pathlib import Path

import pytest
import torch

from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor
from feddifrc_core.diffusion.reduction import PositionStats, SpatialNorm
from feddifrc_core.diffusion.sd import SD21_UNET_CONFIG, random_sd21_backbone
from feddifrc_core.projection import pca_bases, split_feature_dim


@pytest.mark.slow
def test_sd21_architecture_one_image(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    backbone = random_sd21_backbone("cpu", torch.float32, tokenizer_dir=tmp_path)
    assert backbone.sample_size == 768 and len(backbone.unet.up_blocks) == 4
    assert (
        sum(p.numel() for p in backbone.unet.parameters()) > 800e6
    )  # the real 865 M-parameter UNet
    ex = DiffusionFeatureExtractor(
        backbone, timestep=300, up_blocks=(1, 2, 3), image_size=64, batch_size=1
    )
    assert ex.block_channels == (1280, 640, 320)  # METHOD.md: SD 2.1 up-blocks 1, 2, 3
    assert ex.block_channels == tuple(list(reversed(SD21_UNET_CONFIG["block_out_channels"]))[1:])
    feats = ex.extract(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8), [0], [""])
    assert [tuple(f.shape) for f in feats] == [(1, 1, 1280), (1, 1, 640), (1, 1, 320)]
    assert all(torch.isfinite(f).all() and f.abs().sum() > 0 for f in feats)
    # the authors' reduction: per-position PCA to 256/128/128 of 512, RMS over positions
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    accumulators = [PositionStats(c) for c in ex.raw_channels]
    ex.extract(image, [0], [""], reductions=accumulators)
    stats = [a.stats for a in accumulators]
    bases = pca_bases(stats, split_feature_dim(512, 3, ex.raw_channels))
    reduced = ex.extract(image, [0], [""], reductions=[SpatialNorm(b) for b in bases])
    assert [tuple(f.shape) for f in reduced] == [(1, 1, 256), (1, 1, 128), (1, 1, 128)]
    assert all(torch.isfinite(f).all() and (f >= 0).all() for f in reduced)
