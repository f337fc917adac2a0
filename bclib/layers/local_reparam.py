r"""The local reparameterisation trick (Kingma et al. 2015) as two autograd functions.

For a layer with independent Gaussian weights ``w ~ N(mu, sigma^2)`` and bias ``b ~ N(b_mu, sigma_b^2)``
the pre-activation of an input ``h`` is Gaussian, so it is sampled directly (Kingma et al. 2015, Eq. 6):

.. math::
    m = h\,\mu^\top + b_\mu,\qquad v = h^2\,(\sigma^2)^\top + \sigma_b^2,\qquad
    \text{out} = m + \sqrt{v}\,\varepsilon,\quad \varepsilon \sim N(0, 1).

A group-scale convolution also multiplies each output channel of each example by its scale ``z``:
``m = conv(h, mu) z + b_mu`` and ``v = conv(h^2, sigma^2) z^2 + sigma_b^2``.

Written as PyTorch operations this is a dozen element-wise passes forward and as many backward,
each allocating a tensor the size of the layer's output (for LeNet-5's first convolution, 1.5 M
numbers a batch). These functions do the same computation in one autograd node each, with the
gradients written out and the temporaries reused in place, which about halves the passes over memory.
Values and gradients equal the plain PyTorch expression (the tests compare them). Written-out
gradients are first derivatives only (``once_differentiable``): differentiating a training-mode
layer twice (``create_graph=True`` then backward) raises a ``RuntimeError``.

Precision. Under ``torch.autocast`` the products of both paths, forward and backward, run in the
autocast dtype, as in ``nn.Linear`` and ``nn.Conv2d``, except products of fewer than
``MIN_AUTOCAST_TERMS`` terms per output, and the variance path under a float16 autocast, which
runs in float32 (``h^2`` overflows float16 from ``|h| > 256``); the sampled pre-activation, the noise,
every element-wise step and the parameters' gradients stay in the weights' dtype (float32), and so
does the output. (In eval mode a layer is a plain ``F.linear`` / ``F.conv2d`` and follows autocast.)

``variance_dtype`` (default ``None``) runs only the variance path -- the products with ``h^2`` and
``sigma^2`` and their gradients -- in a lower precision such as ``torch.bfloat16``, with or without
autocast. The variance only sets the scale of the sampled noise, so bfloat16's
~0.4 % relative error there is far below the Monte Carlo noise of one sample; on CPUs with
AMX/AVX512-BF16 units and on GPUs the products run 3-6x faster. On CPUs without bfloat16 units
leave both off (bfloat16 is emulated there, and slower).

Layout. Both functions keep the memory layout they are given: with channels-last inputs and weights
(``model.to(memory_format=torch.channels_last)``, faster for convolutions on CPUs) every
convolution, temporary, gradient and the output are channels-last, and the noise is drawn in
memory order (see ``_standard_normal_like``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from .conv_gradient import conv2d_backward
from .noise import standard_normal

__all__ = ["sample_linear", "sample_conv2d"]

# Added to the pre-activation variance so the square root and its gradient stay finite at v = 0.
VARIANCE_EPS = 1e-8


def _variance_gradients(grad: Tensor, noise: Tensor, two_std: Tensor) -> Tensor:
    """``dL/dv = g * eps / (2 sqrt(v))``, in a new tensor: the saved ``noise`` stays intact, so a
    graph kept with ``retain_graph=True`` can be differentiated again."""
    return torch.div(noise, two_std).mul_(grad)


def _standard_normal_like(out: Tensor) -> Tensor:
    """Standard normal noise shaped and laid out like ``out`` (a dense tensor the caller made).

    Drawn as one contiguous run of numbers and viewed with ``out``'s strides, so that the k-th
    number drawn lands on the k-th element in memory: PyTorch's CPU generator fills contiguous
    memory in vectorised blocks but a channels-last tensor one element at a time (8x slower for
    LeNet-5's first convolution). For a contiguous ``out`` the numbers are those of
    ``torch.randn_like(out)``."""
    noise = standard_normal((out.numel(),), dtype=out.dtype, device=out.device, after=out)
    return noise.as_strided(out.size(), out.stride())


def _spatial_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_{h,w} a[n, c, h, w] b[n, c, h, w]``, shape ``(N, C)``, in ``a``'s memory layout (flattening
    a channels-last tensor would copy it). Under ``torch.compile`` always the product and sum, which
    it fuses: the layout test in a backward made Dynamo retrace and lose the caller's autocast."""
    if not torch.compiler.is_compiling() and a.is_contiguous() and b.is_contiguous():
        return torch.linalg.vecdot(a.flatten(2), b.flatten(2))
    return torch.mul(a, b).sum((2, 3))


def _four_bias_variance(bias_logvar: Tensor | None, like: Tensor) -> Tensor:
    """``4 (sigma_b^2 + eps)`` per output unit (``4 eps`` when the bias is deterministic or absent)."""
    if bias_logvar is None:
        return torch.full((1,), 4.0 * VARIANCE_EPS, dtype=like.dtype, device=like.device)
    return bias_logvar.exp().add_(VARIANCE_EPS).mul_(4.0)


# Products summing fewer terms per output than this stay in the weights' dtype under autocast:
# they are bound by memory, not arithmetic, so casting to and from 16 bits only costs time
# (LeNet-5's first convolution, 25 terms, runs slower in bfloat16 on an AMX CPU).
MIN_AUTOCAST_TERMS = 64


def _product_dtypes(x: Tensor, weight_mu: Tensor, variance_dtype: torch.dtype | None):
    """``(mean_dtype, variance_dtype)`` of the matrix products and convolutions.

    Under ``torch.autocast`` for ``x``'s device both are the autocast dtype (as for ``nn.Linear``
    and ``nn.Conv2d``) when each output sums at least ``MIN_AUTOCAST_TERMS`` products;
    otherwise the weights' dtype. An explicit ``variance_dtype`` sets the variance path's.
    Everything else (the sampled pre-activation, its gradients, the parameters' gradients) stays
    in the weights' dtype."""
    device = x.device.type
    long_enough = weight_mu[0].numel() >= MIN_AUTOCAST_TERMS
    low = torch.get_autocast_dtype(device) if long_enough and torch.is_autocast_enabled(device) else None
    # Not a float16 autocast: x^2 overflows float16 from |x| > 256 (bfloat16 has float32's range).
    variance_low = torch.float32 if low == torch.float16 else low
    return low or weight_mu.dtype, variance_dtype or variance_low or weight_mu.dtype


def _squared(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x * x`` in ``dtype``, squared in a type that holds both: a float16 input (from a layer run
    under a float16 autocast) would overflow from ``|x| > 256``."""
    return x.to(torch.promote_types(x.dtype, dtype)).square().to(dtype)


def _autocast_off(backward):
    """``backward`` with autocast off: it makes the casts forward chose itself, and on the CPU an
    autocast around ``loss.backward()`` would recast its products (float16: ``h^2`` overflows)."""
    @functools.wraps(backward)
    def without_autocast(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return backward(ctx, grad)
    return without_autocast


def _optional_to(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype)


class _LinearSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight_mu, weight_logvar, bias_mu, bias_logvar, variance_dtype):
        mean_dtype, variance_dtype = _product_dtypes(h, weight_mu, variance_dtype)
        dtype = weight_mu.dtype
        ctx.input_dtype, ctx.variance_dtype = h.dtype, variance_dtype
        # The casts are explicit: autocast must not re-cast anything in between.
        with torch.autocast(h.device.type, enabled=False):
            h_mean, weight_mu_mean = h.to(mean_dtype), weight_mu.to(mean_dtype)
            weight_var = weight_logvar.exp()
            h_squared, weight_var_low = _squared(h, variance_dtype), weight_var.to(variance_dtype)
            # Work with 4 v so that sqrt gives 2 sqrt(v), the denominator of dL/dv, without another pass.
            four_bias_var = _four_bias_variance(bias_logvar, weight_mu).to(variance_dtype)
            two_std = torch.addmm(four_bias_var, h_squared, weight_var_low.t(), alpha=4.0).to(dtype).sqrt_()
            out = F.linear(h_mean, weight_mu_mean, _optional_to(bias_mu, mean_dtype)).to(dtype)
            noise = _standard_normal_like(out)
            out.addcmul_(two_std, noise, value=0.5)
        ctx.save_for_backward(h_mean, h_squared, weight_mu_mean, weight_var, weight_var_low, bias_logvar, noise,
                              two_std)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_autocast_off
    def backward(ctx, grad):
        h, h_squared, weight_mu, weight_var, weight_var_low, bias_logvar, noise, two_std = ctx.saved_tensors
        need_h, need_mu, need_logvar, need_bias_mu, need_bias_logvar = ctx.needs_input_grad[:5]
        dtype = weight_var.dtype
        grad = grad.to(dtype)
        grad_var = _variance_gradients(grad, noise, two_std)
        grad_low, grad_var_low = grad.to(h.dtype), grad_var.to(ctx.variance_dtype)
        grad_h = grad_mu = grad_logvar = grad_bias_mu = grad_bias_logvar = None
        if need_mu:
            grad_mu = grad_low.t().mm(h).to(dtype)
        if need_logvar:
            # d v / d log sigma^2 = h^2 sigma^2
            grad_logvar = grad_var_low.t().mm(h_squared).to(dtype).mul_(weight_var)
        if need_bias_mu:
            grad_bias_mu = grad.sum(0)
        if need_bias_logvar:
            grad_bias_logvar = grad_var.sum(0).mul_(bias_logvar.exp())
        if need_h:
            # d out / d h = mu + 2 h sigma^2 dL/dv
            grad_h = grad_low.mm(weight_mu).addcmul_(h, grad_var_low.mm(weight_var_low), value=2.0)
            grad_h = grad_h.to(ctx.input_dtype)
        return grad_h, grad_mu, grad_logvar, grad_bias_mu, grad_bias_logvar, None


class _Conv2dSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, weight_mu, weight_logvar, bias_mu, bias_logvar, stride, padding, dilation,
                variance_dtype):
        mean_dtype, variance_dtype = _product_dtypes(x, weight_mu, variance_dtype)
        dtype = weight_mu.dtype
        ctx.conv_args, ctx.input_dtype, ctx.variance_dtype = (stride, padding, dilation), x.dtype, variance_dtype
        channels = (1, -1, 1, 1)
        with torch.autocast(x.device.type, enabled=False):
            x_mean, weight_mu_mean = x.to(mean_dtype), weight_mu.to(mean_dtype)
            # Laid out like weight_mu, so that both convolutions pick the same output layout (a
            # one-channel weight is both contiguous and channels-last, and the two may differ).
            weight_var = torch.empty_like(weight_mu).copy_(weight_logvar).exp_()
            x_squared, weight_var_low = _squared(x, variance_dtype), weight_var.to(variance_dtype)
            four_bias_var = _four_bias_variance(bias_logvar, weight_mu).view(channels)
            var_conv = F.conv2d(x_squared, weight_var_low, None, *ctx.conv_args).to(dtype)
            if scale is None:
                out = F.conv2d(x_mean, weight_mu_mean, _optional_to(bias_mu, mean_dtype), *ctx.conv_args).to(dtype)
                two_std = torch.add(four_bias_var, var_conv, alpha=4.0).sqrt_()
                mean_conv = var_conv = None
            else:
                z = scale.view(*scale.shape, 1, 1)
                mean_conv = F.conv2d(x_mean, weight_mu_mean, None, *ctx.conv_args).to(dtype)
                out = mean_conv * z if bias_mu is None else torch.addcmul(bias_mu.view(channels), mean_conv, z)
                two_std = torch.addcmul(four_bias_var, var_conv, z * z, value=4.0).sqrt_()
            noise = _standard_normal_like(out)
            out.addcmul_(two_std, noise, value=0.5)
        ctx.save_for_backward(x_mean, x_squared, scale, weight_mu_mean, weight_var, weight_var_low, bias_logvar,
                              mean_conv, var_conv, noise, two_std)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_autocast_off
    def backward(ctx, grad):
        (x, x_squared, scale, weight_mu, weight_var, weight_var_low, bias_logvar, mean_conv, var_conv, noise,
         two_std) = ctx.saved_tensors
        need_x, need_scale, need_mu, need_logvar, need_bias_mu, need_bias_logvar = ctx.needs_input_grad[:6]
        dtype = weight_var.dtype
        grad = grad.to(dtype)
        grad_var = _variance_gradients(grad, noise, two_std)
        grad_x = grad_scale = grad_bias_mu = grad_bias_logvar = None
        if need_bias_mu:
            grad_bias_mu = grad.sum((0, 2, 3))
        if need_bias_logvar:
            grad_bias_logvar = grad_var.sum((0, 2, 3)).mul_(bias_logvar.exp())
        if scale is None:
            grad_mean_conv, grad_var_conv = grad, grad_var
        else:
            z = scale.view(*scale.shape, 1, 1)
            if need_scale:
                # d m / d z = conv(h, mu), d v / d z = 2 z conv(h^2, sigma^2), summed over positions
                grad_scale = _spatial_dot(grad, mean_conv)
                grad_scale.addcmul_(scale, _spatial_dot(grad_var, var_conv), value=2.0)
            grad_mean_conv, grad_var_conv = grad * z, grad_var.mul_(z * z)
        # Each product's weight gradient may take the windowed route (conv_gradient), for few terms per output.
        grad_x_mean, grad_mu = conv2d_backward(grad_mean_conv.to(x.dtype), x, weight_mu, ctx.conv_args, need_x,
                                               need_mu)
        grad_x_var, grad_logvar = conv2d_backward(grad_var_conv.to(ctx.variance_dtype), x_squared, weight_var_low,
                                                  ctx.conv_args, need_x, need_logvar)
        if need_mu:
            grad_mu = grad_mu.to(dtype)
        if need_logvar:
            grad_logvar = grad_logvar.to(dtype).mul_(weight_var)
        if need_x:
            grad_x = grad_x_mean.addcmul_(x, grad_x_var, value=2.0).to(ctx.input_dtype)
        return grad_x, grad_scale, grad_mu, grad_logvar, grad_bias_mu, grad_bias_logvar, None, None, None, None


def sample_linear(h: Tensor, weight_mu: Tensor, weight_logvar: Tensor, bias_mu: Tensor | None = None,
                  bias_logvar: Tensor | None = None, variance_dtype: torch.dtype | None = None) -> Tensor:
    r"""One sample of the pre-activation of a linear layer with Gaussian weights.

    Computes :math:`h\mu^\top + b_\mu + \sqrt{h^2 (\sigma^2)^\top + \sigma_b^2}\,\varepsilon` with
    ``sigma^2 = exp(weight_logvar)`` and ``sigma_b^2 = exp(bias_logvar)`` (no bias variance when
    ``bias_logvar`` is ``None``: a deterministic bias).

    Args:
        h: the input (after any group scales).
        weight_mu, weight_logvar: means and log-variances of the weights.
        bias_mu, bias_logvar: of the bias (``None``: no bias, or no bias variance).
        variance_dtype: see the module docstring (``None``: full precision).

    Shape:
        - h: ``(*, in_features)``; weight_mu, weight_logvar: ``(out_features, in_features)``;
          bias_mu, bias_logvar: ``(out_features,)``.
        - Output: ``(*, out_features)``.
    """
    if h.dim() == 2:
        return _LinearSample.apply(h, weight_mu, weight_logvar, bias_mu, bias_logvar, variance_dtype)
    # The function works on a matrix; the reshapes stay outside it, so its output is never a view
    # made inside a custom Function (which in-place ops downstream, ReLU(inplace=True), would reject).
    out = _LinearSample.apply(h.reshape(-1, h.shape[-1]), weight_mu, weight_logvar, bias_mu, bias_logvar,
                              variance_dtype)
    return out.reshape(*h.shape[:-1], out.shape[-1])


def sample_conv2d(x: Tensor, scale: Tensor | None, weight_mu: Tensor, weight_logvar: Tensor,
                  bias_mu: Tensor | None, bias_logvar: Tensor | None, stride, padding, dilation,
                  variance_dtype: torch.dtype | None = None) -> Tensor:
    r"""One sample of the pre-activation of a 2-d convolution with Gaussian weights.

    Computes :math:`m + \sqrt{v}\,\varepsilon` with ``m = conv(x, mu) z + b_mu`` and
    ``v = conv(x^2, sigma^2) z^2 + sigma_b^2``, where ``z`` (``scale``, shape ``(N, out_channels)``)
    is one group scale per example and output channel, or 1 when ``scale`` is ``None``.

    Args:
        x: the input.
        scale: the group scales ``z`` or ``None``.
        weight_mu, weight_logvar: means and log-variances of the filters.
        bias_mu, bias_logvar: of the bias (``None``: no bias, or no bias variance).
        stride, padding, dilation: ints or pairs of ints, as ``F.conv2d`` takes them.
        variance_dtype: see the module docstring (``None``: full precision).

    Shape:
        - x: ``(N, in_channels, H, W)``; weights ``(out_channels, in_channels, kh, kw)``;
          bias_mu, bias_logvar: ``(out_channels,)``.
        - Output: ``(N, out_channels, H_out, W_out)`` as ``F.conv2d``.
    """
    # Pairs, as F.conv2d's: the backward's aten.convolution_backward takes no ints.
    return _Conv2dSample.apply(x, scale, weight_mu, weight_logvar, bias_mu, bias_logvar, _pair(stride),
                               _pair(padding), _pair(dilation), variance_dtype)
