"""KL divergences used by the Bayesian layers and by the priors chapter of the book.

Every function works element-wise on tensors and returns nats. Each one states the
equation it implements, so the book and the tests can check it independently.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "NJ_K1",
    "NJ_K2",
    "NJ_K3",
    "nj_kl_approx",
    "nj_kl_exact",
    "gaussian_kl_std_normal",
    "gaussian_kl_std_normal_sum",
    "lognormal_gamma_kl",
    "lognormal_inverse_gamma_kl",
]

# Constants of the sigmoid fit of Molchanov et al. (2017), Eq. (14).
NJ_K1, NJ_K2, NJ_K3 = 0.63576, 1.87320, 1.48695

# Euler-Mascheroni constant; (gamma + log 2) / 2 is the limit constant of the exact KL.
_EULER_GAMMA = 0.5772156649015329


def nj_kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    r"""Approximate KL(q(z) || p(z)) for the log-uniform (normal-Jeffreys) prior.

    Molchanov et al. (2017), Eq. (14):

    .. math::
        -\mathrm{KL} \approx k_1 \sigma(k_2 + k_3 \log\alpha) - \tfrac12 \log(1 + \alpha^{-1}) - k_1

    ``log(1 + 1/alpha)`` is computed as ``softplus(-log_alpha)`` so it stays finite for any
    ``log_alpha``. The constant is chosen so that the KL tends to 0 as alpha tends to infinity.

    Args:
        log_alpha: tensor of log dropout rates ``log(sigma^2 / mu^2)``.

    Returns:
        Tensor of the same shape, KL in nats (element-wise, not summed).
    """
    neg_kl = NJ_K1 * torch.sigmoid(NJ_K2 + NJ_K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - NJ_K1
    return -neg_kl


def nj_kl_exact(log_alpha, num_points: int = 400_001, half_width: float = 12.0) -> np.ndarray:
    r"""The exact KL of the normal-Jeffreys prior by numerical integration (for plots).

    With :math:`\epsilon \sim N(1, \alpha)` the KL against the improper log-uniform prior is,
    up to a constant (Molchanov et al. 2017, Eq. 13 and App. C):

    .. math::
        \mathrm{KL}(\alpha) = -\tfrac12 \log\alpha + E[\log|\epsilon|] - C,
        \qquad C = -\tfrac12(\gamma + \log 2),

    where :math:`C` makes the KL vanish as :math:`\alpha \to \infty` (there
    :math:`E\log|\epsilon| \to \tfrac12\log\alpha - \tfrac12(\gamma + \log 2)`), the same
    convention as :func:`nj_kl_approx`. The expectation is a midpoint rule over the standard
    normal density; the logarithmic singularity is integrable and the rule converges to about
    1e-4 nats with the default grid. An odd ``num_points`` is raised by one: with an odd count a
    midpoint falls on ``xi = 0``, next to the singularity when alpha is large, and the KL goes wrong
    there (negative by 5e-4 nats at log alpha 100).

    Args:
        log_alpha: scalar or array of log alpha values.
        num_points: grid points of the midpoint rule (an int >= 2).
        half_width: the integral runs over ``xi`` in ``[-half_width, half_width]`` (> 0).

    Returns:
        ``numpy`` array of KL values in nats, shaped like ``log_alpha``.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    if not (isinstance(half_width, (int, float)) and math.isfinite(half_width) and half_width > 0):
        raise ValueError(f"half_width must be a finite number > 0, got {half_width!r}")
    num_points += num_points % 2
    log_alpha = np.asarray(log_alpha, dtype=np.float64)
    edges = np.linspace(-half_width, half_width, num_points + 1)
    xi = 0.5 * (edges[1:] + edges[:-1])
    weights = np.exp(-0.5 * xi**2) / math.sqrt(2 * math.pi) * (edges[1] - edges[0])
    out = np.empty(log_alpha.shape)
    for index, la in np.ndenumerate(log_alpha):
        sigma = math.exp(0.5 * la)
        # E log|1 + sigma xi|, xi ~ N(0, 1); log|.| of a midpoint never hits the singularity exactly.
        expected_log = np.sum(weights * np.log(np.abs(1.0 + sigma * xi) + 1e-300))
        out[index] = -0.5 * la + expected_log + 0.5 * (_EULER_GAMMA + math.log(2.0))
    return out


def gaussian_kl_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""KL(N(mu, sigma^2) || N(0, 1)) element-wise: :math:`\tfrac12(-\log\sigma^2 + \sigma^2 + \mu^2 - 1)`."""
    return 0.5 * (-logvar + logvar.exp() + mu * mu - 1.0)


class _GaussianKLSum(torch.autograd.Function):
    """Fused sum of :func:`gaussian_kl_std_normal` with its gradient written out:
    d/dmu = mu, d/dlog sigma^2 = (sigma^2 - 1) / 2. Over all weights of a layer this is a large share
    of a training step; the fused form makes about half the passes over memory of the autograd one."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        var = logvar.exp()
        ctx.save_for_backward(mu, var)
        flat = mu.reshape(-1)
        return 0.5 * (var.sum() - logvar.sum() + torch.dot(flat, flat) - mu.numel())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        mu, var = ctx.saved_tensors
        half = 0.5 * grad
        # (sigma^2 - 1) g / 2 in one pass over the weights
        return mu * grad, torch.addcmul(-half, var, half)


def gaussian_kl_std_normal_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""``gaussian_kl_std_normal(mu, logvar).sum()`` as one fused operation (same value and gradient);
    ``mu`` and ``logvar`` must have the same shape (no broadcasting)."""
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    return _GaussianKLSum.apply(mu, logvar)


def lognormal_gamma_kl(m: torch.Tensor, v: torch.Tensor, shape: float, scale: float) -> torch.Tensor:
    r"""KL(LogNormal(m, v) || Gamma(shape, scale)), element-wise.

    Louizos et al. (2017), App. (horseshoe KL terms); ``m`` and ``v`` are the mean and variance of
    the logarithm:

    .. math::
        -\tfrac12(\log 2\pi + \log v + 1) + \log\Gamma(a) + a\log b - a m + e^{m + v/2} / b
    """
    return (
        -0.5 * (math.log(2 * math.pi) + torch.log(v) + 1.0)
        + math.lgamma(shape)
        + shape * math.log(scale)
        - shape * m
        + torch.exp(m + 0.5 * v) / scale
    )


def lognormal_inverse_gamma_kl(m: torch.Tensor, v: torch.Tensor, shape: float, scale: float) -> torch.Tensor:
    r"""KL(LogNormal(m, v) || InvGamma(shape, scale)), element-wise.

    The inverse-Gamma density is :math:`b^a / \Gamma(a)\, x^{-a-1} e^{-b/x}`; then

    .. math::
        -\tfrac12(\log 2\pi + \log v + 1) + \log\Gamma(a) - a\log b + a m + b\, e^{-m + v/2}
    """
    return (
        -0.5 * (math.log(2 * math.pi) + torch.log(v) + 1.0)
        + math.lgamma(shape)
        - shape * math.log(scale)
        + shape * m
        + scale * torch.exp(-m + 0.5 * v)
    )
