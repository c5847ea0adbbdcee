"""DIFT-style extraction on the offline tiny SD pipeline (built from configs, loaded from disk)."""

from pathlib import Path

import pytest
import torch

from feddifrc_core.diffusion.backbone import load_backbone
from feddifrc_core.diffusion.extractor import (
    DiffusionFeatureExtractor,
    to_model_pixels,
    up_block_channels,
)
from feddifrc_core.diffusion.tokenizer import load_clip_tokenizer

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a car", ""]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.getbasetemp() / "feddifrc-cache"  # shared by all diffusion test files
    return load_backbone("tiny-sd", "cpu", torch.float32, cache_dir=str(cache))


def _images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def test_tokenizer_is_the_real_clip_bpe(tmp_path: Path) -> None:
    tok = load_clip_tokenizer(tmp_path)
    # ids of the public CLIP vocabulary: <start> a photo of a cat <end>
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_tiny_sd_is_loaded_from_a_saved_folder(backbone) -> None:
    ident = backbone.identity()
    folder = Path(ident["model"])
    assert ident["kind"] == "tiny-sd" and len(ident["content_sha256"]) == 64
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    assert not hasattr(backbone, "vae") and not hasattr(backbone.vae_encoder, "decoder")
    assert not any(p.requires_grad for p in backbone.unet.parameters())
    assert len(backbone.unet.up_blocks) == 4
    # the cached loader returns the same object
    assert (
        load_backbone("tiny-sd", "cpu", torch.float32, cache_dir=str(folder.parents[1])) is backbone
    )


def test_shapes_and_channels_match_the_unet_config(backbone) -> None:
    ex = DiffusionFeatureExtractor(backbone, timestep=300, up_blocks=(1, 2, 3), batch_size=4)
    feats = ex.extract(_images(6), list(range(6)), PROMPTS)
    expected = [list(reversed(backbone.unet.config.block_out_channels))[b] for b in (1, 2, 3)]
    assert ex.block_channels == tuple(expected) == up_block_channels(backbone.unet)[1:]
    assert [tuple(f.shape) for f in feats] == [(6, 4, c) for c in expected]
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in feats)
    assert ex.image_size == backbone.sample_size
    assert ex.alpha_bar == pytest.approx(float(backbone.scheduler.alphas_cumprod[300]))


def test_grid_pooling_keeps_a_coarse_layout_whose_mean_is_the_global_pool(backbone) -> None:
    mean = DiffusionFeatureExtractor(backbone, up_blocks=(1, 2, 3), batch_size=4)
    grid = DiffusionFeatureExtractor(backbone, up_blocks=(1, 2, 3), batch_size=4, pool_grid=2)
    assert grid.block_channels == tuple(4 * c for c in mean.block_channels)
    assert grid.describe() != mean.describe()  # part of the cache fingerprint
    images = _images(3)
    for f_mean, f_grid, c in zip(mean.extract(images, [0, 1, 2], PROMPTS),
                                 grid.extract(images, [0, 1, 2], PROMPTS), mean.block_channels, strict=True):
        assert f_grid.shape == (3, len(PROMPTS), 4 * c)
        # each block's h_l x w_l is even here, so the 2 x 2 cells average back to the global mean
        torch.testing.assert_close(f_grid.view(3, len(PROMPTS), c, 4).mean(-1), f_mean)


def test_prompts_change_features(backbone) -> None:
    ex = DiffusionFeatureExtractor(backbone, batch_size=8)
    feats = ex.extract(_images(3), [0, 1, 2], PROMPTS)
    for f in feats:  # positive (prompt 0) differs from every other prompt of the same image
        for p in range(1, len(PROMPTS)):
            assert (f[:, 0] - f[:, p]).abs().max() > 1e-4


def test_bit_identical_for_same_seeds(backbone) -> None:
    imgs, ids = _images(5), [10, 11, 12, 13, 14]
    a = DiffusionFeatureExtractor(backbone, batch_size=5, seed=3).extract(imgs, ids, PROMPTS)
    b = DiffusionFeatureExtractor(backbone, batch_size=5, seed=3).extract(imgs, ids, PROMPTS)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other_seed = DiffusionFeatureExtractor(backbone, batch_size=5, seed=4).extract(
        imgs, ids, PROMPTS
    )
    assert not torch.equal(a[0], other_seed[0])


def test_rows_do_not_depend_on_which_images_share_their_batch(backbone) -> None:
    """A fresh, a reused and a repaired cache group an image with other images (or none): its row
    must come out bit-identical in every grouping (issue: 1 fp16 step apart otherwise)."""
    ex = DiffusionFeatureExtractor(backbone, batch_size=4, seed=3)
    imgs, ids = _images(7), list(range(20, 27))
    together = ex.extract(imgs, ids, PROMPTS)  # batches [0-3], [4-6] (padded)
    order = [6, 2, 5, 0, 3, 1, 4]  # other neighbours, other positions, other padding
    shuffled = ex.extract(imgs[order], [ids[i] for i in order], PROMPTS)
    alone = [ex.extract(imgs[i : i + 1], ids[i : i + 1], PROMPTS) for i in range(7)]  # padded
    for k, feats in enumerate(together):
        assert torch.equal(shuffled[k][torch.tensor(order).argsort()], feats)
        assert torch.equal(torch.cat([a[k] for a in alone]), feats)
    # noise belongs to the sample id, not to its position in a batch
    assert not torch.equal(ex.extract(imgs[:1], [99], PROMPTS)[0], together[0][:1])


