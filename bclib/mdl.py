r"""Description lengths in bits: the two-part code, bits-back coding and the negative ELBO.

The computations behind the chapter "MDL and variational inference" of the book. A model with
one weight :math:`w` and a data set :math:`D` is sent in two parts, the weight and then the data
given the weight (Rissanen 1978; Hinton & van Camp 1993; Honkela & Valpola 2004):

* **Two-part code.** Send :math:`\hat w` rounded to a grid of width :math:`\delta` with a code
  built from the prior, :math:`-\log_2 P(\text{bin})`, then the data with
  :math:`-\log_2 p(D \mid \hat w)`. A fine grid costs many weight bits, a coarse one spoils the
  data code: :func:`two_part_code_bits`.
* **Bits-back coding.** Draw the weight from a posterior :math:`q` instead (quantised to a
  grid), send it with the prior code, and let the receiver, who can rebuild :math:`q` once it has
  the data, recover the random bits used to draw it. The net cost of the weight is
  :math:`E_Q[\log_2 Q - \log_2 P] = \mathrm{KL}(Q \| P) / \ln 2`: :func:`bits_back_cost`.
* **The negative ELBO** is then the whole message: :math:`E_q[-\log_2 p(D\mid w)] +
  \mathrm{KL}(q\|p)/\ln 2`, never shorter than the Bayesian code :math:`-\log_2 p(D)`:
  :func:`neg_elbo_bits`, :func:`grid_posterior`, :func:`fit_gaussian_posterior`.

All lengths are in bits; inputs are Python floats or ``float64`` tensors. The prior of the weight
is :math:`N(0, \sigma_p^2)` throughout.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .kl import gaussian_kl_std_normal
from .layers.base import check_positive_float, check_positive_int

__all__ = [
    "LN2",
    "BitsBackCost",
    "GridPosterior",
    "bits_back_cost",
    "bits_back_samples",
    "fit_gaussian_posterior",
    "gaussian_kl_bits",
    "grid_posterior",
    "logistic_log_likelihood",
    "neg_elbo_bits",
    "two_part_code_bits",
]

LN2 = math.log(2.0)

# A log-likelihood maps a 1-d tensor of weight values to log p(D | w) (nats), one per value.
LogLikelihood = Callable[[Tensor], Tensor]


class BitsBackCost(NamedTuple):
    """Expected lengths (bits) of sending one quantised weight with bits-back coding.

    Attributes:
        message_bits: :math:`E_Q[-\\log_2 P(w_k)]`, the prior code of the drawn weight.
        refund_bits: :math:`E_Q[-\\log_2 Q(w_k)] = H(Q)`, the random bits the receiver gets back.
        net_bits: ``message_bits - refund_bits`` :math:`= \\mathrm{KL}(Q \\| P)/\\ln 2`.
    """

    message_bits: float
    refund_bits: float
    net_bits: float


class GridPosterior(NamedTuple):
    """The exact posterior of one weight on a grid (see :func:`grid_posterior`).

    Attributes:
        weights: grid points (midpoints), ``float64``.
        density: posterior density at the grid points (integrates to 1 over the grid).
        log_evidence: :math:`\\log p(D)` in nats.
        mean, std: posterior mean and standard deviation.
    """

    weights: Tensor
    density: Tensor
    log_evidence: float
    mean: float
    std: float


# ----------------------------------------------------------------------------- checks


def _as_number(value):
    """A number given as a 0-d tensor or a NumPy scalar, as a Python float (anything else unchanged)."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        return value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int)):
        return float(value)
    return value


# Argument checks shared with the layers: TypeError for a non-number, ValueError naming the argument.
def _positive(name: str, value) -> float:
    return check_positive_float(name, _as_number(value), allow_none=False)


_count = check_positive_int
_MIN_NUM_STD = 8.0


def _check_finite(name: str, value) -> float:
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


# ----------------------------------------------------------------------------- Gaussian masses
def _log_normal_mass(lower: Tensor, upper: Tensor) -> Tensor:
    r""":math:`\log(\Phi(b) - \Phi(a))` for standardised bin edges ``a < b``, accurate in both tails.

    For bins right of zero the mass is computed as :math:`\Phi(-a) - \Phi(-b)`, so the subtraction
    always happens where :math:`\Phi` is small and loses no digits.
    """
    flip = lower > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b))


def _bin_log_masses(edges: Tensor, mean: float, std: float) -> Tensor:
    """Log probability of each bin ``[edges[k], edges[k+1])`` under ``N(mean, std^2)``."""
    z = (edges - mean) / std
    return _log_normal_mass(z[:-1], z[1:])


