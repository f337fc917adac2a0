"""The fused local-reparameterisation functions against the same formula in plain autograd operations:
same noise (same seed, same draw order), so values and every gradient must agree."""
import pytest
import torch
import torch.nn.functional as F

from bclib.layers.local_reparam import VARIANCE_EPS, sample_conv2d, sample_linear


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().double().requires_grad_(True) for t in tensors]


def _reference_linear(h, mu, logvar, bias_mu, bias_logvar):
    mean = F.linear(h, mu, bias_mu)
    var = F.linear(h * h, logvar.exp(), None if bias_logvar is None else bias_logvar.exp())
    return mean + torch.sqrt(var + VARIANCE_EPS) * torch.randn(mean.shape, dtype=torch.float64)


def _reference_conv(x, z, mu, logvar, bias_mu, bias_logvar, stride, padding, dilation):
    mean = F.conv2d(x, mu, None, stride, padding, dilation)
    var = F.conv2d(x * x, logvar.exp(), None, stride, padding, dilation)
    if z is not None:
        mean, var = mean * z[:, :, None, None], var * (z * z)[:, :, None, None]
    if bias_mu is not None:
        mean = mean + bias_mu.view(1, -1, 1, 1)
    if bias_logvar is not None:
        var = var + bias_logvar.exp().view(1, -1, 1, 1)
    return mean + torch.sqrt(var + VARIANCE_EPS) * torch.randn(mean.shape, dtype=torch.float64)


def _compare(fused, reference, inputs, seed=3):
    a, b = _leaves(*inputs), _leaves(*inputs)
    torch.manual_seed(seed)
    out_a = fused(*a)
    torch.manual_seed(seed)
    out_b = reference(*b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    weights = torch.randn(out_a.shape, dtype=torch.float64)
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    for name, ta, tb in zip(range(len(a)), a, b):
        if ta is not None:
            torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-9, atol=1e-12, msg=f"gradient of input {name}")


@pytest.mark.parametrize("bias", ["bayesian", "deterministic", "none"])
@pytest.mark.parametrize("batch_shape", [(7,), (2, 3)])
def test_linear_equals_autograd_formula(bias, batch_shape):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*batch_shape, 5, generator=g)
    mu, logvar = torch.randn(4, 5, generator=g), torch.empty(4, 5).uniform_(-6, 1, generator=g)
    bias_mu = None if bias == "none" else torch.randn(4, generator=g)
    bias_logvar = torch.empty(4).uniform_(-6, 1, generator=g) if bias == "bayesian" else None
    _compare(sample_linear, _reference_linear, (h, mu, logvar, bias_mu, bias_logvar))


@pytest.mark.parametrize("bias", ["bayesian", "deterministic", "none"])
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("geometry", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 2))])
def test_conv_equals_autograd_formula(bias, with_scale, geometry):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 9, 8, generator=g)
    mu, logvar = torch.randn(4, 2, 3, 3, generator=g), torch.empty(4, 2, 3, 3).uniform_(-6, 1, generator=g)
    z = torch.randn(3, 4, generator=g) if with_scale else None
    bias_mu = None if bias == "none" else torch.randn(4, generator=g)
    bias_logvar = torch.empty(4).uniform_(-6, 1, generator=g) if bias == "bayesian" else None
    stride, padding, dilation = geometry

    def fused(x, z, mu, logvar, bias_mu, bias_logvar):
        return sample_conv2d(x, z, mu, logvar, bias_mu, bias_logvar, stride, padding, dilation)

    def reference(x, z, mu, logvar, bias_mu, bias_logvar):
        return _reference_conv(x, z, mu, logvar, bias_mu, bias_logvar, stride, padding, dilation)

    _compare(fused, reference, (x, z, mu, logvar, bias_mu, bias_logvar))


def test_only_requested_gradients_are_computed():
    x = torch.randn(2, 1, 6, 6)  # an input that needs no gradient, as the first layer's
    mu = torch.randn(3, 1, 3, 3, requires_grad=True)
    logvar = torch.full((3, 1, 3, 3), -4.0, requires_grad=True)
    out = sample_conv2d(x, None, mu, logvar, None, None, (1, 1), (0, 0), (1, 1))
    out.sum().backward()
    assert x.grad is None and mu.grad is not None and logvar.grad is not None
