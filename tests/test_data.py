"""Tests of :mod:`bclib.data`: real MNIST against facts known independently of the library (the
published class counts, the raw IDX bytes decoded here), data-root resolution, error messages,
atomic downloads, minibatching and the CIFAR-10 conversion on tensors made here.
"""
from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bclib import data
from bclib.data import MNIST_FILES, TensorSplit, batches, cifar10_tensors, data_root, load_mnist

# Examples per digit 0..9 (LeCun et al.'s MNIST distribution).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    """The payload of an IDX file: big-endian header (magic, sizes), then one unsigned byte per value."""
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read()[header_bytes:], dtype=np.uint8)


# ----------------------------------------------------------------------------- real MNIST
def test_mnist_shapes_and_dtypes(mnist):
    train, test = mnist
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y.shape == (60000,) and test.y.shape == (10000,)
    assert train.x.dtype == test.x.dtype == torch.float32
    assert train.y.dtype == test.y.dtype == torch.int64
    assert len(train) == 60000 and len(test) == 10000


def test_mnist_range_is_exactly_zero_to_one(mnist):
    for split in mnist:
        assert split.x.min().item() == 0.0 and split.x.max().item() == 1.0
        # Both ends are reached by many pixels (background 0 -> 0, saturated 255 -> 1).
        assert (split.x == 0.0).sum() > 1000 and (split.x == 1.0).sum() > 100


