"""The KL terms of :mod:`bclib.kl` against independent computations: the formulas evaluated here,
an exact series for the normal-Jeffreys KL, Monte Carlo estimates, and samples of a half-Cauchy.

Monte Carlo tolerances are 5 standard errors of the estimate (estimated from the same samples).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bclib import kl as bkl
from bclib import priors

EULER_GAMMA = 0.5772156649015329
MC_SAMPLES = 400_000
MC_SIGMAS = 5.0


def mc_mean(samples: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error."""
    return samples.mean().item(), (samples.std() / math.sqrt(samples.numel())).item()


# ----------------------------------------------------------------------------- normal-Jeffreys
def exact_nj_kl_series(log_alpha: float) -> float:
    r"""The exact KL of the normal-Jeffreys prior from a series, no integration.

    KL = -0.5 log alpha + E log|eps| + (gamma + log 2) / 2 with eps ~ N(1, alpha). Writing
    eps^2 = alpha * X with X non-central chi-square (1 dof, non-centrality lambda = 1/alpha), a
    Poisson(lambda/2) mixture of central chi-squares with 1 + 2j dof, and E log chi^2_nu = log 2 + psi(nu/2):

        E log|eps| = 0.5 (log alpha + log 2 + sum_j Pois(j; lambda/2) psi(1/2 + j)).
    """
    log_alpha = float(log_alpha)
    half_lambda = 0.5 * math.exp(-log_alpha)
    j = torch.arange(int(half_lambda + 12 * math.sqrt(half_lambda) + 60), dtype=torch.float64)
    log_pmf = -half_lambda + j * math.log(half_lambda) - torch.lgamma(j + 1)
    expected_digamma = (log_pmf.exp() * torch.special.digamma(j + 0.5)).sum().item()
    expected_log_abs = 0.5 * (log_alpha + math.log(2.0) + expected_digamma)
    return -0.5 * log_alpha + expected_log_abs + 0.5 * (EULER_GAMMA + math.log(2.0))


def test_nj_kl_approx_matches_the_formula():
    log_alpha = torch.linspace(-12.0, 12.0, 97, dtype=torch.float64)
    expected = []
    for la in log_alpha.tolist():
        # -KL ~= k1 sigmoid(k2 + k3 la) - 0.5 log(1 + 1/alpha) - k1, in plain floats.
        sigmoid = 1.0 / (1.0 + math.exp(-(1.87320 + 1.48695 * la)))
        neg_kl = 0.63576 * sigmoid - 0.5 * math.log(1.0 + math.exp(-la)) - 0.63576
        expected.append(-neg_kl)
    torch.testing.assert_close(bkl.nj_kl_approx(log_alpha), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "log_alpha, kl, tolerance",
    # The values quoted in the method notes, to the digits quoted (half a unit of the last digit).
    [(-9.0, 5.14, 0.005), (-3.0, 2.12, 0.005), (0.0, 0.43, 0.005), (3.0, 0.025, 0.0005)],
)
def test_nj_kl_approx_quoted_values(log_alpha, kl, tolerance):
    assert bkl.nj_kl_approx(torch.tensor(log_alpha)).item() == pytest.approx(kl, abs=tolerance)


def test_nj_kl_approx_is_finite_positive_and_decreasing_everywhere():
    log_alpha = torch.linspace(-200.0, 200.0, 4001, requires_grad=True)
    kl = bkl.nj_kl_approx(log_alpha)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(log_alpha.grad).all()
    assert (kl >= 0).all()
    assert (kl[1:] <= kl[:-1]).all(), "the KL must fall as the dropout rate grows"
    # Far left the KL grows like -0.5 log alpha (the log(1 + 1/alpha) term).
    assert kl[0].item() == pytest.approx(100.0 + 0.63576, rel=1e-5)


@pytest.mark.parametrize("log_alpha", [-3.0, 0.0, 2.0])
def test_exact_series_agrees_with_monte_carlo(log_alpha):
    """Validates the series used below as the "true KL": E log|1 + sigma xi| by Monte Carlo."""
    sigma = math.exp(0.5 * log_alpha)
    xi = torch.randn(MC_SAMPLES, dtype=torch.float64)
    mean, stderr = mc_mean(torch.log(torch.abs(1.0 + sigma * xi)))
    kl_mc = -0.5 * log_alpha + mean + 0.5 * (EULER_GAMMA + math.log(2.0))
    assert abs(exact_nj_kl_series(log_alpha) - kl_mc) < MC_SIGMAS * stderr


