"""The paper's networks, each built for a prior: ``"nj"``, ``"hs"``, ``"svd"`` or ``None`` (deterministic).

Every model is an ``nn.Sequential`` (so :func:`bclib.compress` can walk it layer by layer) with an
``input_shape`` attribute, the shape of one example, ``(C, H, W)``.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .layers import Conv2dGroupHS, Conv2dGroupNJ, Conv2dSVD, HorseshoeGlobalScale, LinearGroupHS, LinearGroupNJ, LinearSVD
from .layers.base import check_padding, check_positive_float, check_positive_int
from .layers.hs import DEFAULT_TAU0

__all__ = ["PRIORS", "lenet_300_100", "lenet5_caffe", "vgg_cifar", "build_model", "bayesian_from_pretrained",
           "to_bayesian", "MODELS"]

PRIORS = ("nj", "hs", "svd", None)

_LAYERS = {
    "nj": (LinearGroupNJ, Conv2dGroupNJ),
    "hs": (LinearGroupHS, Conv2dGroupHS),
    "svd": (LinearSVD, Conv2dSVD),
}


def _layer_factories(prior, tau0=None, shared_scale=False) -> tuple[Callable, Callable]:
    """``(linear, conv)`` constructors for ``prior``; ``clip_var`` is dropped for deterministic layers."""
    if prior is not None and prior not in _LAYERS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if not isinstance(shared_scale, bool):
        raise TypeError(f"shared_scale must be True or False, got {shared_scale!r}")
    if prior != "hs" and (tau0 is not None or shared_scale):
        raise ValueError(f"tau0 and shared_scale set the horseshoe's global scale (prior 'hs'); prior {prior!r} "
                         f"has none, got tau0={tau0!r}, shared_scale={shared_scale!r}")
    if prior is None:
        def linear(i, o, clip_var=None, **kw):
            return nn.Linear(i, o, **kw)

        def conv(i, o, k, clip_var=None, **kw):
            return nn.Conv2d(i, o, k, **kw)

        return linear, conv
    linear_cls, conv_cls = _LAYERS[prior]
    if prior != "hs":
        return linear_cls, conv_cls
    # tau0 is checked by the layers (a positive float); None means their default.
    extra = ({"global_scale": HorseshoeGlobalScale(DEFAULT_TAU0 if tau0 is None else tau0)} if shared_scale
             else {} if tau0 is None else {"tau0": tau0})

    def linear(i, o, **kw):
        return linear_cls(i, o, **extra, **kw)

    def conv(i, o, k, **kw):
        return conv_cls(i, o, k, **extra, **kw)

    return linear, conv


def lenet_300_100(prior="nj", *, tau0: float | None = None, shared_scale: bool = False) -> nn.Sequential:
    """LeNet-300-100 for MNIST: 784-300-100-10 with ReLU; ``clip_var=0.04`` on the first layer (release).

    Args:
        prior: ``"nj"``, ``"hs"``, ``"svd"`` or ``None``.
        tau0: horseshoe global scale (``"hs"`` only; ``None``: 1e-5).
        shared_scale: ``"hs"`` only: one global scale for the whole network instead of one per layer.

    Raises:
        ValueError: an unknown ``prior``, a ``tau0`` that is not positive, or ``tau0`` /
            ``shared_scale`` given for a prior other than ``"hs"``.
    """
    linear, _ = _layer_factories(prior, tau0, shared_scale)
    model = nn.Sequential(
        nn.Flatten(),
        linear(784, 300, clip_var=0.04), nn.ReLU(),
        linear(300, 100), nn.ReLU(),
        linear(100, 10),
    )
    model.input_shape = (1, 28, 28)
    return model


def lenet5_caffe(prior="nj", *, tau0: float | None = None, shared_scale: bool = False) -> nn.Sequential:
    """LeNet-5-Caffe for MNIST: conv 20@5x5 - maxpool 2 - conv 50@5x5 - maxpool 2 - fc 800->500 - fc 500->10.

    Args:
        prior, tau0, shared_scale: as in :func:`lenet_300_100`.

    Raises:
        ValueError: as :func:`lenet_300_100`.
    """
    linear, conv = _layer_factories(prior, tau0, shared_scale)
    model = nn.Sequential(
        conv(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        conv(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        linear(800, 500), nn.ReLU(),
        linear(500, 10),
    )
    model.input_shape = (1, 28, 28)
    return model


# VGG-16-like configuration for 32x32 inputs: 13 conv layers ("M" = 2x2 max pooling).
_VGG_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_cifar(prior="nj", *, num_classes: int = 10, width: float = 1.0, tau0: float | None = None,
              shared_scale: bool = False) -> nn.Sequential:
    """VGG-like network for CIFAR-10: 13 conv 3x3 layers with BatchNorm and ReLU, then fc 512 - fc ``num_classes``.

    Args:
        prior: ``"nj"``, ``"hs"``, ``"svd"`` or ``None``.
        num_classes: outputs of the last layer.
        width: multiplies every hidden layer's width, not the output's (``width=0.125`` gives a small
            copy for tests); a positive number, each layer keeping at least one unit.
        tau0, shared_scale: horseshoe only, as in :func:`lenet_300_100`.

    Raises:
        TypeError: ``num_classes`` not an int, ``shared_scale`` not a bool.
        ValueError: an unknown ``prior``, ``num_classes`` not positive, ``width`` not a positive
            number, or ``tau0`` / ``shared_scale`` given for a prior other than ``"hs"``.
    """
    check_positive_int("num_classes", num_classes)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    linear, conv = _layer_factories(prior, tau0, shared_scale)
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, int(round(item * width)))
        layers += [conv(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    hidden = max(1, int(round(512 * width)))
    layers += [nn.Flatten(), linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), linear(hidden, num_classes)]
    model = nn.Sequential(*layers)
    model.input_shape = (3, 32, 32)
    return model


MODELS = {"lenet300": lenet_300_100, "lenet5": lenet5_caffe, "vgg": vgg_cifar}


def build_model(name: str, prior, **kwargs) -> nn.Sequential:
    """Build a model by its name in ``bclib.models.MODELS`` (``lenet300``, ``lenet5``, ``vgg``; the command line
    offers the first two)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](prior, **kwargs)


