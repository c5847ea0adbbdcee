"""Prompts of the text-driven (TDCL) and noise-driven (NDCR) diffusion representations.

Supervised: "a photo of a {class}" per class, the null prompt "" for NDCR, and per sample K other
classes as negatives. Self-supervised: a fixed positive prompt, a fixed "null" prompt and negatives
drawn from a vocabulary of object names (the paper samples Tiny-ImageNet's 200 class names).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from feddifrc_core.seeding import hashed_seed

NULL_PROMPT = ""  # the unconditional prompt SD was trained with (classifier-free guidance)
DEFAULT_TEMPLATE = "a photo of a {}"
_DATA_DIR = Path(__file__).resolve().parent / "data"
_DIGIT = re.compile(r"^\s*(\d+)(\s*-\s*\w+)?\s*$")  # "7" or torchvision-style "7 - seven"


def prompt_class_name(name: str) -> str:
    """Prompt text for a class name: underscores -> spaces; digits -> "handwritten number 7"."""
    match = _DIGIT.match(str(name))
    if match:
        return f"handwritten number {match.group(1)}"
    return " ".join(str(name).replace("_", " ").split())


def class_prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class, in class-index order."""
    if "{}" not in template:
        raise ValueError(
            f"`template` must contain '{{}}' where the class name goes, got {template!r}"
        )
    if len(class_names) == 0:
        raise ValueError("`class_names` must not be empty")
    return [template.format(prompt_class_name(name)) for name in class_names]


def bundled_vocabularies() -> list[str]:
    """Names of the vocabularies shipped in feddifrc_core/data (`<name>_classes.json`)."""
    return sorted(
        p.name.removesuffix("_classes.json").replace("_", "-")
        for p in _DATA_DIR.glob("*_classes.json")
    )


def load_vocabulary(name_or_path: str) -> list[str]:
    """Object names for SSL negatives: a bundled list ("tiny-imagenet") or a file.

    A file is a JSON list of strings (`.json`) or plain text with one name per line (any other
    suffix). Bundled lists are JSON because a Flower app bundle (FAB) carries only
    .py/.toml/.md/.yaml/.json(l) files: a .txt data file would be missing under `flwr run`.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = _DATA_DIR / f"{name_or_path.replace('-', '_')}_classes.json"
    if not path.is_file():
        raise ValueError(
            f"`ssl-vocabulary` must be a bundled list {bundled_vocabularies()} or the path of a "
            f"JSON list of names (.json) or a text file with one name per line, "
            f"got {name_or_path!r}"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"vocabulary {path} is not valid JSON ({err}); write a list of "
                             "names, e.g. [\"goldfish\", \"bullfrog\"]") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"vocabulary {path} must hold a JSON list of strings, got "
                             f"{type(data).__name__}")
        names = [x.strip() for x in data if x.strip()]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) < 2:
        raise ValueError(f"vocabulary {path} must hold at least 2 names, found {len(names)}")
    return names


def draw_per_sample(
    sample_ids: Sequence[int] | torch.Tensor,
    pool_size: int,
    k: int,
    seed: int,
    exclude: Sequence[int] | torch.Tensor | None = None,
    stream: str = "neg",
) -> torch.Tensor:
    """For each sample, k distinct ids from [0, pool_size) minus `exclude[i]`: LongTensor [N, k].

    Keyed by (seed, sample id): a sample gets the same draw whichever client holds it and in
    whatever order. When k equals the whole remaining pool, every id is taken in increasing order.
    """
    ids = [int(s) for s in torch.as_tensor(sample_ids).reshape(-1).tolist()]
    excl = (
        None if exclude is None else [int(e) for e in torch.as_tensor(exclude).reshape(-1).tolist()]
    )
    if excl is not None and len(excl) != len(ids):
        raise ValueError(f"`exclude` must have one entry per sample ({len(ids)}), got {len(excl)}")
    avail = pool_size - (0 if excl is None else 1)
    if not 0 <= k <= avail:
        raise ValueError(f"cannot draw {k} distinct ids from a pool of {avail}")
    out = np.empty((len(ids), k), dtype=np.int64)
    base = np.arange(pool_size)
    for row, sid in enumerate(ids):
        pool = base if excl is None else np.delete(base, excl[row])
        if k == avail:
            out[row] = pool
        else:
            rng = np.random.default_rng(hashed_seed(seed, sid, stream))
            out[row] = np.sort(rng.choice(pool, size=k, replace=False))
    return torch.from_numpy(out)


def sample_negatives(
    labels: Sequence[int] | torch.Tensor,
    num_classes: int,
    neg_num: int,
    seed: int,
    sample_ids: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative classes per sample: LongTensor [N, K], K = min(neg_num, C - 1).

    C - 1 <= neg_num: all other classes (increasing order). Otherwise K other classes drawn per
    sample from a generator keyed by (seed, sample id) (`sample_ids` default: 0..N-1).
    """
    labels_t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2 for negatives, got {num_classes}")
    if neg_num < 1:
        raise ValueError(f"`neg_num` must be >= 1, got {neg_num}")
    if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, {num_classes - 1}], got [{labels_t.min()}, {labels_t.max()}]"
        )
    ids = (
        torch.arange(len(labels_t))
        if sample_ids is None
        else torch.as_tensor(sample_ids).reshape(-1)
    )
    if len(ids) != len(labels_t):
        raise ValueError(
            f"`sample_ids` must have one id per label ({len(labels_t)}), got {len(ids)}"
        )
    k = min(neg_num, num_classes - 1)
    return draw_per_sample(ids, num_classes, k, seed, exclude=labels_t)
