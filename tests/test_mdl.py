"""Tests of bclib.mdl against closed forms worked out here (Gaussian KL, a conjugate Gaussian
model's evidence and posterior, entropies of fine quantisations) and against simulation."""
import math

import numpy as np
import pytest
import torch

from bclib import mdl

LN2 = math.log(2.0)


def kl_gaussians_bits(m_q, s_q, s_p):
    """KL(N(m_q, s_q^2) || N(0, s_p^2)) in bits, by the textbook formula."""
    return (math.log(s_p / s_q) + (s_q**2 + m_q**2) / (2 * s_p**2) - 0.5) / LN2


# ----------------------------------------------------------------------------- Gaussian KL
def test_gaussian_kl_bits_matches_formula_for_a_wide_prior():
    # log(2/0.5) + (0.25 + 1)/8 - 0.5 = 1.0425443 nats = 1.5040779 bits
    assert float(mdl.gaussian_kl_bits(1.0, 0.5, prior_std=2.0)) == pytest.approx(1.0425443 / LN2, abs=1e-6)
    assert float(mdl.gaussian_kl_bits(0.0, 1.0)) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_kl_bits_rejects_bad_scales():
    with pytest.raises(ValueError, match="q_std"):
        mdl.gaussian_kl_bits(0.0, 0.0)
    with pytest.raises(ValueError, match="prior_std"):
        mdl.gaussian_kl_bits(0.0, 1.0, prior_std=-1.0)
    with pytest.raises(TypeError, match="prior_std"):
        mdl.gaussian_kl_bits(0.0, 1.0, prior_std="1")
    for std in (math.inf, math.nan):  # the KL came out NaN
        with pytest.raises(ValueError, match="q_std must be positive and finite"):
            mdl.gaussian_kl_bits(0.0, torch.tensor([1.0, std]))


# ----------------------------------------------------------------------------- bits-back
@pytest.mark.parametrize("m_q, s_q, s_p", [(0.5, 0.1, 1.0), (-2.0, 0.03, 1.5), (30.0, 0.5, 1.0)])
def test_bits_back_net_length_tends_to_the_kl(m_q, s_q, s_p):
    # (30, 0.5) sits 30 prior standard deviations out: the prior masses are ~e^-450.
    cost = mdl.bits_back_cost(m_q, s_q, bin_width=s_q / 1000, prior_std=s_p)
    assert cost.net_bits == pytest.approx(kl_gaussians_bits(m_q, s_q, s_p), abs=1e-4)
    assert cost.message_bits - cost.refund_bits == pytest.approx(cost.net_bits, abs=1e-9)


def test_bits_back_refund_is_the_entropy_of_a_fine_quantisation():
    # H(Q) = h(q)/ln2 - log2(delta) for delta << sigma, h(q) = 0.5 log(2 pi e sigma^2).
    s_q, delta = 0.2, 1e-4
    cost = mdl.bits_back_cost(0.3, s_q, bin_width=delta)
    expected = 0.5 * math.log2(2 * math.pi * math.e * s_q**2) - math.log2(delta)
    assert cost.refund_bits == pytest.approx(expected, abs=1e-4)


def test_quantisation_never_lengthens_the_net_code():
    # Coarser bins merge outcomes: the KL of the quantised distributions cannot exceed the KL.
    kl = kl_gaussians_bits(0.5, 0.1, 1.0)
    nets = [mdl.bits_back_cost(0.5, 0.1, bin_width=d).net_bits for d in (3.0, 1.0, 0.3, 0.1, 0.01)]
    assert all(n <= kl + 1e-9 for n in nets)
    assert nets == sorted(nets)


def test_one_huge_bin_costs_nothing():
    cost = mdl.bits_back_cost(0.1, 0.1, bin_width=1000.0)
    assert cost.message_bits == pytest.approx(0.0, abs=1e-9)
    assert cost.net_bits == pytest.approx(0.0, abs=1e-9)


def test_simulated_transmissions_agree_with_the_exact_sum():
    samples = mdl.bits_back_samples(0.5, 0.1, bin_width=0.05, num_samples=200_000,
                                    generator=torch.Generator().manual_seed(3))
    exact = mdl.bits_back_cost(0.5, 0.1, bin_width=0.05).net_bits
    standard_error = float(samples.std()) / math.sqrt(samples.numel())
    assert abs(float(samples.mean()) - exact) < 4 * standard_error


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(q_std=0.0), ValueError, "q_std"),
    (dict(bin_width=-1.0), ValueError, "bin_width"),
    (dict(q_mean=float("nan")), ValueError, "q_mean"),
    (dict(bin_width="0.1"), TypeError, "bin_width"),
    # The sums would leave mass out: num_std=1 gave 2.26 net bits for a KL of 2.79.
    (dict(num_std=1.0), ValueError, r"num_std must be at least 8\.0"),
])
def test_bits_back_rejects_bad_arguments(kwargs, error, word):
    arguments = dict(q_mean=0.0, q_std=0.1, bin_width=0.01) | kwargs
    with pytest.raises(error, match=word):
        mdl.bits_back_cost(**arguments)


