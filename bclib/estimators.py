r"""Gradient estimators of the expected loss: local reparameterisation against weight sampling.

A Bayesian layer's expected loss :math:`E_{q(W)}[L(XW^\top)]` is estimated on a minibatch by
sampling. Two estimators are unbiased for the same gradient:

* **weight sampling**: draw one weight matrix :math:`W \sim q` for the whole minibatch
  (:func:`weight_sample_forward`). The examples of a minibatch then share one noise draw, so the
  noise does not average out as the minibatch grows;
* **local reparameterisation** (Kingma et al. 2015): draw the pre-activations of each example
  from their Gaussian marginal, independently per example: the layers' own training forward.

:func:`minibatch_gradient_moments` measures the mean and variance of both over many minibatches.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers.base import GroupScaleLayer

__all__ = ["GradientMoments", "weight_sample_forward", "minibatch_gradient_moments"]


class GradientMoments(NamedTuple):
    """Per-element mean and variance of a stochastic gradient, one entry per parameter name.

    Attributes:
        mean: ``{name: tensor}`` shaped like each parameter.
        variance: ``{name: tensor}`` (unbiased, over the minibatches), shaped like each parameter.
    """

    mean: dict[str, Tensor]
    variance: dict[str, Tensor]


def _check_group_layer(layer) -> None:
    if not isinstance(layer, GroupScaleLayer):
        raise TypeError(
            "layer must be a group-scale Bayesian layer (LinearGroupNJ, Conv2dGroupNJ, LinearGroupHS, "
            f"Conv2dGroupHS), got {type(layer).__name__}"
        )


def weight_sample_forward(layer: GroupScaleLayer, x: Tensor) -> Tensor:
    r"""Forward pass with ONE weight matrix drawn from the posterior for the whole minibatch.

    Draws :math:`z_g \sim q(z_g)` once per group and :math:`\tilde w \sim N(\mu, \sigma^2)` once
    per weight, then uses :math:`W = z \tilde w` (Louizos et al. 2017, Eq. 9) and one bias
    :math:`b \sim N(\mu_b, \sigma_b^2)`, all shared by every example of the minibatch. Each
    example's output has the same distribution as in the layer's own training forward; only the
    sharing across the minibatch differs.

    Args:
        layer: a group normal-Jeffreys or group horseshoe layer.
        x: a minibatch, as the layer's forward takes it.

    Returns:
        The layer's output for ``x``.
    """
    _check_group_layer(layer)
    layer._check_input(x)
    z = layer._group_view(layer.sample_group_scale(torch.Size((layer.num_groups,))))
    weight = z * (layer.weight_mu + torch.exp(0.5 * layer.weight_logvar) * torch.randn_like(layer.weight_mu))
    bias = None
    if layer.bias_mu is not None:
        bias = layer.bias_mu + torch.exp(0.5 * layer.bias_logvar) * torch.randn_like(layer.bias_mu)
    return layer._op(x, weight, bias)


def minibatch_gradient_moments(layer: GroupScaleLayer, inputs: Tensor, targets: Tensor, *, batch_size: int,
                               num_batches: int, local_reparameterisation: bool,
                               loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                               generator: torch.Generator | None = None) -> GradientMoments:
    r"""Mean and variance of the minibatch gradient of ``loss`` over ``num_batches`` minibatches.

    Each minibatch draws ``batch_size`` examples at random (without replacement within the
    minibatch) and fresh noise, computes :math:`\nabla_\theta \,\mathrm{loss}(f(x), y)` (the loss
    averaged over the minibatch, as in training) and accumulates its first two moments in
    ``float64``. The variance thus includes both the choice of examples and the weight noise.

    Args:
        layer: a group normal-Jeffreys or group horseshoe layer (put in training mode here).
        inputs: the data set's inputs, first dimension the examples.
        targets: the matching targets for ``loss``.
        batch_size: examples per minibatch.
        num_batches: minibatches (at least 2).
        local_reparameterisation: ``True`` for the layer's own forward (independent noise per
            example), ``False`` for :func:`weight_sample_forward` (one weight draw per minibatch).
        loss: ``loss(output, targets) -> scalar``; cross-entropy by default.
        generator: optional ``torch.Generator`` for the choice of examples (the noise uses torch's
            global generator, as the layers do).

    Returns:
        :class:`GradientMoments` for every parameter of the layer that requires a gradient.
    """
    _check_group_layer(layer)
    for name, value, low in (("batch_size", batch_size, 1), ("num_batches", num_batches, 2)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same number of examples, got "
                         f"{inputs.shape[0]} and {targets.shape[0]}")
    if batch_size > inputs.shape[0]:
        raise ValueError(f"batch_size must be <= the number of examples ({inputs.shape[0]}), got {batch_size}")
    if not isinstance(local_reparameterisation, bool):  # a string such as "no" would count as True
        raise TypeError(f"local_reparameterisation must be True or False, got {local_reparameterisation!r}")
    trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("layer has no parameter that requires a gradient: there is no gradient to measure")
    names, params = zip(*trainable)
    total = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    total_sq = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    layer.train()
    for _ in range(num_batches):
        index = torch.randperm(inputs.shape[0], generator=generator)[:batch_size]
        x, y = inputs[index], targets[index]
        output = layer(x) if local_reparameterisation else weight_sample_forward(layer, x)
        grads = torch.autograd.grad(loss(output, y), params, allow_unused=True)
        for i, grad in enumerate(grads):
            if grad is not None:
                grad = grad.detach().to(torch.float64)
                total[i] += grad
                total_sq[i] += grad * grad
    mean = {n: t / num_batches for n, t in zip(names, total)}
    # Unbiased variance: (sum g^2 - n mean^2) / (n - 1), clamped at 0 against rounding.
    variance = {
        n: ((sq - num_batches * mean[n] ** 2) / (num_batches - 1)).clamp_min(0.0)
        for n, sq in zip(names, total_sq)
    }
    return GradientMoments(mean, variance)