def test_nj_kl_approx_is_within_its_fit_error_of_the_true_kl():
    # Molchanov et al. report the fit to be accurate to ~0.01 nats; observed max ~0.0085 at log alpha ~ -4.
    grid = np.arange(-10.0, 10.01, 0.25)
    exact = np.array([exact_nj_kl_series(la) for la in grid])
    approx = bkl.nj_kl_approx(torch.tensor(grid)).numpy()
    assert np.max(np.abs(approx - exact)) < 0.01
    # The gap is real, not zero: the approximation is not the exact curve.
    assert np.max(np.abs(approx - exact)) > 1e-3


def test_nj_kl_exact_matches_the_series():
    log_alpha = np.array([[-9.0, -3.0, 0.0], [1.0, 3.0, 6.0]])
    got = bkl.nj_kl_exact(log_alpha)
    assert got.shape == log_alpha.shape
    expected = np.array([exact_nj_kl_series(la) for la in log_alpha.ravel()]).reshape(log_alpha.shape)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # Large alpha, where an odd grid put a midpoint on the singularity and the KL went negative.
    large = np.array([30.0, 50.0, 100.0])
    for num_points in (400_000, 400_001):
        got = bkl.nj_kl_exact(large, num_points=num_points)
        assert (got >= 0).all()
        np.testing.assert_allclose(got, [exact_nj_kl_series(la) for la in large], atol=1e-4, rtol=0)
    # Beyond where sigma = e^(log alpha / 2) overflows a float: the KL's limit there is 0 (its convention).
    np.testing.assert_allclose(bkl.nj_kl_exact([1500.0, 5000.0]), [0.0, 0.0], atol=1e-4, rtol=0)
    for bad, message in (({"num_points": 0}, "num_points must be an int >= 2"),
                         ({"half_width": -12.0}, "half_width must be a finite number > 0"),
                         ({"half_width": 0.0}, "half_width must be a finite number > 0"),
                         ({"half_width": True}, "half_width must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            bkl.nj_kl_exact(0.0, **bad)


# ----------------------------------------------------------------------------- Gaussian and horseshoe terms
def test_gaussian_kl_against_monte_carlo(reference):
    mu, logvar = torch.tensor([0.3, -1.2, 0.0], dtype=torch.float64), torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)
    closed = bkl.gaussian_kl_std_normal(mu, logvar)
    torch.testing.assert_close(closed, reference.gaussian_kl(mu, logvar.exp()))
    std = torch.exp(0.5 * logvar)
    x = mu + std * torch.randn(MC_SAMPLES, 3, dtype=torch.float64)
    # log N(x; mu, s^2) - log N(x; 0, 1); the 2 pi terms cancel.
    log_ratio = -torch.log(std) - 0.5 * ((x - mu) / std) ** 2 + 0.5 * x**2
    for k in range(3):
        mean, stderr = mc_mean(log_ratio[:, k])
        assert abs(closed[k].item() - mean) <= MC_SIGMAS * stderr
    assert closed[2].item() == 0.0  # KL of a distribution with itself


def lognormal_samples(m: float, v: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log x, log q(x))`` for x ~ LogNormal(m, v), the density of x written by hand."""
    log_x = m + math.sqrt(v) * torch.randn(MC_SAMPLES, dtype=torch.float64)
    log_q = -log_x - 0.5 * math.log(2 * math.pi * v) - (log_x - m) ** 2 / (2 * v)
    return log_x, log_q


# (m, v, shape a, scale b): the HS local factor, a global Gamma factor at tau0 = 1e-5, and generic ones.
HS_CASES = [
    (0.0, 0.5, 0.5, 1.0),
    (-1.0, 0.1, 0.5, 1.0),
    (2 * math.log(1e-5) + 0.3, 0.2, 0.5, 1e-10),
    (1.5, 1.0, 2.0, 3.0),
]


def closed_forms(implementation: str, reference) -> tuple:
    """(KL vs Gamma, KL vs InvGamma) of the library, or of the tests' own reference (used by test_layers)."""
    if implementation == "bclib":
        return bkl.lognormal_gamma_kl, bkl.lognormal_inverse_gamma_kl
    return reference.lognormal_gamma_kl, reference.lognormal_inverse_gamma_kl


@pytest.mark.parametrize("implementation", ["bclib", "reference"])
@pytest.mark.parametrize("m, v, shape, scale", HS_CASES)
def test_lognormal_gamma_kl_against_monte_carlo(implementation, m, v, shape, scale, reference):
    log_x, log_q = lognormal_samples(m, v)
    # Gamma(a, scale b): x^(a-1) exp(-x/b) / (Gamma(a) b^a).
    log_p = (shape - 1) * log_x - torch.exp(log_x) / scale - math.lgamma(shape) - shape * math.log(scale)
    mean, stderr = mc_mean(log_q - log_p)
    closed = closed_forms(implementation, reference)[0](torch.tensor(m, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), shape, scale)
    assert abs(closed.item() - mean) < MC_SIGMAS * stderr


@pytest.mark.parametrize("implementation", ["bclib", "reference"])
@pytest.mark.parametrize("m, v, shape, scale", HS_CASES)
def test_lognormal_inverse_gamma_kl_against_monte_carlo(implementation, m, v, shape, scale, reference):
    # Move the Gamma-regime means to where an inverse-Gamma factor lives (1/x small when x is large).
    m = -m if m < -5 else m
    log_x, log_q = lognormal_samples(m, v)
    # InvGamma(a, scale b): b^a / Gamma(a) x^(-a-1) exp(-b/x).
    log_p = shape * math.log(scale) - math.lgamma(shape) - (shape + 1) * log_x - scale * torch.exp(-log_x)
    mean, stderr = mc_mean(log_q - log_p)
    closed = closed_forms(implementation, reference)[1](torch.tensor(m, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), shape, scale)
    assert abs(closed.item() - mean) < MC_SIGMAS * stderr


def test_fused_gaussian_kl_sum_gradient_is_the_closed_form():
    """The hand-written backward of the fused KL sum against the derivatives of
    1/2 (-log s2 + s2 + mu^2 - 1) done by hand (d/dmu = mu, d/dlog s2 = (s2 - 1) / 2), for a layer's
    weights and bias (the sum the NJ and HS layers train on), and against finite differences."""
    import bclib

    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, dtype=torch.float64, generator=generator).requires_grad_()
    logvar = (4 * torch.rand(5, 7, dtype=torch.float64, generator=generator) - 12).requires_grad_()
    (3.0 * bkl.gaussian_kl_std_normal_sum(mu, logvar)).backward()
    torch.testing.assert_close(mu.grad, 3.0 * mu.detach())
    torch.testing.assert_close(logvar.grad, 3.0 * (logvar.detach().exp() - 1) / 2)
    assert torch.autograd.gradcheck(bkl.gaussian_kl_std_normal_sum, (mu.detach().requires_grad_(),
                                                                     logvar.detach().requires_grad_()))
    with pytest.raises(ValueError, match=r"mu and logvar must have the same shape, got \(5, 7\) and \(1, 7\)"):
        bkl.gaussian_kl_std_normal_sum(mu, logvar[:1])  # no broadcasting: the sum would be wrong
    layer = bclib.LinearGroupNJ(4, 3).double()
    layer._weight_and_bias_kl().backward()
    torch.testing.assert_close(layer.weight_mu.grad, layer.weight_mu.detach())
    torch.testing.assert_close(layer.bias_logvar.grad, (layer.bias_logvar.detach().exp() - 1) / 2)


