"""MNIST and CIFAR-10 as in-memory tensors, loaded through ``torchvision.datasets``.

The data root is, in order: the ``root`` argument, the ``BCLIB_DATA`` environment variable, or a
per-user cache folder (``$XDG_CACHE_HOME/bclib`` or ``~/.cache/bclib``). Missing files are downloaded
when the network allows it, into a temporary folder, and moved into place only when all arrived;
MNIST's ``.gz`` files are unpacked beside them here, each through a temporary file.

MNIST inputs are scaled to ``[0, 1]`` by default (``input_range=(0, 1)``); ``input_range=(-1, 1)`` gives
the 2017 release's scaling (CIFAR-10's are scaled to ``[-1, 1]``: natural images have no blank
background). They differ in the variance term of the local reparameterisation,
``sum_i x_i^2 sigma_i^2``: in ``[0, 1]`` a blank pixel (0) adds no noise, so a pixel feeds its weight
noise only into the examples where it is inked; in ``[-1, 1]`` the background (-1) feeds the full
noise of every kept pixel into every example, which makes rarely inked pixels costly to keep. The
book's LeNet-300-100 chapter compares both (runs ``lenet300_nj`` and ``lenet300_nj_release_scaling``:
the release's scaling kept fewer pixels there, at a slightly higher error); the default stays the
one our results use.

Training loops batch from the decoded tensors (see :func:`batches`), which removes the per-sample
transform cost of a ``DataLoader`` (8.2 of the release's 14.9 s per LeNet-300-100 epoch).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ._io import write_atomically
from .layers.base import check_positive_int

__all__ = [
    "TensorSplit", "MNIST_FILES", "CIFAR10_FOLDER", "CIFAR10_FILES", "data_root", "load_mnist", "load_cifar10", "cifar10_tensors",
    "batches", "fast_mode",
]

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# The md5 sums of the original files (as torchvision checks them before unpacking).
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The folder torchvision unpacks CIFAR-10 into, and the files it reads there.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@dataclass
class TensorSplit:
    """A split held as two tensors: ``x`` (N, C, H, W) float (scaled, see ``input_range``) and ``y`` (N,) int64 labels."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or not isinstance(self.y, Tensor):
            raise TypeError(f"x and y must be torch.Tensors, got {type(self.x).__name__} and {type(self.y).__name__}")
        if self.x.dim() == 0:  # else len() below fails with "len() of a 0-d tensor", naming neither
            raise ValueError("x must hold one row per example, shape (N, ...), got a 0-d tensor")
        if self.y.dim() != 1:
            raise ValueError(f"y must be a 1-d tensor of labels, shape (N,), got shape {tuple(self.y.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y must hold the same number of examples, got {len(self.x)} and {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device, dtype: torch.dtype | None = None) -> "TensorSplit":
        """On ``device``, with floating-point inputs cast to ``dtype`` when given (labels unchanged)."""
        x_dtype = dtype if dtype is not None and self.x.is_floating_point() else self.x.dtype
        return TensorSplit(self.x.to(device, x_dtype), self.y.to(device))

    def subset(self, n: int) -> "TensorSplit":
        """The first ``n`` examples, an int >= 0 (all of them when there are fewer; for fast mode and tests)."""
        # Checked: a negative n sliced "all but the last |n|" silently.
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be an int >= 0, got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"n must be an int >= 0, got {n}")
        return TensorSplit(self.x[:n], self.y[:n])


_FAST_ON = ("1", "true", "yes", "on")
_FAST_OFF = ("", "0", "false", "no", "off")


