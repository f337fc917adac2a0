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
Values and gradients equal the plain PyTorch expression (the tests compare them).

``variance_dtype`` (default ``None``: the weights' dtype) runs the variance path -- the products
with ``h^2`` and ``sigma^2`` and their gradients -- in a lower precision such as ``torch.bfloat16``,
while the mean path, the parameters and every gradient stay float32. The variance only sets the
scale of the sampled noise, so bfloat16's ~0.4 % relative error there is far below the Monte Carlo
noise of one sample; on CPUs with AMX/AVX512-BF16 units and on GPUs those products run 3-6x faster.
On CPUs without bfloat16 units leave it at ``None`` (bfloat16 is emulated there, and slower).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_linear", "sample_conv2d"]

# Added to the pre-activation variance so the square root and its gradient stay finite at v = 0.
VARIANCE_EPS = 1e-8


def _variance_gradients(grad: Tensor, noise: Tensor, two_std: Tensor) -> Tensor:
    """``dL/dv = g * eps / (2 sqrt(v))``, computed into ``noise`` (free after the forward)."""
    return noise.div_(two_std).mul_(grad)


def _to(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def _four_bias_variance(bias_logvar: Tensor | None, like: Tensor) -> Tensor:
    """``4 (sigma_b^2 + eps)`` per output unit (``4 eps`` when the bias is deterministic or absent)."""
    if bias_logvar is None:
        return torch.full((1,), 4.0 * VARIANCE_EPS, dtype=like.dtype, device=like.device)
    return bias_logvar.exp().add_(VARIANCE_EPS).mul_(4.0)


class _LinearSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight_mu, weight_logvar, bias_mu, bias_logvar, variance_dtype):
        batch_shape = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])
        weight_var = weight_logvar.exp()
        h_squared, weight_var_low = _to(h * h, variance_dtype), _to(weight_var, variance_dtype)
        # Work with 4 v so that sqrt gives 2 sqrt(v), the denominator of dL/dv, without another pass.
        four_bias_var = _to(_four_bias_variance(bias_logvar, h), variance_dtype)
        two_std = torch.addmm(four_bias_var, h_squared, weight_var_low.t(), alpha=4.0).to(h.dtype).sqrt_()
        out = F.linear(h, weight_mu, bias_mu)
        noise = torch.randn_like(out)
        out.addcmul_(two_std, noise, value=0.5)
        ctx.save_for_backward(h, h_squared, weight_mu, weight_var, weight_var_low, bias_logvar, noise, two_std)
        ctx.batch_shape, ctx.variance_dtype = batch_shape, variance_dtype
        return out.reshape(*batch_shape, out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, h_squared, weight_mu, weight_var, weight_var_low, bias_logvar, noise, two_std = ctx.saved_tensors
        need_h, need_mu, need_logvar, need_bias_mu, need_bias_logvar = ctx.needs_input_grad[:5]
        grad = grad.reshape(noise.shape)
        grad_var = _variance_gradients(grad, noise, two_std)
        grad_var_low = _to(grad_var, ctx.variance_dtype)
        grad_h = grad_mu = grad_logvar = grad_bias_mu = grad_bias_logvar = None
        if need_mu:
            grad_mu = grad.t().mm(h)
        if need_logvar:
            # d v / d log sigma^2 = h^2 sigma^2
            grad_logvar = torch.mul(grad_var_low.t().mm(h_squared), weight_var)
        if need_bias_mu:
            grad_bias_mu = grad.sum(0)
        if need_bias_logvar:
            grad_bias_logvar = grad_var.sum(0).mul_(bias_logvar.exp())
        if need_h:
            # d out / d h = mu + 2 h sigma^2 dL/dv
            grad_h = grad.mm(weight_mu).addcmul_(h, grad_var_low.mm(weight_var_low), value=2.0)
            grad_h = grad_h.reshape(*ctx.batch_shape, h.shape[-1])
        return grad_h, grad_mu, grad_logvar, grad_bias_mu, grad_bias_logvar, None


class _Conv2dSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, weight_mu, weight_logvar, bias_mu, bias_logvar, stride, padding, dilation,
                variance_dtype):
        weight_var = weight_logvar.exp()
        x_squared, weight_var_low = _to(x * x, variance_dtype), _to(weight_var, variance_dtype)
        channels = (1, -1, 1, 1)
        four_bias_var = _four_bias_variance(bias_logvar, x).view(channels)
        var_conv = F.conv2d(x_squared, weight_var_low, None, stride, padding, dilation)
        if scale is None:
            out = F.conv2d(x, weight_mu, bias_mu, stride, padding, dilation)
            two_std = torch.add(four_bias_var, var_conv, alpha=4.0).sqrt_()
            mean_conv = var_conv = None
        else:
            z = scale.view(*scale.shape, 1, 1)
            mean_conv = F.conv2d(x, weight_mu, None, stride, padding, dilation)
            out = mean_conv * z if bias_mu is None else torch.addcmul(bias_mu.view(channels), mean_conv, z)
            two_std = torch.addcmul(four_bias_var, var_conv, z * z, value=4.0).sqrt_()
        noise = torch.randn_like(out)
        out.addcmul_(two_std, noise, value=0.5)
        ctx.conv_args, ctx.variance_dtype = (stride, padding, dilation), variance_dtype
        ctx.save_for_backward(x, x_squared, scale, weight_mu, weight_var, weight_var_low, bias_logvar, mean_conv,
                              var_conv, noise, two_std)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x, x_squared, scale, weight_mu, weight_var, weight_var_low, bias_logvar, mean_conv, var_conv, noise,
         two_std) = ctx.saved_tensors
        need_x, need_scale, need_mu, need_logvar, need_bias_mu, need_bias_logvar = ctx.needs_input_grad[:6]
        stride, padding, dilation = ctx.conv_args
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
                grad_scale = torch.linalg.vecdot(grad.flatten(2), mean_conv.flatten(2))
                grad_scale.addcmul_(scale, torch.mul(grad_var, var_conv).sum((2, 3)), value=2.0)
            grad_mean_conv, grad_var_conv = grad * z, grad_var.mul_(z * z)
        weight_args = (stride, padding, dilation, False, (0, 0), 1)
        grad_x_mean, grad_mu, _ = torch.ops.aten.convolution_backward(
            grad_mean_conv, x, weight_mu, None, *weight_args, (need_x, need_mu, False))
        grad_x_var, grad_logvar, _ = torch.ops.aten.convolution_backward(
            _to(grad_var_conv, ctx.variance_dtype), x_squared, weight_var_low, None, *weight_args,
            (need_x, need_logvar, False))
        if need_logvar:
            grad_logvar = torch.mul(grad_logvar, weight_var)
        if need_x:
            grad_x = grad_x_mean.addcmul_(x, grad_x_var, value=2.0)
        return grad_x, grad_scale, grad_mu, grad_logvar, grad_bias_mu, grad_bias_logvar, None, None, None, None