NJ_K1, NJ_K2, NJ_K3 = 0.63576, 1.87320, 1.48695  # Molchanov et al. (2017), Eq. (14)


def hand_nj_kl_sum_and_gradients(mu: np.ndarray, logvar: np.ndarray, eps: float, log_alpha_range=None):
    """sum of the approximate KL of log alpha = clip(logvar - log(mu^2 + eps)) and its derivatives,
    differentiated by hand in numpy float64: dKL/dla = -k1 k3 s (1 - s) - sigmoid(-la) / 2 (s the fitted
    sigmoid), zero where the clip is active; dla/dlogvar = 1, dla/dmu = -2 mu / (mu^2 + eps)."""
    raw = logvar - np.log(mu**2 + eps)
    la = raw if log_alpha_range is None else np.clip(raw, *log_alpha_range)
    fit = 1.0 / (1.0 + np.exp(-(NJ_K2 + NJ_K3 * la)))
    kl = NJ_K1 - NJ_K1 * fit + 0.5 * np.logaddexp(0.0, -la)  # log(1 + e^-la), exact for any la
    dkl_dla = -NJ_K1 * NJ_K3 * fit * (1 - fit) - 0.5 / (1.0 + np.exp(la))
    if log_alpha_range is not None:
        dkl_dla = dkl_dla * ((raw >= log_alpha_range[0]) & (raw <= log_alpha_range[1]))
    return kl.sum(), dkl_dla * (-2 * mu / (mu**2 + eps)), dkl_dla


