"""DIFT-style one-pass diffusion features (METHOD.md, "Diffusion representation").

Per image: resize -> pixels in [-1, 1] -> latent -> seeded noise at ONE timestep -> one UNet pass
per prompt with forward hooks on `unet.up_blocks[i]` -> a reduction of each kept block's output map
(`reduction.py`: the spatial mean by default, or the authors' per-position projection + norm).
Batched: one UNet call covers B images x P prompts, reusing each image's noisy latent for all of
its prompts; prompt embeddings are encoded once. The pass stops right after the last kept block
(a private exception raised from its hook), so the UNet forward itself is never forked.

Batch invariance: every UNet call has the same shape, `batch_size` images x P prompts; a short
batch is padded with copies of its first image and the copies are dropped. Kernels pick their
algorithm by shape (a batch of one image took another path than larger ones), so a row's bits
would otherwise depend on how many images shared its call; with one shape they depend only on the
image, its sample id and the settings, and a fresh, a reused and a repaired cache hold the same
rows (tests/test_diffusion_extractor.py). `batch_size` is therefore part of the fingerprint.

Speed (docs/performance.md, "CPU"): the leading UNet stages that never read the prompt (conv_in
and down blocks without cross-attention; the offline teacher's first two) run once per image
instead of once per (image, prompt), through forward hooks that pass one row per image in and
repeat the outputs; `autocast` runs convolutions and matmuls in bfloat16 where the CPU has it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
        autocast: torch.dtype | None = None,
        once_per_image: bool = True,
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
        if autocast is not None and (
            autocast not in (torch.bfloat16, torch.float16) or backbone.dtype != torch.float32
        ):
            raise ValueError(
                "`autocast` (mixed precision) must be torch.bfloat16 or torch.float16 over a "
                f"float32 backbone, got {autocast} over {backbone.dtype}"
            )
        self.backbone = backbone
        self.timestep = int(timestep)
        self.up_blocks = blocks
        self.image_size = int(image_size) or int(backbone.sample_size)
        self.ensemble_size = int(ensemble_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pool_grid = int(pool_grid)
        self.autocast = autocast
        # prompt-free stages once per image (same bits here; off only to measure its gain)
        self.once_per_image = bool(once_per_image)
        channels = up_block_channels(backbone.unet)
        self.raw_channels = tuple(channels[b] for b in blocks)  # C_l of each kept block's map
        # The kept-signal fraction is what makes timesteps comparable across schedules (METHOD.md).
        self.alpha_bar = float(backbone.scheduler.alphas_cumprod[self.timestep])

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Values per (image, prompt) of each kept block under the default mean pool: C_l * g^2
        (g x g average pooling keeps a coarse layout)."""
        return self.out_dims()

    def describe(self) -> dict[str, Any]:
        """What determines the features (beside the backbone and the data): for fingerprints."""
        return {
            "timestep": self.timestep,
            "alpha_bar": round(self.alpha_bar, 8),
            "up_blocks": list(self.up_blocks),
            "image_size": self.image_size,
            "ensemble_size": self.ensemble_size,
            "seed": self.seed,
            "pool_grid": self.pool_grid,
            "batch_size": self.batch_size,  # the one UNet call shape (module docstring)
            "autocast": "" if self.autocast is None else str(self.autocast).removeprefix("torch."),
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
        """One batch of at most `batch_size` images: features [B, P, d_l] per kept block (float32,
        on the backbone's device).

        prompt_embeds: [Q, L, D] embeddings of the prompt list; prompt_ids: [B, P] indices into it
        (per image), or None for all Q prompts for every image; reductions: one per kept block
        (default: mean pool), applied inside the block hooks so full maps are never kept.
        """
        bb = self.backbone
        device, dtype = bb.device, bb.dtype
        num_images = len(sample_ids)
        if not 1 <= num_images <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} images, got {num_images}")
        # 1. which prompts each image is paired with
        if prompt_ids is None:
            prompt_ids = torch.arange(prompt_embeds.shape[0]).expand(num_images, -1)  # [B, P]
        if prompt_ids.shape[0] != num_images:
            raise ValueError(
                f"`prompt_ids` must have one row per image ({num_images}), "
                f"got {tuple(prompt_ids.shape)}"
            )
        num_prompts = prompt_ids.shape[1]
        # 2. the one call shape: pad with copies of the first image (dropped again in step 6)
        pad = self.batch_size - num_images
        images_t = torch.as_tensor(images)
        ids = [int(s) for s in sample_ids]
        if pad:
            images_t = torch.cat([images_t, images_t[:1].expand(pad, *images_t.shape[1:])])
            ids += ids[:1] * pad
            prompt_ids = torch.cat([prompt_ids, prompt_ids[:1].expand(pad, -1)])
        rows = self.batch_size * num_prompts
        real_rows = num_images * num_prompts
        embeds = prompt_embeds.to(device, dtype)[prompt_ids.reshape(-1).to(device)]  # [B*P, L, D]
        timesteps = torch.full((rows,), self.timestep, device=device, dtype=torch.long)
        # 3. hooks: reduced outputs of the kept blocks; the last one ends the pass
        reduce = self._reductions(reductions)
        pooled: dict[int, torch.Tensor] = {}
        last = self.up_blocks[-1]

        def make_hook(index: int, reduction: BlockReduction) -> Callable[..., None]:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                hidden = output[0] if isinstance(output, tuple) else output  # [B*P, C_l, h_l, w_l]
                # row-wise reductions see the full fixed shape; accumulating ones the real rows
                pooled[index] = reduction(hidden[:real_rows] if reduction.accumulates else hidden)
                if index == last:
                    raise _StopForward

            return hook

        handles = [
            bb.unet.up_blocks[i].register_forward_hook(make_hook(i, r))
            for i, r in zip(self.up_blocks, reduce, strict=True)
        ]
        sums = [torch.zeros(rows, d, device=device) for d in self.out_dims(reduce)]
        shared = num_prompts if self.once_per_image else 1  # rows that share prompt-free stages
        try:
            with self._mixed_precision(), _once_per_image(bb.unet, shared):
                # 4. latents once per image
                pixels = to_model_pixels(images_t, self.image_size, bb.in_channels, device, dtype)
                latents = bb.encode_images(pixels).to(dtype)  # [B, c, h, w]
                for member in range(self.ensemble_size):
                    # 5. seeded noise at one timestep, shared by all prompts of an image; one UNet
                    # pass for B images x P prompts
                    noise = self.noise(latents.shape[1:], ids, member).to(device, dtype)
                    noisy = bb.scheduler.add_noise(latents, noise, timesteps[: self.batch_size])
                    noisy = noisy.repeat_interleave(num_prompts, dim=0)  # [B*P, c, h, w]
                    pooled.clear()
                    try:
                        bb.unet(noisy, timesteps, encoder_hidden_states=embeds)
                    except _StopForward:
                        pass
                    for k, block in enumerate(self.up_blocks):
                        got = pooled[block].float()
                        sums[k][: got.shape[0]] += got
        finally:
            for handle in handles:
                handle.remove()
        # 6. the real images only, averaged over the noise draws
        return [
            (s[:real_rows] / self.ensemble_size).view(num_images, num_prompts, -1) for s in sums
        ]  # per block [B, P, d_l]

    def _mixed_precision(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16/float16 convolutions and matmuls over float32 weights (`autocast`)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.backbone.device.type, dtype=self.autocast)

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


@contextlib.contextmanager
def _once_per_image(unet: Any, repeats: int) -> Iterator[None]:
    """Run the UNet's leading prompt-free stages once per image instead of once per prompt.

    conv_in and the down blocks before the first one with cross-attention see only the noisy
    latent and the time embedding, identical for an image's `repeats` consecutive rows: forward
    pre-hooks keep one row per image and forward hooks repeat the outputs (library modules and
    their forward code unchanged).
    """
    stages = [unet.conv_in]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            break
        stages.append(block)
    if repeats == 1:
        yield
        return

    def take_one(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _map_tensors(args, lambda t: t[::repeats]), _map_tensors(
            kwargs, lambda t: t[::repeats]
        )

    def repeat(_module: Any, _args: Any, _kwargs: Any, output: Any) -> Any:
        return _map_tensors(output, lambda t: t.repeat_interleave(repeats, dim=0))

    handles = []
    try:
        for stage in stages:
            handles.append(stage.register_forward_pre_hook(take_one, with_kwargs=True))
            handles.append(stage.register_forward_hook(repeat, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` applied to every tensor in nested tuples / lists / dicts (block inputs and outputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value