def sample_linear(h: Tensor, weight_mu: Tensor, weight_logvar: Tensor, bias_mu: Tensor | None = None,
                  bias_logvar: Tensor | None = None, variance_dtype: torch.dtype | None = None) -> Tensor:
    r"""One sample of the pre-activation of a linear layer with Gaussian weights.

    Computes :math:`h\mu^\top + b_\mu + \sqrt{h^2 (\sigma^2)^\top + \sigma_b^2}\,\varepsilon` with
    ``sigma^2 = exp(weight_logvar)`` and ``sigma_b^2 = exp(bias_logvar)`` (no bias variance when
    ``bias_logvar`` is ``None``: a deterministic bias).

    Shape:
        - h: ``(*, in_features)``; weight_mu, weight_logvar: ``(out_features, in_features)``;
          bias_mu, bias_logvar: ``(out_features,)``.
        - Output: ``(*, out_features)``.

    ``variance_dtype``: see the module docstring (``None``: full precision).
    """
    return _LinearSample.apply(h, weight_mu, weight_logvar, bias_mu, bias_logvar, variance_dtype)


def sample_conv2d(x: Tensor, scale: Tensor | None, weight_mu: Tensor, weight_logvar: Tensor,
                  bias_mu: Tensor | None, bias_logvar: Tensor | None, stride, padding, dilation,
                  variance_dtype: torch.dtype | None = None) -> Tensor:
    r"""One sample of the pre-activation of a 2-d convolution with Gaussian weights.

    Computes :math:`m + \sqrt{v}\,\varepsilon` with ``m = conv(x, mu) z + b_mu`` and
    ``v = conv(x^2, sigma^2) z^2 + sigma_b^2``, where ``z`` (``scale``, shape ``(N, out_channels)``)
    is one group scale per example and output channel, or 1 when ``scale`` is ``None``.

    Shape:
        - x: ``(N, in_channels, H, W)``; weights ``(out_channels, in_channels, kh, kw)``;
          bias_mu, bias_logvar: ``(out_channels,)``.
        - Output: ``(N, out_channels, H_out, W_out)`` as ``F.conv2d``.

    ``variance_dtype``: see the module docstring (``None``: full precision).
    """
    return _Conv2dSample.apply(x, scale, weight_mu, weight_logvar, bias_mu, bias_logvar, stride, padding, dilation,
                               variance_dtype)
