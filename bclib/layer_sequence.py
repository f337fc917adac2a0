"""A network as the sequence of layers its forward pass runs: what :func:`bclib.compress` walks.

:func:`bclib.compress` prunes each Bayesian layer by the units of the layers before and after it, so
it needs the network as a chain: one input, each operation applied to the output of the one before,
one output. :func:`layer_sequence` reads that chain from the model's ``forward`` with ``torch.fx``
(symbolic tracing), so an ``nn.Sequential`` and a hand-written module class work alike::

    class Net(nn.Module):
        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = x.view(x.size(0), -1)
            return F.log_softmax(self.fc(x), dim=1)

Module calls are kept as they are (Bayesian layers, activations, pooling, BatchNorm, ...); the
functional forms in a ``forward`` become the equivalent module (``F.relu`` -> ``nn.ReLU``,
``F.max_pool2d`` -> ``nn.MaxPool2d``, ``torch.flatten(x, 1)`` / ``x.view(x.size(0), -1)`` ->
``nn.Flatten``, ``F.log_softmax(x, dim=1)`` -> ``nn.LogSoftmax(dim=1)``, ``F.dropout`` ->
``nn.Dropout``), so the export and the compressed file need no code. Anything else in the
path -- a skip connection, a concatenation, a parameter used outside a layer, an operation with no
module form -- is refused with an error that names it. :func:`check_sequence` then runs the chain
and the model side by side on random inputs, which catches a reshape that is not a flatten.
"""
from __future__ import annotations

import contextlib
import inspect
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._compiled import COMPILED_PREFIX, original_module
from .layers import BayesianLayer

__all__ = ["layer_sequence", "check_sequence", "evaluating", "parameter_device_and_dtype"]


def _relu(_):
    return nn.ReLU()


def _tanh(_):
    return nn.Tanh()


def _sigmoid(_):
    return nn.Sigmoid()


def _identity(_):
    return nn.Identity()


def _leaky_relu(args):
    return nn.LeakyReLU(args.get("negative_slope", 0.01))


def _max_pool2d(args):
    # torch.max_pool2d's default stride is [] (meaning: the kernel size), F.max_pool2d's None.
    return nn.MaxPool2d(args["kernel_size"], args.get("stride") or None, args.get("padding", 0), args.get("dilation", 1),
                        args.get("return_indices", False), args.get("ceil_mode", False))


def _avg_pool2d(args):
    return nn.AvgPool2d(args["kernel_size"], args.get("stride"), args.get("padding", 0), args.get("ceil_mode", False),
                        args.get("count_include_pad", True), args.get("divisor_override"))


def _adaptive_avg_pool2d(args):
    return nn.AdaptiveAvgPool2d(args["output_size"])


def _dropout(args):
    return nn.Dropout(args.get("p", 0.5))  # the export is for inference, where dropout is the identity


def _flatten(args):
    return nn.Flatten(args.get("start_dim", 0), args.get("end_dim", -1))


def _reshape(_):
    # x.view(x.size(0), -1) and the like; check_sequence verifies that it really is a flatten.
    return nn.Flatten()


def _softmax_of(module_class):
    def build(args):
        if args.get("dim") is None:
            raise TypeError(f"{module_class.__name__} needs an explicit dim")
        if args.get("dtype") is not None:
            raise TypeError(f"{module_class.__name__} with a dtype is not supported")
        return module_class(args["dim"])
    return build