def gaussian_kl_bits(q_mean, q_std, prior_std: float = 1.0) -> Tensor:
    r"""KL(N(q_mean, q_std^2) || N(0, prior_std^2)) in bits, element-wise.

    .. math::
        \frac{1}{\ln 2}\Big(\log\frac{\sigma_p}{\sigma_q} + \frac{\sigma_q^2 + \mu_q^2}{2\sigma_p^2} - \frac12\Big)

    computed by rescaling to a standard-normal prior and calling
    :func:`bclib.kl.gaussian_kl_std_normal` (the KL is invariant to the common rescaling).
    """
    prior_std = _positive("prior_std", prior_std)
    q_mean = torch.as_tensor(q_mean, dtype=torch.float64) / prior_std
    q_std = torch.as_tensor(q_std, dtype=torch.float64) / prior_std
    if not bool((torch.isfinite(q_std) & (q_std > 0)).all()):
        raise ValueError("q_std must be positive and finite")
    return gaussian_kl_std_normal(q_mean, 2.0 * torch.log(q_std)) / LN2


# ----------------------------------------------------------------------------- bits-back coding
def bits_back_cost(q_mean: float, q_std: float, bin_width: float, prior_std: float = 1.0,
                   num_std: float = 12.0) -> BitsBackCost:
    r"""Expected bits-back code length of one weight drawn from ``N(q_mean, q_std^2)``.

    The weight line is cut into bins :math:`[k\delta - \delta/2, k\delta + \delta/2)`. The sender
    draws bin :math:`k` with probability :math:`Q_k` (the posterior mass of the bin) and encodes
    it with the prior's bin masses :math:`P_k`; the receiver recovers the :math:`-\log_2 Q_k`
    random bits of the draw. The sums run exactly over every bin within ``num_std`` posterior
    standard deviations of the mean (the rest holds less than 1e-30 of the mass at the default 12,
    less than 2e-15 at the smallest allowed, 8):

    .. math::
        \text{message} = -\sum_k Q_k \log_2 P_k,\qquad
        \text{refund} = -\sum_k Q_k \log_2 Q_k,\qquad
        \text{net} = \sum_k Q_k \log_2 \frac{Q_k}{P_k}.

    The net length is the KL divergence of the *quantised* distributions in bits; it grows to
    :math:`\mathrm{KL}(q\|p)/\ln 2` as ``bin_width`` shrinks, while the message and the refund
    each grow like :math:`\log_2(1/\delta)`.

    Args:
        q_mean: posterior mean of the weight.
        q_std: posterior standard deviation (> 0).
        bin_width: quantisation step :math:`\delta` (> 0).
        prior_std: standard deviation of the ``N(0, prior_std^2)`` prior.
        num_std: half-width of the summed range, in posterior standard deviations (>= 8).

    Returns:
        :class:`BitsBackCost` of Python floats.

    Example:
        >>> cost = bits_back_cost(0.5, 0.1, bin_width=0.001)
        >>> round(cost.net_bits, 3), round(float(gaussian_kl_bits(0.5, 0.1)), 3)
        (2.788, 2.788)
    """
    q_mean, prior_std = _check_finite("q_mean", q_mean), _positive("prior_std", prior_std)
    q_std, bin_width = _positive("q_std", q_std), _positive("bin_width", bin_width)
    if _positive("num_std", num_std) < _MIN_NUM_STD:  # fewer bins would leave posterior mass out of the sums
        raise ValueError(f"num_std must be at least {_MIN_NUM_STD} (posterior standard deviations), got {num_std}")
    first = math.floor((q_mean - num_std * q_std) / bin_width + 0.5)
    last = math.floor((q_mean + num_std * q_std) / bin_width + 0.5)
    if last - first > 50_000_000:
        raise ValueError(f"bin_width={bin_width} is too small for q_std={q_std}: over 5e7 bins")
    centres = torch.arange(first, last + 1, dtype=torch.float64) * bin_width
    edges = torch.cat([centres - 0.5 * bin_width, centres[-1:] + 0.5 * bin_width])
    log_q = _bin_log_masses(edges, q_mean, q_std)
    log_p = _bin_log_masses(edges, 0.0, prior_std)
    q = log_q.exp()
    message = float(-(q * log_p).sum() / LN2)
    refund = float(-(q * log_q).sum() / LN2)
    return BitsBackCost(message, refund, message - refund)


