"""Group normal-Jeffreys layers (group variational dropout), Louizos et al. 2017, Sec. 3.1.

Each weight is ``w = z w~`` with a scale ``z`` per group.
Prior: ``p(z) ~ 1/|z|`` per group and ``p(w | z) = N(0, z^2)``, i.e. ``w~ ~ N(0, 1)``.
Posterior: ``q(z_g) = N(z_mu, z_var)`` and ``q(w | z) = N(z mu, z^2 sigma^2)``, i.e. ``q(w~) = N(mu, sigma^2)``.
``alpha_g = z_var / z_mu^2`` is the noise-to-signal ratio of group ``g``'s scale (Gaussian dropout with
drop probability ``p = alpha / (1 + alpha)``): groups with large alpha are pruned.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kl import nj_kl_approx_sum
from .base import _EPS, GroupScaleLayer, _Conv2dGeometry, _LinearGeometry
from .noise import standard_normal

__all__ = ["LinearGroupNJ", "Conv2dGroupNJ"]


class _GroupNJ(GroupScaleLayer):
    def _init_group_parameters(self) -> None:
        self.z_mu = nn.Parameter(torch.empty(self.num_groups))
        self.z_logvar = nn.Parameter(torch.empty(self.num_groups))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``z_mu ~ N(1, 0.01^2)``, ``log z_var ~ N(-9, 0.01^2)`` (the release's start: alpha ~ 1e-4),
        then the weights, divided by ``z_mu`` so that ``E[w] = z_mu * mu`` equals ``init_weight`` when given."""
        self.z_mu.normal_(1.0, 1e-2)
        self.z_logvar.normal_(-9.0, 1e-2)
        self._reset_weight_and_bias(self._group_view(self.z_mu))

    def log_alpha(self) -> Tensor:
        """``log alpha_g = log z_var - log z_mu^2`` per group (one per input unit / output channel)."""
        return self.z_logvar - torch.log(self.z_mu.pow(2) + _EPS)

    def group_scale_moments(self) -> tuple[Tensor, Tensor]:
        return self.z_mu, self.z_logvar.exp()

    def sample_group_scale(self, shape: torch.Size, after: Tensor | None = None) -> Tensor:
        # z = z_mu + sigma_z * eps, one draw per example and group (Eq. 11 of the paper).
        noise = standard_normal(shape, device=self.z_mu.device, dtype=self.z_mu.dtype, after=after)
        return torch.addcmul(self.z_mu, torch.exp(0.5 * self.z_logvar), noise)

    def kl_divergence(self) -> Tensor:
        r"""KL(q || p) in nats: the approximation of Molchanov et al. for each ``z_g`` plus
        :math:`\tfrac12\sum(-\log\sigma^2 + \sigma^2 + \mu^2 - 1)` for the weights and biases."""
        return nj_kl_approx_sum(self.z_mu, self.z_logvar, _EPS) + self._weight_and_bias_kl()


class LinearGroupNJ(_LinearGeometry, _GroupNJ):
    r"""Fully connected layer with a group normal-Jeffreys prior; groups are the input units.

    Training samples the pre-activations (local reparameterisation); ``eval()`` uses the posterior
    mean ``E[w] = z_mu * mu``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False`` the layer has no bias.
        init_weight: optional ``(out_features, in_features)`` tensor to start from (a pretrained network).
        init_bias: optional ``(out_features,)`` tensor to start the bias from.
        clip_var: optional upper bound on the weight variances ``sigma^2`` (applied by
            :meth:`clip_variances`, which a training loop calls after each optimiser step, as
            :func:`bclib.train.fit` does).
        device, dtype: as ``nn.Linear``'s: where the parameters live and their floating dtype.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Attributes:
        weight_mu, weight_logvar: mean and log-variance of ``q(w~)``, shape ``(out_features, in_features)``.
        z_mu, z_logvar: mean and log-variance of ``q(z)``, shape ``(in_features,)``.
        bias_mu, bias_logvar: mean and log-variance of the bias, shape ``(out_features,)``.

    Example:
        >>> layer = LinearGroupNJ(784, 300, clip_var=0.04)
        >>> layer(torch.randn(8, 784)).shape
        torch.Size([8, 300])
        >>> layer.log_alpha().shape
        torch.Size([784])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init_weight: Tensor | None = None, init_bias: Tensor | None = None,
                 clip_var: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self._init_geometry(in_features, out_features)
        self._init_parameters(bias, init_weight, init_bias, clip_var)
        self._init_group_parameters()
        self._place(device, dtype)


class Conv2dGroupNJ(_Conv2dGeometry, _GroupNJ):
    r"""2-d convolution with a group normal-Jeffreys prior; groups are the output channels (filters).

    Training: ``mean = conv(x, mu) z + b``, ``var = conv(x^2, sigma^2) z^2 + sigma_b^2`` with one
    ``z`` per example and output channel, then ``out = mean + sqrt(var) eps``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
        init_weight: optional ``(out_channels, in_channels, kh, kw)`` tensor to start from.
        init_bias: optional ``(out_channels,)`` tensor.
        clip_var: optional upper bound on the weight variances, as in :class:`LinearGroupNJ`.
        groups, padding_mode: ``nn.Conv2d``'s keywords, accepted at their defaults only (1, ``"zeros"``);
            ``bias`` is the 7th positional argument, where ``nn.Conv2d`` has ``groups``.
        device, dtype: as ``nn.Conv2d``'s.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``; output ``(N, out_channels, H_out, W_out)``
          or ``(out_channels, H_out, W_out)``, as ``nn.Conv2d``.

    Example:
        >>> conv = Conv2dGroupNJ(1, 20, 5)
        >>> conv(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 20, 24, 24])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, *, init_weight: Tensor | None = None,
                 init_bias: Tensor | None = None, clip_var: float | None = None, groups: int = 1,
                 padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_parameters(bias, init_weight, init_bias, clip_var)
        self._init_group_parameters()
        self._place(device, dtype)
