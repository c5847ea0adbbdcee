"""Per-client representations on the tiny SD pipeline: layouts, targets, cache reuse and resume."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from feddifrc_core.checkpoint import load_arrays
from feddifrc_core.client_extraction import extract_client_representations, extract_position_stats
from feddifrc_core.config import RunConfig
from feddifrc_core.diffusion import extractor as extractor_module
from feddifrc_core.diffusion.backbone import load_backbone
from feddifrc_core.projection import Basis, merge_all, pca_stats, shared_bases
from feddifrc_core.representations import RepresentationSettings

CLASSES = [str(i) for i in range(10)]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs in the extraction code."""


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "feddifrc-cache"  # shared by all diffusion test files
    return load_backbone("tiny-sd", "cpu", torch.float32, cache_dir=str(cache))


def _data(n: int, num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return images, labels, torch.arange(500, 500 + n)


# The run config's view (the paper's settings), native image size, small calls and cache chunks
SETTINGS = dataclasses.replace(
    RepresentationSettings.from_run_config(
        RunConfig(diffusion_image_size=0, extraction_batch_size=8, diffusion_dtype="float32"),
        label_free=False),
    dataset="test", chunk_images=4)


def test_all_prompt_layout_and_targets(backbone) -> None:
    images, labels, ids = _data(6)
    reps = extract_client_representations(
        backbone, images, labels, ids, CLASSES, SETTINGS, None, progress=False
    )
    assert reps.prompt_ids.shape == (6, 11) and reps.block_channels == (64, 32, 32)
    assert torch.equal(reps.positive_cols, labels) and torch.all(reps.null_cols == 10)
    assert reps.negative_cols.shape == (6, 9) and not (reps.negative_cols == labels[:, None]).any()
    assert reps.prompts[10] == "" and reps.prompts[3] == "a photo of a handwritten number 3"
    bases = shared_bases("random", 64, reps.block_channels, 0, merge_all([reps.pca_stats()]))
    t = reps.targets(bases, 64)
    assert (
        t.positive.shape == (6, 64) and t.negatives.shape == (6, 9, 64) and t.null.shape == (6, 64)
    )
    assert (t.positive[:, None] - t.negatives).abs().amax(
        dim=-1
    ).min() > 0  # positive != every negative
    with pytest.raises(ValueError, match="feature size"):
        reps.targets(bases, 65)


def test_needed_layout_gives_the_same_targets(backbone) -> None:
    images, labels, ids = _data(5)
    full = extract_client_representations(
        backbone, images, labels, ids, CLASSES, SETTINGS, None, progress=False
    )
    needed_settings = RepresentationSettings(**{**SETTINGS.__dict__, "all_prompts_max": 0})
    needed = extract_client_representations(
        backbone, images, labels, ids, CLASSES, needed_settings, None, progress=False
    )
    assert needed.prompt_ids.shape == (5, 11) and torch.all(needed.positive_cols == 0)
    assert torch.equal(needed.prompt_ids[:, 0], labels) and torch.all(
        needed.prompt_ids[:, -1] == 10
    )
    bases = shared_bases("random", 32, full.block_channels, 1, merge_all([full.pca_stats()]))
    a, b = full.targets(bases, 32), needed.targets(bases, 32)
    torch.testing.assert_close(a.positive, b.positive, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(a.negatives, b.negatives, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(a.null, b.null, atol=2e-3, rtol=1e-3)


def test_many_classes_store_only_needed_prompts(backbone) -> None:
    images, labels, ids = _data(4, num_classes=30)
    s = RepresentationSettings(**{**SETTINGS.__dict__, "neg_num": 3})
    reps = extract_client_representations(
        backbone, images, labels, ids, [f"c{i}" for i in range(30)], s, None, progress=False
    )
    assert reps.prompt_ids.shape == (4, 5) and reps.negative_cols.tolist() == [[1, 2, 3]] * 4


def test_ssl_mode_uses_vocabulary_negatives(backbone) -> None:
    images, _, ids = _data(3)
    s = RepresentationSettings(**{**SETTINGS.__dict__, "label_free": True, "neg_num": 4})
    reps = extract_client_representations(backbone, images, None, ids, [], s, None, progress=False)
    assert reps.prompt_ids.shape == (3, 6)
    assert reps.prompts[int(reps.prompt_ids[0, 0])] == "a photo of a similar object"
    assert reps.prompts[int(reps.prompt_ids[0, -1])] == "a photo of a visual object"
    assert all(int(p) < 200 for p in reps.prompt_ids[:, 1:5].reshape(-1))


def test_pca_stats_cover_every_stored_vector(backbone) -> None:
    images, labels, ids = _data(6)
    reps = extract_client_representations(
        backbone, images, labels, ids, CLASSES, SETTINGS, None, progress=False
    )
    stats = reps.pca_stats()
    assert [s.dim for s in stats] == [64, 32, 32] and stats[0].count == 6 * 11
    direct = pca_stats(reps.features[1].reshape(-1, 32).float())
    torch.testing.assert_close(torch.from_numpy(stats[1].outer), torch.from_numpy(direct.outer))
    bases = shared_bases("federated-pca", 64, reps.block_channels, 0, merge_all([stats]))
    assert reps.targets(bases, 64).positive.shape == (6, 64)


def test_cache_reuse_and_resume_after_a_kill(backbone, tmp_path: Path, monkeypatch) -> None:
    images, labels, ids = _data(10)
    reference = extract_client_representations(
        backbone, images, labels, ids, CLASSES, SETTINGS, None, progress=False
    )
    real_extract = extractor_module.DiffusionFeatureExtractor.extract
    calls, die = [], [True]

    def dying_extract(self, images, *args, **kwargs):
        calls.append(len(images))
        if die[0] and len(calls) == 2:
            raise _Killed  # the process dies while computing the second chunk
        return real_extract(self, images, *args, **kwargs)

    monkeypatch.setattr(extractor_module.DiffusionFeatureExtractor, "extract", dying_extract)
    with pytest.raises(_Killed):
        extract_client_representations(
            backbone, images, labels, ids, CLASSES, SETTINGS, tmp_path, progress=False
        )
    calls.clear()
    die[0] = False
    resumed = extract_client_representations(
        backbone, images, labels, ids, CLASSES, SETTINGS, tmp_path, progress=False
    )
    assert calls == [4, 2]  # chunk 0 (4 images) was kept; chunks 1 and 2 were computed
    assert not resumed.from_cache
    for a, b in zip(reference.features, resumed.features, strict=True):
        assert torch.equal(a, b)  # same fp16 numbers as an uninterrupted run
    calls.clear()
    again = extract_client_representations(
        backbone, images, labels, ids, CLASSES, SETTINGS, tmp_path, progress=False
    )
    assert calls == [] and again.from_cache and again.cache_dir == resumed.cache_dir
    # another client (other sample ids) in the same folder gets its own files
    other = extract_client_representations(
        backbone, images[:4], labels[:4], ids[:4] + 100, CLASSES, SETTINGS, tmp_path, progress=False
    )
    assert other.cache_dir != again.cache_dir


def test_settings_from_run_config() -> None:
    cfg = RunConfig(up_blocks="1,3", diffusion_timestep=200, algorithm="feddifrc-ssl")
    s = RepresentationSettings.from_run_config(cfg, cfg.algorithm_class.label_free)
    assert s.up_blocks == (1, 3) and s.timestep == 200 and s.label_free and s.image_size == 224


# --- the authors' reduction: per-position shared PCA, then RMS over positions --------------------
SPATIAL = RepresentationSettings(**{**SETTINGS.__dict__, "reduction": "spatial-norm"})


def _spatial_set_up(backbone, images, labels, ids):
    """One client's per-position statistics and the federated-PCA bases the server makes of them."""
    stats = extract_position_stats(backbone, images, labels, ids, CLASSES, SPATIAL, None)
    return stats, shared_bases("federated-pca", 64, [s.dim for s in stats], 0, merge_all([stats]))


def _spatial_reps(backbone, images, labels, ids, bases, cache=None):
    return extract_client_representations(
        backbone, images, labels, ids, CLASSES, SPATIAL, cache, progress=False, bases=bases
    )


def _raw_maps(backbone, images, ids, prompts: list[str]) -> list[torch.Tensor]:
    """Every kept block's full output map [N, P, C, h, w], computed without the extractor's
    reductions (same pixels, noise and timestep): the post-hoc reference."""
    ex = extractor_module.DiffusionFeatureExtractor(
        backbone, timestep=SPATIAL.timestep, up_blocks=SPATIAL.up_blocks, seed=SPATIAL.seed
    )
    maps: dict[int, torch.Tensor] = {}
    handles = [
        backbone.unet.up_blocks[b].register_forward_hook(
            lambda _m, _i, out, b=b: maps.__setitem__(b, out[0] if isinstance(out, tuple) else out)
        )
        for b in ex.up_blocks
    ]
    try:
        embeds = backbone.encode_prompts(prompts)  # [P, L, D]
        pixels = extractor_module.to_model_pixels(images, ex.image_size, 3, "cpu", torch.float32)
        latents = backbone.encode_images(pixels)
        noise = ex.noise(latents.shape[1:], [int(i) for i in ids], 0)
        t = torch.full((len(images) * len(prompts),), ex.timestep)
        noisy = backbone.scheduler.add_noise(latents, noise, t[: len(images)])
        with torch.no_grad():
            backbone.unet(noisy.repeat_interleave(len(prompts), 0), t,
                          encoder_hidden_states=embeds.repeat(len(images), 1, 1))
    finally:
        for h in handles:
            h.remove()
    return [maps[b].view(len(images), len(prompts), *maps[b].shape[1:]) for b in ex.up_blocks]


def test_spatial_norm_federated_pca_and_targets_equal_a_direct_computation(backbone) -> None:
    images, labels, ids = _data(4)
    # federated: one client's statistics, merged, eigendecomposed, projected inside the hooks
    stats, bases = _spatial_set_up(backbone, images, labels, ids)
    reps = _spatial_reps(backbone, images, labels, ids, bases)
    assert reps.projected and reps.block_channels == (32, 16, 16)
    # direct: full maps of all 11 prompts, numpy PCA over every position, projection, RMS
    maps = _raw_maps(backbone, images, ids, list(reps.prompts))
    for block, (m, basis) in enumerate(zip(maps, bases, strict=True)):
        vectors = m.permute(0, 1, 3, 4, 2).reshape(-1, m.shape[2]).double()  # [N*P*h*w, C]
        assert stats[block].count == vectors.shape[0]
        mean = vectors.mean(0)
        torch.testing.assert_close(torch.from_numpy(basis.mean), mean, atol=1e-5, rtol=1e-5)
        cov = (vectors - mean).T @ (vectors - mean) / vectors.shape[0]
        top = torch.linalg.eigh(cov).eigenvalues.flip(0)[: basis.out_dim]
        comps = torch.from_numpy(basis.components)
        explained = torch.einsum("cd,ce,ed->d", comps, cov, comps)  # variance along each column
        torch.testing.assert_close(explained, top, atol=1e-5, rtol=1e-5)
        # hook-side reduction == post-hoc reduction of the full maps with the same basis
        y = (vectors.float() - mean.float()) @ comps.float()  # [N*P*h*w, d]
        posthoc = y.view(4, 11, -1, basis.out_dim).square().mean(2).sqrt()  # [N, P, d]
        torch.testing.assert_close(reps.features[block].float(), posthoc, atol=2e-3, rtol=1e-3)
    t = reps.targets(bases, 64)
    assert (t.positive >= 0).all() and (t.negatives >= 0).all() and (t.null >= 0).all()


def test_spatial_norm_targets_do_not_depend_on_basis_signs(backbone) -> None:
    images, labels, ids = _data(3)
    _, bases = _spatial_set_up(backbone, images, labels, ids)
    signs = [torch.where(torch.rand(b.out_dim) < 0.5, -1.0, 1.0).double().numpy() for b in bases]
    flipped = [Basis(b.mean, b.components * s) for b, s in zip(bases, signs, strict=True)]
    a = _spatial_reps(backbone, images, labels, ids, bases).targets(bases, 64)
    b = _spatial_reps(backbone, images, labels, ids, flipped).targets(flipped, 64)
    for x, y in ((a.positive, b.positive), (a.negatives, b.negatives), (a.null, b.null)):
        assert torch.equal(x, y)


def test_spatial_norm_caches_per_basis_and_checks_the_bases(backbone, tmp_path: Path) -> None:
    images, labels, ids = _data(5)
    stats = extract_position_stats(backbone, images, labels, ids, CLASSES, SPATIAL, tmp_path)
    again = extract_position_stats(backbone, images, labels, ids, CLASSES, SPATIAL, tmp_path)
    assert all((a.outer == b.outer).all() for a, b in zip(stats, again, strict=True))
    assert len(list(tmp_path.glob("*-stats-*.safetensors"))) == 1
    bases = shared_bases("federated-pca", 64, [s.dim for s in stats], 0, merge_all([stats]))
    first = _spatial_reps(backbone, images, labels, ids, bases, tmp_path)
    second = _spatial_reps(backbone, images, labels, ids, bases, tmp_path)
    assert not first.from_cache and second.from_cache and second.cache_dir == first.cache_dir
    other = shared_bases("random", 64, [s.dim for s in stats], 3, merge_all([stats]))
    third = _spatial_reps(backbone, images, labels, ids, other, tmp_path)
    assert not third.from_cache and third.cache_dir != first.cache_dir
    with pytest.raises(ValueError, match="other bases"):
        first.targets(other, 64)
    with pytest.raises(ValueError, match="needs the shared bases"):
        extract_client_representations(
            backbone, images, labels, ids, CLASSES, SPATIAL, None, progress=False
        )
    with pytest.raises(ValueError, match="already projected"):
        first.pca_stats()


def test_spatial_norm_centred_offset_removes_the_mean_target(backbone) -> None:
    images, labels, ids = _data(6)
    _, bases = _spatial_set_up(backbone, images, labels, ids)
    reps = _spatial_reps(backbone, images, labels, ids, bases)
    count, total = reps.target_sum(bases, 64)
    assert count == 6 * 11
    offset = total / count
    every = reps.projected_all(bases, 64) - torch.as_tensor(offset, dtype=torch.float32)
    torch.testing.assert_close(every.mean((0, 1)), torch.zeros(64), atol=1e-5, rtol=0)
    t = reps.targets(bases, 64, offset)
    torch.testing.assert_close(t.null, every[torch.arange(6), reps.null_cols])
    assert (t.null < 0).any()  # centred targets are signed again


def _client(backbone, data, rows, cache, settings=SETTINGS):
    """Representations of a client holding `rows` of `data` = (images, labels, ids)."""
    images, labels, ids = data
    return extract_client_representations(
        backbone, images[rows], labels[rows], ids[rows], CLASSES, settings, cache, progress=False
    )


def _extracted_ids(monkeypatch) -> list[int]:
    """Sample ids the extractor is asked for from now on (appended to the returned list)."""
    real_extract = extractor_module.DiffusionFeatureExtractor.extract
    asked: list[int] = []

    def recording_extract(self, images, sample_ids, *args, **kwargs):
        asked.extend(int(s) for s in sample_ids)
        return real_extract(self, images, sample_ids, *args, **kwargs)

    monkeypatch.setattr(extractor_module.DiffusionFeatureExtractor, "extract", recording_extract)
    return asked


def test_another_partition_of_the_same_images_reuses_their_rows(
    backbone, tmp_path: Path, monkeypatch
) -> None:
    data = images, labels, ids = _data(10)
    reference = _client(backbone, data, slice(None), None)
    calls = _extracted_ids(monkeypatch)
    # partition A: images 0-5 in one client
    _client(backbone, data, slice(6), tmp_path)
    calls.clear()
    # partition B: a client holding images 3-7 and 9 in another order extracts only 6, 7, 9
    order = torch.tensor([9, 3, 7, 4, 6, 5])
    other = _client(backbone, data, order, tmp_path)
    assert sorted(calls) == ids[[6, 7, 9]].tolist()
    # partition C: image 8 is the only one to extract, alone in its UNet call
    calls.clear()
    alone = _client(backbone, data, torch.tensor([8, 2]), tmp_path)
    assert calls == ids[[8]].tolist()
    # reused rows and rows extracted beside other neighbours (or none): bit-identical to a fresh
    # extraction of the whole set
    for got, want in zip(other.features, reference.features, strict=True):
        assert torch.equal(got, want[order])
    for got, want in zip(alone.features, reference.features, strict=True):
        assert torch.equal(got, want[[8, 2]])
    # same ids but other image bytes (another data version): nothing is reused
    calls.clear()
    changed = images.clone()
    changed[:6] = 255 - changed[:6]
    _client(backbone, (changed, labels, ids), slice(5), tmp_path)
    assert sorted(calls) == ids[:5].tolist()
    # a damaged part is reported, removed and its rows extracted again
    first = min(tmp_path.glob("rows-*/part-*.safetensors"), key=lambda p: p.stat().st_mtime)
    first.write_bytes(first.read_bytes()[:-10])
    calls.clear()
    again = _client(backbone, data, slice(4), tmp_path)
    assert sorted(calls) == ids[:4].tolist()
    load_arrays(first)  # written again, whole (same rows -> same content-addressed name)
    for got, want in zip(again.features, reference.features, strict=True):
        assert torch.equal(got, want[:4])  # a repaired cache holds the same bits


def test_rows_are_not_shared_across_extraction_settings(
    backbone, tmp_path: Path, monkeypatch
) -> None:
    data = images, labels, ids = _data(4)
    _client(backbone, data, slice(None), tmp_path)
    calls = _extracted_ids(monkeypatch)
    other_seed = RepresentationSettings(**{**SETTINGS.__dict__, "seed": SETTINGS.seed + 1})
    _client(backbone, data, slice(3), tmp_path, other_seed)
    assert sorted(calls) == ids[:3].tolist()  # other noise seed: nothing reused
    assert len(list(tmp_path.glob("rows-*"))) == 2  # one row store per setting
    calls.clear()
    _client(backbone, data, slice(3), tmp_path)
    assert calls == []  # same setting as the first client: all three rows reused


def test_a_client_cache_without_shared_rows_shares_them_when_read(
    backbone, tmp_path: Path, monkeypatch
) -> None:
    data = images, labels, ids = _data(6)
    _client(backbone, data, slice(None), tmp_path)
    for store in tmp_path.glob("rows-*"):  # as written by a version without shared rows
        shutil.rmtree(store)
    _client(backbone, data, slice(None), tmp_path)  # read from its cache: rows 0-5 are shared now
    calls = _extracted_ids(monkeypatch)
    _client(backbone, data, slice(2, None), tmp_path)
    assert calls == []
