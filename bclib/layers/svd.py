"""Sparse variational dropout layers (Molchanov et al. 2017): the per-weight baseline.

Each weight has its own ``q(w) = N(theta, alpha theta^2)`` under the log-uniform prior. ``log alpha``
is clipped to ``[-8, 8]`` as in that paper, and weights with ``log alpha > 3`` are dropped. This
prunes single weights, not units: it gives sparse, not architectural, compression. Biases are
deterministic (point estimates with no KL term), as in Molchanov et al.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kl import nj_kl_approx_sum
from .base import _EPS, BayesianLayer, _Conv2dGeometry, _LinearGeometry

__all__ = ["LinearSVD", "Conv2dSVD"]

LOG_ALPHA_RANGE = (-8.0, 8.0)


class _SparseVD(BayesianLayer):
    def _init_parameters(self, bias, init_weight, init_bias, clip_var) -> None:
        self._init_weight_parameters(bias, init_weight, init_bias, clip_var, bayesian_bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``theta`` as ``nn.Linear`` (or ``init_weight``), ``log sigma^2 = -10``, bias as ``nn.Linear`` (or ``init_bias``)."""
        bound = 1.0 / math.sqrt(self.fan_in)
        if self._init_weight is None:
            self.weight_mu.uniform_(-bound, bound)
        else:
            self.weight_mu.copy_(self._init_weight)
        self.weight_logvar.fill_(-10.0)
        if self.bias_mu is not None:
            if self._init_bias is None:
                self.bias_mu.uniform_(-bound, bound)
            else:
                self.bias_mu.copy_(self._init_bias)

    def log_alpha(self) -> Tensor:
        """Per weight: ``log alpha = log sigma^2 - log theta^2``, clipped to [-8, 8]."""
        return torch.clamp(self.weight_logvar - torch.log(self.weight_mu.pow(2) + _EPS), *LOG_ALPHA_RANGE)

    def posterior_weight(self) -> tuple[Tensor, Tensor]:
        """``(theta, sigma^2)``: the posterior is ``N(theta, sigma^2)`` with ``sigma^2 = alpha theta^2``.

        As in Molchanov et al.'s code the forward pass uses ``sigma^2`` itself; the clip of
        ``log alpha`` to [-8, 8] applies to the KL and the pruning signal only.
        """
        return self.weight_mu, self.weight_logvar.exp()

    def kl_divergence(self) -> Tensor:
        """Molchanov et al.'s approximation, summed over weights (biases carry no KL)."""
        return nj_kl_approx_sum(self.weight_mu, self.weight_logvar, _EPS, LOG_ALPHA_RANGE)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self._unbatched(x):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if not self.training:
            return self._op(x, self.weight_mu, self.bias_mu)
        # Local reparameterisation (Kingma et al. 2015, Eq. 6): sample pre-activations.
        return self._sample(x, None, None)  # deterministic bias: no bias variance


class LinearSVD(_LinearGeometry, _SparseVD):
    r"""Fully connected layer with sparse variational dropout (one alpha per weight).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        init_weight, init_bias: optional tensors to start from.
        clip_var: optional upper bound on ``sigma^2`` (applied by
            :meth:`clip_variances`, which a training loop calls after each optimiser step, as
            :func:`bclib.train.fit` does).
        device, dtype: as ``nn.Linear``'s: where the parameters live and their floating dtype.

    Shape:
        - Input ``(*, in_features)``; output ``(*, out_features)``.

    Example:
        >>> LinearSVD(784, 300)(torch.randn(8, 784)).shape
        torch.Size([8, 300])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init_weight: Tensor | None = None, init_bias: Tensor | None = None,
                 clip_var: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self._init_geometry(in_features, out_features)
        self._init_parameters(bias, init_weight, init_bias, clip_var)
        self._place(device, dtype)


class Conv2dSVD(_Conv2dGeometry, _SparseVD):
    r"""2-d convolution with sparse variational dropout.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
        init_weight, init_bias, clip_var: as :class:`LinearSVD`.
        groups, padding_mode: ``nn.Conv2d``'s keywords, accepted at their defaults only (1, ``"zeros"``);
            ``bias`` is the 7th positional argument, where ``nn.Conv2d`` has ``groups``.
        device, dtype: as ``nn.Conv2d``'s.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)``; output ``(N, out_channels, H_out, W_out)``
          or ``(out_channels, H_out, W_out)``, as ``nn.Conv2d``.

    Example:
        >>> Conv2dSVD(1, 20, 5)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 20, 24, 24])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, *, init_weight: Tensor | None = None,
                 init_bias: Tensor | None = None, clip_var: float | None = None, groups: int = 1,
                 padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_parameters(bias, init_weight, init_bias, clip_var)
        self._place(device, dtype)