def test_release_input_range_maps_bytes_onto_minus_one_to_one(mnist_root, mnist):
    _, test = load_mnist(mnist_root, download=False, input_range=(-1, 1))
    assert test.x.min().item() == -1.0 and test.x.max().item() == 1.0
    # The same pixels, linearly: x_release = 2 x - 1.
    torch.testing.assert_close(test.x, 2 * mnist[1].x - 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad, error", [((1, 0), ValueError), ((0, 0), ValueError), ("ab", TypeError), (3, TypeError)])
def test_bad_input_range_is_a_clear_error(mnist_root, bad, error):
    with pytest.raises(error, match="input_range"):
        load_mnist(mnist_root, download=False, input_range=bad)


def test_mnist_label_counts_are_the_known_ones(mnist):
    train, test = mnist
    assert torch.bincount(train.y, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(test.y, minlength=10).tolist() == TEST_COUNTS


def test_mnist_pixels_and_labels_match_the_raw_idx_files(mnist, mnist_root):
    """Decode the test files here (16-byte image header, 8-byte label header): x = byte / 255."""
    _, test = mnist
    raw = mnist_root / "MNIST" / "raw"
    pixels = _read_idx(raw / "t10k-images-idx3-ubyte.gz", 16).reshape(10000, 1, 28, 28)
    labels = _read_idx(raw / "t10k-labels-idx1-ubyte.gz", 8)
    expected = torch.from_numpy(pixels.astype(np.float64) / 255.0)
    torch.testing.assert_close(test.x.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(test.y, torch.from_numpy(labels.astype(np.int64)))


def test_subset_and_to_keep_the_first_examples(mnist):
    train, _ = mnist
    small = train.subset(7).to("cpu")
    assert isinstance(small, TensorSplit) and len(small) == 7
    assert torch.equal(small.x, train.x[:7]) and torch.equal(small.y, train.y[:7])


# ----------------------------------------------------------------------------- data root
def test_data_root_argument_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BCLIB_DATA", str(tmp_path / "from-env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root(tmp_path / "from-arg") == tmp_path / "from-arg"


def test_data_root_environment_wins_over_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BCLIB_DATA", str(tmp_path / "from-env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "from-env"


def test_data_root_falls_back_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("BCLIB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "bclib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "bclib"


def test_load_mnist_reads_the_root_from_the_environment(monkeypatch, tmp_path):
    """With no argument, a missing-files error names the folder under ``$BCLIB_DATA``."""
    monkeypatch.setenv("BCLIB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "MNIST" / "raw")):
        load_mnist(download=False)


# ----------------------------------------------------------------------------- missing files
def test_missing_files_without_download_name_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert set(re.findall(r"[\w.-]+\.gz", message)) == set(MNIST_FILES)


def test_one_missing_file_is_detected(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES[:3]:
        os.symlink(mnist_root / "MNIST" / "raw" / name, raw / name)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path, download=False)


def test_a_truncated_file_is_named_as_damaged(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        data = (mnist_root / "MNIST" / "raw" / name).read_bytes()
        (raw / name).write_bytes(data[:len(data) // 2] if name == "train-labels-idx1-ubyte.gz" else data)
    with pytest.raises(ValueError, match=f"MNIST files in {re.escape(str(raw))} are damaged"):
        load_mnist(tmp_path, download=False)


def test_failed_download_leaves_no_file_behind(monkeypatch, tmp_path):
    """A download that writes part of a file and then fails (no network) must leave the root empty."""
    import torchvision

    calls = []

    def failing_mnist(root, train=True, download=False, **kwargs):
        calls.append(root)
        partial = Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"\x1f\x8b half a file")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz (no network)")

    monkeypatch.setattr(torchvision.datasets, "MNIST", failing_mnist)
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(root, download=True)
    assert calls, "the download was not attempted"
    assert str(root / "MNIST" / "raw") in str(info.value)
    left = [p for p in root.rglob("*") if not p.is_dir()] if root.exists() else []
    assert left == []


# ----------------------------------------------------------------------------- batches
def _numbered_split(n: int) -> TensorSplit:
    return TensorSplit(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


def test_shuffled_batches_cover_every_example_exactly_once():
    split = _numbered_split(103)
    seen = []
    sizes = []
    for x, y in batches(split, 10, shuffle=True, generator=torch.Generator().manual_seed(3)):
        assert torch.equal(x.view(-1).long(), y)  # inputs and labels stay paired
        seen += y.tolist()
        sizes.append(len(y))
    assert sorted(seen) == list(range(103))
    assert sizes == [10] * 10 + [3]
    assert seen != list(range(103))  # actually shuffled


def test_shuffle_order_depends_only_on_the_generator_seed():
    split = _numbered_split(50)

    def order(seed):
        return torch.cat([y for _, y in batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(seed))])

    assert torch.equal(order(7), order(7))
    assert not torch.equal(order(7), order(8))


def test_unshuffled_batches_are_in_order():
    split = _numbered_split(25)
    ys = [y.tolist() for _, y in batches(split, 10)]
    assert ys == [list(range(0, 10)), list(range(10, 20)), list(range(20, 25))]


@pytest.mark.parametrize("size, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)])
def test_a_bad_batch_size_fails_at_the_call(size, error):
    # At the call, not at the first batch: -2 used to yield no batch at all, silently.
    with pytest.raises(error, match=f"batch_size must be a positive int, got .*{size!r}"):
        batches(_numbered_split(5), size)


def test_a_split_is_made_of_tensors_with_one_label_per_example():
    with pytest.raises(TypeError, match="x and y must be torch.Tensors, got list and list"):
        TensorSplit([1, 2], [1, 2])
    with pytest.raises(ValueError, match=r"y must be a 1-d tensor of labels, shape \(N,\), got shape \(2, 1\)"):
        TensorSplit(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))


# ----------------------------------------------------------------------------- CIFAR-10
def _fake_cifar10(calls: list, download_fails: bool = False):
    """A stand-in for torchvision's CIFAR10 (CIFAR-10 cannot be downloaded here). With ``download=True``
    it unpacks the seven files into ``root`` (or, with ``download_fails``, half of them, then fails as
    urllib does without a network); either way it reads the root as the real one would, failing when
    a file is missing or damaged (here: empty)."""
    import urllib.error

    from bclib.data import CIFAR10_FILES

    def cifar10(root, train=True, download=False, **kwargs):
        calls.append((root, train, download))
        folder = Path(root) / "cifar-10-batches-py"
        if download:
            folder.mkdir(parents=True, exist_ok=True)
            for name in CIFAR10_FILES[:4] if download_fails else CIFAR10_FILES:
                (folder / name).write_bytes(b"pickled batch")
            if download_fails:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        if not all((folder / name).exists() and (folder / name).stat().st_size for name in CIFAR10_FILES):
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        images = np.full((3 if train else 2, 32, 32, 3), 255 if train else 0, dtype=np.uint8)
        return SimpleNamespace(data=images, targets=[1, 2, 3][:len(images)])
    return cifar10


def test_load_cifar10_downloads_atomically_and_reads_both_splits(monkeypatch, tmp_path):
    """A download goes to a temporary folder and is moved in whole; both splits are then read (without
    download) from the root and converted."""
    import torchvision

    from bclib.data import CIFAR10_FILES, load_cifar10

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10(calls))
    root = tmp_path / "root"
    train, test = load_cifar10(root)
    assert len(calls) == 3 and calls[0][2] is True and Path(calls[0][0]).parent == root  # a folder inside the root
    assert calls[1:] == [(str(root), True, False), (str(root), False, False)]
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(CIFAR10_FILES)
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # the temporary folder is gone
    assert train.x.shape == (3, 3, 32, 32) and test.x.shape == (2, 3, 32, 32)
    assert bool((train.x == 1).all()) and bool((test.x == -1).all()) and test.y.tolist() == [1, 2]
    calls.clear()
    load_cifar10(root)  # present: no download
    assert [download for _, _, download in calls] == [False, False]


def test_load_cifar10_without_network_names_the_folder_and_leaves_nothing(monkeypatch, tmp_path):
    import torchvision

    from bclib.data import load_cifar10

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10(calls, download_fails=True))
    root = tmp_path / "root"
    folder = re.escape(str(root / "cifar-10-batches-py"))
    with pytest.raises(FileNotFoundError, match=f"CIFAR-10 not found in {folder} .*data_batch_1"):
        load_cifar10(root)
    assert calls and [p for p in root.rglob("*")] == []  # the half download was removed
    calls.clear()
    with pytest.raises(FileNotFoundError, match=f"CIFAR-10 not found in {folder}"):
        load_cifar10(root, download=False)
    assert calls == []


def test_load_cifar10_names_damaged_files(monkeypatch, tmp_path):
    import torchvision

    from bclib.data import CIFAR10_FILES, load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in CIFAR10_FILES:
        (folder / name).write_bytes(b"" if name == "test_batch" else b"pickled batch")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10([]))
    with pytest.raises(ValueError, match=f"CIFAR-10 files in {re.escape(str(folder))} are damaged"):
        load_cifar10(tmp_path)


def test_cifar10_tensors_maps_pixels_by_hand():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0] = (0, 255, 51)  # pixel (row 0, col 0) of image 0: R, G, B
    images[1, 4, 7] = (102, 0, 255)
    images[1, 31, 31, 2] = 153
    fake = SimpleNamespace(data=images, targets=[3, 9])
    split = cifar10_tensors(fake)
    assert split.x.shape == (2, 3, 32, 32) and split.x.dtype == torch.float32
    assert split.y.tolist() == [3, 9] and split.y.dtype == torch.int64
    # byte b -> b / 127.5 - 1: 0 -> -1, 255 -> 1, 51 -> -0.6, 102 -> -0.2, 153 -> 0.2
    assert split.x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6], abs=1e-6)
    assert split.x[1, :, 4, 7].tolist() == pytest.approx([-0.2, -1.0, 1.0], abs=1e-6)
    assert split.x[1, 2, 31, 31].item() == pytest.approx(0.2, abs=1e-6)
    assert split.x.min().item() == -1.0 and split.x.max().item() == 1.0
    # Five bytes set above are nonzero; every other one is the zero byte.
    assert (split.x == -1.0).sum().item() == 2 * 3 * 32 * 32 - 5


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 32, 32), (2, 32, 32, 1)])
def test_cifar10_tensors_rejects_wrong_shapes(shape):
    fake = SimpleNamespace(data=np.zeros(shape, dtype=np.uint8), targets=[0, 1])
    with pytest.raises(ValueError, match="data"):
        cifar10_tensors(fake)


# ----------------------------------------------------------------------------- fast mode
@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_fast_mode_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("BCLIB_FAST", value)
    assert data.fast_mode() is expected


def test_fast_mode_is_off_by_default(monkeypatch):
    monkeypatch.delenv("BCLIB_FAST", raising=False)
    assert data.fast_mode() is False
