r"""The sparsity priors as scale mixtures: sampling and marginal densities.

Both priors of the paper put a Gaussian on a weight given its scale and a heavy-tailed prior on
the scale, :math:`w = z\,\tilde w` with :math:`\tilde w \sim N(0, 1)`:

* **normal-Jeffreys**: :math:`p(z) \propto 1/|z|`, flat in :math:`\log z`. It is improper; here
  it is truncated to :math:`\log z \in [a, b]` so that it can be sampled and normalised. Its
  marginal is then close to :math:`1 / (2(b - a)|w|)` for :math:`e^a \ll |w| \ll e^b`.
* **horseshoe** (Carvalho et al. 2010): :math:`z = \tau\lambda`,
  :math:`\lambda \sim C^+(0, 1)`. The marginal has an infinite spike at 0 and Cauchy tails.

When a whole group of weights (the outgoing weights of one input unit, one convolutional filter)
shares one scale, a scale near zero removes the group at once: :func:`sample_scale_mixture`.

The half-Cauchy scale is written as a product with conjugate-friendly factors (Neville et al.
2014, used by the horseshoe layers): if :math:`a \sim C^+(0, k)` then :math:`a^2 = u v` with
:math:`u \sim \mathrm{Gamma}(1/2, \text{scale } k^2)` and :math:`v \sim \mathrm{InvGamma}(1/2, 1)`:
:func:`sample_half_cauchy_decomposed`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .layers.base import check_positive_float, check_positive_int

__all__ = [
    "PRIORS",
    "half_cauchy_pdf",
    "horseshoe_pdf",
    "log_uniform_mixture_pdf",
    "sample_half_cauchy_decomposed",
    "sample_scale_mixture",
]

PRIORS = ("horseshoe", "log_uniform")

# Midpoints over log z for the mixture integrals. The integrands are smooth on the scale of one
# unit of log z, so a step of 0.04 (or finer) is accurate to ~1e-6 relative: at least 2001 points,
# more for ranges wider than 80.
_NUM_LOG_SCALES = 2001
_MAX_LOG_SCALE_STEP = 0.04
# Half-width in log z of the horseshoe's integral around log tau: the omitted scales carry no
# mass that matters for |w| / tau between 1e-6 and 1e6.
_HORSESHOE_LOG_HALF_WIDTH = 40.0


# Argument checks shared with the layers: TypeError for a non-number, ValueError naming the argument.
_positive = functools.partial(check_positive_float, allow_none=False)
_count = check_positive_int


def _check_log_range(log_scale_range) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in log_scale_range)
    except (TypeError, ValueError):
        raise TypeError(f"log_scale_range must be a pair of numbers (low, high), got {log_scale_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"log_scale_range must be finite with low < high, got {log_scale_range!r}")
    return low, high


def half_cauchy_pdf(x, scale: float = 1.0) -> Tensor:
    r"""Density of :math:`C^+(0, k)`: :math:`\frac{2}{\pi k (1 + (x/k)^2)}` for :math:`x \ge 0`, 0 below."""
    scale = _positive("scale", scale)
    x = torch.as_tensor(x, dtype=torch.float64)
    density = 2.0 / (math.pi * scale * (1.0 + (x / scale) ** 2))
    return torch.where(x >= 0, density, torch.zeros_like(density))


def _scale_mixture_pdf(w, log_scale_density, low: float, high: float) -> Tensor:
    r""":math:`p(w) = \int_{low}^{high} N(w; 0, z^2)\, p(\log z)\, d\log z` by a midpoint rule in :math:`\log z`."""
    w = torch.as_tensor(w, dtype=torch.float64)
    points = max(_NUM_LOG_SCALES, math.ceil((high - low) / _MAX_LOG_SCALE_STEP))
    edges = torch.linspace(low, high, points + 1, dtype=torch.float64)
    log_z = 0.5 * (edges[1:] + edges[:-1])
    step = (high - low) / points
    log_weight = torch.log(log_scale_density(log_z)) + math.log(step)
    # log N(w; 0, z^2) for every (w, z) pair, then log-sum-exp over z.
    flat = w.reshape(-1, 1)
    log_normal = -0.5 * (flat / log_z.exp()) ** 2 - log_z - 0.5 * math.log(2.0 * math.pi)
    return torch.logsumexp(log_normal + log_weight, dim=1).exp().reshape(w.shape)


def horseshoe_pdf(w, tau: float = 1.0) -> Tensor:
    r"""Marginal density of the horseshoe prior, :math:`\int N(w; 0, \tau^2\lambda^2) C^+(\lambda; 0, 1)\, d\lambda`.

    No closed form exists (Carvalho et al. 2010 give the bounds
    :math:`\frac{K}{2}\log(1 + 4/w^2) < p(w) < K \log(1 + 2/w^2)`, :math:`K = (2\pi^3)^{-1/2}`, for
    :math:`\tau = 1`); this integrates over :math:`\log\lambda` numerically, for
    :math:`10^{-6} \le |w|/\tau \le 10^6`. The density is infinite at ``w = 0``.

    Args:
        w: weights (any shape); ``inf`` where ``w`` is zero.
        tau: the global scale :math:`\tau`.

    Returns:
        ``float64`` tensor shaped like ``w``.
    """
    tau = _positive("tau", tau)
    # Density of log z for z = tau * lambda: C+(z; 0, tau) * z.
    density = _scale_mixture_pdf(w, lambda log_z: half_cauchy_pdf(log_z.exp(), tau) * log_z.exp(),
                                 math.log(tau) - _HORSESHOE_LOG_HALF_WIDTH, math.log(tau) + _HORSESHOE_LOG_HALF_WIDTH)
    # The integral over a window of scales stays finite at 0; the density does not.
    return density.masked_fill(torch.as_tensor(w, dtype=torch.float64) == 0, math.inf)


def log_uniform_mixture_pdf(w, log_scale_range=(-10.0, 2.0)) -> Tensor:
    r"""Marginal density of the normal-Jeffreys prior truncated to :math:`\log z \in [a, b]`.

    .. math::
        p(w) = \frac{1}{b - a}\int_a^b N(w; 0, e^{2s})\, ds

    Between the bounds, :math:`p(w) \approx 1/(2(b-a)|w|)`: the improper
    :math:`1/|w|` of the untruncated prior, normalised.

    Args:
        w: weights (any shape).
        log_scale_range: ``(a, b)``, natural logarithms of the smallest and largest scale.

    Returns:
        ``float64`` tensor shaped like ``w``.
    """
    low, high = _check_log_range(log_scale_range)
    # The grid spans exactly [a, b], where the density of log z is the constant 1 / (b - a).
    return _scale_mixture_pdf(w, lambda log_z: torch.full_like(log_z, 1.0 / (high - low)), low, high)


def sample_half_cauchy_decomposed(num_samples: int, scale: float = 1.0) -> Tensor:
    r"""Half-Cauchy draws made as :math:`\sqrt{u v}`, :math:`u \sim \mathrm{Gamma}(1/2, \text{scale } k^2)`,
    :math:`v \sim \mathrm{InvGamma}(1/2, 1)`.

    The factors are drawn with ``torch.distributions`` (``Gamma(0.5, rate=1/k^2)`` and
    ``InverseGamma(0.5, rate=1)``, whose density is :math:`x^{-3/2} e^{-1/x} / \Gamma(1/2)`), the
    parameterisation of the horseshoe layers' KL terms. Uses torch's global random generator:
    seed it with ``torch.manual_seed``.

    Args:
        num_samples: number of draws.
        scale: the half-Cauchy scale :math:`k`.

    Returns:
        ``float64`` tensor of shape ``(num_samples,)``.
    """
    num_samples = _count("num_samples", num_samples)
    scale = _positive("scale", scale)
    half = torch.tensor(0.5, dtype=torch.float64)
    u = torch.distributions.Gamma(half, rate=1.0 / torch.tensor(scale, dtype=torch.float64) ** 2).sample((num_samples,))
    v = torch.distributions.InverseGamma(half, torch.tensor(1.0, dtype=torch.float64)).sample((num_samples,))
    return torch.sqrt(u * v)


def sample_scale_mixture(prior: str, num_groups: int, group_size: int = 1, *, tau: float = 1.0,
                         log_scale_range=(-10.0, 2.0), generator: torch.Generator | None = None) -> Tensor:
    r"""Weights drawn from a scale-mixture prior, one scale per group: :math:`w_{ig} = z_g \tilde w_{ig}`.

    Each column is a group (as the outgoing weights of one input unit): its ``group_size`` weights
    share one scale :math:`z_g`, so a small scale makes the whole column small. With
    ``group_size=1`` every weight has its own scale.

    Args:
        prior: ``"horseshoe"`` (:math:`z = \tau\lambda`, :math:`\lambda \sim C^+(0, 1)`) or
            ``"log_uniform"`` (normal-Jeffreys, :math:`\log z \sim U(a, b)`).
        num_groups: number of groups (columns).
        group_size: weights per group (rows).
        tau: the horseshoe's global scale.
        log_scale_range: ``(a, b)`` of the truncated normal-Jeffreys prior.
        generator: optional ``torch.Generator``.

    Returns:
        ``float64`` tensor of shape ``(group_size, num_groups)``.

    Example:
        >>> w = sample_scale_mixture("horseshoe", num_groups=50, group_size=20)
        >>> w.shape
        torch.Size([20, 50])
    """
    num_groups, group_size = _count("num_groups", num_groups), _count("group_size", group_size)
    if prior == "horseshoe":
        tau = _positive("tau", tau)
        # Inverse CDF of C+(0, 1): lambda = tan(pi U / 2).
        uniform = torch.rand(num_groups, dtype=torch.float64, generator=generator)
        scales = tau * torch.tan(0.5 * math.pi * uniform)
    elif prior == "log_uniform":
        low, high = _check_log_range(log_scale_range)
        scales = torch.exp(low + (high - low) * torch.rand(num_groups, dtype=torch.float64, generator=generator))
    else:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    return scales.reshape(1, -1) * torch.randn(group_size, num_groups, dtype=torch.float64, generator=generator)