def bits_back_samples(q_mean: float, q_std: float, bin_width: float, num_samples: int,
                      prior_std: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    r"""Net bits-back code lengths of ``num_samples`` simulated weight transmissions.

    Each transmission draws :math:`w \sim N(\mu_q, \sigma_q^2)`, rounds it to the bin
    :math:`k = \mathrm{round}(w/\delta)`, and costs :math:`-\log_2 P_k + \log_2 Q_k` bits: the
    prior code of the bin minus the bits given back. Their mean is a Monte Carlo estimate of
    ``bits_back_cost(...).net_bits``, independent of the exact sum.

    Args:
        q_mean, q_std, bin_width, prior_std: as :func:`bits_back_cost`.
        num_samples: number of simulated transmissions.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``float64`` tensor of shape ``(num_samples,)``, bits per transmission.
    """
    q_mean, prior_std = _check_finite("q_mean", q_mean), _positive("prior_std", prior_std)
    q_std, bin_width = _positive("q_std", q_std), _positive("bin_width", bin_width)
    num_samples = _count("num_samples", num_samples)
    w = q_mean + q_std * torch.randn(num_samples, dtype=torch.float64, generator=generator)
    centres = torch.round(w / bin_width) * bin_width
    lower, upper = centres - 0.5 * bin_width, centres + 0.5 * bin_width
    log_q = _log_normal_mass((lower - q_mean) / q_std, (upper - q_mean) / q_std)
    log_p = _log_normal_mass(lower / prior_std, upper / prior_std)
    return (log_q - log_p) / LN2


# ----------------------------------------------------------------------------- a one-weight model
def logistic_log_likelihood(weights: Tensor, inputs: Tensor, labels: Tensor) -> Tensor:
    r"""Log-likelihood (nats) of binary labels under :math:`p(y=1 \mid x, w) = \sigma(w x)`.

    .. math::
        \log p(D \mid w) = \sum_n \big[y_n \log\sigma(w x_n) + (1 - y_n)\log(1 - \sigma(w x_n))\big]

    Args:
        weights: 1-d tensor of weight values to evaluate.
        inputs: 1-d tensor of inputs :math:`x_n`.
        labels: 1-d tensor of labels in {0, 1}, shaped like ``inputs``.

    Returns:
        Tensor shaped like ``weights``: one log-likelihood of the whole data set per weight.
    """
    if inputs.dim() != 1 or labels.shape != inputs.shape:
        raise ValueError(f"inputs and labels must be 1-d of the same length, got {tuple(inputs.shape)} "
                         f"and {tuple(labels.shape)}")
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError("labels must be 0 or 1")
    logits = weights.reshape(-1, 1) * inputs.reshape(1, -1)
    targets = labels.to(logits.dtype).reshape(1, -1).expand_as(logits)
    per_example = -F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_example.sum(1).reshape(weights.shape)


@functools.lru_cache(maxsize=8)
def _standard_normal_quadrature(num_nodes: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for E[f(x)], x ~ N(0, 1) (the weights sum to 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)  # weight function exp(-x^2/2)
    return (torch.as_tensor(nodes, dtype=torch.float64),
            torch.as_tensor(weights / math.sqrt(2.0 * math.pi), dtype=torch.float64))


def neg_elbo_bits(log_likelihood: LogLikelihood, q_mean, q_std, prior_std: float = 1.0,
                  num_nodes: int = 64) -> tuple[Tensor, Tensor]:
    r"""The negative ELBO of a Gaussian posterior ``N(q_mean, q_std^2)`` as a code length.

    .. math::
        -\mathrm{ELBO}(q) = \underbrace{E_q[-\log_2 p(D \mid w)]}_{\text{data bits}}
        + \underbrace{\mathrm{KL}(q \| p)/\ln 2}_{\text{model bits}}
        = -\log_2 p(D) + \mathrm{KL}(q \| p(w \mid D))/\ln 2.

    The expectation uses Gauss-Hermite quadrature with ``num_nodes`` nodes (exact for
    polynomials up to degree ``2 num_nodes - 1``); it is differentiable in ``q_mean`` and
    ``q_std`` when ``log_likelihood`` is.

    Args:
        log_likelihood: maps a 1-d tensor of weights to their log-likelihoods (nats).
        q_mean, q_std: mean and standard deviation of ``q`` (scalars; tensors keep gradients).
        prior_std: standard deviation of the prior ``N(0, prior_std^2)``.
        num_nodes: quadrature nodes.

    Returns:
        ``(data_bits, model_bits)``, two scalar tensors.
    """
    nodes, weights = _standard_normal_quadrature(_count("num_nodes", num_nodes))
    q_mean = torch.as_tensor(q_mean, dtype=torch.float64)
    q_std = torch.as_tensor(q_std, dtype=torch.float64)
    data_bits = -(weights * log_likelihood(q_mean + q_std * nodes)).sum() / LN2
    return data_bits, gaussian_kl_bits(q_mean, q_std, prior_std)


def grid_posterior(log_likelihood: LogLikelihood, prior_std: float = 1.0, half_width: float = 8.0,
                   num_points: int = 20_001) -> GridPosterior:
    r"""The exact posterior and evidence of one weight by a midpoint rule.

    .. math::
        p(D) = \int p(D\mid w)\, N(w; 0, \sigma_p^2)\, dw,\qquad
        p(w \mid D) = p(D \mid w) N(w; 0, \sigma_p^2) / p(D),

    over :math:`w \in [-h\sigma_p, h\sigma_p]` with ``h = half_width``, in log space
    (log-sum-exp) so that large data sets do not underflow. :math:`-\log_2 p(D)` is the length of
    the Bayesian mixture code of the data, the shortest code the prior allows.

    Args:
        log_likelihood: maps a 1-d tensor of weights to their log-likelihoods (nats).
        prior_std: standard deviation of the prior.
        half_width: the grid spans ``half_width`` prior standard deviations each side of 0.
        num_points: grid points.

    Returns:
        :class:`GridPosterior`.
    """
    prior_std, half_width = _positive("prior_std", prior_std), _positive("half_width", half_width)
    num_points = _count("num_points", num_points)
    edges = torch.linspace(-half_width * prior_std, half_width * prior_std, num_points + 1, dtype=torch.float64)
    w = 0.5 * (edges[1:] + edges[:-1])
    step = float(edges[1] - edges[0])
    log_prior = -0.5 * (w / prior_std) ** 2 - math.log(prior_std * math.sqrt(2.0 * math.pi))
    with torch.no_grad():
        log_joint = log_likelihood(w) + log_prior
    log_evidence = float(torch.logsumexp(log_joint, 0) + math.log(step))
    density = torch.exp(log_joint - log_evidence)
    mean = float((w * density).sum() * step)
    std = math.sqrt(float(((w - mean) ** 2 * density).sum() * step))
    return GridPosterior(w, density, log_evidence, mean, std)


def fit_gaussian_posterior(log_likelihood: LogLikelihood, prior_std: float = 1.0, max_iter: int = 200,
                           init_mean: float = 0.0, init_std: float = 0.1,
                           num_nodes: int = 64) -> tuple[float, float]:
    r"""Variational inference for one weight: the Gaussian ``q`` with the shortest :func:`neg_elbo_bits`.

    Minimises data bits + model bits over :math:`(\mu_q, \log\sigma_q)`, the objective the
    Bayesian layers minimise for millions of weights. With two parameters a quasi-Newton method
    (L-BFGS with a strong-Wolfe line search) converges in a few dozen evaluations.

    Args:
        log_likelihood: differentiable map from a 1-d tensor of weights to log-likelihoods (nats).
        prior_std: standard deviation of the prior.
        max_iter: most L-BFGS iterations.
        init_mean, init_std: the starting ``q``.
        num_nodes: quadrature nodes of :func:`neg_elbo_bits`.

    Returns:
        ``(q_mean, q_std)`` as floats.
    """
    max_iter = _count("max_iter", max_iter)
    mean = torch.tensor(_check_finite("init_mean", init_mean), dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(_positive("init_std", init_std)), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([mean, log_std], max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        data_bits, model_bits = neg_elbo_bits(log_likelihood, mean, log_std.exp(), prior_std, num_nodes)
        total = data_bits + model_bits
        total.backward()
        return total

    optimiser.step(closure)
    return float(mean.detach()), float(log_std.detach().exp())


# ----------------------------------------------------------------------------- two-part code
def two_part_code_bits(log_likelihood: LogLikelihood, weight: float, bin_width: float,
                       prior_std: float = 1.0, num_offsets: int = 64) -> tuple[float, float]:
    r"""Expected length of the two-part code: a rounded weight, then the data given it.

    The weight is sent as the bin of a grid of width :math:`\delta`, at the cost
    :math:`-\log_2 P(\text{bin})` under the prior; the receiver uses the bin's centre
    :math:`\hat w`, so the data cost :math:`-\log_2 p(D \mid \hat w)`. Where the grid falls
    relative to ``weight`` is arbitrary; the lengths are averaged over ``num_offsets`` evenly
    spaced grid shifts (the rounding error :math:`\hat w - w` uniform on
    :math:`[-\delta/2, \delta/2]`).

    Args:
        log_likelihood: maps a 1-d tensor of weights to their log-likelihoods (nats).
        weight: the weight to send (usually the maximum-likelihood or MAP estimate).
        bin_width: the grid step :math:`\delta`.
        prior_std: standard deviation of the prior.
        num_offsets: grid shifts averaged over.

    Returns:
        ``(weight_bits, data_bits)`` as floats.
    """
    weight, bin_width = _check_finite("weight", weight), _positive("bin_width", bin_width)
    prior_std = _positive("prior_std", prior_std)
    num_offsets = _count("num_offsets", num_offsets)
    offsets = (torch.arange(num_offsets, dtype=torch.float64) + 0.5) / num_offsets - 0.5
    centres = weight + bin_width * offsets
    log_p = _log_normal_mass((centres - 0.5 * bin_width) / prior_std, (centres + 0.5 * bin_width) / prior_std)
    with torch.no_grad():
        data_bits = -log_likelihood(centres) / LN2
    return float(-log_p.mean() / LN2), float(data_bits.mean())