def fast_mode() -> bool:
    """True when ``BCLIB_FAST=1``: notebooks and examples shrink data and epochs to run in about a minute.

    On: ``1``, ``true``, ``yes``, ``on``; off: unset, empty, ``0``, ``false``, ``no``, ``off`` (any case).

    Raises:
        ValueError: any other value (``BCLIB_FAST=no`` used to turn fast mode on).
    """
    value = os.environ.get("BCLIB_FAST", "").strip().lower()
    if value not in _FAST_ON + _FAST_OFF:
        raise ValueError(f"BCLIB_FAST must be one of {', '.join(_FAST_ON)} (on) or {', '.join(_FAST_OFF[1:])} or "
                         f"empty (off), got {os.environ['BCLIB_FAST']!r}")
    return value in _FAST_ON


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: argument, else ``$BCLIB_DATA``, else the per-user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("BCLIB_DATA"):
        return Path(os.environ["BCLIB_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "bclib"


DEFAULT_INPUT_RANGE = (0.0, 1.0)


def _scale(images_uint8: Tensor, input_range=DEFAULT_INPUT_RANGE) -> Tensor:
    """Map bytes 0..255 linearly onto ``input_range`` (``low + (high - low) * x / 255``)."""
    low, high = _check_input_range(input_range)
    return images_uint8.float().mul_((high - low) / 255.0).add_(low)


def _check_input_range(input_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise TypeError(f"input_range must be a pair of numbers (low, high), got {input_range!r}") from None
    if not low < high:
        raise ValueError(f"input_range must have low < high, got {input_range!r}")
    return low, high


def _missing_mnist_message(raw: Path) -> str:
    names = ", ".join(MNIST_FILES)
    return (
        f"MNIST files not found in {raw} and could not be downloaded. Put the four original files "
        f"there ({names}), or set BCLIB_DATA / pass root= (--data on the command line) to a folder holding MNIST/raw/."
    )


def _missing_cifar10_message(folder: Path) -> str:
    return (f"CIFAR-10 not found in {folder} and could not be downloaded. Put the unpacked python version "
            f"there (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html: "
            f"{', '.join(CIFAR10_FILES)}), or set BCLIB_DATA / pass root= to the folder above it.")


def _download_atomically(root: Path, dataset_class, paths: list[str], missing_message: str) -> None:
    """Download with ``dataset_class(tmp, download=True)`` into a temporary folder in ``root``, then move
    ``paths`` (relative to the root) into place only when all arrived; on failure nothing is left, not
    even the folders this call created (a mistyped root would otherwise stay behind, empty)."""
    created = _missing_folders([root, *((root / path).parent for path in paths)])
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bclib-download-", dir=root))
        try:
            dataset_class(str(tmp), train=True, download=True)
            for path in paths:
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / path, root / path)
        except Exception as error:  # no network (URLError, RuntimeError), checksum failure, ...
            raise FileNotFoundError(missing_message) from error
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        for folder in created:  # deepest first; one that is not empty now is someone else's: kept
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def _missing_folders(folders: list[Path]) -> list[Path]:
    """The folders among ``folders`` and their parents that do not exist yet, deepest first."""
    missing = set()
    for folder in folders:
        for path in (folder, *folder.parents):
            if path.exists():
                break
            missing.add(path)
    return sorted(missing, key=lambda path: len(path.parts), reverse=True)


def load_mnist(root: str | os.PathLike | None = None, *, download: bool = True,
               device: torch.device | str | None = None,
               input_range=DEFAULT_INPUT_RANGE) -> tuple[TensorSplit, TensorSplit]:
    """MNIST train (60000) and test (10000) splits as tensors of shape (N, 1, 28, 28).

    Args:
        root: data root holding ``MNIST/raw/`` (see :func:`data_root`).
        download: try to download missing files (with ``False``, no network request at all).
        input_range: ``(low, high)`` the bytes 0..255 are mapped onto (default ``(0, 1)``; the release used ``(-1, 1)``).
        device: where to keep the tensors (e.g. ``"cuda"`` to batch on the GPU).

    Raises:
        FileNotFoundError: the files are missing and cannot be downloaded; the message names the
            folder and the four file names.
        ValueError: the files are there but damaged (truncated, corrupt, labels outside 0..9); the
            message names the folder and the damaged files.

    Example:
        >>> train, test = load_mnist()  # doctest: +SKIP
        >>> train.x.shape, test.y.shape  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), torch.Size([10000]))
    """
    import torchvision

    _check_input_range(input_range)
    root = data_root(root)
    raw = root / "MNIST" / "raw"
    present = all((raw / n).exists() or (raw / n[:-3]).exists() for n in MNIST_FILES)
    if not present:
        if not download:
            raise FileNotFoundError(_missing_mnist_message(raw))
        _download_atomically(root, torchvision.datasets.MNIST, [f"MNIST/raw/{name}" for name in MNIST_FILES],
                             _missing_mnist_message(raw))
    _unpack_mnist(raw)
    splits = []
    for train in (True, False):
        prefix = "train" if train else "t10k"
        files = f"{prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte"
        # download=False: all four files are unpacked now, so torchvision only reads them (with True it
        # also fetched the .gz of any file present only unpacked: network calls even for download=False).
        try:
            dataset = torchvision.datasets.MNIST(str(root), train=train, download=False)
            images, labels = dataset.data, dataset.targets
        except (RuntimeError, AssertionError, ValueError, TypeError, KeyError, IndexError) as error:
            # A truncated file fails the reshape to the sizes in its header; a bad header, an assert.
            raise ValueError(_damaged_mnist_message(raw, files, str(error) or type(error).__name__)) from None
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
            raise ValueError(_damaged_mnist_message(raw, files, f"images of shape {tuple(images.shape)} and dtype "
                                                                f"{images.dtype}, not (N, 28, 28) uint8"))
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(_damaged_mnist_message(raw, files, f"{len(images)} images but labels of shape "
                                                                f"{tuple(labels.shape)}"))
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(_damaged_mnist_message(raw, f"{prefix}-labels-idx1-ubyte",
                                                    f"labels from {low} to {high}, not digits 0..9"))
        split = TensorSplit(_scale(images.unsqueeze(1), input_range), labels.long())
        splits.append(split.to(device) if device is not None else split)
    return splits[0], splits[1]


def _damaged_mnist_message(raw: Path, files: str, reason) -> str:
    # Names the unpacked files, which are the ones read: replacing the .gz files beside them changes nothing.
    them, copies = ("them", "intact copies") if " and " in files else ("it", "an intact copy")
    return (f"MNIST files in {raw} are damaged: {files} ({reason}); replace {them} with {copies}, or delete "
            f"{them} (unpacked again from the .gz beside, or downloaded again when that is missing too)")


def _unpack_mnist(raw: Path) -> None:
    """Unpack every MNIST file present only as ``.gz``, after checking its md5, into a temporary file
    renamed into place: torchvision unpacks in place, so an interrupted run left half a file that the
    next one read as whole."""
    for name in MNIST_FILES:
        target = raw / name[:-3]
        if target.exists():
            continue
        archive = raw / name
        with open(archive, "rb") as handle:
            md5 = hashlib.md5(handle.read(), usedforsecurity=False).hexdigest()
        if md5 != _MNIST_MD5[name]:
            raise ValueError(f"MNIST files in {raw} are damaged: {name} (md5 {md5}, not the original's "
                             f"{_MNIST_MD5[name]}); replace it with an intact copy (or delete it to download it again)")
        write_atomically(target, functools.partial(_gunzip, archive))


def _gunzip(archive: Path, destination: str) -> None:
    with gzip.open(archive, "rb") as packed, open(destination, "wb") as unpacked:
        shutil.copyfileobj(packed, unpacked)


def cifar10_tensors(dataset, input_range=(-1.0, 1.0)) -> TensorSplit:
    """Convert a ``torchvision.datasets.CIFAR10``-like object (``.data`` uint8 N x 32 x 32 x 3,
    ``.targets``) into a :class:`TensorSplit` of shape (N, 3, 32, 32) scaled to ``input_range``
    (``[-1, 1]`` by default: natural images have no blank background).

    Raises:
        ValueError: ``dataset.data`` not of shape (N, H, W, 3), or not bytes: values outside 0..255 or,
            in a float array, not whole numbers (data already scaled, to ``[0, 1]`` say).
    """
    data = torch.as_tensor(dataset.data)
    if data.dim() != 4 or data.shape[-1] != 3:
        raise ValueError(f"dataset.data must have shape (N, H, W, 3), got {tuple(data.shape)}")
    # Scaled again, data already in [0, 1] would all land within 1/127.5 of -1, silently.
    if data.dtype != torch.uint8 and data.numel():
        low, high = data.min().item() + 0, data.max().item() + 0  # + 0: no "-0" in the message
        if low < 0 or high > 255 or (data.is_floating_point() and not bool((data == data.round()).all())):
            raise ValueError(f"dataset.data must hold bytes 0..255 (uint8, as torchvision's CIFAR10 gives), got "
                             f"{data.dtype} values from {low:g} to {high:g}: already scaled?")
    return TensorSplit(_scale(data.permute(0, 3, 1, 2).contiguous(), input_range), torch.as_tensor(dataset.targets).long())


def load_cifar10(root: str | os.PathLike | None = None, *, download: bool = True,
                 device: torch.device | str | None = None) -> tuple[TensorSplit, TensorSplit]:
    """CIFAR-10 train (50000) and test (10000) splits through ``torchvision.datasets.CIFAR10``, as
    tensors of shape (N, 3, 32, 32) (see :func:`cifar10_tensors` for the scaling).

    Args:
        root: data root holding ``cifar-10-batches-py/`` (see :func:`data_root`).
        download: try to download missing files.
        device: where to keep the tensors (e.g. ``"cuda"`` to batch on the GPU).

    Raises:
        FileNotFoundError: the files are missing and cannot be downloaded; the message names the
            folder and the files.
        ValueError: the files are there but damaged; the message names the folder.
    """
    import torchvision

    root = data_root(root)
    folder = root / CIFAR10_FOLDER
    if not all((folder / name).exists() for name in CIFAR10_FILES):
        if not download:
            raise FileNotFoundError(_missing_cifar10_message(folder))
        _download_atomically(root, torchvision.datasets.CIFAR10, [f"{CIFAR10_FOLDER}/{name}" for name in CIFAR10_FILES],
                             _missing_cifar10_message(folder))
    try:  # download=False: torchvision checks the files' md5 sums and reads them
        splits = [cifar10_tensors(torchvision.datasets.CIFAR10(str(root), train=t, download=False))
                  for t in (True, False)]
    except RuntimeError as error:
        raise ValueError(f"CIFAR-10 files in {folder} are damaged ({error}); replace them with an intact copy "
                         f"(or delete the folder to download again)") from None
    return tuple(s.to(device) if device is not None else s for s in splits)


def batches(split: TensorSplit, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` minibatches by indexing the in-memory tensors (the last batch may be smaller).

    Args:
        split: the examples.
        batch_size: examples per batch, a positive int.
        shuffle: draw the order with ``torch.randperm`` (with ``generator``) instead of keeping it.
        generator: the random generator of the shuffle (``None``: PyTorch's default one).

    Raises:
        TypeError: ``batch_size`` not an int.
        ValueError: ``batch_size`` below 1.
    """
    # Checked here, not in the generator, so that a bad size fails at the call, before any work.
    check_positive_int("batch_size", batch_size)
    return _batches(split, batch_size, shuffle, generator)


def _batches(split: TensorSplit, batch_size: int, shuffle: bool,
             generator: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator).to(split.x.device)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            yield split.x[index], split.y[index]
    else:
        for start in range(0, n, batch_size):
            yield split.x[start:start + batch_size], split.y[start:start + batch_size]
