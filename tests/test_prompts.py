"""Prompts and per-sample negative sampling."""

from pathlib import Path

import pytest
import torch

from feddifrc_core import prompts
from feddifrc_core.prompts import (
    bundled_vocabularies,
    class_prompts,
    load_vocabulary,
    prompt_class_name,
    sample_negatives,
)


def test_class_prompts_clean_names() -> None:
    assert class_prompts(["golden_retriever", "7", "3 - three"]) == [
        "a photo of a golden retriever",
        "a photo of a handwritten number 7",
        "a photo of a handwritten number 3",
    ]
    assert prompt_class_name("T-shirt/top") == "T-shirt/top"
    with pytest.raises(ValueError, match="template"):
        class_prompts(["cat"], "a photo")


def test_all_other_classes_when_few_classes() -> None:
    labels = torch.tensor([0, 3, 9, 3])
    neg = sample_negatives(labels, num_classes=10, neg_num=10, seed=7)
    assert neg.shape == (4, 9)
    for row, y in zip(neg.tolist(), labels.tolist(), strict=True):
        assert row == [c for c in range(10) if c != y]


def test_drawn_negatives_are_seeded_per_sample_id() -> None:
    labels = torch.randint(0, 100, (50,), generator=torch.Generator().manual_seed(0))
    ids = torch.arange(1000, 1050)
    neg = sample_negatives(labels, 100, 10, seed=7, sample_ids=ids)
    assert neg.shape == (50, 10)
    assert not (neg == labels[:, None]).any()
    assert all(len(set(r)) == 10 for r in neg.tolist())
    # same sample id -> same draw, regardless of order or companions; other seed -> other draw
    rev = sample_negatives(labels.flip(0), 100, 10, seed=7, sample_ids=ids.flip(0))
    assert torch.equal(rev.flip(0), neg)
    assert not torch.equal(sample_negatives(labels, 100, 10, seed=8, sample_ids=ids), neg)
    assert len({tuple(r) for r in neg.tolist()}) > 40  # samples get different negatives


def test_negative_errors() -> None:
    with pytest.raises(ValueError, match="labels"):
        sample_negatives(torch.tensor([10]), 10, 5, 0)
    with pytest.raises(ValueError, match="neg_num"):
        sample_negatives(torch.tensor([1]), 10, 0, 0)


def test_tiny_imagenet_vocabulary() -> None:
    names = load_vocabulary("tiny-imagenet")
    assert len(names) == 200 == len(set(names)) and names[0] == "goldfish"
    with pytest.raises(ValueError, match="ssl-vocabulary"):
        load_vocabulary("no-such-list")


def test_vocabulary_files_json_list_or_one_name_per_line(tmp_path) -> None:
    as_json = tmp_path / "objects.json"
    as_json.write_text('["red fox", " teapot ", ""]', encoding="utf-8")
    as_text = tmp_path / "objects.txt"
    as_text.write_text("red fox\n\n teapot \n", encoding="utf-8")
    assert load_vocabulary(str(as_json)) == load_vocabulary(str(as_text)) == ["red fox", "teapot"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"names": ["a", "b"]}', encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list of strings"):
        load_vocabulary(str(bad))
    bad.write_text("red fox\nteapot\n", encoding="utf-8")  # text in a .json file
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vocabulary(str(bad))


def test_bundled_vocabulary_is_json_so_the_flower_bundle_carries_it() -> None:
    """flwr 1.39 packs only *.py/*.toml/*.md/*.yaml/*.json(l): any other data file is lost."""
    data_dir = Path(prompts.__file__).parent / "data"
    assert bundled_vocabularies() == ["tiny-imagenet"]
    assert sorted(p.suffix for p in data_dir.iterdir() if p.is_file()) == [".json"]
