"""Tests of bclib.priors against the bounds of Carvalho et al. (2010), closed-form CDFs,
normalisation integrals and samples drawn here with torch.distributions."""
import math

import pytest
import torch

from bclib import priors


def integrate_over_positive_line(pdf, low=-30.0, high=12.0, num=4001):
    """int_0^inf pdf(w) dw as int pdf(e^s) e^s ds by a midpoint rule (handles the spike at 0)."""
    edges = torch.linspace(low, high, num + 1, dtype=torch.float64)
    s = 0.5 * (edges[1:] + edges[:-1])
    return float((pdf(s.exp()) * s.exp()).sum() * (edges[1] - edges[0]))


def test_half_cauchy_pdf_values_and_normalisation():
    assert float(priors.half_cauchy_pdf(0.0, scale=2.0)) == pytest.approx(1 / math.pi)
    assert float(priors.half_cauchy_pdf(-1.0)) == 0.0
    # int_0^inf over a log grid misses only the tail beyond e^12 (2/(pi e^12) ~ 4e-6).
    assert integrate_over_positive_line(lambda w: priors.half_cauchy_pdf(w, 2.0)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("w", [0.01, 0.1, 0.5, 1.0, 3.0, 10.0])
def test_horseshoe_density_lies_between_carvalhos_bounds(w):
    k = 1.0 / math.sqrt(2 * math.pi**3)
    density = float(priors.horseshoe_pdf(torch.tensor(w)))
    assert k / 2 * math.log(1 + 4 / w**2) < density < k * math.log(1 + 2 / w**2)


def test_horseshoe_density_scales_with_tau():
    w = torch.tensor([0.03, 0.4, 2.0], dtype=torch.float64)
    assert torch.allclose(priors.horseshoe_pdf(w, tau=0.1), priors.horseshoe_pdf(w / 0.1) / 0.1, rtol=1e-9)


def test_horseshoe_density_agrees_with_independent_samples():
    # P(|w| < 1) from w = lambda * eps with torch's own HalfCauchy, against 2 int_0^1 p(w) dw.
    torch.manual_seed(0)
    n = 400_000
    lam = torch.distributions.HalfCauchy(torch.tensor(1.0, dtype=torch.float64)).sample((n,))
    w = lam * torch.randn(n, dtype=torch.float64)
    empirical = float((w.abs() < 1).double().mean())
    integral = 2 * integrate_over_positive_line(priors.horseshoe_pdf, high=0.0)
    assert integral == pytest.approx(empirical, abs=4 * math.sqrt(0.25 / n))
    # and the whole line integrates to 1 (the tail beyond e^12 holds ~1e-6)
    assert 2 * integrate_over_positive_line(priors.horseshoe_pdf) == pytest.approx(1.0, abs=1e-4)


def test_truncated_normal_jeffreys_is_one_over_w_in_the_middle():
    a, b = -10.0, 2.0
    w = torch.tensor([math.exp(-4.0), math.exp(-3.0)], dtype=torch.float64)
    density = priors.log_uniform_mixture_pdf(w, (a, b))
    assert torch.allclose(density, 1.0 / (2 * (b - a) * w), rtol=0.02)
    total = 2 * integrate_over_positive_line(lambda v: priors.log_uniform_mixture_pdf(v, (a, b)), low=-20.0, high=8.0)
    assert total == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("log_scale_range", [(-10.0, 2.0), (-60.0, 60.0), (-2000.0, 2000.0)])
def test_truncated_normal_jeffreys_against_its_closed_form(log_scale_range):
    # With t = |w| e^-s: p(w) = (Phi(|w| e^-a) - Phi(|w| e^-b)) / ((b - a) |w|).
    a, b = log_scale_range
    w = torch.tensor([0.37, 1.0, 2.5], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    scale = torch.exp(-torch.tensor([a, b], dtype=torch.float64))  # e^2000 is inf here, Phi(inf) = 1
    expected = (normal.cdf(w * scale[0]) - normal.cdf(w * scale[1])) / ((b - a) * w)
    torch.testing.assert_close(priors.log_uniform_mixture_pdf(w, log_scale_range), expected, rtol=1e-6, atol=0.0)


def test_the_horseshoe_density_is_infinite_at_zero():
    density = priors.horseshoe_pdf(torch.tensor([0.0, -0.0, 1e-6], dtype=torch.float64))
    assert density[:2].tolist() == [math.inf, math.inf] and math.isfinite(density[2])


def test_decomposed_half_cauchy_has_the_half_cauchy_distribution():
    # Kolmogorov-Smirnov distance to the CDF 2/pi atan(x/k); 1.63/sqrt(n) is the 1% critical value.
    torch.manual_seed(1)
    n, k = 100_000, 2.0
    draws, _ = torch.sort(priors.sample_half_cauchy_decomposed(n, scale=k))
    cdf = 2 / math.pi * torch.atan(draws / k)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((ranks - cdf).abs(), (ranks - 1 / n - cdf).abs()).max())
    assert ks < 1.63 / math.sqrt(n)


def test_the_gamma_scale_must_be_k_squared():
    # With scale k instead of k^2 the median would be sqrt(k) = 1.41 instead of k = 2.
    torch.manual_seed(2)
    median = float(priors.sample_half_cauchy_decomposed(100_000, scale=2.0).median())
    assert median == pytest.approx(2.0, rel=0.03)


def test_group_scale_is_shared_by_the_column():
    a, b = -6.0, 1.0
    w = priors.sample_scale_mixture("log_uniform", num_groups=300, group_size=4000, log_scale_range=(a, b),
                                    generator=torch.Generator().manual_seed(3))
    assert w.shape == (4000, 300)
    # 4000 draws pin each column's scale to ~2%: their logarithms fill [a, b] and no more.
    log_scales = torch.log(w.std(dim=0))
    assert a - 0.1 < float(log_scales.min()) < a + 0.3
    assert b - 0.3 < float(log_scales.max()) < b + 0.1


def test_horseshoe_group_scales_have_median_tau():
    w = priors.sample_scale_mixture("horseshoe", num_groups=4000, group_size=400, tau=0.5,
                                    generator=torch.Generator().manual_seed(4))
    # The median of C+(0, tau) is tau.
    assert float(w.std(dim=0).median()) == pytest.approx(0.5, rel=0.06)


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(prior="laplace"), ValueError, "prior"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(group_size=2.0), TypeError, "group_size"),
    (dict(tau=-1.0), ValueError, "tau"),
    (dict(prior="log_uniform", log_scale_range=(2.0, 1.0)), ValueError, "log_scale_range"),
])
def test_sampler_rejects_bad_arguments(kwargs, error, word):
    arguments = dict(prior="horseshoe", num_groups=3) | kwargs
    with pytest.raises(error, match=word):
        priors.sample_scale_mixture(**arguments)