def bayesian_from_pretrained(name: str, prior, pretrained: nn.Module, **kwargs) -> nn.Sequential:
    """Build model ``name`` with ``prior`` whose posterior means start at a pretrained deterministic copy.

    Each Bayesian layer gets the weight and bias of the matching ``nn.Linear`` / ``nn.Conv2d`` of
    ``pretrained`` (in order), as ``init_weight`` / ``init_bias`` would; BatchNorm statistics and
    affine parameters are copied too. For any other network, :func:`to_bayesian`.

    Example:
        >>> det = lenet_300_100(None)
        >>> bayes = bayesian_from_pretrained("lenet300", "nj", det)
    """
    if prior not in ("nj", "hs", "svd"):
        raise ValueError(f"prior must be 'nj', 'hs' or 'svd' (a Bayesian model to start from pretrained), got {prior!r}")
    if not isinstance(pretrained, nn.Module):
        raise TypeError(f"pretrained must be the deterministic network (an nn.Module), got {type(pretrained).__name__}; "
                        f"for a state_dict, build it with build_model({name!r}, None) and load it there first")
    model = build_model(name, prior, **kwargs)
    plain = [m for m in pretrained.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    bayes = [m for m in model.modules() if hasattr(m, "load_pretrained")]
    norms = [[m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
             for network in (pretrained, model)]
    for sources, targets, what in ((plain, bayes, "linear/conv layers"), (*norms, "BatchNorm layers")):
        if len(sources) != len(targets):
            raise ValueError(f"pretrained has {len(sources)} {what}, model {name!r} has {len(targets)}")
    for source, target in zip(plain, bayes):
        target.load_pretrained(source.weight.detach(), None if source.bias is None else source.bias.detach())
    for source, target in zip(*norms):
        target.load_state_dict(source.state_dict())
    return model


def to_bayesian(module: nn.Module, prior: str, *, exclude: Iterable[str] | None = (),
                clip_var: float | None = None, tau0: float | None = None, shared_scale: bool = False) -> nn.Module:
    """A copy of any network with every ``nn.Linear`` and ``nn.Conv2d`` replaced by the Bayesian layer of ``prior``.

    Each new layer starts where the old one is: its posterior mean equals the old weight and bias
    (as ``init_weight`` / ``init_bias`` give), so a trained network keeps its predictions in eval
    mode and training starts from there (chapter 7 of the book). Everything else, BatchNorm and
    custom modules included, is copied unchanged; ``module`` itself is left as it was. Only the
    exact classes ``nn.Linear`` and ``nn.Conv2d`` are converted: subclasses (your own, ``nn.LazyLinear``)
    and other convolutions (``nn.Conv1d``, ``nn.ConvTranspose2d``, ...) stay with a warning; the
    output projection inside ``nn.MultiheadAttention`` also stays, silently, because attention reads
    its weight directly, and so do ``linear1`` / ``linear2`` of ``nn.TransformerEncoderLayer`` (with a
    warning: torch reads their weights in its eval-mode fast path). A layer
    used at several places (tied weights) becomes one Bayesian layer used at all of them; a weight
    tied across two modules (a head sharing an embedding's) is refused. The new
    layers' parameters are trainable even where the old ones were frozen (``requires_grad=False``):
    to keep a layer fixed, leave it deterministic with ``exclude``. Training needs the KL term (:func:`bclib.kl_divergence`); :func:`bclib.compress` needs a
    network whose ``forward`` is a chain of layers (an ``nn.Sequential``, nested ones included, or a
    module class of your own, read with :func:`bclib.layer_sequence.layer_sequence`).

    Args:
        module: the network to convert.
        prior: ``"nj"``, ``"hs"`` or ``"svd"``.
        exclude: names of layers to keep deterministic (``None``: none), as in ``module.named_modules()`` (a
            convolution the Bayesian layers cannot express, say); a container's name keeps every
            layer inside it. :func:`bclib.compress` needs every
            weighted layer Bayesian, so it cannot export a network with excluded layers.
        clip_var: upper bound on the weight variances of every converted layer (``None``: none).
        tau0, shared_scale: horseshoe only, as in :func:`lenet_300_100`.

    Returns:
        The converted copy, on the device and in the dtype and training mode of ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; ``exclude`` is a string (give a list of names) or
            not a collection of names; ``clip_var`` or ``tau0`` is not a number.
        ValueError: an unknown ``prior``, a name in ``exclude`` that is not a module of ``module``,
            ``clip_var`` or ``tau0`` not positive and finite,
            a layer whose weight or bias another module also holds (tied across modules),
            ``tau0`` / ``shared_scale`` given for a prior other than ``"hs"``,
            or a convolution the Bayesian layers cannot express (``groups`` other than 1, a
            ``padding_mode`` other than ``"zeros"``, ``padding="same"`` that is not symmetric).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 10))
        >>> [type(m).__name__ for m in to_bayesian(net, "nj")]
        ['Conv2dGroupNJ', 'ReLU', 'Flatten', 'LinearGroupNJ']
    """
    # Every argument is checked here, before anything is converted: clip_var and tau0 too, which
    # no layer would see in a network without nn.Linear / nn.Conv2d.
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(prior, str) or prior not in _LAYERS:  # a list is unhashable: no dict lookup
        raise ValueError(f"prior must be one of {tuple(_LAYERS)}, got {prior!r}")
    if isinstance(exclude, str):
        # set("fc1") would be the letters: a common slip, refused rather than misread.
        raise TypeError(f"exclude must be a collection of layer names, e.g. [{exclude!r}], got the string {exclude!r}")
    try:
        exclude = set(() if exclude is None else exclude)
    except TypeError:
        raise TypeError(f"exclude must be None or a collection of layer names, got {exclude!r}") from None
    if not all(isinstance(name, str) for name in exclude):
        raise TypeError(f"exclude must hold layer names (strings), got {sorted(exclude, key=repr)!r}")
    check_positive_float("clip_var", clip_var)
    check_positive_float("tau0", tau0)
    names = {name for name, _ in module.named_modules(remove_duplicate=False)}
    if not exclude <= names:
        raise ValueError(f"exclude names layers that module does not have: {sorted(exclude - names)}; "
                         f"its modules are {sorted(names - {''})}")

    def excluded(name: str) -> bool:  # the layer itself or a container holding it
        return any(e == "" or name == e or name.startswith(e + ".") for e in exclude)

    linear, conv = _layer_factories(prior, tau0, shared_scale)
    converted = copy.deepcopy(module)
    # A layer used at several places (tied weights) becomes one Bayesian layer used at all of
    # them; it stays deterministic if any of its names is excluded.
    places: dict[int, list[str]] = {}
    children, unsupported, transformer_layers = {}, [], []
    for name, child in converted.named_modules(remove_duplicate=False):
        if type(child) in (nn.Linear, nn.Conv2d):
            if _read_by_transformer(converted, name):
                if not excluded(name):
                    transformer_layers.append(name)
                continue
            places.setdefault(id(child), []).append(name)
            children[id(child)] = child
        elif (isinstance(child, (nn.modules.conv._ConvNd, nn.Bilinear, nn.Linear)) and not excluded(name)
              and type(child) is not NonDynamicallyQuantizableLinear):  # attention reads that weight itself
            unsupported.append(f"{name} ({type(child).__name__})")
    if unsupported:
        warnings.warn(f"to_bayesian leaves these layers deterministic (it converts the classes nn.Linear and "
                      f"nn.Conv2d themselves, not subclasses or other convolutions; pass them in exclude to "
                      f"silence this): {', '.join(unsupported)}", stacklevel=2)
    if transformer_layers:
        warnings.warn(f"to_bayesian leaves these layers deterministic (torch's transformer layers read their "
                      f"weights directly in eval mode; pass them in exclude to silence this): "
                      f"{', '.join(transformer_layers)}", stacklevel=2)
    _check_no_ties_across_modules(converted, places, children, excluded)
    replaced = {}
    for key, names in places.items():
        if any(excluded(name) for name in names):
            continue
        child, name = children[key], names[0]
        weight, bias = child.weight.detach(), None if child.bias is None else child.bias.detach()
        kwargs = {"bias": bias is not None, "init_weight": weight, "init_bias": bias, "clip_var": clip_var}
        if type(child) is nn.Linear:
            layer = linear(child.in_features, child.out_features, **kwargs)
        else:
            layer = conv(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                         padding=_explicit_padding(name or "module", child), dilation=child.dilation, **kwargs)
        layer = layer.to(device=weight.device, dtype=weight.dtype).train(child.training)
        if weight.dtype != torch.float32:
            layer.reset_parameters()  # start again from init_weight, now in the network's dtype
        replaced.update((place, layer) for place in names)
    if "" in replaced:  # module is itself one layer
        return replaced[""]
    for name, layer in replaced.items():
        parent, _, attribute = name.rpartition(".")
        setattr(converted.get_submodule(parent), attribute, layer)
    return converted


def _read_by_transformer(network: nn.Module, name: str) -> bool:
    """Is ``name`` the ``linear1`` / ``linear2`` of an ``nn.TransformerEncoderLayer``, whose eval-mode
    fast path reads ``.weight`` (a Bayesian layer has none; the decoder layer has no such path)?"""
    parent, _, attribute = name.rpartition(".")
    return attribute in ("linear1", "linear2") and isinstance(network.get_submodule(parent), nn.TransformerEncoderLayer)


def _check_no_ties_across_modules(network: nn.Module, places: dict[int, list[str]], children: dict[int, nn.Module],
                                  excluded) -> None:
    """Refuse a layer to convert whose weight or bias another module also holds (a head tied to
    an embedding, two layers given one Parameter): its Bayesian copy would silently untie them."""
    holders: dict[int, list[str]] = {}
    for name, child in network.named_modules():
        for parameter in child.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append(name)
    for key, names in places.items():
        if any(excluded(name) for name in names):
            continue
        layer = children[key]
        for kind in ("weight", "bias"):
            parameter = getattr(layer, kind)
            # .get: a weight computed by a parametrisation (spectral_norm) is held by no module.
            others = [] if parameter is None else [h for h in holders.get(id(parameter), []) if h not in names]
            if others:
                other = repr(others[0]) if others[0] else "the network itself"
                raise ValueError(f"layer {names[0]!r} shares its {kind} with {other}: a Bayesian layer would "
                                 f"untie them; pass {names[0]!r} and the layers sharing it in exclude to keep "
                                 "them deterministic and tied")


def _explicit_padding(name: str, conv: nn.Conv2d) -> tuple[int, int]:
    """The padding of ``conv`` as two ints, or a ValueError naming the layer when bclib cannot express it."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: bclib's Bayesian convolutions have groups=1 and zero padding, got "
                         f"groups={conv.groups}, padding_mode={conv.padding_mode!r} (pass it in exclude to keep it)")
    try:
        return check_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation)
    except ValueError as error:
        raise ValueError(f"layer {name!r}: {error}") from None
