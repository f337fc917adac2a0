"""KL divergences used by the Bayesian layers and by the priors chapter of the book.

Every function works element-wise on tensors and returns nats. Each one states the
equation it implements, so the book and the tests can check it independently.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "NJ_K1",
    "NJ_K2",
    "NJ_K3",
    "nj_kl_approx",
    "nj_kl_approx_sum",
    "nj_kl_exact",
    "gaussian_kl_std_normal",
    "gaussian_kl_std_normal_sum",
    "lognormal_gamma_kl",
    "lognormal_inverse_gamma_kl",
    "lognormal_gamma_kl_sum",
    "lognormal_inverse_gamma_kl_sum",
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


class _NJKLApproxSum(torch.autograd.Function):
    """Fused sum of :func:`nj_kl_approx` of ``log alpha = clamp(log sigma^2 - log(mu^2 + eps))`` with its
    gradient written out. As PyTorch operations this is about ten autograd nodes of one small pass
    each; a layer's KL is evaluated every step, and for groups of a few hundred the nodes' overhead,
    not the arithmetic, is its cost (the fused form is 3-4x faster for LeNet-300-100's layers)."""

    @staticmethod
    def forward(ctx, mu, logvar, eps, log_alpha_range):
        mu_squared = torch.mul(mu, mu).add_(eps)
        log_alpha = torch.sub(logvar, mu_squared.log())
        clamped = log_alpha if log_alpha_range is None else log_alpha.clamp(*log_alpha_range)
        fit = torch.sigmoid(clamped * NJ_K3 + NJ_K2)
        ctx.save_for_backward(mu, mu_squared, log_alpha, clamped, fit)
        ctx.log_alpha_range = log_alpha_range
        # softplus(-la) = -log sigmoid(la) = -(min(la, 0) + log sigmoid(|la|)), finite for any la:
        # F.softplus goes through log1p, which is not vectorised on CPU (6x slower than sigmoid and
        # log over a layer's weights); the absolute error is under 1e-7 per element.
        log_sigmoid = torch.sigmoid(clamped.abs()).log_().add_(torch.clamp(clamped, max=0.0))
        # sum of k1 - k1 sigmoid(k2 + k3 la) + softplus(-la) / 2 (the negated Eq. 14)
        return NJ_K1 * (clamped.numel() - fit.sum()) - 0.5 * log_sigmoid.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        mu, mu_squared, log_alpha, clamped, fit = ctx.saved_tensors
        # d KL / d la = -k1 k3 s (1 - s) - sigmoid(-la) / 2, with s the fitted sigmoid
        grad_log_alpha = torch.sigmoid(-clamped).mul_(-0.5).sub_(fit * (1 - fit) * (NJ_K1 * NJ_K3)).mul_(grad)
        if ctx.log_alpha_range is not None:
            # torch.clamp passes the gradient on [low, high] (both ends included) and stops it outside
            low, high = ctx.log_alpha_range
            grad_log_alpha.mul_((log_alpha >= low) & (log_alpha <= high))
        # d la / d log sigma^2 = 1, d la / d mu = -2 mu / (mu^2 + eps)
        grad_mu = torch.div(mu, mu_squared).mul_(grad_log_alpha).mul_(-2.0)
        return grad_mu, grad_log_alpha, None, None


def nj_kl_approx_sum(mu: torch.Tensor, logvar: torch.Tensor, eps: float = 1e-8,
                     log_alpha_range: tuple[float, float] | None = None) -> torch.Tensor:
    r"""``nj_kl_approx(log_alpha).sum()`` for ``q = N(mu, exp(logvar))``, as one fused operation.

    :math:`\log\alpha = \log\sigma^2 - \log(\mu^2 + \epsilon)`, clamped to ``log_alpha_range``
    when given (as ``torch.clamp``: no gradient outside it), then Eq. (14) of Molchanov et al. (2017)
    summed; value and gradient equal those of the plain expression, in fewer passes.

    Args:
        mu, logvar: mean and log-variance of each Gaussian, tensors of the same shape.
        eps: added to ``mu^2`` so that a zero mean gives a finite ``log alpha``.
        log_alpha_range: optional ``(low, high)`` clamp of ``log alpha`` (Sparse VD clamps to [-8, 8]).

    Returns:
        A scalar tensor, the KL in nats.

    Example:
        >>> mu, logvar = torch.tensor([1.0, 0.1]), torch.tensor([-9.0, -1.0])
        >>> bool(torch.isclose(nj_kl_approx_sum(mu, logvar), nj_kl_approx(logvar - torch.log(mu**2 + 1e-8)).sum()))
        True
    """
    _check_same_shape(mu, logvar)
    if log_alpha_range is not None and not (len(log_alpha_range) == 2 and log_alpha_range[0] < log_alpha_range[1]):
        raise ValueError(f"log_alpha_range must be None or a pair (low, high) with low < high, got {log_alpha_range!r}")
    return _NJKLApproxSum.apply(mu, logvar, eps, log_alpha_range)


def _check_gamma_parameters(shape, scale) -> None:
    """The (inverse-)Gamma prior's shape ``a`` and scale ``b``: positive finite numbers (NumPy's and
    0-d tensors too)."""
    for name, value in (("shape", shape), ("scale", scale)):
        number = value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise TypeError(f"{name} must be a positive finite number (the prior's), got {value!r}")
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be a positive finite number (the prior's), got {value!r}")


def _check_same_shape(mu: torch.Tensor, logvar: torch.Tensor, mean_name: str = "mu") -> None:
    if mu.shape != logvar.shape:
        raise ValueError(f"{mean_name} and logvar must have the same shape, got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")


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
    if isinstance(half_width, bool) or not (isinstance(half_width, (int, float)) and math.isfinite(half_width)
                                            and half_width > 0):
        raise ValueError(f"half_width must be a finite number > 0, got {half_width!r}")
    num_points += num_points % 2
    log_alpha = np.asarray(log_alpha, dtype=np.float64)
    edges = np.linspace(-half_width, half_width, num_points + 1)
    xi = 0.5 * (edges[1:] + edges[:-1])
    weights = np.exp(-0.5 * xi**2) / math.sqrt(2 * math.pi) * (edges[1] - edges[0])
    out = np.empty(log_alpha.shape)
    for index, la in np.ndenumerate(log_alpha):
        # E log|1 + sigma xi|, xi ~ N(0, 1); log|.| of a midpoint never hits the singularity exactly.
        # For sigma > 1 as log sigma + E log|1/sigma + xi|: sigma itself overflows from log alpha ~ 1420.
        if la <= 0:
            expected_log = np.sum(weights * np.log(np.abs(1.0 + math.exp(0.5 * la) * xi) + 1e-300))
        else:
            expected_log = 0.5 * la + np.sum(weights * np.log(np.abs(math.exp(-0.5 * la) + xi) + 1e-300))
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
        # (sigma^2 - 1) g / 2. Not addcmul(-g/2, var, g/2): with two 0-dim operands PyTorch's CPU
        # kernel leaves its vectorised loop, 4x slower over a layer's weights than these two passes.
        return mu * grad, torch.sub(var, 1.0).mul_(0.5 * grad)


def gaussian_kl_std_normal_sum(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""``gaussian_kl_std_normal(mu, logvar).sum()`` as one fused operation (same value and gradient);
    ``mu`` and ``logvar`` must have the same shape (no broadcasting)."""
    _check_same_shape(mu, logvar)
    return _GaussianKLSum.apply(mu, logvar)


def lognormal_gamma_kl(m: torch.Tensor, v: torch.Tensor, shape: float, scale: float) -> torch.Tensor:
    r"""KL(LogNormal(m, v) || Gamma(shape, scale)), element-wise.

    Louizos et al. (2017), App. (horseshoe KL terms); ``m`` and ``v`` are the mean and variance of
    the logarithm:

    .. math::
        -\tfrac12(\log 2\pi + \log v + 1) + \log\Gamma(a) + a\log b - a m + e^{m + v/2} / b
    """
    _check_gamma_parameters(shape, scale)
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
    _check_gamma_parameters(shape, scale)
    return (
        -0.5 * (math.log(2 * math.pi) + torch.log(v) + 1.0)
        + math.lgamma(shape)
        - shape * math.log(scale)
        + shape * m
        + scale * torch.exp(-m + 0.5 * v)
    )


class _LogNormalKLSum(torch.autograd.Function):
    r"""Fused sum of :func:`lognormal_gamma_kl` (``sign=1``) or :func:`lognormal_inverse_gamma_kl`
    (``sign=-1``) from the log-variance, with the gradient written out. Both are one formula in
    :math:`d = \pm(m - \log b)`:

    .. math::
        \mathrm{KL} = -\tfrac12(\log 2\pi + \log v + 1) + \log\Gamma(a) - a d + e^{d + v/2},\qquad
        \frac{\partial\,\mathrm{KL}}{\partial m} = \pm(e^{d + v/2} - a),\quad
        \frac{\partial\,\mathrm{KL}}{\partial \log v} = \tfrac12(v e^{d + v/2} - 1).
    """

    @staticmethod
    def forward(ctx, m, logvar, shape, scale, sign):
        var = logvar.exp()
        d = torch.sub(m, math.log(scale)).mul_(sign)
        tail = torch.add(d, var, alpha=0.5).exp_()
        ctx.save_for_backward(var, tail)
        ctx.shape, ctx.sign = shape, sign
        constant = math.lgamma(shape) - 0.5 * (math.log(2 * math.pi) + 1.0)
        return constant * m.numel() - 0.5 * logvar.sum() - shape * d.sum() + tail.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        var, tail = ctx.saved_tensors
        grad_m = torch.sub(tail, ctx.shape).mul_(ctx.sign * grad)
        grad_logvar = torch.mul(var, tail).sub_(1.0).mul_(0.5 * grad)
        return grad_m, grad_logvar, None, None, None


def lognormal_gamma_kl_sum(m: torch.Tensor, logvar: torch.Tensor, shape: float, scale: float) -> torch.Tensor:
    """``lognormal_gamma_kl(m, logvar.exp(), shape, scale).sum()`` as one fused operation (same value and
    gradient, a fraction of the autograd nodes); ``m`` and ``logvar`` have the same shape.

    Example:
        >>> m, logvar = torch.zeros(3), torch.full((3,), -9.0)
        >>> bool(torch.isclose(lognormal_gamma_kl_sum(m, logvar, 0.5, 1.0), lognormal_gamma_kl(m, logvar.exp(), 0.5, 1.0).sum()))
        True
    """
    _check_gamma_parameters(shape, scale)
    _check_same_shape(m, logvar, "m")
    return _LogNormalKLSum.apply(m, logvar, shape, scale, 1.0)


def lognormal_inverse_gamma_kl_sum(m: torch.Tensor, logvar: torch.Tensor, shape: float, scale: float) -> torch.Tensor:
    """``lognormal_inverse_gamma_kl(m, logvar.exp(), shape, scale).sum()`` as one fused operation (see
    :func:`lognormal_gamma_kl_sum`)."""
    _check_gamma_parameters(shape, scale)
    _check_same_shape(m, logvar, "m")
    return _LogNormalKLSum.apply(m, logvar, shape, scale, -1.0)
