"""Tests of :mod:`bclib.data`: real MNIST against facts known independently of the library (the
published class counts, the raw IDX bytes decoded here), tiny MNIST-format files written here,
data-root resolution, error messages, atomic downloads and unpacking (with the network refused),
minibatching and the CIFAR-10 conversion on tensors made here.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import struct
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


def _write_idx(path: Path, values: np.ndarray) -> None:
    """An unpacked IDX file of unsigned bytes: magic 0x0000 08 <ndim>, each size as a big-endian uint32,
    then the bytes (LeCun's format description)."""
    values = np.asarray(values, dtype=np.uint8)
    path.write_bytes(struct.pack(">HBB", 0, 0x08, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
                     + values.tobytes())


def _tiny_mnist(root: Path, train_labels=(0, 9, 4), test_labels=(7, 1)) -> Path:
    """Write the four unpacked files of a tiny MNIST into ``root/MNIST/raw``: image k of a split has
    byte 10 k + 1 at (row k, column 2 k) and 0 elsewhere."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for k in range(len(labels)):
            images[k, k, 2 * k] = 10 * k + 1
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array(labels))
    return raw


@pytest.fixture
def network_calls(monkeypatch) -> list:
    """Refuse every network request (as a machine offline does) and record its address."""
    import urllib.error
    import urllib.request

    calls = []

    def refuse(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("network refused by the test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


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


@pytest.mark.parametrize("n, error", [(-3, ValueError), (2.5, TypeError), ("5", TypeError), (True, TypeError)])
def test_subset_wants_an_int_of_at_least_zero(n, error):
    # -3 used to give "all but the last 3" (7 of 10 examples), silently.
    with pytest.raises(error, match=f"n must be an int >= 0, got .*{re.escape(str(n))}"):
        _numbered_split(10).subset(n)
    assert len(_numbered_split(10).subset(0)) == 0 and len(_numbered_split(10).subset(np.int64(3))) == 3


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


def test_only_gz_of_one_file_is_unpacked_here_without_network(tmp_path, mnist_root, network_calls):
    """Three files unpacked, one only as .gz: it is unpacked (atomically, nothing else left in the
    folder) and all load with download=False, without a network request (torchvision fetched the
    three missing .gz and failed as damaged)."""
    source = mnist_root / "MNIST" / "raw"
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes((source / "train-images-idx3-ubyte.gz").read_bytes())
    for name in MNIST_FILES[1:]:
        (raw / name[:-3]).write_bytes(gzip.decompress((source / name).read_bytes()))
    train, test = load_mnist(tmp_path, download=False)
    assert network_calls == []
    expected = sorted(["train-images-idx3-ubyte.gz", *(name[:-3] for name in MNIST_FILES)])
    assert sorted(p.name for p in raw.iterdir()) == expected
    unpacked = gzip.decompress((source / "train-images-idx3-ubyte.gz").read_bytes())
    assert (raw / "train-images-idx3-ubyte").read_bytes() == unpacked
    assert train.x.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.y, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(test.y, minlength=10).tolist() == TEST_COUNTS
    pixels = _read_idx(source / "train-images-idx3-ubyte.gz", 16)[:784].reshape(1, 28, 28)
    torch.testing.assert_close(train.x[0].double(), torch.from_numpy(pixels / 255.0), rtol=0, atol=1e-6)


def test_a_truncated_gz_is_named_without_network(tmp_path, mnist_root, network_calls):
    """Only the .gz files, one cut short: a ValueError naming that file, no request, nothing unpacked
    from it (torchvision went to the network for a fresh copy, with download=False)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        content = (mnist_root / "MNIST" / "raw" / name).read_bytes()
        (raw / name).write_bytes(content[:10000] if name == "train-labels-idx1-ubyte.gz" else content)
    damaged = f"MNIST files in {re.escape(str(raw))} are damaged: train-labels-idx1-ubyte.gz "
    with pytest.raises(ValueError, match=damaged):
        load_mnist(tmp_path, download=False)
    assert network_calls == []
    assert not (raw / "train-labels-idx1-ubyte").exists()
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]


def test_an_interrupted_unpack_leaves_no_half_file(monkeypatch, tmp_path, mnist_root, network_calls):
    """Unpacking fails after writing part of the file (a full disk here): no unpacked file, no
    temporary one, so the next load does not take half a file for the whole."""
    raw = _tiny_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    original = mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(original.read_bytes())
    before = sorted(p.name for p in raw.iterdir())

    class FullDisk(io.BytesIO):
        def read(self, size=-1):
            if self.tell():
                raise OSError(28, "No space left on device")
            return super().read(100)  # 100 bytes arrive, then the disk is full

    monkeypatch.setattr(gzip, "open", lambda *args, **kwargs: FullDisk(bytes(10008)))
    with pytest.raises(OSError, match="No space left on device"):
        load_mnist(tmp_path, download=False)
    assert sorted(p.name for p in raw.iterdir()) == before
    assert network_calls == []


def test_tiny_files_load_and_damaged_ones_are_named(tmp_path, network_calls):
    """Hand-made files load byte for byte; labels outside 0..9 (they loaded silently) are a
    ValueError naming the unpacked file read, not the .gz."""
    raw = _tiny_mnist(tmp_path)
    train, test = load_mnist(tmp_path, download=False)
    assert train.y.tolist() == [0, 9, 4] and test.y.tolist() == [7, 1]
    assert train.x.shape == (3, 1, 28, 28) and test.x.shape == (2, 1, 28, 28)
    assert train.x[2, 0, 2, 4].item() == pytest.approx(21 / 255)
    assert test.x[1, 0, 1, 2].item() == pytest.approx(11 / 255)
    assert (train.x > 0).sum().item() == 3 and (test.x > 0).sum().item() == 2
    _tiny_mnist(tmp_path, test_labels=(7, 200))
    with pytest.raises(ValueError, match=f"MNIST files in {re.escape(str(raw))} are damaged: t10k-labels-idx1-ubyte "
                                         r"\(labels from 7 to 200, not digits 0..9\)") as info:
        load_mnist(tmp_path, download=False)
    assert set(re.findall(r"[\w-]+-ubyte[\w.]*", str(info.value))) == {"t10k-labels-idx1-ubyte"}
    assert network_calls == []


@pytest.mark.parametrize("damage", ["labels_short", "images_27x27", "images_truncated"])
def test_damaged_unpacked_files_name_both_files_of_the_split(tmp_path, network_calls, damage):
    """Images and labels that disagree in number, images not 28 x 28, or a file cut short: a
    ValueError naming the two unpacked files of the split (these loaded, or failed naming the .gz)."""
    raw = _tiny_mnist(tmp_path)
    if damage == "labels_short":
        _write_idx(raw / "train-labels-idx1-ubyte", np.array([0, 9]))
    elif damage == "images_27x27":
        _write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 27, 27)))
    else:
        content = (raw / "train-images-idx3-ubyte").read_bytes()
        (raw / "train-images-idx3-ubyte").write_bytes(content[:-100])
    with pytest.raises(ValueError, match=f"MNIST files in {re.escape(str(raw))} are damaged: "
                                         "train-images-idx3-ubyte and train-labels-idx1-ubyte \\(") as info:
        load_mnist(tmp_path, download=False)
    assert ".gz" not in str(info.value).split(";")[0]
    assert network_calls == []


