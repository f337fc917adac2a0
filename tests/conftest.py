"""Shared test fixtures: a fixed seed for every test, reference formulas written independently
of :mod:`bclib` (derived here from the densities, not copied from the library), and real MNIST
copied into a writable temporary root (decoded once per session).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# The tests use small tensors: one thread avoids OpenMP spin-waiting against other processes
# (training runs, notebooks) on a 2-core machine, and is as fast for tensors this size.
torch.set_num_threads(1)

# Molchanov et al. (2017), Eq. (14): the constants as printed in the paper.
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def reference_nj_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL ~= k1 - k1 sigmoid(k2 + k3 log alpha) + 0.5 log(1 + 1/alpha)."""
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * torch.log1p(torch.exp(-log_alpha))


def reference_gaussian_kl(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, 1)) = 0.5 (var + mu^2 - 1 - log var)."""
    return 0.5 * (var + mu**2 - 1.0 - torch.log(var))


def _lognormal_entropy(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # H[LN(m, v)] = H[N(m, v)] + E[log x] = 0.5 log(2 pi e v) + m.
    return 0.5 * torch.log(2 * math.pi * math.e * v) + m


def reference_lognormal_gamma_kl(m, v, shape: float, scale: float):
    """-H[q] - E_q[log Gamma(x; a, scale b)], with E[log x] = m and E[x] = exp(m + v/2)."""
    expected_log_prior = (
        -math.lgamma(shape) - shape * math.log(scale) + (shape - 1) * m - torch.exp(m + v / 2) / scale
    )
    return -_lognormal_entropy(m, v) - expected_log_prior


def reference_lognormal_inverse_gamma_kl(m, v, shape: float, scale: float):
    """-H[q] - E_q[log InvGamma(x; a, scale b)], with E[1/x] = exp(-m + v/2)."""
    expected_log_prior = (
        shape * math.log(scale) - math.lgamma(shape) - (shape + 1) * m - scale * torch.exp(-m + v / 2)
    )
    return -_lognormal_entropy(m, v) - expected_log_prior


@pytest.fixture
def reference() -> SimpleNamespace:
    """Independent reference formulas (element-wise on tensors, nats)."""
    return SimpleNamespace(
        nj_kl=reference_nj_kl,
        gaussian_kl=reference_gaussian_kl,
        lognormal_gamma_kl=reference_lognormal_gamma_kl,
        lognormal_inverse_gamma_kl=reference_lognormal_inverse_gamma_kl,
    )


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same random state, so Monte Carlo checks are reproducible."""
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- real MNIST
# The four original files live beside the checkout (../shared/data/MNIST/raw, read-only); the tests
# copy them into a writable temporary root, where torchvision unpacks them.
_SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"
_MNIST_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def _mnist_source() -> Path:
    if _SHARED_MNIST.is_dir():
        return _SHARED_MNIST
    if os.environ.get("BCLIB_DATA"):
        return Path(os.environ["BCLIB_DATA"]).expanduser() / "MNIST" / "raw"
    pytest.fail(f"MNIST files not found: put {', '.join(_MNIST_FILES)} into {_SHARED_MNIST}, "
                "or set BCLIB_DATA to a root holding MNIST/raw/ with them")


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A writable data root holding copies of the four original MNIST files in ``MNIST/raw/``."""
    source = _mnist_source()
    missing = [name for name in _MNIST_FILES if not (source / name).is_file()]
    if missing:
        pytest.fail(f"MNIST files missing in {source}: {', '.join(missing)}")
    root = tmp_path_factory.mktemp("mnist-root")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in _MNIST_FILES:
        shutil.copyfile(source / name, raw / name)  # copyfile: the copies stay writable
    return root


@pytest.fixture(scope="session")
def mnist(mnist_root):
    """Real MNIST ``(train, test)`` as :class:`bclib.data.TensorSplit`, decoded once per session."""
    from bclib.data import load_mnist

    return load_mnist(mnist_root, download=False)


@pytest.fixture(scope="session")
def glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library through ``os.confstr``, not through bclib)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


@pytest.fixture
def windowed_calls(monkeypatch) -> list:
    """The weight shapes of the calls of the windowed convolution weight gradient, in order (the
    function still runs)."""
    from bclib.layers import conv_gradient

    calls = []
    original = conv_gradient.conv2d_weight_gradient

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(conv_gradient, "conv2d_weight_gradient", counted)
    return calls