# Supported operations: their positional parameters after the input, and the module each becomes.
_FUNCTIONS = {
    F.relu: (("inplace",), _relu), torch.relu: ((), _relu), torch.relu_: ((), _relu),
    F.leaky_relu: (("negative_slope", "inplace"), _leaky_relu),
    torch.tanh: ((), _tanh), F.tanh: ((), _tanh), torch.sigmoid: ((), _sigmoid), F.sigmoid: ((), _sigmoid),
    F.max_pool2d: (("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"), _max_pool2d),
    torch.max_pool2d: (("kernel_size", "stride", "padding", "dilation", "ceil_mode"), _max_pool2d),
    F.avg_pool2d: (("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                   _avg_pool2d),
    F.adaptive_avg_pool2d: (("output_size",), _adaptive_avg_pool2d),
    F.dropout: (("p", "training", "inplace"), _dropout),
    torch.flatten: (("start_dim", "end_dim"), _flatten),
    F.log_softmax: (("dim", "_stacklevel", "dtype"), _softmax_of(nn.LogSoftmax)),
    F.softmax: (("dim", "_stacklevel", "dtype"), _softmax_of(nn.Softmax)),
    torch.log_softmax: (("dim", "dtype"), _softmax_of(nn.LogSoftmax)),
    torch.softmax: (("dim", "dtype"), _softmax_of(nn.Softmax)),
}
_METHODS = {
    "relu": ((), _relu), "relu_": ((), _relu), "tanh": ((), _tanh), "sigmoid": ((), _sigmoid),
    "flatten": (("start_dim", "end_dim"), _flatten), "view": (None, _reshape), "reshape": (None, _reshape),
    "contiguous": ((), _identity),
    "log_softmax": (("dim", "dtype"), _softmax_of(nn.LogSoftmax)),
    "softmax": (("dim", "dtype"), _softmax_of(nn.Softmax)),
}
_SUPPORTED = ("relu, leaky_relu, tanh, sigmoid, max_pool2d, avg_pool2d, adaptive_avg_pool2d, dropout, "
              "torch.flatten(x, 1), x.view(x.size(0), -1), x.contiguous(), softmax and log_softmax (the last two "
              "after the last Bayesian layer)")
# Operations on the sizes of a tensor (for x.view(x.size(0), -1)): not part of the chain.
_SIZE_METHODS = {"size", "dim"}


class _Tracer(fx.Tracer):
    """Bayesian layers are leaves, like torch.nn's own modules: traced as calls, not into."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, BayesianLayer) or super().is_leaf_module(module, qualified_name)


def layer_sequence(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``model.forward`` runs, in order, as ``(name, module)`` pairs.

    Module calls keep their qualified names (as in ``model.named_modules()``, e.g. ``"features.0"``
    or ``"fc1"``) and are the model's own module objects; an operation written in the forward
    becomes a new equivalent module named ``"forward:<op>"`` (see the module docstring).

    Args:
        model: any ``nn.Module`` whose forward is a chain of supported operations, or the
            ``torch.compile`` of one (its layers named as its ``named_modules()`` names them:
            ``"_orig_mod.0"``, ...).

    The forward is read in eval mode (what the export computes: a branch on ``self.training``
    takes its eval side); arguments after the input must have defaults and are read at them.
    Sizes (``x.size(0)``, ``x.shape[0]``) may be taken of any value of the chain.

    Raises:
        TypeError: when the forward cannot be traced (data-dependent control flow), branches or
            joins (skip connections, concatenations, a value used twice), reads a parameter outside
            a layer, calls an operation with no module form (the message names the operation),
            takes a second input without a default, or calls an ``nn.Linear`` / ``nn.Conv2d``
            (convert it with :func:`bclib.to_bayesian`); and for a single Bayesian layer.
        ValueError: when one Bayesian layer is called twice (tied weights).

    Example:
        >>> import bclib
        >>> net = nn.Sequential(bclib.LinearGroupNJ(4, 3), nn.ReLU(), bclib.LinearGroupNJ(3, 2))
        >>> [name for name, _ in layer_sequence(net)]
        ['0', '1', '2']
    """
    if isinstance(model, BayesianLayer):
        raise TypeError(f"model is a single {type(model).__name__}: compress works on a network; wrap the layer "
                        "as nn.Sequential(layer)")
    original = original_module(model)
    if original is not model:
        # torch.compile's wrapper: read the module it runs, named as the wrapper's named_modules() names them
        return [(name if name.startswith("forward:") else f"{COMPILED_PREFIX}{name}", module)
                for name, module in layer_sequence(original)]
    try:
        # Read in eval mode: what the export computes (a branch on self.training takes its eval side).
        with evaluating(model):
            graph = _Tracer().trace(model, concrete_args=_defaults_after_input(model))
    except Exception as error:  # fx raises many kinds (TraceError, TypeError, AttributeError, ...)
        raise TypeError(f"compress reads the layers of {type(model).__name__}.forward with torch.fx, which failed "
                        f"({type(error).__name__}: {error}); write the forward as a plain chain of layers (no "
                        "control flow on tensor values) or build the network as nn.Sequential") from None
    return _chain(model, graph)


def _defaults_after_input(model: nn.Module) -> dict | None:
    """Arguments of ``forward`` after the input that have defaults: traced at their default values."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} or None


def _chain(model: nn.Module, graph: fx.Graph) -> list[tuple[str, nn.Module]]:
    sizes: set[fx.Node] = set()
    chain: set[fx.Node] = set()
    fixed: set[fx.Node] = set()
    current: fx.Node | None = None
    leaves: list[tuple[str, nn.Module]] = []
    bayesian_ids: set[int] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is None:
                current = node
                chain.add(node)
            elif node.args:  # an argument fixed at its default: fx adds it with a check of its value
                fixed.add(node)
            else:
                raise TypeError(f"{type(model).__name__}.forward takes more than one input ({node.target!r}); "
                                "compress needs a network of one input (other arguments need defaults)")
        elif node.all_input_nodes and all(n in fixed for n in node.all_input_nodes):
            fixed.add(node)  # fx's check that a fixed argument has its default value
        elif node.op == "get_attr":
            raise TypeError(f"{type(model).__name__}.forward uses the tensor {node.target!r} outside a layer call "
                            "(a parameter, buffer or constant, or a layer's method other than forward); compress "
                            "needs every weight inside a layer module")
        elif node.op == "output":
            if node.args[0] is not current:
                returned = node.args[0]
                what = _describe(returned) if isinstance(returned, fx.Node) else f"a {type(returned).__name__}"
                raise TypeError(f"{type(model).__name__}.forward does not return the output of its last layer "
                                f"(it returns {what}); compress needs one tensor out")
        elif _is_size_of(node, chain, sizes):
            sizes.add(node)
        else:
            _check_input(model, node, current, sizes)
            name, module = _as_module(model, node)
            if isinstance(module, BayesianLayer):
                if id(module) in bayesian_ids:
                    raise ValueError(f"model runs Bayesian layer {name!r} twice (tied weights): compress prunes each "
                                     "layer by its own inputs and outputs, so each must appear once")
                bayesian_ids.add(id(module))
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"model layer {name!r} is a {type(module).__name__}: compress needs the weighted layers "
                                "to be bclib Bayesian layers (bclib.to_bayesian converts them)")
            leaves.append((name, module))
            current = node
            chain.add(node)
    return leaves


def _is_size_of(node: fx.Node, chain: set[fx.Node], sizes: set[fx.Node]) -> bool:
    """``x.size(0)``, ``x.shape``, ``x.shape[0]``, ``x.dim()`` of any value of the chain, and arithmetic on them."""
    inputs = node.all_input_nodes
    if not inputs:
        return False
    if _is_size(node) and inputs[0] in chain:
        return True
    return node.op == "call_function" and all(n in sizes for n in inputs) and node.target in (
        operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub)


def _check_input(model: nn.Module, node: fx.Node, current: fx.Node, sizes: set[fx.Node]) -> None:
    """The operation must take the chain's current value as its first argument, and nothing else
    from the chain but sizes; the value before must feed nothing else."""
    tensors = [n for n in node.all_input_nodes if n not in sizes]
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if first is not current or tensors != [current]:
        raise TypeError(f"the forward of {type(model).__name__} joins or branches at {_describe(node)} (it takes "
                        f"{', '.join(_value(n) for n in tensors)}: a skip connection or a concatenation?); "
                        "compress follows a chain, each layer fed by the one before")
    others = [user for user in current.users if user is not node and not _is_size(user)]
    if others:
        raise TypeError(f"the forward of {type(model).__name__} uses {_value(current)} twice (in "
                        f"{_describe(node)} and {_describe(others[0])}): compress follows a chain, each value used "
                        "once")


def _is_size(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _SIZE_METHODS) or (
        node.op == "call_function" and node.target is getattr and node.args[1] == "shape")


def _value(node: fx.Node) -> str:
    return "the input" if node.op == "placeholder" else f"the output of {_describe(node)}"


def _describe(node: fx.Node) -> str:
    """How the user wrote it: ``layer 'fc1'``, ``relu()``, ``.view()``, ``the input``."""
    if node.op == "call_module":
        return f"layer {node.target!r}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the return value"
    if node.target is getattr:
        return f".{node.args[1]}"
    return f"{getattr(node.target, '__name__', node.target)}()"


def _as_module(model: nn.Module, node: fx.Node) -> tuple[str, nn.Module]:
    """``(name, module)`` of one operation of the chain."""
    if node.op == "call_module":
        return node.target, model.get_submodule(node.target)
    table = _FUNCTIONS if node.op == "call_function" else _METHODS
    key = node.target
    if key not in table:
        raise TypeError(f"{type(model).__name__}.forward calls {_describe(node)}, which compress cannot export; "
                        f"supported in a forward: module calls and {_SUPPORTED}")
    names, build = table[key]
    extra = node.args[1:]
    if names is None:  # view / reshape: the sizes are checked by check_sequence
        args = {}
    else:
        if len(extra) > len(names):
            raise TypeError(f"{_describe(node)} has more arguments than expected")
        kwargs = dict(node.kwargs)
        if not node.args:  # the chain's value given by keyword, torch.tanh(input=x): the first (_check_input)
            del kwargs[next(iter(kwargs))]
        args = {**dict(zip(names, extra)), **kwargs}
        if any(isinstance(v, fx.Node) for v in args.values()):
            raise TypeError(f"{_describe(node)} takes an argument computed in forward; compress needs constants")
    return f"forward:{node.name}", build(args).eval()  # eval like the rest: F.dropout's module draws nothing


def parameter_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's first parameter lives (the CPU and the default dtype when it has none)."""
    first = next(model.parameters(), None)
    if first is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return first.device, first.dtype


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the duration, then every module's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.train(flag)


def check_sequence(model: nn.Module, leaves: list[tuple[str, nn.Module]],
                   input_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Run ``leaves`` one after another and ``model`` on the same inputs; raise unless they agree.

    Both run in eval mode, each on its own copy of the same three random examples of
    ``input_shape`` (in the model's dtype, on its device; in-place operations cannot leak from one
    to the other), drawn from a fixed seed that leaves torch's global generator alone.

    Returns:
        The (input, output) shape of one example at every leaf, in order.

    Raises:
        ValueError: when the inputs do not pass the model (a wrong ``input_shape``; the message names it).
        TypeError: when the leaves fail where the model runs, or compute another shape or other values.
    """
    device, dtype = parameter_device_and_dtype(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *input_shape, generator=generator).to(device=device, dtype=dtype)
    shapes = []
    name = type(model).__name__
    with torch.no_grad(), evaluating(model):
        # The forward first: where it runs and a leaf does not, the chain was misread, not the input.
        try:
            expected = model(x.clone())
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"an input of input_shape {input_shape} does not pass {name}.forward: {error}") from None
        y = x.clone()
        for leaf, module in leaves:
            try:
                out = module(y)
            except (RuntimeError, ValueError, TypeError) as error:
                raise TypeError(f"the layers compress read from {name}.forward fail at layer {leaf!r}, where the "
                                f"forward runs ({error}): a view or reshape before it that is not a flatten to "
                                "(batch, features)?") from None
            shapes.append((tuple(y.shape[1:]), tuple(out.shape[1:])))
            y = out
    if not isinstance(expected, Tensor):
        raise TypeError(f"{name}.forward returns a {type(expected).__name__}, not a tensor")
    if y.shape != expected.shape:
        raise TypeError(f"the layers compress read from {name}.forward give outputs of shape {tuple(y.shape)}, the "
                        f"forward {tuple(expected.shape)}: a view or reshape that is not a flatten to (batch, "
                        "features)?")
    if not torch.allclose(y, expected, rtol=1e-5, atol=1e-6, equal_nan=True):
        difference = float((y - expected).abs().nan_to_num(nan=float("inf")).max())
        raise TypeError(f"the layers compress read from {name}.forward compute other values than it does in eval "
                        f"mode (up to {difference:.3g} apart): does the forward draw random numbers (F.dropout without "
                        "training=self.training), change its input in place, or run hooks?")
    return shapes
