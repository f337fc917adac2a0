"""Group horseshoe layers, Louizos et al. 2017, Sec. 3.2 (non-centred parameterisation).

Prior: ``w_ij = w~_ij z~_g s`` with ``w~ ~ N(0, 1)``, ``z~_g ~ C+(0, 1)`` (local scale per group)
and ``s ~ C+(0, tau0)`` (global scale). Each half-Cauchy is written as a product that has
conjugate-friendly factors: if ``a ~ C+(0, k)`` then ``a^2 = u v`` with ``u ~ Gamma(1/2, scale k^2)``
and ``v ~ InvGamma(1/2, 1)``. All four factors get log-normal posteriors, so
``log z_g = log s + log z~_g`` is Gaussian with

    mean = (m_sa + m_sb + m_a + m_b) / 2,    variance = (v_sa + v_sb + v_a + v_b) / 4.

Defaults chosen here (the paper leaves them open):

* ``tau0 = 1e-5``: a small global scale, so that most groups are pulled towards zero and the data
  must pay to keep a group (Ghosh et al. 2017 and the paper's appendix use values of this order).
* One global scale per layer (``global_scale=None``). Pass one :class:`HorseshoeGlobalScale` to
  several layers to share it across the network; :func:`bclib.kl_divergence` counts it once.
* The pruning signal ``log_alpha()`` is the log "dropout rate" of the local scale,
  ``alpha_g = Var[z~_g] / E[z~_g]^2 = exp((v_a + v_b) / 4) - 1``: the analogue of NJ's alpha. The
  global scale is left out of it because it is common to all groups of a layer. Not ``E[log z~_g]``:
  a group the data do not use settles at the minimum of its KL terms, ``v_a = v_b = 2`` and
  ``E[log z~_g] = 0`` (no shrinkage), where ``log alpha = log(e - 1) ~ 0.54``.
* Initialisation sits where the prior is comfortable: ``m_sa = log tau0^2`` (the Gamma factor at
  its scale) and ``m_sb`` set so that ``E[s] = 1/sqrt(fan_in)`` (a scale per layer; a scale shared
  across the network starts at its ``init_scale``, 0.05 by default); ``m_a = m_b = 0``. Then, with a
  scale per layer, ``w~`` starts in ``U(-1, 1)``, the typical range under its ``N(0, 1)`` prior.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kl import lognormal_gamma_kl_sum, lognormal_inverse_gamma_kl_sum
from .base import GroupScaleLayer, _Conv2dGeometry, _LinearGeometry, check_positive_float
from .noise import standard_normal

__all__ = ["HorseshoeGlobalScale", "LinearGroupHS", "Conv2dGroupHS"]

# Initial log-variance of every log-normal factor: log scales start almost deterministic
# (log alpha ~ -9, the same start as the NJ layers).
_INIT_LOGVAR = -9.0 + math.log(2.0)
DEFAULT_TAU0 = 1e-5
# Upper bound on a sampled log z: with log-variances up to 5 a draw of log z can reach ~50, and
# z^2 would overflow float32 (max ~e^88) in the variance of the pre-activation. No sensible
# posterior comes near z = e^20; the bound only keeps the extreme cases finite.
_MAX_LOG_SCALE = 20.0


class HorseshoeGlobalScale(nn.Module):
    r"""The global scale ``s ~ C+(0, tau0)`` as ``s^2 = s_a s_b``, ``s_a ~ Gamma(1/2, tau0^2)``,
    ``s_b ~ InvGamma(1/2, 1)``, with log-normal posteriors ``LN(sa_mu, exp(sa_logvar))`` and
    ``LN(sb_mu, exp(sb_logvar))``.

    Args:
        tau0: scale of the half-Cauchy prior on ``s``.
        init_scale: the initial ``E[s]`` (approximately).

    A scale passed to a layer as its ``global_scale`` is marked ``shared``: from then on no layer
    counts it in its own ``kl_divergence()`` or resets it, and :func:`bclib.kl_divergence` counts it
    once (this holds for a layer's own scale handed on to another layer too). ``load_state_dict``
    refuses a state_dict whose copies of a shared scale disagree: one from a network with a scale
    per layer.

    Example:
        >>> shared = HorseshoeGlobalScale(tau0=1e-5)
        >>> net = torch.nn.Sequential(LinearGroupHS(4, 3, global_scale=shared), LinearGroupHS(3, 2, global_scale=shared))
    """

    def __init__(self, tau0: float = DEFAULT_TAU0, init_scale: float = 0.05) -> None:
        super().__init__()
        self.tau0 = check_positive_float("tau0", tau0, allow_none=False)
        self.init_scale = check_positive_float("init_scale", init_scale, allow_none=False)
        self.shared = False  # set by the layers it is passed to
        self.sa_mu = nn.Parameter(torch.empty(()))
        self.sa_logvar = nn.Parameter(torch.empty(()))
        self.sb_mu = nn.Parameter(torch.empty(()))
        self.sb_logvar = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.sa_mu.fill_(2.0 * math.log(self.tau0))
        self.sb_mu.fill_(2.0 * math.log(self.init_scale) - 2.0 * math.log(self.tau0))
        self.sa_logvar.fill_(_INIT_LOGVAR)
        self.sb_logvar.fill_(_INIT_LOGVAR)

    def log_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``log s = (log s_a + log s_b) / 2``."""
        mean = 0.5 * (self.sa_mu + self.sb_mu)
        var = 0.25 * (self.sa_logvar.exp() + self.sb_logvar.exp())
        return mean, var

    def kl_divergence(self) -> Tensor:
        """KL(LN || Gamma(1/2, tau0^2)) + KL(LN || InvGamma(1/2, 1)), nats."""
        return (
            lognormal_gamma_kl_sum(self.sa_mu, self.sa_logvar, 0.5, self.tau0**2)
            + lognormal_inverse_gamma_kl_sum(self.sb_mu, self.sb_logvar, 0.5, 1.0)
        )

    def extra_repr(self) -> str:
        return f"tau0={self.tau0}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A shared scale is loaded once under each layer that holds it. A state_dict of one scale per
        # layer would leave it silently with the last layer's values: report it instead, as
        # load_state_dict reports other mismatches. One call passes the same error_msgs list to every
        # module, which tells a second load within the call from a later call.
        incoming = [state_dict.get(prefix + name) for name in ("sa_mu", "sa_logvar", "sb_mu", "sb_logvar")]
        first = getattr(self, "_first_load", None)
        if not (self.shared and first is not None and first["error_msgs"] is error_msgs):
            self._first_load = {"error_msgs": error_msgs, "prefix": prefix, "reported": False,
                                "values": [None if t is None else torch.as_tensor(t).detach().clone() for t in incoming]}
        elif not first["reported"] and not all(a is None or b is None or _same(a, torch.as_tensor(b))
                                               for a, b in zip(first["values"], incoming)):
            first["reported"] = True
            error_msgs.append(
                f"the global scale shared by several layers has other values under {prefix!r} than under "
                f"{first['prefix']!r}: this state_dict holds one scale per layer (shared_scale=False), the "
                "network one shared scale")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN equal to NaN (one diverged scale is still one scale)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class _GroupHS(GroupScaleLayer):
    def _init_group_parameters(self, tau0, global_scale) -> None:
        tau0 = check_positive_float("tau0", tau0)
        if global_scale is None:
            tau0 = DEFAULT_TAU0 if tau0 is None else tau0
            self.global_scale = HorseshoeGlobalScale(tau0, init_scale=1.0 / math.sqrt(self.fan_in))
        else:
            if not isinstance(global_scale, HorseshoeGlobalScale):
                raise TypeError(f"global_scale must be None or a HorseshoeGlobalScale, got {type(global_scale).__name__}")
            # Registered as a child so .to(), state_dict() and parameters() see it; counted once in bclib.kl_divergence.
            if tau0 is not None and tau0 != global_scale.tau0:
                raise ValueError(f"tau0={tau0} differs from the shared global_scale's tau0={global_scale.tau0}; set it there")
            self.global_scale = global_scale
            # Marked on the scale, not on this layer: a layer whose own scale is handed on must stop
            # counting it too (it was counted twice).
            global_scale.shared = True
        self.za_mu = nn.Parameter(torch.empty(self.num_groups))
        self.za_logvar = nn.Parameter(torch.empty(self.num_groups))
        self.zb_mu = nn.Parameter(torch.empty(self.num_groups))
        self.zb_logvar = nn.Parameter(torch.empty(self.num_groups))
        self.reset_parameters()

    @property
    def shared_scale(self) -> HorseshoeGlobalScale | None:
        """The global scale when it is shared with other layers, else ``None``."""
        return self.global_scale if self.global_scale.shared else None

    @property
    def tau0(self) -> float:
        return self.global_scale.tau0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Local scales at ``z~ = 1`` (``m_a = m_b = 0``), nearly deterministic; a per-layer global scale
        is reset too; then ``mu = w_init / E[z]`` so ``E[w]`` equals ``init_weight`` when given."""
        self.za_mu.zero_()
        self.zb_mu.zero_()
        self.za_logvar.fill_(_INIT_LOGVAR)
        self.zb_logvar.fill_(_INIT_LOGVAR)
        if self.shared_scale is None:
            self.global_scale.reset_parameters()
        self._reset_weight_and_bias(self._group_view(self.group_scale_moments()[0]))

    def log_scale_moments(self) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``log z_g = log s + (log a_g + log b_g) / 2`` per group."""
        s_mean, s_var = self.global_scale.log_moments()
        mean = s_mean + 0.5 * (self.za_mu + self.zb_mu)
        var = s_var + 0.25 * (self.za_logvar.exp() + self.zb_logvar.exp())
        return mean, var

    def group_scale_moments(self) -> tuple[Tensor, Tensor]:
        # Log-normal moments: E[z] = exp(m + v/2), Var[z] = (exp(v) - 1) exp(2m + v), written as
        # exp(2m + 2v + log(1 - exp(-v))) so that it overflows only where Var[z] itself does (exp(v)
        # alone overflows float32 from v ~ 88, where a small exp(2m + v) can keep Var[z] finite).
        m, v = self.log_scale_moments()
        return torch.exp(m + 0.5 * v), torch.exp(2 * (m + v) + torch.log(-torch.expm1(-v)))

    def sample_group_scale(self, shape: torch.Size, after: Tensor | None = None) -> Tensor:
        m, v = self.log_scale_moments()
        log_z = m + v.sqrt() * standard_normal(shape, device=m.device, dtype=m.dtype, after=after)
        return torch.exp(log_z.clamp(max=_MAX_LOG_SCALE))

    def log_alpha(self) -> Tensor:
        """``log(exp((v_a + v_b)/4) - 1)`` per group: the log dropout rate of the local scale ``z~_g``."""
        return torch.log(torch.expm1(0.25 * (self.za_logvar.exp() + self.zb_logvar.exp())))

    def kl_divergence(self) -> Tensor:
        """KL of ``w~`` and bias (vs N(0,1)), of every ``a_g`` (vs Gamma(1/2, 1)) and ``b_g`` (vs InvGamma(1/2, 1)),
        and of the global scale when it belongs to this layer alone."""
        kl = (
            self._weight_and_bias_kl()
            + lognormal_gamma_kl_sum(self.za_mu, self.za_logvar, 0.5, 1.0)
            + lognormal_inverse_gamma_kl_sum(self.zb_mu, self.zb_logvar, 0.5, 1.0)
        )
        if self.shared_scale is None:
            kl = kl + self.global_scale.kl_divergence()
        return kl

    def _prior_repr(self) -> str:
        shared = ", shared global scale" if self.shared_scale is not None else ""
        return f", tau0={self.tau0}{shared}"


class LinearGroupHS(_LinearGeometry, _GroupHS):
    r"""Fully connected layer with a group horseshoe prior; groups are the input units.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        init_weight, init_bias: optional tensors to start from (``E[w]`` equals them at start).
        clip_var: optional upper bound on the variances of ``w~`` (applied by
            :meth:`clip_variances`, which a training loop calls after each optimiser step, as
            :func:`bclib.train.fit` does).
        tau0: scale of the global half-Cauchy prior (default ``1e-5``); with a shared
            ``global_scale`` it is taken from there (another value raises ``ValueError``).
        global_scale: ``None`` for a scale of this layer alone, or a :class:`HorseshoeGlobalScale`
            shared with other layers.
        device, dtype: as ``nn.Linear``'s: where the parameters live and their floating dtype.

    Shape:
        - Input: ``(*, in_features)``; output ``(*, out_features)``.

    Example:
        >>> layer = LinearGroupHS(784, 300)
        >>> layer(torch.randn(8, 784)).shape
        torch.Size([8, 300])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init_weight: Tensor | None = None, init_bias: Tensor | None = None,
                 clip_var: float | None = None, tau0: float | None = None,
                 global_scale: HorseshoeGlobalScale | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self._init_geometry(in_features, out_features)
        self._init_parameters(bias, init_weight, init_bias, clip_var)
        self._init_group_parameters(tau0, global_scale)
        self._place(device, dtype)


class Conv2dGroupHS(_Conv2dGeometry, _GroupHS):
    r"""2-d convolution with a group horseshoe prior; groups are the output channels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d``.
        init_weight, init_bias, clip_var, tau0, global_scale: as :class:`LinearGroupHS`.
        groups, padding_mode: ``nn.Conv2d``'s keywords, accepted at their defaults only (1, ``"zeros"``);
            ``bias`` is the 7th positional argument, where ``nn.Conv2d`` has ``groups``.
        device, dtype: as ``nn.Conv2d``'s.

    Shape:
        - Input: ``(N, in_channels, H, W)`` or unbatched ``(in_channels, H, W)``; output as ``nn.Conv2d``.

    Example:
        >>> Conv2dGroupHS(1, 20, 5)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 20, 24, 24])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, *, init_weight: Tensor | None = None,
                 init_bias: Tensor | None = None, clip_var: float | None = None, tau0: float | None = None,
                 global_scale: HorseshoeGlobalScale | None = None, groups: int = 1, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_parameters(bias, init_weight, init_bias, clip_var)
        self._init_group_parameters(tau0, global_scale)
        self._place(device, dtype)
