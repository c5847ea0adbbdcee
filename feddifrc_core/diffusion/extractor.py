"""DIFT-style one-pass diffusion features (METHOD.md, "Diffusion representation").

Per image: resize -> pixels in [-1, 1] -> latent -> seeded noise at ONE timestep -> one UNet pass
per prompt with forward hooks on `unet.up_blocks[i]` -> a reduction of each kept block's output map
(`reduction.py`: the spatial mean by default, or the authors' per-position projection + norm).
Batched: one UNet call covers B images x P prompts, reusing each image's noisy latent for all of
its prompts; prompt embeddings are encoded once. The pass stops right after the last kept block
(a private exception raised from its hook), so the UNet forward itself is never forked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from feddifrc_core.diffusion.backbone import DiffusionBackbone
from feddifrc_core.diffusion.reduction import BlockReduction, MeanPool
from feddifrc_core.seeding import hashed_seed


class _StopForward(Exception):
    """Raised from the last needed block's hook to end the UNet pass early."""


def up_block_channels(unet: Any) -> tuple[int, ...]:
    """Output channels of every `unet.up_blocks[i]` (decoder order: block_out_channels reversed)."""
    return tuple(int(c) for c in reversed(unet.config.block_out_channels))


def to_model_pixels(
    images: torch.Tensor | np.ndarray,
    size: int,
    channels: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float [B, channels, size, size] in [-1, 1] on `device` in `dtype`.

    Grey images are repeated to 3 channels for RGB models; RGB images are converted to luma for
    1-channel models. (The reference code's (x/255 - 0.5) * 2 on [0, 1] input is a bug: not copied.)
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"`images` must be uint8 [B, 1|3, H, W], got {x.dtype} {tuple(x.shape)}")
    x = x.to(device).float() / 127.5 - 1.0  # [B, C, H, W] in [-1, 1]
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
        x = (x * luma).sum(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return x.to(dtype)  # [B, channels, size, size]


class DiffusionFeatureExtractor:
    """Pooled up-block features of a frozen backbone for images x prompts."""

    def __init__(
        self,
        backbone: DiffusionBackbone,
        *,
        timestep: int = 300,
        up_blocks: Sequence[int] = (1, 2, 3),
        image_size: int = 0,
        ensemble_size: int = 1,
        batch_size: int = 16,
        seed: int = 0,
        pool_grid: int = 1,
    ) -> None:
        num_blocks = len(backbone.unet.up_blocks)
        blocks = tuple(sorted(int(b) for b in up_blocks))
        if (
            not blocks
            or len(set(blocks)) != len(blocks)
            or blocks[0] < 0
            or blocks[-1] >= num_blocks
        ):
            raise ValueError(
                f"`up_blocks` must be distinct indices in [0, {num_blocks - 1}] (this UNet has "
                f"{num_blocks} up blocks), got {tuple(up_blocks)}; SD uses '1,2,3'"
            )
        num_train = int(backbone.scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < num_train:
            raise ValueError(f"`timestep` must be in [0, {num_train - 1}], got {timestep}")
        for name, value in (
            ("ensemble_size", ensemble_size), ("batch_size", batch_size), ("pool_grid", pool_grid)
        ):
            if int(value) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if int(image_size) < 0:
            raise ValueError(
                f"`image_size` must be >= 0 (0 = the backbone's native size), got {image_size}"
            )
        self.backbone = backbone
        self.timestep = int(timestep)
        self.up_blocks = blocks
        self.image_size = int(image_size) or int(backbone.sample_size)
        self.ensemble_size = int(ensemble_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pool_grid = int(pool_grid)
        channels = up_block_channels(backbone.unet)
        self.raw_channels = tuple(channels[b] for b in blocks)  # C_l of each kept block's map
        # The kept-signal fraction is what makes timesteps comparable across schedules (METHOD.md).
        self.alpha_bar = float(backbone.scheduler.alphas_cumprod[self.timestep])

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Values per (image, prompt) of each kept block under the default mean pool: C_l * g^2
        (g x g average pooling keeps a coarse layout)."""
        return self.out_dims()

    def settings(self) -> dict[str, Any]:
        """What determines the features (beside the backbone and the data): for fingerprints."""
        return {
            "timestep": self.timestep,
            "alpha_bar": round(self.alpha_bar, 8),
            "up_blocks": list(self.up_blocks),
            "image_size": self.image_size,
            "ensemble_size": self.ensemble_size,
            "seed": self.seed,
            "pool_grid": self.pool_grid,
        }

    def noise(self, shape: Sequence[int], sample_ids: Sequence[int], member: int) -> torch.Tensor:
        """Per-sample noise [B, *shape] from CPU generators seeded by (seed, sample id, member).

        CPU generation: CUDA's generator would give different numbers on different GPUs/versions.
        """
        out = torch.empty((len(sample_ids), *shape), dtype=torch.float32)
        gen = torch.Generator(device="cpu")
        for row, sid in enumerate(sample_ids):
            gen.manual_seed(hashed_seed(self.seed, int(sid), member))
            out[row] = torch.randn(tuple(shape), generator=gen)
        return out

    def _reductions(self, reductions: Sequence[BlockReduction] | None) -> list[BlockReduction]:
        """One reduction per kept block; default: the g x g mean pool of `pool_grid`."""
        if reductions is None:
            return [MeanPool(self.pool_grid) for _ in self.up_blocks]
        if len(reductions) != len(self.up_blocks):
            raise ValueError(
                f"got {len(reductions)} reductions for the {len(self.up_blocks)} kept blocks "
                f"{self.up_blocks}"
            )
        return list(reductions)

    def out_dims(self, reductions: Sequence[BlockReduction] | None = None) -> tuple[int, ...]:
        """Values per (image, prompt) of each kept block under `reductions`."""
        return tuple(
            r.out_dim(c) for r, c in zip(self._reductions(reductions), self.raw_channels, strict=True)
        )

    @torch.no_grad()
    def extract_batch(
        self,
        images: torch.Tensor | np.ndarray,
        sample_ids: Sequence[int],
        prompt_embeds: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        reductions: Sequence[BlockReduction] | None = None,
    ) -> list[torch.Tensor]:
        """One batch: features [B, P, d_l] per kept block (float32, on the backbone's device).

        prompt_embeds: [Q, L, D] embeddings of the prompt list; prompt_ids: [B, P] indices into it
        (per image), or None for all Q prompts for every image; reductions: one per kept block
        (default: mean pool), applied inside the block hooks so full maps are never kept.
        """
        bb = self.backbone
        device, dtype = bb.device, bb.dtype
        num_images = len(sample_ids)
        # 1. which prompts each image is paired with
        if prompt_ids is None:
            prompt_ids = torch.arange(prompt_embeds.shape[0]).expand(num_images, -1)  # [B, P]
        if prompt_ids.shape[0] != num_images:
            raise ValueError(
                f"`prompt_ids` must have one row per image ({num_images}), "
                f"got {tuple(prompt_ids.shape)}"
            )
        num_prompts = prompt_ids.shape[1]
        embeds = prompt_embeds.to(device, dtype)[prompt_ids.reshape(-1).to(device)]  # [B*P, L, D]
        # 2. latents once per image
        pixels = to_model_pixels(images, self.image_size, bb.in_channels, device, dtype)
        latents = bb.encode_images(pixels)  # [B, c, h, w]
        timesteps = torch.full(
            (num_images * num_prompts,), self.timestep, device=device, dtype=torch.long
        )
        # 3. hooks: reduced outputs of the kept blocks; the last one ends the pass
        reduce = self._reductions(reductions)
        pooled: dict[int, torch.Tensor] = {}
        last = self.up_blocks[-1]

        def make_hook(index: int, reduction: BlockReduction) -> Callable[..., None]:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                hidden = output[0] if isinstance(output, tuple) else output  # [B*P, C_l, h_l, w_l]
                pooled[index] = reduction(hidden)  # [B*P, d_l]
                if index == last:
                    raise _StopForward

            return hook

        handles = [
            bb.unet.up_blocks[i].register_forward_hook(make_hook(i, r))
            for i, r in zip(self.up_blocks, reduce, strict=True)
        ]
        sums = [
            torch.zeros(num_images, num_prompts, d, device=device) for d in self.out_dims(reduce)
        ]
        try:
            for member in range(self.ensemble_size):
                # 4. seeded noise at one timestep, shared by all prompts of an image
                noise = self.noise(latents.shape[1:], sample_ids, member).to(device, dtype)
                t_img = timesteps[:num_images]
                noisy = bb.scheduler.add_noise(latents, noise, t_img)  # [B, c, h, w]
                noisy = noisy.repeat_interleave(num_prompts, dim=0)  # [B*P, c, h, w]
                # 5. one UNet pass for B images x P prompts
                pooled.clear()
                try:
                    bb.unet(noisy, timesteps, encoder_hidden_states=embeds)
                except _StopForward:
                    pass
                for k, block in enumerate(self.up_blocks):
                    sums[k] += pooled[block].view(num_images, num_prompts, -1)
        finally:
            for handle in handles:
                handle.remove()
        return [s / self.ensemble_size for s in sums]  # per block [B, P, d_l]

    @torch.no_grad()
    def extract(
        self,
        images: torch.Tensor | np.ndarray,
        sample_ids: Sequence[int],
        prompts: list[str],
        prompt_ids: torch.Tensor | None = None,
        progress: Callable[[int], None] | None = None,
        reductions: Sequence[BlockReduction] | None = None,
    ) -> list[torch.Tensor]:
        """Features of N images: per kept block a float32 CPU tensor [N, P, d_l].

        prompts: the prompt list (embedded once); prompt_ids: [N, P] indices into it per image,
        or None for every prompt for every image. `progress(n)` is called after each batch.
        reductions: one per kept block (default: mean pool of `pool_grid`, d_l = C_l * g^2).
        """
        n = len(images)
        if len(sample_ids) != n:
            raise ValueError(
                f"`sample_ids` must have one id per image ({n}), got {len(sample_ids)}"
            )
        if prompt_ids is not None:
            prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
            if prompt_ids.ndim != 2 or prompt_ids.shape[0] != n:
                raise ValueError(f"`prompt_ids` must be [N={n}, P], got {tuple(prompt_ids.shape)}")
            if prompt_ids.numel() and (prompt_ids.min() < 0 or prompt_ids.max() >= len(prompts)):
                raise ValueError(f"`prompt_ids` must index the {len(prompts)} prompts")
        if prompt_ids is None:
            embeds = self.backbone.encode_prompts(list(prompts))  # [Q, L, D], encoded once
        else:  # encode only the prompts in use (SSL: a few of a 200-name vocabulary per client)
            used = torch.unique(prompt_ids)  # sorted
            embeds = self.backbone.encode_prompts([prompts[i] for i in used.tolist()])  # [U, L, D]
            remap = torch.full((len(prompts),), -1, dtype=torch.long)
            remap[used] = torch.arange(len(used))
            prompt_ids = remap[prompt_ids]  # [N, P] indices into embeds
        width = len(prompts) if prompt_ids is None else prompt_ids.shape[1]
        outs = [torch.empty(n, width, d) for d in self.out_dims(reductions)]
        ids = [int(s) for s in sample_ids]
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            rows = None if prompt_ids is None else prompt_ids[start:stop]
            feats = self.extract_batch(
                images[start:stop], ids[start:stop], embeds, rows, reductions
            )
            for out, feat in zip(outs, feats, strict=True):
                out[start:stop] = feat.cpu()
            if progress is not None:
                progress(stop - start)
        return outs
