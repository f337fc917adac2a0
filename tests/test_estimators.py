"""Tests of bclib.estimators: both gradient estimators are unbiased for the gradient of the
expected loss, computed here in closed form; local reparameterisation has the smaller variance."""
import math

import pytest
import torch
import torch.nn.functional as F

import bclib
from bclib.estimators import minibatch_gradient_moments, weight_sample_forward


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: extra threads only add synchronisation (50x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_layer(in_features=6, out_features=3, seed=0):
    """A LinearGroupNJ whose posterior is wide (alpha = 0.25, sigma = |mu| / 2), as mid-training."""
    torch.manual_seed(seed)
    layer = bclib.LinearGroupNJ(in_features, out_features)
    with torch.no_grad():
        layer.weight_mu.normal_(0.0, 0.5)
        layer.weight_logvar.copy_(torch.log(0.25 * layer.weight_mu**2 + 1e-3))
        layer.z_logvar.copy_(torch.log(0.25 * layer.z_mu**2))
        layer.bias_logvar.fill_(math.log(0.01))
    return layer


def expected_output_moments(layer, x):
    """E and Var of each output of a linear NJ layer: w = z w~, z ~ N(mu_z, s_z^2), w~ ~ N(mu, s^2).

    Var[z w~] = E[z^2] E[w~^2] - E[z]^2 E[w~]^2 for independent factors.
    """
    mz, vz = layer.z_mu, layer.z_logvar.exp()
    mw, vw = layer.weight_mu, layer.weight_logvar.exp()
    mean = x @ (mz * mw).T + layer.bias_mu
    var_w = (mz**2 + vz) * (mw**2 + vw) - mz**2 * mw**2
    return mean, (x**2) @ var_w.T + layer.bias_logvar.exp()


def test_weight_sampling_shares_one_draw_across_the_minibatch():
    layer = noisy_layer()
    x = torch.randn(1, 6).expand(4, 6)
    same = weight_sample_forward(layer, x)
    assert torch.allclose(same, same[:1].expand_as(same))
    layer.train()
    independent = layer(x)  # local reparameterisation: fresh noise per example
    assert not torch.allclose(independent, independent[:1].expand_as(independent))


def test_weight_sampling_has_the_posterior_predictive_moments():
    layer = noisy_layer()
    x = torch.randn(2, 6)
    torch.manual_seed(1)
    with torch.no_grad():
        draws = torch.stack([weight_sample_forward(layer, x) for _ in range(20_000)])
        mean, var = expected_output_moments(layer, x)
    assert torch.allclose(draws.mean(0), mean, atol=4 * float(var.max().sqrt()) / math.sqrt(20_000))
    assert torch.allclose(draws.var(0), var, rtol=0.05)


@pytest.mark.parametrize("local", [True, False])
def test_both_estimators_are_unbiased_for_the_expected_loss_gradient(local):
    # Squared error: E[(f - y)^2] = (E f - y)^2 + Var f, differentiated by autograd in closed form.
    layer = noisy_layer()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    mean, var = expected_output_moments(layer, x)
    expected_loss = ((mean - y) ** 2 + var).mean()
    names, params = zip(*layer.named_parameters())
    exact = dict(zip(names, torch.autograd.grad(expected_loss, params)))
    torch.manual_seed(2)
    moments = minibatch_gradient_moments(layer, x, y, batch_size=32, num_batches=3000,
                                         local_reparameterisation=local, loss=F.mse_loss)
    for name in names:
        standard_error = (moments.variance[name] / 3000).sqrt()
        error = (moments.mean[name] - exact[name].double()).abs()
        assert bool((error <= 5 * standard_error + 1e-6).all()), name


@pytest.mark.parametrize("local", [True, False])
def test_minibatch_gradient_variance_of_the_bias_matches_its_closed_form(local):
    """Squared error on the whole data set in every minibatch: the choice of examples cannot vary,
    so the bias gradient (2 / K)(mean_n f_nk - mean_n y_nk) varies only through the noise.

    Weight sampling shares one draw, so mean_n f_k is the output at the mean input, variance
    Var f(x_bar)_k; local reparameterisation draws each example independently, variance
    sum_n Var f(x_n)_k / N^2. Both are the output moments worked out above.
    """
    layer = noisy_layer()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    n, k = y.shape
    with torch.no_grad():
        if local:
            output_variance = expected_output_moments(layer, x)[1].sum(0) / n**2
        else:
            output_variance = expected_output_moments(layer, x.mean(0, keepdim=True))[1][0]
    expected = (2 / k) ** 2 * output_variance.double()
    torch.manual_seed(5)
    moments = minibatch_gradient_moments(layer, x, y, batch_size=n, num_batches=2000,
                                         local_reparameterisation=local, loss=F.mse_loss)
    # The sample variance of 2000 draws is off by ~3.5 % (sd, measured over 20 seeds; the products
    # z w~ have heavier tails than a Gaussian): 15 % is over 4 sd, and any scale error beyond it fails.
    torch.testing.assert_close(moments.variance["bias_mu"], expected, rtol=0.15, atol=0)


def test_local_reparameterisation_has_smaller_gradient_variance():
    layer = noisy_layer(in_features=20, out_features=5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 20, generator=g)
    y = torch.randint(0, 5, (1024,), generator=g)
    torch.manual_seed(4)
    local, shared = (minibatch_gradient_moments(layer, x, y, batch_size=256, num_batches=200,
                                                local_reparameterisation=flag, generator=g) for flag in (True, False))
    for name in ("weight_logvar", "z_mu", "z_logvar"):
        assert float(local.variance[name].mean()) < 0.5 * float(shared.variance[name].mean()), name


def test_bad_arguments_are_rejected():
    layer = noisy_layer()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match="group-scale"):
        weight_sample_forward(bclib.LinearSVD(6, 3), x)
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_gradient_moments(layer, x, y, batch_size=9, num_batches=2, local_reparameterisation=True)
    with pytest.raises(ValueError, match="num_batches"):
        minibatch_gradient_moments(layer, x, y, batch_size=4, num_batches=1, local_reparameterisation=True)
    with pytest.raises(ValueError, match="same number"):
        minibatch_gradient_moments(layer, x, y[:4], batch_size=4, num_batches=2, local_reparameterisation=True)
    with pytest.raises(TypeError, match="local_reparameterisation must be True or False, got 'no'"):
        minibatch_gradient_moments(layer, x, y, batch_size=4, num_batches=2, local_reparameterisation="no")
    with pytest.raises(ValueError, match="layer has no parameter that requires a gradient"):
        minibatch_gradient_moments(layer.requires_grad_(False), x, y, batch_size=4, num_batches=2,
                                   local_reparameterisation=True)
