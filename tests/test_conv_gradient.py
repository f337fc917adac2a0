"""The windowed convolution weight gradients against PyTorch's own (``F.unfold``,
``torch.nn.grad.conv2d_weight``, autograd through ``F.conv2d``), and where they are taken."""
import pytest
import torch
import torch.nn.functional as F

from bclib.layers import conv_gradient
from bclib.layers.local_reparam import sample_conv2d

# (in_channels, out_channels, kernel, stride, padding, dilation, input size)
GEOMETRIES = [
    (1, 20, (5, 5), (1, 1), (0, 0), (1, 1), (28, 28)),  # LeNet-5's first convolution
    (3, 8, (3, 3), (1, 1), (1, 1), (1, 1), (12, 12)),  # a first convolution on RGB images
    (2, 4, (3, 2), (2, 1), (1, 2), (2, 1), (11, 9)),  # every argument uneven
    (6, 5, (3, 3), (1, 2), (0, 1), (1, 1), (8, 10)),
]


def _conv_inputs(in_channels, out_channels, kernel, stride, padding, dilation, size, batch=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, *size, dtype=torch.float64, generator=generator)
    weight = torch.randn(out_channels, in_channels, *kernel, dtype=torch.float64, generator=generator)
    grad = torch.randn_like(F.conv2d(x, weight, None, stride, padding, dilation))
    return x, weight, grad


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_windows_and_weight_gradient_equal_pytorchs(geometry, channels_last):
    in_channels, out_channels, kernel, stride, padding, dilation, size = geometry
    x, weight, grad = _conv_inputs(*geometry)
    if channels_last:  # the windows are read through strides: any layout
        x = x.contiguous(memory_format=torch.channels_last)
    windows = conv_gradient.conv2d_input_windows(x, kernel, stride, padding, dilation)
    torch.testing.assert_close(windows, F.unfold(x, kernel, dilation, padding, stride), rtol=0, atol=0)
    expected = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation)
    got = conv_gradient.conv2d_weight_gradient(grad, x, weight.shape, stride, padding, dilation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # In slices of examples: windows of 2 examples at most, then of 1 (a limit below one example's).
    one_example = F.unfold(x[:1], kernel, dilation, padding, stride).numel()
    for limit in (2 * one_example, 1):
        got = conv_gradient.conv2d_weight_gradient(grad, x, weight.shape, stride, padding, dilation,
                                                   max_window_elements=limit)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [GEOMETRIES[2], (2, 4, (3, 3), 2, 1, 1, (11, 9))], ids=["pairs", "ints"])
def test_the_windowed_convolution_has_the_gradients_of_f_conv2d(geometry):
    x, weight, grad = _conv_inputs(*geometry)
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    stride, padding, dilation = geometry[3:6]
    leaves = [[t.clone().requires_grad_(True) for t in (x, weight, bias)] for _ in range(2)]
    expected = F.conv2d(*leaves[0], stride, padding, dilation)
    got = conv_gradient.conv2d(*leaves[1], stride, padding, dilation)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (expected * grad).sum().backward()
    (got * grad).sum().backward()
    for ours, theirs in zip(leaves[1], leaves[0]):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def _bayesian_conv_gradients(in_channels, channels_last=False):
    """The parameters' gradients of one sampled Bayesian convolution with a group scale."""
    torch.manual_seed(0)
    x = torch.randn(4, in_channels, 12, 12, dtype=torch.float64)
    mu = (torch.randn(6, in_channels, 5, 5, dtype=torch.float64) * 0.1).requires_grad_(True)
    logvar = torch.full((6, in_channels, 5, 5), -6.0, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, 6, dtype=torch.float64).add_(0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = sample_conv2d(x, scale, mu, logvar, None, None, (1, 1), (0, 0), (1, 1))
    out.pow(2).sum().backward()
    return mu.grad, logvar.grad


def test_an_empty_batch_gives_zero_weight_gradients_as_f_conv2d_does():
    geometry = GEOMETRIES[2]
    x, weight, grad = _conv_inputs(*geometry, batch=0)
    stride, padding, dilation = geometry[3:6]
    leaves = [weight.clone().requires_grad_(True) for _ in range(2)]
    (F.conv2d(x, leaves[0], None, stride, padding, dilation) * grad).sum().backward()
    (conv_gradient.conv2d(x, leaves[1], None, stride, padding, dilation) * grad).sum().backward()
    assert torch.equal(leaves[1].grad, leaves[0].grad) and not leaves[1].grad.any()  # an IndexError before


def test_the_bayesian_convolution_takes_the_windowed_route_only_for_few_terms_in_nchw(windowed_calls):
    # 1 x 5 x 5 = 25 terms per output: both products (mean and variance) go the windowed way ...
    windowed = _bayesian_conv_gradients(1)
    assert windowed_calls == [(6, 1, 5, 5)] * 2
    # ... and give oneDNN's gradients (the same sums in another order).
    with conv_gradient.windowed_weight_gradients(False):
        onednn = _bayesian_conv_gradients(1)
    assert len(windowed_calls) == 2
    for ours, theirs in zip(windowed, onednn):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # 3 x 5 x 5 = 75 terms, or the channels-last layout: oneDNN's.
    _bayesian_conv_gradients(3)
    _bayesian_conv_gradients(2, channels_last=True)
    assert len(windowed_calls) == 2


def test_windowed_weight_gradients_switch_checks_its_argument_and_restores_the_route():
    with pytest.raises(TypeError, match="enabled must be a bool, got 0"):
        with conv_gradient.windowed_weight_gradients(0):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with conv_gradient.windowed_weight_gradients(False):
            assert not conv_gradient._windowed
            raise RuntimeError("inside")
    assert conv_gradient._windowed
