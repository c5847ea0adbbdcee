"""The teacher's zero-shot classifier: batch invariant, seeded per image, cached per image on the
client's disk (verified, resumable, reused by other partitions of the same images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddifrc_core import teacher_logits as tl
from feddifrc_core import zero_shot
from feddifrc_core.datasets import load_dataset, subsample
from feddifrc_core.diffusion.backbone import load_backbone
from feddifrc_core.prompts import class_prompts
from feddifrc_core.zero_shot import ZeroShotSettings, zero_shot_logits

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a car"]
SETTINGS = ZeroShotSettings(timesteps=(300, 600), draws=2, seed=5)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.getbasetemp() / "feddifrc-cache"  # shared by all diffusion test files
    return load_backbone("tiny-sd", "cpu", torch.float32, cache_dir=str(cache))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)


def test_logits_do_not_depend_on_the_other_images_or_their_order(backbone) -> None:
    images, ids = _images(5), [10, 11, 12, 13, 14]
    together = zero_shot_logits(backbone, images, ids, PROMPTS, SETTINGS)
    assert together.shape == (5, 3) and together.dtype == torch.float32
    assert torch.isfinite(together).all() and (together < 0).all()  # minus a squared error
    alone = torch.cat([zero_shot_logits(backbone, images[i:i + 1], ids[i:i + 1], PROMPTS,
                                        SETTINGS) for i in range(5)])
    order = [3, 0, 4, 2, 1]
    shuffled = zero_shot_logits(backbone, images[order], [ids[i] for i in order], PROMPTS,
                                SETTINGS)
    assert torch.equal(alone, together)  # bit for bit
    assert torch.equal(shuffled, together[order])
    # the noise is the sample id's: another id (or seed) gives other logits for the same image
    other = zero_shot_logits(backbone, images[:1], [99], PROMPTS, SETTINGS)
    assert not torch.equal(other, together[:1])


def test_noise_is_seeded_per_seed_sample_and_pass() -> None:
    a = zero_shot.image_noise((1, 4, 4), 7, SETTINGS)
    assert a.shape == (4, 1, 4, 4)  # 2 timesteps x 2 draws
    assert torch.equal(a, zero_shot.image_noise((1, 4, 4), 7, SETTINGS))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, zero_shot.image_noise((1, 4, 4), 8, SETTINGS))
    with pytest.raises(ValueError, match="draws"):
        ZeroShotSettings(timesteps=(1,), draws=0)


def test_the_offline_teacher_classifies_fashion_mnist_zero_shot(fmnist_root) -> None:
    """The real teacher, 30 test images, one timestep: far above chance (10 %), so the prompts,
    passes and errors line up (a mix-up of prompt and pass order gives chance level)."""
    test, rows = subsample(load_dataset("fashion-mnist", "test"), 30, seed=0)
    teacher = load_backbone("offline-teacher", "cpu", torch.float32)
    prompts = class_prompts(list(test.class_names))
    logits = zero_shot_logits(teacher, test.images, rows.tolist(), prompts,
                              ZeroShotSettings(timesteps=(500,), seed=7))
    assert zero_shot.accuracy(logits, test.labels) >= 0.5


def test_client_logits_are_cached_per_image_resumed_and_verified(backbone, tmp_path,
                                                                  monkeypatch) -> None:
    images, ids = _images(7, seed=1), list(range(100, 107))
    fresh = zero_shot_logits(backbone, images, ids, PROMPTS, SETTINGS)

    # 1. a computation killed after its first chunk resumes at the first image no part holds
    real, calls = tl.zero_shot_logits, []

    def dies_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tl, "zero_shot_logits", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        tl.client_teacher_logits(backbone, images, ids, PROMPTS, SETTINGS, tmp_path, chunk_images=3)
    monkeypatch.setattr(tl, "zero_shot_logits", real)
    got, info = tl.client_teacher_logits(backbone, images, ids, PROMPTS, SETTINGS, tmp_path,
                                         chunk_images=3)
    assert (info["reused"], info["computed"]) == (3, 4) and torch.equal(got, fresh)

    # 2. another partition of the same images (some new ones) reuses every known row, bit for bit
    more = torch.cat([images[2:], _images(2, seed=9)])
    more_ids = ids[2:] + [200, 201]
    got, info = tl.client_teacher_logits(backbone, more, more_ids, PROMPTS, SETTINGS, tmp_path)
    assert (info["reused"], info["computed"]) == (5, 2) and torch.equal(got[:5], fresh[2:])

    # 3. a damaged part is never used: its images are computed again, with the same values
    folder = next((tmp_path / "zero-shot").iterdir())
    part = sorted(folder.glob("part-*.safetensors"))[0]
    data = bytearray(part.read_bytes())
    data[-4] ^= 0xFF
    part.write_bytes(bytes(data))
    got, info = tl.client_teacher_logits(backbone, images, ids, PROMPTS, SETTINGS, tmp_path)
    assert info["computed"] == 3 and torch.equal(got, fresh)

    # 4. a changed image under a known sample id is recomputed, not served from the cache
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    _, info = tl.client_teacher_logits(backbone, changed, ids, PROMPTS, SETTINGS, tmp_path)
    assert info["computed"] == 1

    # 5. other settings are another folder
    _, info = tl.client_teacher_logits(backbone, images, ids, PROMPTS,
                                       ZeroShotSettings(timesteps=(300,), seed=5), tmp_path)
    assert info["computed"] == 7 and len(list((tmp_path / "zero-shot").iterdir())) == 2
    assert np.array_equal(tl.image_hashes(images), tl.image_hashes(images.clone()))
