"""The offline teacher: training (micro configuration), the shipped model and its loader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from feddifrc_core.diffusion.backbone import DiffusionBackbone, load_backbone
from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor
from feddifrc_core.diffusion.teacher_backbone import (
    MODELS_ENV,
    REQUIRED_KEYS,
    TeacherBackbone,
    load_teacher_backbone,
    models_dir,
    read_teacher_info,
    resolve_teacher_path,
)
from teacher.config import TeacherConfig, build_scheduler, build_unet, config_from_info
from teacher.training import CHECKPOINT, train_teacher

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "fmnist-teacher"
# 2 classes + "" caption, 8x8 images, a 2-level UNet: a few steps take well under a second each.
MICRO = TeacherConfig(
    image_size=8,
    block_out_channels=(8, 16),
    layers_per_block=1,
    attention_heads=2,
    norm_num_groups=4,
    cross_attention_dim=32,
    max_length=4,
    batch_size=16,
    lr=3e-3,
    warmup_steps=2,
    max_steps=24,
    seed=3,
)


def _micro_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """64 images of 2 classes (bright left half vs bright right half) + a fixed random context."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randint(0, 40, (64, 1, 8, 8), generator=g, dtype=torch.uint8)
    images[labels == 0, :, :, :4] += 200
    images[labels == 1, :, :, 4:] += 200
    context = torch.randn(3, MICRO.max_length, MICRO.cross_attention_dim, generator=g)
    return images, labels, context


def test_micro_training_reduces_loss_and_is_deterministic():
    images, labels, ctx = _micro_data()
    a = train_teacher(images, labels, ("left", "right"), MICRO, context=ctx, progress=False)
    b = train_teacher(images, labels, ("left", "right"), MICRO, context=ctx, progress=False)
    losses = [h[1] for h in a.history]
    assert len(losses) == MICRO.max_steps
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6  # it learns (starts near 1.0)
    assert a.history == b.history  # same seed -> same batches, noise, timesteps, dropout
    for pa, pb in zip(a.ema.parameters(), b.ema.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_training_resumes_from_checkpoint_exactly(tmp_path: Path):
    images, labels, ctx = _micro_data()
    cfg = TeacherConfig(
        **{**MICRO.to_json(), "max_steps": 8, "block_out_channels": MICRO.block_out_channels}
    )
    full = train_teacher(images, labels, ("l", "r"), cfg, context=ctx, progress=False)
    part = train_teacher(
        images,
        labels,
        ("l", "r"),
        cfg,
        context=ctx,
        progress=False,
        work_dir=tmp_path,
        time_budget_s=0.0,
    )  # stops (and saves) after 1 step
    assert part.step == 1 and (tmp_path / CHECKPOINT).exists()
    rest = train_teacher(
        images, labels, ("l", "r"), cfg, context=ctx, progress=False, work_dir=tmp_path
    )
    assert rest.history == full.history
    for pa, pb in zip(rest.ema.parameters(), full.ema.parameters(), strict=True):
        assert torch.equal(pa, pb)
    other = TeacherConfig(
        **{**cfg.to_json(), "seed": 4, "block_out_channels": cfg.block_out_channels}
    )
    with pytest.raises(RuntimeError, match="another configuration"):
        train_teacher(
            images, labels, ("l", "r"), other, context=ctx, progress=False, work_dir=tmp_path
        )


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="image_size"):
        TeacherConfig(image_size=30)
    images, labels, ctx = _micro_data()
    with pytest.raises(ValueError, match="labels"):
        train_teacher(images, labels[:10], ("l", "r"), MICRO, context=ctx, progress=False)
    with pytest.raises(ValueError, match="context"):
        train_teacher(images, labels, ("l", "r", "x"), MICRO, context=ctx, progress=False)