@pytest.mark.parametrize("log_alpha_range", [None, (-8.0, 8.0)])
def test_fused_nj_kl_sum_against_the_formula_differentiated_by_hand(log_alpha_range):
    """Value and gradients of nj_kl_approx_sum against numpy, over log alphas from -40 to 40 (some
    clipped when a range is given), a mean of exactly zero, and finite differences (gradcheck)."""
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 50, dtype=torch.float64, generator=generator)
    mu[0, 0] = 0.0
    logvar = torch.empty(6, 50, dtype=torch.float64).uniform_(-40.0, 40.0, generator=generator)
    expected, expected_mu, expected_logvar = hand_nj_kl_sum_and_gradients(mu.numpy(), logvar.numpy(), 1e-8,
                                                                          log_alpha_range)
    mu.requires_grad_(), logvar.requires_grad_()
    kl = bkl.nj_kl_approx_sum(mu, logvar, 1e-8, log_alpha_range)
    (2.5 * kl).backward()
    assert kl.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(mu.grad, 2.5 * torch.from_numpy(expected_mu), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logvar.grad, 2.5 * torch.from_numpy(expected_logvar), rtol=1e-10, atol=1e-12)
    if log_alpha_range is not None:
        assert (logvar.grad == 0).any() and (logvar.grad != 0).any()  # both sides of the clip were tested
    small = (torch.randn(3, 4, dtype=torch.float64, generator=generator).requires_grad_(),
             (4 * torch.randn(3, 4, dtype=torch.float64, generator=generator)).requires_grad_())
    assert torch.autograd.gradcheck(lambda m, lv: bkl.nj_kl_approx_sum(m, lv, 1e-8, log_alpha_range), small)


def test_fused_nj_kl_sum_is_accurate_in_float32_where_layers_train():
    """In float32 (the layers' dtype) the sum over a LeNet-300-100 input layer's worth of weights, with
    log alphas from -200 to 200, stays within 1e-6 relative of the float64 value, and finite."""
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(300, 784, generator=generator) * 0.1
    logvar = torch.empty(300, 784).uniform_(-200.0, 200.0, generator=generator)
    expected = hand_nj_kl_sum_and_gradients(mu.double().numpy(), logvar.double().numpy(), 1e-8)[0]
    kl = bkl.nj_kl_approx_sum(mu, logvar)
    assert kl.dtype == torch.float32 and math.isfinite(kl.item())
    assert kl.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fused, elementwise, sign", [
    (bkl.lognormal_gamma_kl_sum, bkl.lognormal_gamma_kl, 1.0),
    (bkl.lognormal_inverse_gamma_kl_sum, bkl.lognormal_inverse_gamma_kl, -1.0)])
def test_fused_lognormal_kl_sums_against_derivatives_by_hand(fused, elementwise, sign):
    """The fused sums equal the element-wise closed forms (checked against Monte Carlo above) summed,
    and their gradients the derivatives done by hand: with t = e^{+-(m - log b) + v/2}, d/dm = +-(t - a)
    and d/dlog v = (v t - 1) / 2 (+ for the Gamma, - for the inverse Gamma)."""
    shape, scale = 0.5, 0.3
    generator = torch.Generator().manual_seed(2)
    m = torch.randn(40, dtype=torch.float64, generator=generator).requires_grad_()
    logvar = (3 * torch.randn(40, dtype=torch.float64, generator=generator) - 2).requires_grad_()
    (1.5 * fused(m, logvar, shape, scale)).backward()
    torch.testing.assert_close(fused(m, logvar, shape, scale), elementwise(m, logvar.exp(), shape, scale).sum())
    with torch.no_grad():
        v = logvar.exp()
        tail = torch.exp(sign * (m - math.log(scale)) + v / 2)
        torch.testing.assert_close(m.grad, 1.5 * sign * (tail - shape))
        torch.testing.assert_close(logvar.grad, 1.5 * (v * tail - 1) / 2)
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, shape, scale), (m.detach()[:5].requires_grad_(),
                                                                               logvar.detach()[:5].requires_grad_()))
    with pytest.raises(ValueError, match=r"m and logvar must have the same shape, got \(40,\) and \(1,\)"):
        fused(m, logvar[:1], shape, scale)