def _reference_features(backbone, images, ids, prompts, timestep, blocks, seed):
    """The definition, written plainly: per image and prompt one full UNet call at batch size 1
    (no batching, no shared stages, no early exit, no padding), global mean of each kept block."""
    ex = DiffusionFeatureExtractor(backbone, timestep=timestep, up_blocks=blocks, seed=seed)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        backbone.unet.up_blocks[b].register_forward_hook(
            lambda _m, _i, out, b=b: captured.__setitem__(b, out.float().mean(dim=(2, 3)))
        )
        for b in blocks
    ]
    embeds = backbone.encode_prompts(prompts)
    t = torch.tensor([timestep])
    out = [torch.empty(len(images), len(prompts), c) for c in ex.raw_channels]
    try:
        with torch.no_grad():
            for n in range(len(images)):
                px = to_model_pixels(images[n : n + 1], ex.image_size, backbone.in_channels,
                                     backbone.device, backbone.dtype)
                latent = backbone.encode_images(px)
                noisy = backbone.scheduler.add_noise(latent, ex.noise(latent.shape[1:], [ids[n]], 0), t)
                for p in range(len(prompts)):
                    backbone.unet(noisy, t, encoder_hidden_states=embeds[p : p + 1])
                    for k, b in enumerate(blocks):
                        out[k][n, p] = captured[b][0]
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("model", ["tiny-sd", "offline-teacher"])
def test_features_equal_the_plain_definition(model, backbone) -> None:
    """Batching, padding, the early exit and running prompt-free stages once per image (the
    teacher's conv_in + first two down blocks; SD's conv_in) change nothing beyond float
    rounding: relative error below 1e-5. bfloat16-mixed stays within 1e-2 (docs/performance.md)."""
    bb = backbone if model == "tiny-sd" else load_backbone("offline-teacher", "cpu", torch.float32)
    blocks = (1, 2, 3) if model == "tiny-sd" else (0, 1, 2)
    imgs, ids = _images(3, size=28), [5, 6, 7]
    ref = _reference_features(bb, imgs, ids, PROMPTS, 50, blocks, seed=2)
    for autocast, tolerance in ((None, 1e-5), (torch.bfloat16, 1e-2)):
        ex = DiffusionFeatureExtractor(bb, timestep=50, up_blocks=blocks, batch_size=2, seed=2,
                                       autocast=autocast)
        got = ex.extract(imgs, ids, PROMPTS)
        for g, r in zip(got, ref, strict=True):
            assert float((g - r).norm() / r.norm()) < tolerance
        assert ex.describe()["autocast"] == ("" if autocast is None else "bfloat16")


def test_prompt_free_stages_run_once_per_image() -> None:
    teacher = load_backbone("offline-teacher", "cpu", torch.float32)
    rows: dict[str, int] = {}
    watched = {"conv_in": teacher.unet.conv_in, "down0": teacher.unet.down_blocks[0],
               "down1": teacher.unet.down_blocks[1], "down2": teacher.unet.down_blocks[2]}
    # registered before the extractor's own hooks, so they see the rows a stage computed
    handles = [m.register_forward_hook(
        lambda _m, _i, out, n=n: rows.__setitem__(n, len(out[0] if isinstance(out, tuple) else out)))
        for n, m in watched.items()]
    try:
        DiffusionFeatureExtractor(teacher, batch_size=2, up_blocks=(0,)).extract(
            _images(2), [0, 1], PROMPTS)
    finally:
        for h in handles:
            h.remove()
    # the first two down blocks have no cross-attention; the third reads the prompt
    assert rows == {"conv_in": 2, "down0": 2, "down1": 2, "down2": 2 * len(PROMPTS)}
    assert not teacher.unet.conv_in._forward_pre_hooks  # our hooks are removed


def test_per_image_prompt_ids(backbone) -> None:
    ex = DiffusionFeatureExtractor(backbone, batch_size=4)
    imgs, ids = _images(3), [0, 1, 2]
    full = ex.extract(imgs, ids, PROMPTS)
    chosen = torch.tensor([[0, 3], [1, 3], [2, 0]])
    part = ex.extract(imgs, ids, PROMPTS, prompt_ids=chosen)
    for f, p in zip(full, part, strict=True):
        torch.testing.assert_close(
            p,
            torch.gather(f, 1, chosen[..., None].expand(-1, -1, f.shape[-1])),
            rtol=1e-4,
            atol=1e-5,
        )