def test_shipped_teacher_is_complete_and_small():
    info = read_teacher_info(SHIPPED)
    assert set(REQUIRED_KEYS) <= set(info)
    assert info["data"]["subset"] == "public" and info["data"]["num_images"] == 30000
    assert len(info["class_names"]) == 10 and info["captions"][-1] == ""
    rec = info["recommended"]
    assert 0 <= rec["timestep"] < 1000 and 0 < rec["alpha_bar"] < 1
    assert set(rec["up_blocks"].split(",")) <= {"0", "1", "2"}
    cfg = config_from_info(info)
    assert rec["alpha_bar"] == pytest.approx(
        float(build_scheduler(cfg).alphas_cumprod[rec["timestep"]]), abs=1e-4
    )
    assert info["training"]["steps_done"] > 0 and info["training"]["final_loss_mean100"] < 0.2
    card = (SHIPPED / "README.md").read_text()
    for needed in ("make teacher", "MIT", "Apache-2.0", "public", "loss"):
        assert needed in card
    assert (SHIPPED / "loss_curve.csv").read_text().startswith("step,loss")
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 10 * 2**20  # a few MB in git; nodes find it on disk (not in the Flower bundle)


def test_shipped_teacher_loads_as_backbone_and_runs():
    bb = load_backbone("offline-teacher", "cpu", torch.float32)
    assert isinstance(bb, DiffusionBackbone) and isinstance(bb, TeacherBackbone)
    assert bb.identity()["kind"] == "offline-teacher" and bb.in_channels == 1
    assert len(bb.unet.up_blocks) == 3 and not any(p.requires_grad for p in bb.unet.parameters())
    pixels = torch.rand(2, 1, 28, 28) * 2 - 1
    x = bb.encode_images(pixels)  # [2, 1, S, S]
    assert x.shape == (2, 1, bb.info["image_size"], bb.info["image_size"])
    ctx = bb.encode_prompts(["", "a photo of a coat"])
    assert ctx.shape == (2, bb.info["text_max_length"], 384)
    assert bb.encode_prompts([""]).data_ptr() != ctx.data_ptr() and torch.equal(
        bb.encode_prompts([""])[0], ctx[0]
    )
    out = bb.unet(x, torch.tensor([100, 100]), encoder_hidden_states=ctx).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_teacher_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert resolve_teacher_path("offline-teacher") == SHIPPED
    # $FEDDIFRC_MODELS_DIR wins when it holds a complete copy ...
    (tmp_path / "fmnist-teacher").symlink_to(SHIPPED, target_is_directory=True)
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert models_dir() == tmp_path
    assert resolve_teacher_path("offline-teacher") == tmp_path / "fmnist-teacher"
    # ... a copy without weights (what a Flower app bundle carries) is skipped
    (tmp_path / "fmnist-teacher").unlink()
    (tmp_path / "fmnist-teacher" / "unet").mkdir(parents=True)
    for f in ("teacher.json", "unet/config.json"):
        (tmp_path / "fmnist-teacher" / f).write_bytes((SHIPPED / f).read_bytes())
    assert resolve_teacher_path("offline-teacher") == SHIPPED
    with pytest.raises(FileNotFoundError, match="make teacher"):
        resolve_teacher_path("no-such-teacher")
    with pytest.raises(ValueError, match="path_or_name"):
        load_teacher_backbone("", "cpu", torch.float32)


def _probe_module():
    spec = importlib.util.spec_from_file_location(
        "teacher_probe", ROOT / "benchmarks" / "teacher_probe.py"
    )
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_probe_features_match_the_extractor():
    """The probe measures exactly what the federation's extractor computes (pool 1 = global mean)."""
    cfg = TeacherConfig(
        image_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=32,
        max_length=4,
    )
    torch.manual_seed(0)
    info = {
        "in_channels": 1,
        "pixel_size": 8,
        "image_size": 8,
        "text_max_length": 4,
        "weights_sha256": "0" * 64,
        "text_encoder": "none",
    }
    bb = TeacherBackbone(
        unet=build_unet(cfg),
        scheduler=build_scheduler(cfg),
        info=info,
        device=torch.device("cpu"),
        dtype=torch.float32,
        name="micro",
    )
    bb._prompt_cache[""] = torch.randn(4, 32)  # no MiniLM needed for this check
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    ids = torch.arange(5).numpy() + 7
    probe = _probe_module()
    feats = probe.null_prompt_features(bb, images, ids, timestep=100, batch_size=2, pools=(1, 2))
    ref = DiffusionFeatureExtractor(bb, timestep=100, up_blocks=(0, 1), batch_size=3).extract(
        images, [int(i) for i in ids], [""]
    )
    for block in (0, 1):
        torch.testing.assert_close(feats[(1, block)], ref[block][:, 0], rtol=1e-5, atol=1e-5)
        assert feats[(2, block)].shape[1] == 4 * feats[(1, block)].shape[1]