def test_failed_download_removes_the_folders_it_created(monkeypatch, tmp_path, network_calls):
    """A mistyped root that cannot be downloaded into leaves no empty folders behind; a root that
    was there stays (it was left whole: typo/a/b remained)."""
    import torchvision

    from bclib.data import load_cifar10

    calls = []

    def failing_mnist(root, train=True, download=False, **kwargs):
        calls.append(root)
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz (no network)")

    monkeypatch.setattr(torchvision.datasets, "MNIST", failing_mnist)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "typo" / "a" / "b" / "MNIST" / "raw"))):
        load_mnist(tmp_path / "typo" / "a" / "b")
    assert calls  # the download was tried
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(FileNotFoundError):
        load_mnist(tmp_path / "kept")
    assert len(calls) == 2 and [p.name for p in tmp_path.rglob("*")] == ["kept"]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10([], download_fails=True))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        load_cifar10(tmp_path / "c" / "d")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


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


def test_a_split_of_a_0d_x_names_x():
    # It failed with len()'s "len() of a 0-d tensor", naming no argument.
    with pytest.raises(ValueError, match=r"x must hold one row per example, shape \(N, ...\), got a 0-d tensor"):
        TensorSplit(torch.tensor(1.0), torch.tensor([1]))


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


def test_cifar10_tensors_refuses_data_that_is_not_bytes():
    """Floats already in [0, 1] were scaled as bytes (all within 1/127.5 of -1), silently; whole
    numbers 0..255 in a float or int array are taken as the bytes they are."""
    images = np.zeros((2, 32, 32, 3))
    images[0, 0, 0] = (0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="dataset.data must hold bytes 0..255 .*from 0 to 1: already scaled"):
        cifar10_tensors(SimpleNamespace(data=images.astype(np.float32), targets=[0, 1]))
    with pytest.raises(ValueError, match="dataset.data must hold bytes 0..255 .*from -1 to 0"):
        cifar10_tensors(SimpleNamespace(data=images - 1, targets=[0, 1]))
    with pytest.raises(ValueError, match="dataset.data must hold bytes 0..255 .*from 0 to 256"):
        cifar10_tensors(SimpleNamespace(data=(images * 256).astype(np.int64), targets=[0, 1]))
    images[0, 0, 0] = (0, 51, 255)
    for dtype in (np.float64, np.int64):
        split = cifar10_tensors(SimpleNamespace(data=images.astype(dtype), targets=[0, 1]))
        assert split.x[0, :, 0, 0].tolist() == pytest.approx([-1.0, -0.6, 1.0], abs=1e-6)


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


@pytest.mark.parametrize("value", ["no", "off", "FALSE", "Off", " 0 "])
def test_fast_mode_off_words_turn_it_off(monkeypatch, value):
    # Only "", "0", "false" and "False" were off: BCLIB_FAST=no turned fast mode on.
    monkeypatch.setenv("BCLIB_FAST", value)
    assert data.fast_mode() is False


@pytest.mark.parametrize("value", ["maybe", "2", "y"])
def test_fast_mode_refuses_other_values(monkeypatch, value):
    monkeypatch.setenv("BCLIB_FAST", value)
    with pytest.raises(ValueError, match=f"BCLIB_FAST must be one of 1, true, yes, on .*got '{value}'"):
        data.fast_mode()


def test_fast_mode_is_off_by_default(monkeypatch):
    monkeypatch.delenv("BCLIB_FAST", raising=False)
    assert data.fast_mode() is False