def test_pass_stops_after_last_needed_block(backbone) -> None:
    calls = []
    handle = backbone.unet.up_blocks[2].register_forward_hook(lambda *_: calls.append("up2"))
    try:
        feats = DiffusionFeatureExtractor(backbone, up_blocks=(1,)).extract(
            _images(2), [0, 1], PROMPTS[:1]
        )
    finally:
        handle.remove()
    assert calls == [] and feats[0].shape == (2, 1, 64)
    assert not backbone.unet.up_blocks[1]._forward_hooks  # our hooks are removed


def test_ensemble_averages_noise_draws(backbone) -> None:
    imgs = _images(2)
    one = DiffusionFeatureExtractor(backbone, ensemble_size=1).extract(imgs, [0, 1], PROMPTS[:2])
    three = DiffusionFeatureExtractor(backbone, ensemble_size=3).extract(imgs, [0, 1], PROMPTS[:2])
    assert one[0].shape == three[0].shape and not torch.allclose(one[0], three[0])


def test_input_validation(backbone) -> None:
    with pytest.raises(ValueError, match="up_blocks.*4 up"):
        DiffusionFeatureExtractor(backbone, up_blocks=(1, 4))
    with pytest.raises(ValueError, match="timestep"):
        DiffusionFeatureExtractor(backbone, timestep=1000)
    ex = DiffusionFeatureExtractor(backbone)
    with pytest.raises(ValueError, match="uint8"):
        ex.extract(torch.zeros(1, 1, 8, 8), [0], PROMPTS)
    with pytest.raises(ValueError, match="sample_ids"):
        ex.extract(_images(2), [0], PROMPTS)


def test_pixels_are_in_minus_one_to_one() -> None:
    img = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    px = to_model_pixels(img, 2, 3, torch.device("cpu"), torch.float32)
    assert px.shape == (1, 3, 2, 2) and px.min() == -1.0 and px.max() == 1.0
    assert torch.equal(px[:, 0], px[:, 2])  # grey repeated to RGB


def test_offline_hub_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from feddifrc_core.diffusion.sd import load_sd_backbone

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # never touch the network
    with pytest.raises(RuntimeError, match="offline-teacher") as info:
        load_sd_backbone("no-such-org/no-such-model", "cpu", torch.float32)
    assert "HF_HUB_OFFLINE" in str(info.value) and "folder" in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_sd_backbone("/no/such/folder", "cpu", torch.float32)


def test_offline_teacher_dispatch_is_lazy_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    from feddifrc_core.diffusion import teacher_backbone
    from feddifrc_core.diffusion.backbone import clear_backbone_cache

    calls = []

    def fake_loader(path_or_name, device, dtype):
        calls.append((path_or_name, str(device), dtype))
        return object()

    monkeypatch.setattr(teacher_backbone, "load_teacher_backbone", fake_loader)
    clear_backbone_cache()
    first = load_backbone("offline-teacher", "cpu", torch.float32)
    assert load_backbone("offline-teacher", "cpu", torch.float32) is first
    load_backbone("offline-teacher:/models/other", "cpu", torch.float16)
    assert calls == [
        ("offline-teacher", "cpu", torch.float32),
        ("/models/other", "cpu", torch.float16),
    ]
    clear_backbone_cache()
    with pytest.raises(ValueError, match="spec"):
        load_backbone("", "cpu", torch.float32)


@pytest.mark.slow
def test_hub_id_loads_from_the_offline_hf_cache(backbone, tmp_path: Path) -> None:
    """A hub id resolves through the HF cache layout offline; the snapshot commit is recorded."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(backbone.identity()["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "import json, torch; from feddifrc_core.diffusion.sd import load_sd_backbone; "
        "print(json.dumps(load_sd_backbone('someone/tiny-sd', 'cpu', torch.float32).identity()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'"commit": "{commit}"' in out.stdout.strip().splitlines()[-1]


def test_precision_names_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from feddifrc_core.diffusion import backbone as backbone_module
    from feddifrc_core.diffusion.backbone import Precision, resolve_precision

    assert resolve_precision("float32", "cpu") == Precision(torch.float32)
    assert resolve_precision("bfloat16", "cpu") == Precision(torch.bfloat16)
    assert resolve_precision("bfloat16-mixed", "cpu") == Precision(torch.float32, torch.bfloat16)
    assert resolve_precision("auto", "cuda") == Precision(torch.float16)
    for native, expected in ((True, Precision(torch.float32, torch.bfloat16)),
                             (False, Precision(torch.float32))):
        monkeypatch.setattr(backbone_module, "cpu_has_native_bfloat16", lambda n=native: n)
        assert resolve_precision("auto", "cpu") == expected
    with pytest.raises(ValueError, match="bfloat16-mixed"):
        resolve_precision("half", "cpu")
    # mixed precision needs float32 weights underneath
    half = load_backbone("offline-teacher", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="float32 backbone"):
        DiffusionFeatureExtractor(half, up_blocks=(0,), autocast=torch.bfloat16)
