"""What every Bayesian layer shares: the interface, argument checks, linear/conv geometry,
and the local-reparameterisation forward of the group-scale layers (NJ and HS).

A group-scale layer has effective weights ``w_ij = z_g * w~_ij`` with one scale ``z_g`` per
group (Louizos et al. 2017, Sec. 3). Groups are the *input units* of a linear layer and the
*output channels* of a convolution. The subclasses (:mod:`bclib.layers.nj`,
:mod:`bclib.layers.hs`) only say how ``z`` is distributed.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kl import gaussian_kl_std_normal_sum
from .local_reparam import sample_conv2d, sample_linear

__all__ = ["BayesianLayer", "kl_divergence", "bayesian_layers", "set_variance_dtype"]

# Added under square roots and logarithms so zero inputs and zero means stay finite.
_EPS = 1e-8
# The dtypes set_variance_dtype takes. Not float16: x^2 overflows it from |x| > 256; nor float8.
VARIANCE_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- argument checks
def _is_int(value) -> bool:
    """An int, or an integer type such as ``numpy.int64`` (as ``nn.Linear`` and ``nn.Conv2d`` take), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_size(name: str, value) -> int:
    """A layer size as a positive Python int; integer types such as ``numpy.int64`` are taken, as
    ``nn.Linear`` and ``nn.Conv2d`` take them."""
    return check_positive_int(name, int(value) if _is_int(value) else value)


def check_pair(name: str, value, minimum: int) -> tuple[int, int]:
    # A float or other scalar must give the TypeError below, not "object is not iterable".
    pair = (value, value) if _is_int(value) else (tuple(value) if isinstance(value, (tuple, list)) else (value,))
    if len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in pair)


def check_padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> tuple[int, int]:
    """``padding`` as a pair of ints: an int, a pair, or ``nn.Conv2d``'s strings ``"valid"`` (none)
    and ``"same"`` (stride 1; the padding that keeps H and W, when it is the same on both sides)."""
    if not isinstance(padding, str):
        return check_pair("padding", padding, 0)
    if padding == "valid":
        return 0, 0
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1, as in nn.Conv2d; got stride {stride}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' with kernel {kernel_size} and dilation {dilation} pads unevenly "
                         "(nn.Conv2d pads one side more), which bclib's convolutions cannot express")
    return total[0] // 2, total[1] // 2


