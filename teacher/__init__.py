"""Training of the offline diffusion teacher: a small pixel-space text-to-image DDPM.

No pretrained Stable Diffusion exists offline, so the project pretrains its own teacher on the
PUBLIC half of a training set and uses it, frozen, for federated learning on the disjoint PRIVATE
half (the relation SD has to CIFAR). The UNet is a diffusers `UNet2DConditionModel` conditioned by
cross-attention on frozen MiniLM token states of "a photo of a {class name}" (10% of the captions
dropped to "" so the null prompt is a trained condition, as in SD).

A tool of this repository, not part of the federated library: the library only *loads* the
exported model (`feddifrc_core.diffusion.teacher_backbone`). Modules: `config` (architecture,
schedule), `training` (the resumable loop), `export` (the shipped folder and its model card),
`data` (the public split), `__main__` (the command: `python -m teacher` = `make teacher`).
"""
