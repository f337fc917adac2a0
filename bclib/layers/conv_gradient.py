r"""Weight gradients of convolutions with few terms per output, from the input's windows.

A 2-d convolution's weight gradient sums, over examples and output positions, the output gradient
times the input window under the kernel:

.. math::
    \frac{\partial L}{\partial W} = \sum_n g_n X_n^\top ,

with :math:`g_n` example ``n``'s output gradient, shape ``(out_channels, H_out W_out)``, and
:math:`X_n` its input windows, shape ``(in_channels kh kw, H_out W_out)`` (what ``F.unfold``
returns). When each output sums few terms (LeNet-5's first convolution: one channel, 5 x 5), the
products are small and oneDNN, PyTorch's CPU convolution library, computes this gradient slowly in
the default NCHW layout, more slowly than reading the windows through strides and doing one
batched matrix product (on the AMD EPYC of family 25 where it was measured, taking that route
for this one gradient takes a sixth off a deterministic LeNet-5-Caffe training step:
``python -m bclib bench layers``, row ``none+windowed``). :func:`conv2d_backward` takes that route
for such convolutions and leaves every other gradient to oneDNN (with more terms, or in the
channels-last layout, oneDNN's was as fast or faster there). The values are the same sums in
another order.

The Bayesian convolutions (:mod:`.local_reparam`) use it for both of their products, the mean's
and the variance's. ``python -m bclib bench layers`` times them with oneDNN's gradients too
(:func:`windowed_weight_gradients`), and a deterministic network given the same gradients
(:func:`conv2d`), so the speed-up is not credited to the Bayesian layers alone.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["WINDOWED_WEIGHT_GRADIENT_TERMS", "MAX_WINDOW_ELEMENTS", "conv2d", "conv2d_backward",
           "conv2d_input_windows", "conv2d_weight_gradient", "windowed_weight_gradients"]

#: Convolutions summing fewer terms per output than this (``in_channels * kh * kw``: LeNet-5's first,
#: 25; a first convolution on RGB images with 3 x 3 kernels, 27) take the windowed route.
WINDOWED_WEIGHT_GRADIENT_TERMS = 64
#: The most numbers the windows of one batched product may hold (64 MiB in float32); a larger batch
#: is taken in slices of examples, so that large images do not cost gigabytes.
MAX_WINDOW_ELEMENTS = 1 << 24
_windowed = True


@contextlib.contextmanager
def windowed_weight_gradients(enabled: bool):
    """Turn the windowed route on or off inside the ``with`` block (process-wide; on by default).

    For measuring what it gains: off, every weight gradient comes from oneDNN, as before it."""
    global _windowed
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _windowed = _windowed, enabled
    try:
        yield
    finally:
        _windowed = previous


def conv2d_input_windows(x: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """The windows a 2-d convolution multiplies with its kernel, as ``F.unfold`` returns them.

    Read through views (one copy), for any memory layout of ``x``: ``F.unfold`` gives the same
    tensor but takes longer on a CPU than the product it feeds. Views, not ``as_strided`` with
    ``x``'s strides: under ``torch.compile`` the compiler may lay ``x`` out otherwise than the
    strides it traced, and windows read by explicit strides were then wrong (wrong weight gradients).

    Shape:
        - x: ``(N, in_channels, H, W)``; ``kernel_size``, ``stride``, ``padding``, ``dilation``: pairs.
        - Output: ``(N, in_channels * kh * kw, H_out * W_out)``, in the order of the weight's
          flattened ``(in_channels, kh, kw)``.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    # (n, channels, out_h, out_w, span_h, span_w), every dilation-th element of a span under the kernel
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, channels, out_h, out_w = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, channels * kh * kw, out_h * out_w)


def conv2d_weight_gradient(grad: Tensor, x: Tensor, weight_shape, stride, padding, dilation,
                           max_window_elements: int = MAX_WINDOW_ELEMENTS) -> Tensor:
    r"""``dL/dW`` of ``conv2d(x, W, None, stride, padding, dilation)`` given ``grad = dL/d out``:
    :math:`\sum_n g_n X_n^\top` (module docstring), one batched matrix product per slice of
    examples whose windows hold at most ``max_window_elements`` numbers (at least one example).

    Shape:
        - grad: ``(N, out_channels, H_out, W_out)``; x: ``(N, in_channels, H, W)``.
        - Output: ``weight_shape``, ``(out_channels, in_channels, kh, kw)``.
    """
    if x.shape[0] == 0:  # an empty batch: nothing to sum (as nn.Conv2d gives)
        return grad.new_zeros(weight_shape)
    per_example = math.prod(weight_shape[1:]) * grad[0, 0].numel()
    step = max(1, max_window_elements // per_example)
    total = None
    for start in range(0, x.shape[0], step):
        windows = conv2d_input_windows(x[start:start + step], weight_shape[2:], stride, padding, dilation)
        part = torch.bmm(grad[start:start + step].flatten(2), windows.transpose(1, 2)).sum(0)
        total = part if total is None else total.add_(part)
    return total.view(weight_shape)


def _windowed_route_pays(grad: Tensor, weight: Tensor) -> bool:
    # Not under torch.compile, which makes its own convolution backward: there the route's layout
    # test (is_contiguous) made Dynamo retrace and lose the caller's autocast, and its batch slices
    # failed to compile for symbolic image sizes.
    return (_windowed and not torch.compiler.is_compiling() and grad.device.type == "cpu"
            and grad.is_contiguous() and weight[0].numel() < WINDOWED_WEIGHT_GRADIENT_TERMS)


def conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, conv_args, need_x: bool, need_weight: bool):
    """``(dL/dx, dL/dW)`` of ``conv2d(x, weight, None, *conv_args)``, ``None`` where not needed.

    The weight gradient takes the windowed route (:func:`conv2d_weight_gradient`) for a convolution
    on a CPU, outside ``torch.compile``, with fewer than :data:`WINDOWED_WEIGHT_GRADIENT_TERMS` terms per output and ``grad``
    in the NCHW layout, unless :func:`windowed_weight_gradients` turned it off; everything else
    comes from oneDNN. ``conv_args``: ``(stride, padding, dilation)``, each a pair.
    """
    windowed = need_weight and _windowed_route_pays(grad, weight)
    grad_x = grad_weight = None
    if need_x or (need_weight and not windowed):
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, *conv_args, False, (0, 0), 1, (need_x, need_weight and not windowed, False))
    if windowed:
        grad_weight = conv2d_weight_gradient(grad, x, weight.shape, *conv_args)
    return grad_x, grad_weight


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.conv_args = (stride, padding, dilation)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x, grad_weight = conv2d_backward(grad, x, weight, ctx.conv_args, need_x, need_weight)
        return grad_x, grad_weight, grad.sum((0, 2, 3)) if need_bias else None, None, None, None


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """``F.conv2d`` (one group) whose gradients come from :func:`conv2d_backward`: a deterministic
    convolution with the Bayesian layers' weight gradients, for comparing like with like.
    ``stride``, ``padding``, ``dilation``: ints or pairs of ints, as ``F.conv2d`` takes them."""
    return _Conv2d.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation))