def test_bits_back_takes_numbers_as_numpy_scalars_and_0d_tensors():
    expected = mdl.bits_back_cost(0.5, 0.1, bin_width=0.01)
    assert mdl.bits_back_cost(torch.tensor(0.5, dtype=torch.float64), np.float32(0.1), bin_width=np.float64(0.01)
                              ).net_bits == pytest.approx(expected.net_bits, rel=1e-6)


# ----------------------------------------------------------------------------- a one-weight model
def test_logistic_log_likelihood_by_hand():
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # log sigmoid(0.5) + log(1 - sigmoid(-1)) = log sigmoid(0.5) + log sigmoid(1)
    expected = math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(-1.0)))
    got = mdl.logistic_log_likelihood(torch.tensor([0.5], dtype=torch.float64), x, y)
    assert float(got[0]) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        mdl.logistic_log_likelihood(torch.tensor([0.5]), x, torch.tensor([1.0, 2.0]))


class ConjugateModel:
    """y_n ~ N(w, s^2) with w ~ N(0, s_p^2): evidence and posterior in closed form."""

    def __init__(self, y, s=0.7, s_p=1.3):
        self.y, self.s, self.s_p = torch.as_tensor(y, dtype=torch.float64), s, s_p
        n = len(y)
        self.post_var = 1.0 / (n / s**2 + 1.0 / s_p**2)
        self.post_mean = self.post_var * float(self.y.sum()) / s**2
        # log N(y; 0, s^2 I + s_p^2 11^T) via the matrix determinant lemma and Sherman-Morrison.
        total, sq = float(self.y.sum()), float((self.y**2).sum())
        log_det = n * math.log(s**2) + math.log(1 + n * s_p**2 / s**2)
        quad = sq / s**2 - (s_p**2 / s**4) * total**2 / (1 + n * s_p**2 / s**2)
        self.log_evidence = -0.5 * (n * math.log(2 * math.pi) + log_det + quad)

    def log_likelihood(self, w):
        r = self.y.reshape(1, -1) - w.reshape(-1, 1)
        return (-0.5 * (r / self.s) ** 2 - math.log(self.s * math.sqrt(2 * math.pi))).sum(1).reshape(w.shape)


MODEL = ConjugateModel([0.9, 1.4, 0.2, 1.1, 0.7])


def test_grid_posterior_matches_the_conjugate_closed_form():
    post = mdl.grid_posterior(MODEL.log_likelihood, prior_std=MODEL.s_p)
    assert post.log_evidence == pytest.approx(MODEL.log_evidence, abs=1e-6)
    assert post.mean == pytest.approx(MODEL.post_mean, abs=1e-6)
    assert post.std == pytest.approx(math.sqrt(MODEL.post_var), abs=1e-6)


def test_neg_elbo_is_the_evidence_code_plus_the_posterior_kl():
    evidence_bits = -MODEL.log_evidence / LN2
    m, v = MODEL.post_mean, MODEL.post_var
    for q_mean, q_std in [(m, math.sqrt(v)), (m + 0.2, 0.5), (-0.3, 0.05)]:
        data_bits, model_bits = mdl.neg_elbo_bits(MODEL.log_likelihood, q_mean, q_std, prior_std=MODEL.s_p)
        kl_to_posterior = (math.log(math.sqrt(v) / q_std) + (q_std**2 + (q_mean - m) ** 2) / (2 * v) - 0.5) / LN2
        assert float(data_bits + model_bits) == pytest.approx(evidence_bits + kl_to_posterior, abs=1e-8)


def test_fitted_gaussian_is_the_exact_posterior_of_a_conjugate_model():
    q_mean, q_std = mdl.fit_gaussian_posterior(MODEL.log_likelihood, prior_std=MODEL.s_p)
    assert q_mean == pytest.approx(MODEL.post_mean, abs=1e-5)
    assert q_std == pytest.approx(math.sqrt(MODEL.post_var), rel=1e-4)


def test_two_part_code_by_hand():
    # Data bits: the squared error grows by n E[u^2]/(2 s^2) nats, E[u^2] the mean square of the
    # evenly spaced grid offsets; weight bits: -log2 of the prior mass of a narrow bin.
    w, delta, k = 0.9, 0.01, 64
    weight_bits, data_bits = mdl.two_part_code_bits(MODEL.log_likelihood, w, delta, MODEL.s_p, num_offsets=k)
    mean_square_offset = delta**2 * (1 / 12 - 1 / (12 * k**2))
    n = len(MODEL.y)
    expected_data = (-float(MODEL.log_likelihood(torch.tensor([w], dtype=torch.float64))[0])
                     + n * mean_square_offset / (2 * MODEL.s**2)) / LN2
    assert data_bits == pytest.approx(expected_data, abs=1e-9)
    density = math.exp(-0.5 * (w / MODEL.s_p) ** 2) / (MODEL.s_p * math.sqrt(2 * math.pi))
    assert weight_bits == pytest.approx(-math.log2(density * delta), abs=1e-4)