def check_positive_float(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number{' or None' if allow_none else ''}, got {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def check_init_tensor(name: str, value, shape: tuple[int, ...]):
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    # Kept in its own floating dtype, so a float64 network converted with model.to(torch.float64)
    # and reset_parameters() starts exactly at its weights; integers become float32.
    return value.detach().clone() if value.is_floating_point() else value.detach().float()


# ----------------------------------------------------------------------------- the interface
class BayesianLayer(nn.Module):
    """Interface of every Bayesian layer in :mod:`bclib`.

    A subclass provides:

    * :meth:`kl_divergence` -- KL(q || p) of all its variational parameters, a scalar in nats;
    * :meth:`log_alpha` -- the pruning signal: per group (NJ, HS) or per weight (Sparse VD);
    * :meth:`posterior_weight` -- ``(mean, variance)`` of the effective weight, shaped like the weight;
    * :meth:`clip_variances` -- clamps the weight variances to ``clip_var``. The forward pass does
      not: :func:`bclib.train.fit` calls it after each optimiser step, and a training loop of your
      own must too (``for _, layer in bclib.bayesian_layers(model): layer.clip_variances()``).

    ``train()`` mode samples pre-activations (local reparameterisation); ``eval()`` mode is the
    deterministic forward pass with the posterior-mean weights. Training mode can be differentiated
    once (its gradients are written out, :mod:`bclib.layers.local_reparam`): a second derivative
    through it (gradient penalties, Hessian-vector products) raises; in eval mode it works.

    Args, Shape: those of the concrete layer (:class:`bclib.LinearGroupNJ`, :class:`bclib.Conv2dGroupHS`, ...).

    Example:
        >>> import bclib
        >>> layer = bclib.LinearGroupNJ(4, 3)
        >>> isinstance(layer, BayesianLayer), layer.log_alpha().shape, layer.posterior_weight()[0].shape
        (True, torch.Size([4]), torch.Size([3, 4]))
    """

    weight_mu: nn.Parameter
    weight_logvar: nn.Parameter
    bias_mu: nn.Parameter | None
    clip_var: float | None
    # Precision of the training-mode variance path (None: the weights' own); see set_variance_dtype.
    variance_dtype: torch.dtype | None = None

    def kl_divergence(self) -> Tensor:  # pragma: no cover - interface
        """KL(q || p) of all the layer's variational parameters: a scalar tensor in nats."""
        raise NotImplementedError

    def log_alpha(self) -> Tensor:  # pragma: no cover - interface
        """The pruning signal: one log dropout rate per group (NJ, HS) or per weight (Sparse VD)."""
        raise NotImplementedError

    def posterior_weight(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``(mean, variance)`` of the effective weight under the posterior, each shaped like the weight."""
        raise NotImplementedError

    def posterior_bias(self) -> Tensor | None:
        """Posterior mean of the bias (``None`` when the layer has no bias)."""
        return None if self.bias_mu is None else self.bias_mu

    def load_pretrained(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Restart from a pretrained deterministic layer: the same as passing ``init_weight`` and
        ``init_bias`` to the constructor (the posterior mean starts at ``weight`` and ``bias``)."""
        if bias is not None and self.bias_mu is None:
            raise ValueError("bias was given but the layer has bias=False")
        # Both checked before either is kept: a refused bias must not leave the new weight for the next reset.
        init_weight = check_init_tensor("weight", weight, self.weight_shape)
        init_bias = check_init_tensor("bias", bias, (self.weight_shape[0],))
        self._init_weight, self._init_bias = init_weight, init_bias
        self.reset_parameters()

    def _prior_repr(self) -> str:
        """What ``extra_repr`` adds for the prior's own settings (the horseshoe's ``tau0``)."""
        return ""

    @torch.no_grad()
    def clip_variances(self) -> None:
        """Clamp ``log sigma^2`` of the weights to ``log(clip_var)`` (no-op when ``clip_var`` is None).

        The release applied this to the first layer of LeNet-300-100 (``clip_var=0.04``) after each
        optimiser step, to stop the noise of the input layer from growing without bound.
        """
        if self.clip_var is not None:
            self.weight_logvar.clamp_(max=math.log(self.clip_var))

    def _init_weight_parameters(self, bias: bool, init_weight, init_bias, clip_var, *, bayesian_bias: bool) -> None:
        """Check the constructor's arguments and create ``weight_mu``, ``weight_logvar`` and the bias
        (``bias_mu``, plus ``bias_logvar`` when the bias is Bayesian)."""
        if not isinstance(bias, bool):  # nn.Conv2d's 7th positional argument is groups, ours bias
            raise TypeError(f"bias must be True or False, got {bias!r} (a convolution's 7th positional argument "
                            f"is bias here, groups in nn.Conv2d: pass groups= by keyword)")
        self.clip_var = check_positive_float("clip_var", clip_var)
        self._init_weight = check_init_tensor("init_weight", init_weight, self.weight_shape)
        self._init_bias = check_init_tensor("init_bias", init_bias, (self.weight_shape[0],))
        if init_bias is not None and not bias:
            raise ValueError("init_bias was given but bias=False")
        self.weight_mu = nn.Parameter(torch.empty(self.weight_shape))
        self.weight_logvar = nn.Parameter(torch.empty(self.weight_shape))
        bias_names = ("bias_mu", "bias_logvar") if bayesian_bias else ("bias_mu",)
        for name in bias_names:
            self.register_parameter(name, nn.Parameter(torch.empty(self.weight_shape[0])) if bias else None)

    def _place(self, device, dtype) -> None:
        """The constructor's ``device`` and ``dtype`` (as ``nn.Linear``'s): move the new parameters there."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)
        if dtype is not None:  # initialised again in that dtype: E[w] = init_weight to its precision
            self.reset_parameters()

    @torch.no_grad()
    def mask_(self, weight_mask: Tensor, bias_mask: Tensor | None = None) -> None:
        """Zero pruned weights (and biases of pruned output units) in place, so the posterior mean is masked.

        Args:
            weight_mask: shaped like the weight; nonzero where a weight is kept.
            bias_mask: one value per output unit (or ``None``: biases unchanged).
        """
        for name, mask, target in (("weight_mask", weight_mask, self.weight_mu), ("bias_mask", bias_mask, self.bias_mu)):
            if mask is not None and target is not None and tuple(mask.shape) != tuple(target.shape):
                raise ValueError(f"{name} must have the shape {tuple(target.shape)}, got {tuple(mask.shape)}")
        # where, not a product: a pruned weight that diverged to inf or NaN becomes 0 too (inf * 0 is NaN).
        self.weight_mu.copy_(torch.where(weight_mask.to(self.weight_mu.device) != 0, self.weight_mu, 0.0))
        if self.bias_mu is not None and bias_mask is not None:
            self.bias_mu.copy_(torch.where(bias_mask.to(self.bias_mu.device) != 0, self.bias_mu, 0.0))


def bayesian_layers(module: nn.Module) -> Iterator[tuple[str, BayesianLayer]]:
    """``(name, layer)`` for every Bayesian layer in ``module``, in registration order.

    Args:
        module: any ``nn.Module``; nested containers are searched too.

    Example:
        >>> import bclib
        >>> model = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> [name for name, _ in bayesian_layers(model)]
        ['0']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (a network or a layer), got {type(module).__name__}")
    for name, child in module.named_modules():
        if isinstance(child, BayesianLayer):
            yield name, child


def set_variance_dtype(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Run the variance path of every Bayesian layer in ``module`` in ``dtype`` during training.

    ``torch.bfloat16`` computes the products with ``x^2`` and ``sigma^2`` (and their gradients) in
    bfloat16 while the parameters, the mean path and all gradients stay float32: 3-6x faster
    products on CPUs with bfloat16 units (AMX, AVX512-BF16) and on GPUs, at ~0.4 % relative error
    on the sampled noise's variance (see :mod:`bclib.layers.local_reparam`). ``None`` restores full
    precision. Evaluation (``.eval()``) is unaffected.

    Args:
        module: any ``nn.Module``; every Bayesian layer in it is set.
        dtype: ``torch.bfloat16``, ``torch.float32`` or ``torch.float64``, or ``None`` for the
            weights' own dtype. Not ``torch.float16``: ``x^2`` overflows it from ``|x| > 256``.

    Returns:
        ``module``, for chaining.

    Raises:
        TypeError: any other ``dtype``.

    Example:
        >>> import bclib
        >>> model = set_variance_dtype(torch.nn.Sequential(bclib.LinearGroupNJ(4, 3)), torch.bfloat16)
        >>> model[0].variance_dtype
        torch.bfloat16
    """
    if dtype is not None and dtype not in VARIANCE_DTYPES:
        raise TypeError(f"dtype must be None or one of {', '.join(map(str, VARIANCE_DTYPES))}, got {dtype!r}")
    for _, layer in bayesian_layers(module):
        layer.variance_dtype = dtype
    return module


def kl_divergence(module: nn.Module) -> Tensor:
    """Total KL divergence (nats) of every Bayesian layer in any ``nn.Module``.

    A horseshoe global scale shared by several layers is counted once.

    Args:
        module: any ``nn.Module``; modules other than Bayesian layers add nothing.

    Returns:
        A scalar tensor, differentiable with respect to the variational parameters.

    Example:
        >>> import bclib
        >>> model = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2))
        >>> bool(bclib.kl_divergence(model) > 0)
        True
    """
    total = None
    shared = {}
    for _, layer in bayesian_layers(module):
        term = layer.kl_divergence()
        total = term if total is None else total + term
        scale = getattr(layer, "shared_scale", None)
        if scale is not None:
            shared[id(scale)] = scale
    for scale in shared.values():
        total = total + scale.kl_divergence()
    if total is None:
        return torch.zeros(())
    return total


# ----------------------------------------------------------------------------- geometry
class _LinearGeometry:
    """Shape bookkeeping of a fully connected layer: groups are the input units."""

    groups_on_input = True

    def _init_geometry(self, in_features: int, out_features: int) -> None:
        self.in_features = check_size("in_features", in_features)
        self.out_features = check_size("out_features", out_features)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def num_groups(self) -> int:
        return self.in_features

    @property
    def fan_in(self) -> int:
        return self.in_features

    def _group_view(self, group_values: Tensor) -> Tensor:
        """Broadcast one value per input unit over a weight of shape (out, in)."""
        return group_values.view(1, -1)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def _sample(self, x: Tensor, output_scale: Tensor | None, bias_logvar: Tensor | None) -> Tensor:
        """One local-reparameterisation sample of the pre-activation (a linear layer scales no outputs)."""
        return sample_linear(x, self.weight_mu, self.weight_logvar, self.bias_mu, bias_logvar, self.variance_dtype)

    @staticmethod
    def _unbatched(x: Tensor) -> bool:
        return False  # any leading dimensions are batch dimensions

    def _check_input(self, x: Tensor) -> None:
        _check_input_is_tensor(self, x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.in_features} features in the last "
                f"dimension, got input of shape {tuple(x.shape)}"
            )
        _check_input_dtype(self, x)

    def plain_module(self, weight: Tensor, bias: Tensor | None) -> nn.Linear:
        """An ``nn.Linear`` holding ``weight`` and ``bias``, on this layer's device and in its dtype."""
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **_factory_kwargs(self))
        return _filled(layer, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias_mu is not None}" + _clip_repr(self) + self._prior_repr()
        )


