"""The real CLIP BPE tokenizer, rebuilt offline from the vocabulary in the open-clip-torch wheel.

No registry ships Stable Diffusion's tokenizer files, but `open_clip/bpe_simple_vocab_16e6.txt.gz`
is the same BPE table: from it we write `vocab.json` + `merges.txt` (identical to SD 1.x's
tokenizer folder) and load them with `transformers.CLIPTokenizer`.

Quirks (see ../shared/NOTES.md): `open_clip` itself must not be imported (it needs torchvision),
so the file is located with `importlib.util.find_spec`; the two paths go to `CLIPTokenizer`
positionally (the fast tokenizer with keyword paths silently returns garbage ids in transformers
5.x); `model_max_length=77` is required or the SD text encoder overflows its position table.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from feddifrc_core.checkpoint import atomic_write_text

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_LENGTH = 77  # CLIP's text position table
CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (+"</w>") + 48894 merges + 2 special tokens
_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses from the file (the rest are unused)


def find_open_clip_bpe() -> Path:
    """Path of the BPE vocabulary shipped in the installed open-clip-torch wheel."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The CLIP tokenizer vocabulary comes from the open-clip-torch wheel, which is not "
            "installed. Install it without its torchvision dependency: "
            "`pip install --no-deps open-clip-torch==3.3.0` "
            "(`make venv` does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    if not path.is_file():
        raise RuntimeError(
            f"open-clip-torch is installed but {path} is missing; reinstall the wheel."
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character table (bytes are BPE's base symbols)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_clip_tokenizer_files(
    out_dir: str | Path, bpe_path: str | Path | None = None
) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` (HF CLIP format) into `out_dir`; returns both paths.

    Written atomically (temp file + fsync + os.replace) so concurrent processes never read a half file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return vocab_path, merges_path
    # 1. the merge list: line 0 is a version header, CLIP uses the next _NUM_MERGES lines
    lines = gzip.open(bpe_path or find_open_clip_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    # 2. the vocabulary in CLIP's id order: bytes, bytes + "</w>", merged symbols, special tokens
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    if len(symbols) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"rebuilt CLIP vocabulary has {len(symbols)} entries, expected {CLIP_VOCAB_SIZE}"
        )
    vocab = {s: i for i, s in enumerate(symbols)}
    # 3. atomic writes
    atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def load_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The SD tokenizer built from the open-clip vocabulary, files kept in `folder`."""
    vocab_path, merges_path = write_clip_tokenizer_files(folder)
    # Positional paths and model_max_length=77: see the module docstring.
    return CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=CLIP_MAX_LENGTH)
