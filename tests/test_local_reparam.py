"""The fused local-reparameterisation functions against the same formula in plain autograd operations:
same noise (same seed, same draw order), so values and every gradient must agree."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bclib.layers.local_reparam import MIN_AUTOCAST_TERMS, VARIANCE_EPS, sample_conv2d, sample_linear


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().double().requires_grad_(True) for t in tensors]


def _reference_linear(h, mu, logvar, bias_mu, bias_logvar, noise_dtype=torch.float64):
    mean = F.linear(h, mu, bias_mu)
    var = F.linear(h * h, logvar.exp(), None if bias_logvar is None else bias_logvar.exp())
    return mean + torch.sqrt(var + VARIANCE_EPS) * torch.randn(mean.shape, dtype=noise_dtype).double()


def _reference_conv(x, z, mu, logvar, bias_mu, bias_logvar, stride, padding, dilation, noise_dtype=torch.float64,
                    draw=None):
    mean = F.conv2d(x, mu, None, stride, padding, dilation)
    var = F.conv2d(x * x, logvar.exp(), None, stride, padding, dilation)
    if z is not None:
        mean, var = mean * z[:, :, None, None], var * (z * z)[:, :, None, None]
    if bias_mu is not None:
        mean = mean + bias_mu.view(1, -1, 1, 1)
    if bias_logvar is not None:
        var = var + bias_logvar.exp().view(1, -1, 1, 1)
    noise = torch.randn(mean.shape, dtype=noise_dtype) if draw is None else draw(mean.shape)
    return mean + torch.sqrt(var + VARIANCE_EPS) * noise.double()


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


@pytest.mark.parametrize("in_channels", [1, 8])  # 9 and 72 terms per output: both weight-gradient routes
def test_conv_takes_ints_as_f_conv2d_does(in_channels):
    """stride=2, padding=1, dilation=1 as ints (the backward's aten call takes only pairs)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, in_channels, 9, 8, generator=g)
    mu = torch.randn(4, in_channels, 3, 3, generator=g)
    logvar = torch.empty(4, in_channels, 3, 3).uniform_(-6, 1, generator=g)
    z, bias_mu, bias_logvar = torch.rand(3, 4, generator=g) + 0.5, torch.randn(4, generator=g), torch.randn(4, generator=g)

    def fused(x, z, mu, logvar, bias_mu, bias_logvar):
        return sample_conv2d(x, z, mu, logvar, bias_mu, bias_logvar, 2, 1, 1)

    def reference(x, z, mu, logvar, bias_mu, bias_logvar):
        return _reference_conv(x, z, mu, logvar, bias_mu, bias_logvar, 2, 1, 1)

    _compare(fused, reference, (x, z, mu, logvar, bias_mu, bias_logvar))


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("with_scale", [True, False])
def test_conv_in_channels_last_keeps_the_layout_and_draws_the_noise_in_memory_order(in_channels, with_scale):
    """Channels-last inputs and weights give a channels-last output, and the k-th number drawn
    goes to the k-th element in memory (NHWC order), so that the generator fills contiguous memory;
    values and gradients are the formula's with that noise. With one input channel a weight is both
    contiguous and channels-last (LeNet-5's first convolution)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, in_channels, 9, 8, generator=g)
    mu = torch.randn(4, in_channels, 3, 3, generator=g)
    logvar = torch.empty(4, in_channels, 3, 3).uniform_(-6, 1, generator=g)
    z = torch.rand(3, 4, generator=g) + 0.5 if with_scale else None
    bias_mu, bias_logvar = torch.randn(4, generator=g), torch.empty(4).uniform_(-6, 1, generator=g)
    # as Module.to(memory_format=...) converts (.contiguous() would leave a one-channel tensor as it is)
    x, mu, logvar = (t.to(memory_format=torch.channels_last) for t in (x, mu, logvar))
    geometry = ((1, 1), (1, 0), (1, 1))

    def fused(x, z, mu, logvar, bias_mu, bias_logvar):
        return sample_conv2d(x, z, mu, logvar, bias_mu, bias_logvar, *geometry)

    def reference(x, z, mu, logvar, bias_mu, bias_logvar):
        def nhwc_noise(shape):
            n, c, h, w = shape
            return torch.randn(n, h, w, c, dtype=torch.float64).permute(0, 3, 1, 2)
        return _reference_conv(x, z, mu, logvar, bias_mu, bias_logvar, *geometry, draw=nhwc_noise)

    out = fused(x, z, mu, logvar, bias_mu, bias_logvar)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    _compare(fused, reference, (x, z, mu, logvar, bias_mu, bias_logvar))


class _ConvolutionBackwardMasks(TorchDispatchMode):
    """Records the output mask (input, weight, bias gradients) of every aten convolution_backward
    that runs: what the convolution library was asked to compute, seen from outside bclib."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("in_channels", [1, 8])  # 9 and 72 terms per output: both weight-gradient routes
def test_only_requested_gradients_are_computed(in_channels):
    mu = torch.randn(3, in_channels, 3, 3, requires_grad=True)
    logvar = torch.full((3, in_channels, 3, 3), -4.0, requires_grad=True)
    for x_needs_grad in (False, True):  # False: an input that needs no gradient, as the first layer's
        x = torch.randn(2, in_channels, 6, 6, requires_grad=x_needs_grad)
        out = sample_conv2d(x, None, mu, logvar, None, None, (1, 1), (0, 0), (1, 1))
        with _ConvolutionBackwardMasks() as recorded:
            (out * torch.rand_like(out)).sum().backward()  # a dense output gradient, as a loss gives
        # Two products (mean, variance); an input gradient is asked for exactly when x needs one.
        # With 9 terms per output the weight gradients take the windowed route: no call then.
        assert [mask[0] for mask in recorded.masks] == [x_needs_grad] * len(recorded.masks)
        assert len(recorded.masks) == (2 if x_needs_grad or in_channels == 8 else 0)
        assert (x.grad is not None) == x_needs_grad and mu.grad is not None and logvar.grad is not None


# ----------------------------------------------------------------------------- mixed precision
def _autocast_case(kind: str):
    """Inputs with at least MIN_AUTOCAST_TERMS products per output, and the float64 reference fed the
    float32 noise the fused function draws."""
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        inputs = (torch.randn(16, 96, generator=g), 0.1 * torch.randn(8, 96, generator=g),
                  torch.empty(8, 96).uniform_(-8, -2, generator=g), torch.randn(8, generator=g),
                  torch.empty(8).uniform_(-8, -2, generator=g))
        return inputs, sample_linear, partial(_reference_linear, noise_dtype=torch.float32)
    geometry = ((1, 1), (1, 1), (1, 1))
    z = torch.rand(4, 6, generator=g) + 0.5 if kind == "conv-scaled" else None
    inputs = (torch.randn(4, 4, 10, 10, generator=g), z, 0.1 * torch.randn(6, 4, 5, 5, generator=g),
              torch.empty(6, 4, 5, 5).uniform_(-8, -2, generator=g), torch.randn(6, generator=g),
              torch.empty(6).uniform_(-8, -2, generator=g))
    return (inputs, lambda *t: sample_conv2d(*t, *geometry),
            lambda *t: _reference_conv(*t, *geometry, noise_dtype=torch.float32))


@pytest.mark.parametrize("kind", ["linear", "conv", "conv-scaled"])
def test_autocast_runs_the_products_in_bfloat16_close_to_float64(kind):
    inputs, fused, reference = _autocast_case(kind)
    assert inputs[-3][0].numel() >= MIN_AUTOCAST_TERMS
    low = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    exact = _leaves(*inputs)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(*low)
    torch.manual_seed(5)
    expected = reference(*exact)
    assert out.dtype == torch.float32
    error, scale = (out.double() - expected).abs().max().item(), expected.abs().max().item()
    # bfloat16 keeps 8 significant bits; float32 products would agree to ~1e-7 of the scale.
    assert 1e-5 * scale < error <= 0.02 * scale
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (expected * weights).sum().backward()
    for index, (a, b) in enumerate(zip(low, exact)):
        if a is not None:
            assert a.grad.dtype == torch.float32, index
            assert (a.grad.double() - b.grad).abs().max() <= 0.03 * b.grad.abs().max(), f"gradient of input {index}"


def test_autocast_leaves_short_products_in_full_precision():
    # 1 input channel x 5 x 5 = 25 products per output, as LeNet-5's first convolution.
    x, mu, logvar = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 5, 5), torch.full((3, 1, 5, 5), -4.0)
    assert mu[0].numel() < MIN_AUTOCAST_TERMS
    torch.manual_seed(0)
    expected = sample_conv2d(x, None, mu, logvar, None, None, (1, 1), (0, 0), (1, 1))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample_conv2d(x, None, mu, logvar, None, None, (1, 1), (0, 0), (1, 1))
    assert torch.equal(out, expected)