def _check_input_is_tensor(layer: nn.Module, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{type(layer).__name__}: expected the input as a torch.Tensor, got {type(x).__name__} "
                        f"(torch.as_tensor converts a NumPy array)")


def _check_input_dtype(layer: nn.Module, x: Tensor) -> None:
    """The input's dtype must be the weights', as ``nn.Linear`` / ``nn.Conv2d`` require, in train and
    eval mode alike (under ``torch.autocast`` any floating dtype: autocast casts it)."""
    dtype = layer.weight_mu.dtype
    if x.dtype == dtype or (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        return
    raise TypeError(f"{type(layer).__name__}: expected input of dtype {dtype} (the weights' dtype), got {x.dtype}; "
                    f"convert the input or the model (model.to({dtype}))")


class _Conv2dGeometry:
    """Shape bookkeeping of a 2-d convolution: groups are the output channels."""

    groups_on_input = False

    def _init_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups=1,
                       padding_mode="zeros") -> None:
        # Accepted for code written against nn.Conv2d's keywords; other values the layers cannot express.
        if isinstance(groups, bool) or groups != 1:
            raise ValueError(f"groups must be 1 (bclib's convolutions are not grouped), got {groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' (bclib's convolutions pad with zeros), got {padding_mode!r}")
        self.in_channels = check_size("in_channels", in_channels)
        self.out_channels = check_size("out_channels", out_channels)
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.stride = check_pair("stride", stride, 1)
        self.dilation = check_pair("dilation", dilation, 1)
        self.padding = check_padding(padding, self.kernel_size, self.stride, self.dilation)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def num_groups(self) -> int:
        return self.out_channels

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _group_view(self, group_values: Tensor) -> Tensor:
        """Broadcast one value per OUTPUT channel over a weight of shape (out, in, kh, kw)."""
        return group_values.view(-1, 1, 1, 1)

    def _op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _sample(self, x: Tensor, output_scale: Tensor | None, bias_logvar: Tensor | None) -> Tensor:
        """One local-reparameterisation sample of the pre-activation; ``output_scale`` (N, out_channels) or None."""
        return sample_conv2d(x, output_scale, self.weight_mu, self.weight_logvar, self.bias_mu, bias_logvar,
                             self.stride, self.padding, self.dilation, self.variance_dtype)

    def _check_input(self, x: Tensor) -> None:
        _check_input_is_tensor(self, x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        _check_input_dtype(self, x)

    @staticmethod
    def _unbatched(x: Tensor) -> bool:
        """One example of shape (C, H, W), which nn.Conv2d accepts too."""
        return x.dim() == 3

    def plain_module(self, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
        """An ``nn.Conv2d`` holding ``weight`` and ``bias`` with this layer's stride/padding/dilation,
        on this layer's device and in its dtype."""
        layer = nn.Conv2d(
            weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), self.stride, self.padding,
            self.dilation, bias=bias is not None, **_factory_kwargs(self),
        )
        return _filled(layer, weight, bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + f", bias={self.bias_mu is not None}" + _clip_repr(self) + self._prior_repr()


def _factory_kwargs(layer: nn.Module) -> dict:
    return {"device": layer.weight_mu.device, "dtype": layer.weight_mu.dtype}


@torch.no_grad()
def _filled(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _clip_repr(layer) -> str:
    text = "" if layer.clip_var is None else f", clip_var={layer.clip_var}"
    if layer.variance_dtype is not None:
        text += f", variance_dtype={layer.variance_dtype}"
    return text


# ----------------------------------------------------------------------------- group-scale layers
class GroupScaleLayer(BayesianLayer):
    """Shared machinery of the group normal-Jeffreys and group horseshoe layers.

    Parameters common to both: ``weight_mu`` and ``weight_logvar`` of ``q(w~) = N(mu, sigma^2)``,
    and a Bayesian bias ``q(b) = N(bias_mu, exp(bias_logvar))`` with a ``N(0, 1)`` prior, as in the
    2017 release. A subclass provides ``group_scale_moments()`` (mean and variance of each ``z_g``)
    and ``sample_group_scale(shape, after=None)`` (one draw of the scales; ``after``, the layer's
    input, orders the draw under ``torch.compile``: :func:`bclib.layers.noise.standard_normal`).
    """

    def _init_parameters(self, bias: bool, init_weight, init_bias, clip_var) -> None:
        self._init_weight_parameters(bias, init_weight, init_bias, clip_var, bayesian_bias=True)

    @torch.no_grad()
    def _reset_weight_and_bias(self, weight_scale: Tensor | float) -> None:
        """Initialise ``q(w~)`` and the bias; ``weight_scale`` is the initial E[z] per weight.

        Without ``init_weight`` the mean effective weight follows ``nn.Linear``'s default,
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Log-variances start at -9 (the release's choice).
        """
        bound = 1.0 / math.sqrt(self.fan_in)
        if self._init_weight is None:
            self.weight_mu.uniform_(-bound, bound)
        else:
            self.weight_mu.copy_(self._init_weight)
        self.weight_mu.div_(weight_scale)
        self.weight_logvar.normal_(-9.0, 1e-2)
        if self.bias_mu is not None:
            if self._init_bias is None:
                self.bias_mu.uniform_(-bound, bound)
            else:
                self.bias_mu.copy_(self._init_bias)
            self.bias_logvar.normal_(-9.0, 1e-2)

    def group_scale_moments(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def sample_group_scale(self, shape: torch.Size, after: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _weight_and_bias_kl(self) -> Tensor:
        kl = gaussian_kl_std_normal_sum(self.weight_mu, self.weight_logvar)
        if self.bias_mu is not None:
            kl = kl + gaussian_kl_std_normal_sum(self.bias_mu, self.bias_logvar)
        return kl

    def posterior_weight(self) -> tuple[Tensor, Tensor]:
        r"""Mean and variance of ``w = z w~`` for independent ``z`` and ``w~``:

        .. math::
            E[w] = E[z]\mu,\quad \mathrm{Var}[w] = E[z]^2\sigma^2 + \mathrm{Var}[z]\mu^2 + \mathrm{Var}[z]\sigma^2
        """
        z_mean, z_var = (self._group_view(t) for t in self.group_scale_moments())
        weight_var = self.weight_logvar.exp()
        # A pruned weight (mu = 0, as mask_ leaves it) has mean exactly 0, also in a horseshoe group
        # whose E[z] overflowed to inf (inf * 0 would be NaN, and the eval forward with it); only
        # there, so that a zero weight of a finite group keeps its gradient z.
        mean = z_mean * self.weight_mu
        mean = torch.where((self.weight_mu == 0) & z_mean.isinf(), 0.0, mean)
        # Var[z] (mu^2 + sigma^2) rather than Var[z] mu^2 + ...: a pruned weight (mu = 0) of a
        # group whose Var[z] overflows gives inf, not inf * 0 = NaN.
        var = z_mean.pow(2) * weight_var + z_var * (self.weight_mu.pow(2) + weight_var)
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self._unbatched(x):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if not self.training:
            return self._op(x, self.posterior_weight()[0], self.bias_mu)
        if self.groups_on_input:
            # Group noise on the inputs: h = x * z with z drawn per example (multiplicative dropout),
            # then the pre-activation sampled from its Gaussian (local reparameterisation).
            return self._sample(x * self.sample_group_scale(x.shape, after=x), None, self.bias_logvar)
        # Conv: z scales each output channel of each example; the bias is not scaled.
        z = self.sample_group_scale(torch.Size((x.shape[0], self.num_groups)), after=x)
        return self._sample(x, z, self.bias_logvar)