def test_lognormal_kls_are_elementwise():
    m = torch.tensor([[0.0, -1.0], [1.0, 2.0]])
    v = torch.tensor([[0.5, 0.1], [0.2, 1.0]])
    for closed in (bkl.lognormal_gamma_kl, bkl.lognormal_inverse_gamma_kl):
        out = closed(m, v, 0.5, 1.0)
        assert out.shape == (2, 2)
        assert out[1, 0] == closed(m[1, 0], v[1, 0], 0.5, 1.0)


@pytest.mark.parametrize("function", [bkl.lognormal_gamma_kl, bkl.lognormal_inverse_gamma_kl,
                                      bkl.lognormal_gamma_kl_sum, bkl.lognormal_inverse_gamma_kl_sum])
@pytest.mark.parametrize("shape, scale, message", [(-0.5, 1.0, "shape must be a positive finite number .*-0.5"),
                                                   (0, 1.0, "shape must be a positive finite number .*got 0"),
                                                   (0.5, 0.0, "scale must be a positive finite number .*got 0.0"),
                                                   (0.5, math.inf, "scale must be a positive finite number")])
def test_lognormal_kls_refuse_priors_that_are_none(function, shape, scale, message):
    with pytest.raises(ValueError, match=message):  # a negative shape gave a number, zero a bare math domain error
        function(torch.zeros(2), torch.zeros(2), shape, scale)
    with pytest.raises(TypeError, match="shape must be a positive finite number .*got '0.5'"):
        function(torch.zeros(2), torch.zeros(2), "0.5", 1.0)
    # NumPy scalars and 0-d tensors are numbers, as they were before the check
    expected = function(torch.zeros(2), torch.zeros(2), 0.5, 1.0)
    assert torch.equal(function(torch.zeros(2), torch.zeros(2), np.float32(0.5), torch.tensor(1.0)), expected)


def test_nj_kl_sum_refuses_an_empty_clamp():
    with pytest.raises(ValueError, match=r"log_alpha_range must be None or a pair \(low, high\) with low < high"):
        bkl.nj_kl_approx_sum(torch.ones(2), torch.zeros(2), log_alpha_range=(8.0, -8.0))


# ----------------------------------------------------------------------------- half-Cauchy decomposition
def half_cauchy_ks_distance(samples: torch.Tensor, scale: float) -> float:
    """Kolmogorov-Smirnov distance to C+(0, k), whose CDF (2/pi) atan(x/k) inverts the quantile k tan(pi p/2)."""
    x, _ = torch.sort(samples)
    n = x.numel()
    cdf = 2.0 / math.pi * torch.atan(x / scale)
    rank = torch.arange(1, n + 1, dtype=x.dtype)
    return max((rank / n - cdf).max().item(), (cdf - (rank - 1) / n).max().item())


def product_of_gamma_and_inverse_gamma(gamma_scale: float, n: int) -> torch.Tensor:
    """sqrt(u v), u ~ Gamma(1/2, scale gamma_scale), v ~ InvGamma(1/2, scale 1)."""
    half = torch.tensor(0.5, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    u = torch.distributions.Gamma(half, rate=one / gamma_scale).sample((n,))
    v = torch.distributions.InverseGamma(half, one).sample((n,))
    return torch.sqrt(u * v)


@pytest.mark.parametrize("k", [3.0, 1e-2])
def test_half_cauchy_decomposition(k):
    n = 100_000
    # Critical KS value at significance 1e-3 is 1.95 / sqrt(n).
    critical = 1.95 / math.sqrt(n)
    torch.manual_seed(4)
    samples = priors.sample_half_cauchy_decomposed(n, scale=k)  # the parameterisation the HS KL terms use
    assert half_cauchy_ks_distance(samples, k) < critical
    # The check has the power to tell: with Gamma scale k, not k^2, the product is C+(0, sqrt(k)), far off.
    assert half_cauchy_ks_distance(product_of_gamma_and_inverse_gamma(k, n), k) > 10 * critical
    # And the quantile function itself, at the quartiles (standard error of a quantile: sqrt(p(1-p)/n) / f(q)).
    for p in (0.25, 0.5, 0.75):
        q = k * math.tan(math.pi * p / 2)
        density = 2.0 / (math.pi * k * (1 + (q / k) ** 2))
        stderr = math.sqrt(p * (1 - p) / n) / density
        assert abs(torch.quantile(samples, p).item() - q) < MC_SIGMAS * stderr
