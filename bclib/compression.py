"""Pruning masks, bit precision, compression rates and export to plain PyTorch (Louizos et al. 2017, Sec. 5).

:func:`compress` turns a trained Bayesian network into

* a plain ``nn.Sequential`` of ``nn.Conv2d`` / ``nn.Linear`` (and the network's own activations,
  pooling, ``Flatten`` and BatchNorm) holding only the surviving filters and units;
* a :class:`CompressionReport` (data, printable as a table) with the pruned architecture, the bits
  per layer and the compression rates defined by the paper's code release;
* a reduced-precision copy (weights on each layer's fixed-point grid) and a real file
  (:meth:`CompressedModel.save`: the grid integers entropy-coded, or bit-packed at each layer's
  width; read back by :func:`bclib.load_compressed`).

:func:`fine_tune` (not in the paper) retrains the surviving weights of a compressed network on
their grids, which keeps the architecture and bits and lowers the error (the exponent bits follow
the largest retrained weight).

Which weights survive
---------------------
Group ``g`` of a layer is kept when ``log_alpha_g < threshold`` (one threshold per layer). The
groups of a linear layer are its input units, those of a convolution its output channels. The
units *between* layer ``l`` and layer ``l+1`` are the outputs of ``l`` and the inputs of ``l+1``
(a flatten maps conv channel ``c`` onto its block of ``H*W`` inputs of the next linear layer).
A unit is alive when

* the producing layer keeps it (a conv keeps a channel whose group survives and that has a
  surviving input; a linear layer keeps an output with at least one surviving incoming weight), and
* the consuming layer keeps it (a linear layer keeps an input whose group survives -- for a
  flattened conv channel, at least one of its ``H*W`` positions -- a conv keeps an input channel
  that feeds at least one surviving filter).

A weight survives when its own test passes (group kept, or for Sparse VD its own
``log_alpha < threshold``) AND its input unit AND its output unit are alive. Removing units can
strand others (a unit with no surviving weights is removed), so the rule is applied until nothing
changes; for the group priors one pass settles it. The outputs of the last layer (the classes) are
never pruned, and the network's inputs are never dropped from the exported model (they are the
data), only zeroed.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._compiled import COMPILED_PREFIX
from .data import TensorSplit
from .fileformat import (build_module, check_runs, dequantize, encode_compressed, load_compressed, module_spec,
                         read_compressed, write_compressed)
from .layer_sequence import check_sequence, evaluating, layer_sequence
from .layers import BayesianLayer, bayesian_layers
from .layers.base import _is_int, check_positive_int
from .train import TrainConfig, fit, input_dtype

__all__ = [
    "compress", "CompressedModel", "CompressionReport", "LayerReport", "SavedFile",
    "weight_bits", "exponent_bits", "quantize", "model_error",
    "propose_threshold", "propose_thresholds", "select_thresholds", "resolve_thresholds", "threshold_sweep",
    "weight_masks", "apply_masks", "load_compressed",
    "fine_tune", "FixedPointGrid", "prune_further", "prune_to_groups",
]

MAX_MANTISSA_BITS = 23
# The largest float32: a finite threshold that cuts where +inf would (log alphas are float32; a
# threshold of +inf keeps every group).
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------- bit precision
def weight_bits(variance: Tensor) -> int:
    r"""Bits of a layer by the release's rule: ``t_l = ceil(mean_i #{t in 1..23 : 2 Var[w_i] < 2^-t})``.

    Each weight counts the grid steps ``2^-t`` that are still larger than twice its posterior
    variance (the rule compares the *variance*, not the standard deviation), then the layer takes
    the mean over its surviving weights, rounded up. An empty layer needs 0 bits.

    Args:
        variance: posterior variances of the surviving weights (any shape).

    Example:
        >>> weight_bits(torch.tensor([2.0**-8, 2.0**-6]))  # 2 Var = 2^-7, 2^-5: t = 1..6 and 1..4
        5
    """
    variance = variance.detach().reshape(-1).to(torch.float64)
    if variance.numel() == 0:
        return 0
    steps = torch.pow(2.0, -torch.arange(1, MAX_MANTISSA_BITS + 1, dtype=torch.float64))
    counts = (2.0 * variance[:, None] < steps[None, :]).sum(1)
    total = int(counts.sum())
    return -(-total // variance.numel())  # exact integer ceiling of the mean


def exponent_bits(max_abs_weight: float) -> int:
    r"""Exponent bits of the network: ``e = ceil(log2(|log2 max|w|| + 1) + 1)``.

    The release wrote ``log2(log2 max|w| + 1)``, which is ``-inf`` at ``max|w| = 0.5`` and NaN
    below it, although trained networks usually have ``max|w| < 1``. The absolute value makes it
    the bits of a signed exponent as large as ``|log2 max|w||``: the same for ``max|w| >= 1``,
    finite for every positive weight. With no weights left (``max|w| = 0``) it returns 1, the
    formula's value at ``max|w| = 1``.

    Example:
        >>> exponent_bits(0.3), exponent_bits(2.0), exponent_bits(0.0)
        (3, 2, 1)
    """
    max_abs_weight = float(max_abs_weight)
    if not math.isfinite(max_abs_weight) or max_abs_weight < 0:
        raise ValueError(f"max_abs_weight must be a finite number >= 0, got {max_abs_weight}")
    if max_abs_weight == 0:
        return 1
    return math.ceil(math.log2(abs(math.log2(max_abs_weight)) + 1) + 1)


def quantize(weight: Tensor, bits: int) -> Tensor:
    """Integer grid indices ``q = round(w / 2^-bits)`` (int64); the reduced weight is ``q 2^-bits``.

    Args:
        weight: the weights to round (any shape; read, not changed).
        bits: mantissa bits, an int in ``0 ... MAX_MANTISSA_BITS`` (the grid step is ``2^-bits``).

    Raises:
        ValueError: ``bits`` outside that range; a NaN or infinite weight, or one whose index would
            not fit in 62 bits, ``|q| < 2^61`` (the widest the file stores, two's complement; int64
            would wrap around silently).
    """
    bits = _check_bits(bits)
    scaled = torch.round(weight.detach().to(torch.float64) * math.ldexp(1.0, bits))
    if scaled.numel() and not bool(scaled.abs().max() < 2.0**61):  # False for NaN too
        raise ValueError(f"weights must be finite with |w| 2^bits < 2^61 to round on the grid of {bits} bits, got "
                         f"max |w| = {float(weight.detach().abs().max())}")
    return scaled.to(torch.int64)


def _check_bits(bits, argument: str = "bits") -> int:
    """``bits`` as a plain int (``math.ldexp`` and the file take no NumPy integers) if it is one in
    ``0 ... MAX_MANTISSA_BITS``, else ``ValueError`` naming ``argument``."""
    if not _is_int(bits) or not 0 <= bits <= MAX_MANTISSA_BITS:
        raise ValueError(f"{argument} must be an int in 0..{MAX_MANTISSA_BITS}, got {bits!r}")
    return int(bits)


def _resolve_bits(bits, names: list[str], current: list[int]) -> list[int]:
    """One plain int of bits per layer (``names`` in order) from a list, or a dict by name whose missing
    layers keep ``current``; checked (:meth:`CompressionReport.with_bits`)."""
    if isinstance(bits, dict):
        unknown = sorted(set(bits) - set(names))
        if unknown:
            raise ValueError(f"bits names layers {unknown} that the report does not have; its layers are {names}")
        bits = [bits.get(name, b) for name, b in zip(names, current)]
    elif isinstance(bits, (list, tuple)):
        if len(bits) != len(names):
            raise ValueError(f"bits must have one value per Bayesian layer ({len(names)}: {names}), got {len(bits)}")
    else:
        raise TypeError(f"bits must be a list (one per Bayesian layer) or a dict by layer name, "
                        f"got {type(bits).__name__}")
    return [_check_bits(b, f"bits for layer {name!r}") for name, b in zip(names, bits)]


# ----------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One Bayesian layer after pruning.

    ``in_kept`` counts input columns for a linear layer (positions of a flattened conv output
    included) and input channels for a convolution. ``weights_kept`` is the dense block between
    the surviving units (what the architecture stores); ``weights_nonzero`` counts the surviving
    weights themselves (smaller only for Sparse VD). ``flops`` are multiply-accumulates per example.
    """

    name: str
    kind: str
    in_kept: int
    in_total: int
    out_kept: int
    out_total: int
    weights_kept: int
    weights_total: int
    weights_nonzero: int
    bits: int
    threshold: float
    flops_before: int
    flops_after: int
    groups_kept: int  # the paper's architecture entry: input units of a linear layer, filters of a convolution


@dataclass
class CompressionReport:
    r"""What :func:`compress` did, as data. ``str(report)`` is a readable table.

    Rates as the paper's code release defined them (biases excluded, pruned matrices stored dense):

    .. math::
        \text{compression\_pruning} = \frac{\sum_l |W_l|}{\sum_l |W_l^{\text{pruned}}|},\qquad
        \text{compression\_precision} = \frac{32 \sum_l |W_l|}{\sum_l |W_l^{\text{pruned}}| (1 + e + t_l)}

    with ``|W_l pruned|`` the dense block between surviving units, ``e`` the exponent bits and
    ``t_l`` the layer's bits. ``compression_sparse`` and ``compression_sparse_precision`` use the
    count of surviving (nonzero) weights instead: a different quantity (a sparse format would need
    indices too), the one that matters for Sparse VD. FLOPs are multiply-accumulates per example of
    the conv/linear layers.

    Attributes:
        layers: one :class:`LayerReport` per Bayesian layer (units, weights, bits, threshold, FLOPs).
        exponent_bits: ``e``, shared by the network (the release's rule, :func:`exponent_bits`, of the
            largest surviving weight as stored, on its layer's grid: the rounded posterior mean for
            :func:`compress`, the retrained grid value after :func:`fine_tune`).
        compression_pruning, compression_precision: the release's two rates (above).
        compression_sparse, compression_sparse_precision: the same over nonzero weights.
        flops_before, flops_after: multiply-accumulates per example, dense and pruned.
        dense_float32_bytes: float32 weights and biases of the unpruned network's Bayesian layers (not
            BatchNorm's parameters and statistics, which the file stores: a slightly low file ratio there).
        file: the :class:`SavedFile` once :meth:`CompressedModel.save` wrote one, else ``None``.

    Example:
        >>> import bclib
        >>> net = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2)).eval()
        >>> report = compress(net, thresholds=[-3.0, -3.0]).report
        >>> report.flops_before, report.flops_after, report.compression_pruning
        (18, 18, 1.0)
    """

    layers: list[LayerReport]
    exponent_bits: int
    compression_pruning: float
    compression_precision: float
    compression_sparse: float
    compression_sparse_precision: float
    flops_before: int
    flops_after: int
    dense_float32_bytes: int
    file: "SavedFile | None" = field(default=None)

    @property
    def architecture(self) -> str:
        """Kept groups per layer as the paper writes them, e.g. ``"8-13-88-13"`` for LeNet-5."""
        return "-".join(str(layer.groups_kept) for layer in self.layers)

    @property
    def flop_reduction(self) -> float:
        return _ratio(self.flops_before, self.flops_after)

    def with_bits(self, bits) -> "CompressionReport":
        """The same pruning with other bits per layer: each row's ``bits`` replaced, the rates recomputed
        with the report's exponent bits (a report holds no weights: :meth:`CompressedModel.with_bits`
        also recounts the exponent bits from the weights on their new grids).

        Args:
            bits: as for :meth:`CompressedModel.with_bits` (a list in layer order or a dict by name).
        """
        bits = _resolve_bits(bits, [row.name for row in self.layers], [row.bits for row in self.layers])
        rows = [replace(row, bits=b) for row, b in zip(self.layers, bits, strict=True)]
        return replace(self, layers=rows, **_rates(rows, self.exponent_bits), file=None)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionReport":
        """Rebuild a report from :meth:`to_dict`'s output (a run's ``report.json``); keys that are not
        report fields (errors, thresholds, the file summary) are ignored and ``file`` is ``None``,
        while each row of ``layers`` must hold exactly the fields of a :class:`LayerReport`.

        Example:
            >>> import bclib
            >>> net = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2))
            >>> report = compress(net.eval(), -3.0).report
            >>> CompressionReport.from_dict(report.to_dict()) == report
            True
        """
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise ValueError("data must be a dict with a 'layers' list, as CompressionReport.to_dict writes")
        names = {f.name for f in fields(cls)} - {"layers", "file"}
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"data lacks the report fields {missing}")
        values = {name: math.inf if data[name] is None else data[name] for name in names}
        row_fields = {f.name for f in fields(LayerReport)}
        for number, row in enumerate(data["layers"]):
            if not isinstance(row, dict):
                raise ValueError(f"data['layers'][{number}] must be a dict (a layer's row), got {type(row).__name__}")
            if set(row) != row_fields:
                raise ValueError(f"data['layers'][{number}] lacks the keys {sorted(row_fields - set(row))} and has "
                                 f"unknown keys {sorted(set(row) - row_fields)} (a layer's row holds {sorted(row_fields)})")
        # to_dict writes an infinite threshold (keep everything) as None, as it does infinite rates.
        layers = [LayerReport(**{**row, "threshold": math.inf if row["threshold"] is None else row["threshold"]})
                  for row in data["layers"]]
        return cls(layers=layers, **values)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (an infinite rate, when nothing survives, becomes ``None``)."""
        data = asdict(self)
        data["architecture"] = self.architecture
        data["flop_reduction"] = self.flop_reduction
        return _finite_or_none(data)

    def __str__(self) -> str:
        header = ("layer", "kind", "in kept", "out kept", "weights kept", "bits", "threshold")
        rows = [header] + [
            (r.name, r.kind, f"{r.in_kept}/{r.in_total}", f"{r.out_kept}/{r.out_total}",
             f"{r.weights_kept}/{r.weights_total}", str(r.bits), f"{r.threshold:g}")
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [
            f"architecture {self.architecture}; exponent bits {self.exponent_bits}",
            f"compression (biases excluded): after pruning {_times(self.compression_pruning)}, "
            f"after precision {_times(self.compression_precision)}",
            f"sparse (nonzero weights) compression: {_times(self.compression_sparse)}, "
            f"with precision {_times(self.compression_sparse_precision)}",
            f"FLOPs (multiply-accumulates per example): {self.flops_before:,} -> {self.flops_after:,} "
            + (f"({_times(self.flop_reduction)} fewer)" if math.isfinite(self.flop_reduction) else "(none left)"),
        ]
        if self.file is not None:
            lines.append(str(self.file))
        return "\n".join(lines)


@dataclass
class SavedFile:
    """Size of a written compressed file next to the float32 weights and biases of the dense original."""

    path: str
    file_bytes: int
    dense_float32_bytes: int
    precision_rate: float

    @property
    def file_ratio(self) -> float:
        return _ratio(self.dense_float32_bytes, self.file_bytes)

    @property
    def fraction_of_theoretical(self) -> float:
        """``file_ratio / compression_precision``: 1.0 means the file is as small as the theoretical rate."""
        return self.file_ratio / self.precision_rate if math.isfinite(self.precision_rate) else 0.0

    def __str__(self) -> str:
        return (f"file {self.path}: {self.file_bytes:,} bytes vs {self.dense_float32_bytes:,} bytes float32 dense: "
                f"{_times(self.file_ratio)} ({self.fraction_of_theoretical:.2f} of the after-precision rate)")


def _times(rate: float) -> str:
    return f"{rate:.1f}x" if math.isfinite(rate) else "inf (nothing left)"


def _ratio(before: float, after: float) -> float:
    return math.inf if after == 0 else before / after


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_threshold(name: str, value) -> float:
    if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:  # one number, as a scalar threshold may be
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"threshold for {name!r} must be a number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"threshold for {name!r} must not be NaN")
    if value == -math.inf:  # a report writes infinite thresholds as null and reads them back as +inf
        raise ValueError(f"threshold for {name!r} must not be -inf (+inf keeps every group; to prune every "
                         "group give a finite threshold below all log alphas)")
    return float(value)


def _finite_cut(threshold: float) -> float:
    """``threshold`` as a finite cut: the largest float32 for +inf (which would keep every group; the
    largest float32 keeps all but those at +inf), minus it for -inf (which no threshold may be; it keeps
    only groups at -inf), else itself."""
    return _FLOAT32_MAX if threshold == math.inf else -_FLOAT32_MAX if threshold == -math.inf else threshold


def _uncalled(model: nn.Module, names: list[str]) -> frozenset[str]:
    """The Bayesian layers of ``model`` that forward never runs: those not among ``names``."""
    called = set(names)
    return frozenset(name for name, _ in bayesian_layers(model) if name not in called)


def _without(values, names: frozenset[str]):
    """``values`` without the entries of ``names`` if it is a dict by layer name (one that
    :func:`propose_thresholds` gives names every layer the model holds, those forward never runs too)."""
    return {name: v for name, v in values.items() if name not in names} if isinstance(values, dict) else values


def resolve_thresholds(thresholds, names: list[str]) -> list[float]:
    """One threshold per Bayesian layer (``names`` in order) from a number, a list or a dict by name."""
    if isinstance(thresholds, (Tensor, np.ndarray)):
        thresholds = thresholds.tolist()
    if isinstance(thresholds, (int, float, np.floating, np.integer)) and not isinstance(thresholds, bool):
        return [_check_threshold(name, thresholds) for name in names]
    if isinstance(thresholds, dict):
        return [_check_threshold(name, value) for name, value in zip(names, _by_name(thresholds, names, "thresholds"))]
    if isinstance(thresholds, (list, tuple)):
        if len(thresholds) != len(names):
            raise ValueError(f"thresholds must have one value per Bayesian layer ({len(names)}: {names}), "
                             f"got {len(thresholds)}")
        return [_check_threshold(name, value) for name, value in zip(names, thresholds)]
    raise TypeError("thresholds must be a number, a list (one per Bayesian layer) or a dict by module name, "
                    f"got {type(thresholds).__name__}")


def _other_form(name) -> str | None:
    """A layer's name with torch.compile's wrapper prefix added, or removed if it has it."""
    if not isinstance(name, str):
        return None
    return name[len(COMPILED_PREFIX):] if name.startswith(COMPILED_PREFIX) else f"{COMPILED_PREFIX}{name}"


def _by_name(values: dict, names: list[str], argument: str) -> list:
    """``values[name]`` for each of ``names``; an error naming ``argument`` for unknown or missing names."""
    unknown = sorted(set(values) - set(names))
    missing = [name for name in names if name not in values]
    if unknown or missing:
        compiled = (f"; a torch.compile'd network's layer names start with {COMPILED_PREFIX!r} (its wrapper's), "
                    "the plain network's do not" if any(_other_form(name) in names for name in unknown) else "")
        raise ValueError(f"{argument} must have one entry per Bayesian layer {names}; "
                         f"unknown names {unknown}, missing {missing}{compiled}")
    return [values[name] for name in names]


def _resolve_input_shape(model, input_shape, first_layer) -> tuple[int, ...]:
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        if first_layer.groups_on_input:
            return (first_layer.in_features,)
        raise ValueError("input_shape is needed (the shape of one example, e.g. (1, 28, 28)): pass input_shape= "
                         "or set model.input_shape")
    if not isinstance(input_shape, (tuple, list, torch.Size)):
        raise TypeError(f"input_shape must be a tuple of positive ints (one example, e.g. (1, 28, 28)), "
                        f"got {type(input_shape).__name__} {input_shape!r}")
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    return shape


# ----------------------------------------------------------------------------- masks
@dataclass
class _Weighted:
    """A Bayesian layer with what compression needs of it, on the CPU."""

    name: str
    layer: BayesianLayer
    threshold: float
    keep: Tensor         # its own test (log_alpha < threshold), broadcast to the weight's shape
    mean: Tensor
    var: Tensor
    bias: Tensor | None
    in_shape: tuple      # one example's input and output shapes
    out_shape: tuple
    positions: int = 1   # inputs per unit of the previous layer (H*W after a flatten, else 1)

    @property
    def is_conv(self) -> bool:
        return not self.layer.groups_on_input

    @property
    def units_in(self) -> int:
        return self.mean.shape[1] // self.positions

    def along_in(self, v: Tensor) -> Tensor:
        return v.view(1, -1, 1, 1) if self.is_conv else v.view(1, -1)

    def along_out(self, v: Tensor) -> Tensor:
        return v.view(-1, 1, 1, 1) if self.is_conv else v.view(-1, 1)

    def own_keep(self, log_alpha: Tensor, threshold: float) -> Tensor:
        """The layer's own test ``log_alpha < threshold``, shaped like the weight (one test per group,
        input units or filters, broadcast; or one per weight). A threshold of +inf keeps every group, one
        whose log alpha is +inf too."""
        keep = torch.ones_like(log_alpha, dtype=torch.bool) if threshold == math.inf else log_alpha < threshold
        if keep.shape == self.mean.shape:
            return keep
        return (self.along_out if self.is_conv else self.along_in)(keep).expand_as(self.mean).clone()


def _any_per_input(mask: Tensor) -> Tensor:
    return mask.transpose(0, 1).reshape(mask.shape[1], -1).any(1)


def _any_per_output(mask: Tensor) -> Tensor:
    return mask.reshape(mask.shape[0], -1).any(1)


def _alive_units(layers: list[_Weighted]) -> tuple[list[Tensor], list[Tensor]]:
    """Alive units at every boundary (``n + 1`` of them) and alive input columns of every layer.

    Boundary 0 holds the first layer's input columns/channels, boundary ``n`` the network's outputs.
    """
    n = len(layers)
    alive = [torch.ones(layer.units_in, dtype=torch.bool) for layer in layers]
    alive.append(torch.ones(layers[-1].mean.shape[0], dtype=torch.bool))
    while True:
        columns = []
        for l, layer in enumerate(layers):
            used = _any_per_input(layer.keep & layer.along_out(alive[l + 1]))
            columns.append(used & alive[l].repeat_interleave(layer.positions))
        new = [columns[0].clone()]
        for b in range(1, n):
            consumer = columns[b].view(-1, layers[b].positions).any(1)
            producer = _any_per_output(layers[b - 1].keep & layers[b - 1].along_in(columns[b - 1]))
            new.append(consumer & producer)
        new.append(alive[n])
        if all(torch.equal(a, b) for a, b in zip(alive, new)):
            return alive, columns
        alive = new


def _weight_mask(layer: _Weighted, columns: Tensor, outputs: Tensor) -> Tensor:
    """The AND rule: a weight survives iff its own test, its input column and its output unit survive."""
    return layer.keep & layer.along_in(columns) & layer.along_out(outputs)


def weight_masks(model: nn.Module, thresholds, input_shape=None) -> dict[str, Tensor]:
    """Boolean keep-mask, shaped like the weight, of every Bayesian layer: what :func:`compress`
    keeps, without building the export (cheap enough to call every epoch, e.g. for the animations).

    Args:
        model, thresholds, input_shape: as for :func:`compress`.

    Returns:
        ``{module name: mask}`` in layer order.
    """
    layers, alive, columns = _Structure.of(model, input_shape).pruned(thresholds)
    return {layer.name: _weight_mask(layer, columns[k], alive[k + 1]) for k, layer in enumerate(layers)}


@dataclass
class _Structure:
    """What :func:`compress` needs of a network whatever the thresholds: its layers in forward order
    (:func:`~bclib.layer_sequence.layer_sequence`), where the Bayesian ones are, the input shape and
    every layer's shapes. Read once for a search that compresses one network many times."""

    leaves: list[tuple[str, nn.Module]]
    weighted_at: list[int]
    input_shape: tuple[int, ...]
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]
    uncalled: frozenset[str] = frozenset()  # Bayesian layers of the model that forward never runs

    @property
    def names(self) -> list[str]:
        return [self.leaves[i][0] for i in self.weighted_at]

    @classmethod
    def of(cls, model: nn.Module, input_shape=None) -> "_Structure":
        leaves = layer_sequence(model)
        weighted_at = [i for i, (_, module) in enumerate(leaves) if isinstance(module, BayesianLayer)]
        if not weighted_at:
            raise ValueError("model has no Bayesian layers to compress")
        input_shape = _resolve_input_shape(model, input_shape, leaves[weighted_at[0]][1])
        uncalled = _uncalled(model, [leaves[i][0] for i in weighted_at])
        return cls(leaves, weighted_at, input_shape, check_sequence(model, leaves, input_shape), uncalled)

    def pruned(self, thresholds):
        """``(layers, alive, columns)``: every Bayesian layer's moments and own masks at ``thresholds``,
        and the units that survive the AND of the masks (:func:`_alive_units`)."""
        thresholds = resolve_thresholds(_without(thresholds, self.uncalled), self.names)
        layers = _collect(self.leaves, self.weighted_at, thresholds, self.shapes)
        return (layers, *_alive_units(layers))

    def compress(self, thresholds) -> "CompressedModel":
        return CompressedModel._build(self.leaves, self.weighted_at, *self.pruned(thresholds), self.shapes,
                                      self.input_shape)


# ----------------------------------------------------------------------------- compress
def compress(model: nn.Module, thresholds, input_shape=None) -> "CompressedModel":
    r"""Prune a Bayesian network, set each layer's bit precision and export it to plain PyTorch.

    Args:
        model: a network whose forward is a chain of bclib Bayesian layers and ReLU / LeakyReLU /
            Tanh / Sigmoid / Identity / Dropout / MaxPool2d / AvgPool2d / AdaptiveAvgPool2d /
            Flatten / BatchNorm1d / BatchNorm2d (and Softmax / LogSoftmax after the last layer):
            an ``nn.Sequential`` (nested ones too) as built by :mod:`bclib.models`, or a module
            class of your own, whose forward is read with ``torch.fx``, functional calls such as
            ``F.relu`` and ``x.view(x.size(0), -1)`` included (:mod:`bclib.layer_sequence`).
        thresholds: log-alpha threshold per Bayesian layer, in the order ``forward`` runs them (a
            list; :func:`bclib.bayesian_layers` gives the order they were registered in, which can
            differ), or a dict by module name (as in ``model.named_modules()``; entries for
            Bayesian layers that forward never runs are ignored, as they are not exported), or one
            number for every layer. A group is kept when ``log_alpha < threshold``; ``+inf`` keeps
            every group (one whose log alpha is +inf too). Typical values: the release used -2.8 to -5 for the
            NJ layers (their groups start near -9); a horseshoe group the data does not use settles
            near log(e - 1) = 0.54; Sparse VD weights are dropped above 3 (Molchanov et al.).
            :func:`propose_thresholds` (between the two modes of each histogram) and
            :func:`select_thresholds` (on held-out examples) choose them from the trained network.
        input_shape: shape of one example, e.g. ``(1, 28, 28)``; defaults to ``model.input_shape``
            (needed for the FLOPs of convolutions and the flatten between conv and linear layers).

    Returns:
        A :class:`CompressedModel`: ``.model`` (plain, eval mode, on the CPU), ``.report``,
        ``.reduced_precision_model()``, ``.save(path)``, ``.masks``. The plain model runs a ReLU
        followed by max-pooling as pooling then ReLU (the same values, a quarter of the work), so
        its module indices there differ from the source network's.

    In eval mode ``.model`` computes what the *masked* Bayesian model computes
    (:func:`apply_masks`: pruned weights and biases of pruned units zeroed), up to float
    rounding; this also holds with BatchNorm, because the weights leaving a pruned unit are zero
    in the masked model. Where a conv feeds a linear layer and only some of a kept channel's
    ``H*W`` positions survive, the exported linear layer keeps all ``H*W`` columns of that channel
    with zeros in the dead positions (plain PyTorch has no index-select layer); the report and the
    file count only the surviving positions. Likewise the first layer keeps all network inputs.

    Pruning removes a unit whole, bias included, as the paper's architectures count it. A pruned
    unit of the unmasked network would still send a constant on (its bias through a ReLU,
    ``sigmoid(0) = 0.5``, a BatchNorm shift); that constant is dropped, not folded into the next
    layer's bias (with zero padding a constant input is not constant at a convolution's borders;
    chapter 8 of the book writes out the BatchNorm case). Judge a compression by the error of
    ``.model`` or ``.reduced_precision_model()`` on held-out data: the report counts every
    surviving weight as kept, even where its layer's grid rounds it to 0 (with few bits a layer
    can be almost empty in the file).

    Raises:
        TypeError: for a model whose forward is not a chain of supported layers (a skip
            connection, an operation with no module form, a linear layer applied along the last
            dimension of multi-dimensional examples before another Bayesian layer; the message names
            it), or thresholds of the wrong type.
        ValueError: for the wrong number of thresholds, an unknown layer name, a NaN or -inf threshold or
            a missing ``input_shape``.

    Example:
        >>> from bclib.models import lenet5_caffe
        >>> compressed = compress(lenet5_caffe("nj"), [-3.0] * 4)
        >>> compressed.model(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
        >>> compressed.save("lenet5.bcz")  # doctest: +SKIP
    """
    return _Structure.of(model, input_shape).compress(thresholds)


def prune_further(compressed: "CompressedModel", architecture: nn.Module, log_alpha, thresholds) -> "CompressedModel":
    r"""Prune a compressed network further, by the log alphas it was pruned by, at lower thresholds.

    :func:`compress` needs the trained Bayesian network. A run kept as its compressed file and the
    log alphas of its layers (a few kilobytes for the group priors) can still be pruned deeper:
    the file holds every weight that survives the lower thresholds, because a group kept at a
    lower threshold was kept at the file's. The weights are put back at their places in the
    unpruned ``architecture``, the masks of ``thresholds`` are computed by the rule of
    :func:`compress` (groups, the AND rule, stranded units), and the network is exported again.

    The result is what ``compress(model, thresholds)`` gives the Bayesian network behind
    ``compressed``, with these differences: its weights are those of ``compressed`` (on its grids if
    it was read from a file or retrained), so the exponent bits, set by the largest surviving
    weight, and with them the after-precision rates can differ; and each layer keeps the bits of
    ``compressed`` (the posterior variances that set them are not in a file;
    :meth:`CompressedModel.with_bits` sets others).

    Args:
        compressed: a :class:`CompressedModel` (from :func:`compress`, :func:`fine_tune` or
            :meth:`CompressedModel.from_file`).
        architecture: the Bayesian network ``compressed`` was made from, or one built the same way
            (only its structure is read: layer types and sizes, the layers between them).
        log_alpha: the log alphas ``compressed`` was pruned by, one tensor per Bayesian layer shaped
            as its ``log_alpha()`` (per group, or per weight for Sparse VD): a list in the order
            ``forward`` runs the layers, or a dict by module name (entries for Bayesian layers that
            forward never runs are ignored, as :func:`compress` ignores their thresholds).
        thresholds: as for :func:`compress`; each at most the layer's threshold in
            ``compressed.report`` (a pruned group cannot come back).

    Returns:
        A new :class:`CompressedModel` (``compressed`` is left unchanged). Its ``masks`` are those
        of ``architecture``'s layers.

    Raises:
        TypeError: ``compressed`` is not a :class:`CompressedModel`, or ``architecture`` cannot be
            compressed (as for :func:`compress`).
        ValueError: a threshold above ``compressed``'s, ``log_alpha`` of the wrong length, names or
            shapes, or an ``architecture`` and ``log_alpha`` that do not give ``compressed``'s
            pruned shapes at its own thresholds.

    Example:
        >>> import bclib
        >>> net = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2)).eval()
        >>> log_alpha = [layer.log_alpha().detach() for layer in (net[0], net[2])]
        >>> base = compress(net, thresholds=[-3.0, -3.0])
        >>> deeper = prune_further(base, net, log_alpha, [-3.0, float(log_alpha[1].median())])
        >>> base.report.architecture, deeper.report.architecture
        ('4-3', '4-1')
    """
    if not isinstance(compressed, CompressedModel):
        raise TypeError(f"compressed must be a CompressedModel (from bclib.compress or CompressedModel.from_file), "
                        f"got {type(compressed).__name__}")
    leaves = layer_sequence(architecture)
    weighted_at = [i for i, (_, module) in enumerate(leaves) if isinstance(module, BayesianLayer)]
    names = [leaves[i][0] for i in weighted_at]
    if len(leaves) != len(compressed._specs) or weighted_at != sorted(compressed._bits):
        raise ValueError(f"architecture has {len(leaves)} layers ({len(weighted_at)} Bayesian), but compressed has "
                         f"{len(compressed._specs)} ({len(compressed._bits)} weighted): not the network it was "
                         "compressed from")
    uncalled = _uncalled(architecture, names)  # a dict's entries for them are ignored, as compress ignores them
    log_alpha, thresholds = _without(log_alpha, uncalled), _without(thresholds, uncalled)
    log_alphas = _per_layer_tensors(log_alpha, names, "log_alpha")
    for name, index, values in zip(names, weighted_at, log_alphas):
        expected = tuple(leaves[index][1].log_alpha().shape)
        if tuple(values.shape) != expected:
            raise ValueError(f"log_alpha for {name!r} must have the shape of its log_alpha(), {expected}, "
                             f"got {tuple(values.shape)}")
    base_thresholds = [row.threshold for row in compressed.report.layers]
    new_thresholds = resolve_thresholds(thresholds, names)
    for name, new, base in zip(names, new_thresholds, base_thresholds):
        if np.float32(new) > np.float32(base):  # the masks compare float32 log alphas with float32 thresholds
            raise ValueError(f"threshold for {name!r} is {new}, above {base}, the one compressed was pruned at: "
                             "prune_further can only prune more (a pruned group's weights are not in compressed)")
    shapes = check_sequence(architecture, leaves, compressed.input_shape)
    base_layers = _collect(leaves, weighted_at, base_thresholds, shapes, log_alphas)
    alive, columns = _alive_units(base_layers)
    exported = _exported_units(alive)
    layers = [replace(base, threshold=new, keep=base.own_keep(log_alpha, new))
              for base, log_alpha, new in zip(base_layers, log_alphas, new_thresholds)]
    for number, (layer, index) in enumerate(zip(layers, weighted_at)):
        values = compressed._tensors[index]
        rows = torch.arange(layer.mean.shape[0]) if exported[number + 1] is None else exported[number + 1]
        cols = (torch.arange(layer.mean.shape[1]) if exported[number] is None
                else _expand_units(exported[number], layer.positions))
        if values["weight"].shape[:2] != (len(rows), len(cols)):
            raise ValueError(f"layer {layer.name!r}: compressed holds a {tuple(values['weight'].shape[:2])} weight, "
                             f"but log_alpha at compressed's thresholds leaves {(len(rows), len(cols))}: log_alpha "
                             "or architecture is not the one compressed was pruned by")
        layer.mean = torch.zeros_like(layer.mean)
        layer.mean[rows[:, None], cols[None, :]] = values["weight"].float()
        base_mask = _weight_mask(base_layers[number], columns[number], alive[number + 1])
        if (layer.mean != 0).logical_and(~base_mask).any() or (
                "in_mask" in values and not torch.equal(values["in_mask"].bool(), columns[number][cols])):
            raise ValueError(f"layer {layer.name!r}: compressed keeps weights that log_alpha at compressed's "
                             "thresholds prunes: log_alpha or architecture is not the one compressed was pruned by")
        layer.var = torch.zeros_like(layer.mean)  # unused: bits come from compressed
        if layer.bias is not None:
            layer.bias = torch.zeros_like(layer.bias)
            layer.bias[rows] = values["bias"].float()
    module_values = {}
    for index, keep in enumerate(_leaf_unit_indices(leaves, base_layers, exported, shapes)):
        values = compressed._tensors[index]
        if index in compressed._bits or not values:
            continue
        full = module_spec(leaves[index][1])[1]
        for key, value in values.items():
            if keep is None:
                full[key] = value.clone()
            else:
                full[key][keep] = value
        module_values[index] = full
    alive, columns = _alive_units(layers)
    bits = [compressed._bits[index] for index in weighted_at]
    return CompressedModel._build(leaves, weighted_at, layers, alive, columns, shapes, compressed.input_shape,
                                  bits=bits, module_values=module_values)


def prune_to_groups(compressed: "CompressedModel", architecture: nn.Module, log_alpha, groups) -> "CompressedModel":
    r"""Prune a compressed network further until each layer keeps at most ``groups[l]`` groups, by log alpha.

    :func:`prune_further` takes thresholds; this takes the groups to keep, such as an architecture
    a paper reports (``(5, 10, 76, 16)`` for LeNet-5's "5-10-76-16"). Layers are taken in order. In
    layer :math:`l`, the log alphas of the groups that survive so far (the earlier layers' cuts
    included, by the AND rule) are sorted, :math:`\lambda_{(1)} \le \dots \le \lambda_{(n)}`, and
    when :math:`n > k = ` ``groups[l]`` the threshold goes midway between the last kept and the
    first cut,

    .. math::
        t_l = \tfrac{1}{2}\left(\lambda_{(k)} + \lambda_{(k+1)}\right),

    so the :math:`k` groups of lowest log alpha stay (a group is kept when its log alpha is below
    the threshold). A layer keeps fewer where log alphas tie at the cut, or where a later layer's cut
    leaves one of its units with no weight (:func:`compress` removes such units); a layer that keeps
    :math:`k` or fewer already keeps its threshold.

    Args:
        compressed: a :class:`CompressedModel`, as for :func:`prune_further` (one read from a file too).
        architecture: the Bayesian network ``compressed`` was made from, or one built the same way.
        log_alpha: the log alphas ``compressed`` was pruned by, as for :func:`prune_further`.
        groups: the most groups each Bayesian layer keeps, in order: input units of a linear layer,
            filters of a convolution (a sequence of positive ints, one per layer).

    Returns:
        A new :class:`CompressedModel` (``compressed`` is left unchanged); its
        ``report.layers[l].threshold`` are the thresholds used.

    Raises:
        TypeError: an entry of ``groups`` that is not an int (NumPy integers are).
        ValueError: ``groups`` is not one positive int per Bayesian layer, or ``log_alpha`` holds one
            value per weight (a Sparse VD layer has no groups to keep); else as :func:`prune_further`.

    Example:
        >>> import bclib
        >>> net = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2)).eval()
        >>> log_alpha = [layer.log_alpha().detach() for layer in (net[0], net[2])]
        >>> prune_to_groups(compress(net, thresholds=[0.0, 0.0]), net, log_alpha, [4, 1]).report.architecture
        '4-1'
    """
    if not isinstance(compressed, CompressedModel):
        raise TypeError(f"compressed must be a CompressedModel (from bclib.compress or CompressedModel.from_file), "
                        f"got {type(compressed).__name__}")
    names = [row.name for row in compressed.report.layers]
    expected = f"groups must hold one positive int per Bayesian layer ({len(names)}: {names}), got {groups!r}"
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__len__") or len(groups) != len(names):
        raise ValueError(expected)
    if not all(_is_int(k) for k in groups):  # NumPy integers are
        raise TypeError(expected)
    counts = [int(k) for k in groups]
    if any(k < 1 for k in counts):
        raise ValueError(expected)
    log_alpha = _without(log_alpha, _uncalled(architecture, names))
    log_alphas = dict(zip(names, _per_layer_tensors(log_alpha, names, "log_alpha")))
    thresholds = {row.name: row.threshold for row in compressed.report.layers}
    # At its own thresholds: a network read from a file gets its masks, which the counts need.
    current = prune_further(compressed, architecture, log_alpha, list(thresholds.values()))
    # The same layers named as architecture names them (torch.compile's wrapper adds "_orig_mod.").
    architecture_names = [row.name for row in current.report.layers]
    for name, architecture_name, keep in zip(names, architecture_names, counts):
        alive = current.surviving_groups(architecture_name)
        if log_alphas[name].numel() != len(alive):
            raise ValueError(f"log_alpha for {name!r} must hold one value per group ({len(alive)}: input units of "
                             f"a linear layer, filters of a convolution), got {log_alphas[name].numel()} (one per "
                             "weight, as Sparse VD's? prune_to_groups cuts networks of group priors)")
        surviving = torch.sort(log_alphas[name].flatten()[alive]).values
        if len(surviving) > keep:
            # Finite: midway to a log alpha of +inf is +inf, which would keep every group.
            # In Python floats: a float32 sum may overflow, or round the midpoint onto the lower value.
            thresholds[name] = _finite_cut((float(surviving[keep - 1]) + float(surviving[keep])) / 2)
            current = prune_further(compressed, architecture, log_alpha, list(thresholds.values()))
    return current


def _per_layer_tensors(values, names: list[str], argument: str) -> list[Tensor]:
    """One tensor per layer (``names`` in order) from a list in order or a dict by name."""
    if isinstance(values, dict):
        values = _by_name(values, names, argument)
    elif not isinstance(values, (list, tuple)):
        raise TypeError(f"{argument} must be a list (one tensor per Bayesian layer) or a dict by module name, "
                        f"got {type(values).__name__}")
    if len(values) != len(names):
        raise ValueError(f"{argument} must have one tensor per Bayesian layer ({len(names)}: {names}), "
                         f"got {len(values)}")
    return [torch.as_tensor(value, dtype=torch.float32) for value in values]


def _collect(leaves, weighted_at, thresholds, shapes, log_alphas=None) -> list[_Weighted]:
    """Posterior moments, own keep-masks and unit geometry of every Bayesian layer (``log_alphas``,
    one tensor per layer, replaces the layers' own ``log_alpha()``)."""
    layers = []
    for number, (index, threshold) in enumerate(zip(weighted_at, thresholds)):
        name, layer = leaves[index]
        with torch.no_grad():
            mean, var = (t.detach().float().cpu() for t in layer.posterior_weight())
            log_alpha = layer.log_alpha() if log_alphas is None else log_alphas[number]
            log_alpha = log_alpha.detach().float().cpu()
            bias = layer.posterior_bias()
            bias = None if bias is None else bias.detach().float().cpu()
        entry = _Weighted(name, layer, threshold, None, mean, var, bias, *shapes[index])
        entry.keep = entry.own_keep(log_alpha, threshold)
        if number > 0:
            entry.positions = _positions(leaves, weighted_at[number - 1], index, shapes, layers[-1])
        layers.append(entry)
    return layers


def _positions(leaves, producer_at, consumer_at, shapes, producer: _Weighted) -> int:
    """Inputs of the consumer per output unit of the producer: ``H*W`` after a flatten, else 1.

    Checks that the layers between keep the producer's units as channels (activations, pooling,
    BatchNorm) and that a flatten, if any, turns each channel into one block of positions.
    """
    units = producer.mean.shape[0]
    if not producer.is_conv and len(producer.out_shape) != 1:
        # Its units are then the last dimension, not the first that a flatten's blocks follow.
        raise TypeError(f"layer {producer.name!r} is a linear layer applied along the last dimension of "
                        f"{producer.in_shape}-shaped inputs; compress maps the units of a linear layer that "
                        "takes one vector per example (flatten before it)")
    positions = 1
    for index in range(producer_at + 1, consumer_at):
        (in_shape, out_shape), (name, module) = shapes[index], leaves[index]
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            # Pruned units would still count in the normaliser: exp(0) = 1 each.
            raise TypeError(f"layer {name!r} ({type(module).__name__}) lies between {leaves[producer_at][0]!r} and "
                            f"{leaves[consumer_at][0]!r}; compress allows a softmax only after the last layer")
        elif isinstance(module, nn.Flatten) and len(in_shape) > 1:
            positions = math.prod(in_shape[1:])
        elif out_shape[0] != in_shape[0]:
            raise TypeError(f"layer {name!r} ({type(module).__name__}) changes the number of units between "
                            f"{leaves[producer_at][0]!r} and {leaves[consumer_at][0]!r}; compress cannot map them")
    consumer_in = shapes[consumer_at][0]
    expected_dims = 1 if leaves[consumer_at][1].groups_on_input else 3
    if len(consumer_in) != expected_dims or consumer_in[0] != units * positions:
        raise TypeError(f"cannot map the {units} outputs of {leaves[producer_at][0]!r} onto the input of "
                        f"{leaves[consumer_at][0]!r} (input shape {consumer_in})")
    return positions


def apply_masks(model: nn.Module, masks: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """A deep copy of ``model`` with ``layer.mask_(weight_mask, bias_mask)`` applied to each named Bayesian layer.

    This is the *masked Bayesian model* whose eval-mode predictions the exported model reproduces.

    Args:
        model: the Bayesian network (left unchanged).
        masks: ``{layer name: (weight_mask, bias_mask)}``, as :attr:`CompressedModel.masks` holds them.

    Raises:
        ValueError: a name in ``masks`` that is not a Bayesian layer of ``model``.
    """
    layers = dict(bayesian_layers(model))
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"masks names layers that are not Bayesian layers of model: {unknown}; "
                         f"its Bayesian layers are {sorted(layers)}")
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    for name, (weight_mask, bias_mask) in masks.items():
        modules[name].mask_(weight_mask.to(modules[name].weight_mu.device), bias_mask)
    return masked


# ----------------------------------------------------------------------------- result
class CompressedModel:
    """The result of :func:`compress`.

    Attributes:
        model: the exported plain ``nn.Sequential`` (float32, eval mode, CPU).
        report: the :class:`CompressionReport`.
        masks: ``{layer name: (weight_mask, bias_mask)}`` for :func:`apply_masks`.
        input_shape: shape of one example.

    Example:
        >>> import bclib
        >>> net = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2)).eval()
        >>> result = compress(net, thresholds=[-3.0, -3.0])
        >>> result.report.architecture
        '4-3'
        >>> type(result.model).__name__, type(result.reduced_precision_model()).__name__
        ('Sequential', 'Sequential')
    """

    def __init__(self, specs, tensors, bits, report, masks, input_shape) -> None:
        self._specs, self._tensors, self._bits = specs, tensors, bits
        self.report, self.masks, self.input_shape = report, masks, tuple(input_shape)
        self.model = build_module(specs, tensors)
        self.model.input_shape = self.input_shape

    @classmethod
    def _build(cls, leaves, weighted_at, layers, alive, columns, shapes, input_shape, *, bits=None,
               module_values=None) -> "CompressedModel":
        """Export ``layers`` with their alive units; ``bits`` (one per layer) replaces the posterior's
        rule, ``module_values`` (``{leaf index: tensors}``) the other layers' own tensors."""
        specs, tensors, bits_at, masks, rows = [], [], {}, {}, []
        exported = _exported_units(alive)
        unit_indices = _leaf_unit_indices(leaves, layers, exported, shapes)
        number = 0
        for index, (name, module) in enumerate(leaves):
            if isinstance(module, BayesianLayer):
                layer = layers[number]
                mask = _weight_mask(layer, columns[number], alive[number + 1])
                masks[name] = (mask.float(), alive[number + 1].float())
                spec, values = _export_weighted(layer, mask, alive[number + 1], exported[number], exported[number + 1],
                                                columns[number])
                bits_at[index] = spec["bits"] = weight_bits(layer.var[mask]) if bits is None else bits[number]
                rows.append(_layer_report(layer, mask, columns[number], alive[number + 1], spec["bits"]))
                number += 1
            else:
                spec, values = module_spec(module)
                if module_values is not None and index in module_values:
                    values = module_values[index]
                keep = unit_indices[index]
                if spec["type"].startswith("batchnorm") and keep is not None:
                    values = {k: v[keep] for k, v in values.items()}
                    spec["num"] = len(keep)
            specs.append(spec)
            tensors.append(values)
        # The exponent bits (and the after-precision rates) come from the weights as stored, on their
        # grids, as for every other network: _exponent_from_grid sets them once the grids exist.
        return cls(specs, tensors, bits_at, _summarise(layers, rows), masks, input_shape)._exponent_from_grid()

    @classmethod
    def from_file(cls, path, report: "CompressionReport | dict") -> "CompressedModel":
        """A compressed network read back from its file, to retrain or round it further.

        The file holds the architecture, each layer's bits and its grid values; ``report`` (the
        :class:`CompressionReport` of the network, or its dict as a run's ``report.json`` holds it)
        supplies what the file does not: the dense network's sizes behind the rates. ``masks`` is
        empty (the Bayesian layers' names are not in the file). ``.model`` holds the grid values.

        Raises:
            TypeError: ``report`` neither a :class:`CompressionReport` nor a dict.
            ValueError: a file :func:`bclib.load_compressed` rejects, a report dict that is not one
                (:meth:`CompressionReport.from_dict`), or a report whose layers do not match the
                file's weighted layers (their count, bits, or inputs and outputs kept).
        """
        if isinstance(report, dict):
            report = CompressionReport.from_dict(report)
        elif not isinstance(report, CompressionReport):
            raise TypeError(f"report must be a CompressionReport or its dict (a run's report.json), got "
                            f"{type(report).__name__}")
        input_shape, specs, tensors = read_compressed(path)
        weighted = [i for i, spec in enumerate(specs) if spec["type"] in ("linear", "conv2d")]
        if len(weighted) != len(report.layers):
            raise ValueError(f"report describes {len(report.layers)} Bayesian layers, but {path} holds "
                             f"{len(weighted)} weighted layers")
        bits = {}
        for index, row in zip(weighted, report.layers):
            if specs[index]["bits"] != row.bits:
                raise ValueError(f"report gives layer {row.name!r} {row.bits} bits, but {path} stores "
                                 f"{specs[index]['bits']}")
            stored = (int(tensors[index]["in_mask"].sum()), specs[index]["out"])
            # A layer with no unit left is exported with one unit of zero weights (_exported_units).
            if (row.in_kept, row.out_kept or 1) != stored:
                raise ValueError(f"report gives layer {row.name!r} {row.in_kept} inputs and {row.out_kept} outputs "
                                 f"kept, but {path} stores {stored[0]} and {stored[1]} (a report of another network)")
            bits[index] = row.bits
        specs = [{k: v for k, v in spec.items() if k not in ("width", "masked")} for spec in specs]  # set on writing
        report = copy.deepcopy(report)
        report.file = None
        compressed = None

        def exported() -> nn.Module:
            nonlocal compressed
            compressed = cls(specs, tensors, bits, report, {}, input_shape)
            return compressed.model
        check_runs(exported, input_shape, path)  # as load_compressed does: a header can describe a network that fails
        return compressed._exponent_from_grid()

    def with_bits(self, bits) -> "CompressedModel":
        """The same network on other fixed-point grids: ``bits`` per Bayesian layer, in order (a list)
        or by the report's layer names (a dict, missing layers keep theirs).

        The weights are not changed here; :meth:`reduced_precision_model`, the file and
        :func:`fine_tune` round them to the new grids ``q 2^-t``. The report's rates follow the bits,
        and its exponent bits the largest weight on the new grids.

        Example:
            >>> import bclib
            >>> net = torch.nn.Sequential(bclib.LinearGroupNJ(4, 3), torch.nn.ReLU(), bclib.LinearGroupNJ(3, 2))
            >>> coarse = compress(net.eval(), -3.0).with_bits([2, 3])
            >>> [layer.bits for layer in coarse.report.layers]
            [2, 3]
        """
        report = self.report.with_bits(bits)  # checks bits
        by_index = dict(zip(self._bits, (row.bits for row in report.layers)))
        specs = [dict(spec, bits=by_index[i]) if i in by_index else spec for i, spec in enumerate(self._specs)]
        return CompressedModel(specs, self._tensors, by_index, report, self.masks,
                               self.input_shape)._exponent_from_grid()

    @property
    def tensors(self) -> list[dict[str, Tensor]]:
        """Per exported layer, its tensors by name (a weighted layer's float ``weight`` as held, which after
        :func:`fine_tune` is the latent weight, off the grid; ``in_mask``, ``bias``; BatchNorm's state):
        what :meth:`with_tensors` takes back, e.g. to save a retrained network with ``torch.save`` and load
        it with ``weights_only=True``. New dicts holding the network's own tensors (not copies)."""
        return [dict(values) for values in self._tensors]

    def with_tensors(self, tensors) -> "CompressedModel":
        """The same network (architecture, bits, report with ``file`` None, masks) holding ``tensors``
        instead, as :attr:`tensors` gives them: one dict per exported layer with the same names, shapes
        and dtypes. The report's exponent bits, and with them the after-precision rates, follow the
        largest of the new weights on their grids.

        Raises:
            ValueError: another number of layers, other tensor names, another shape or dtype.
        """
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(self._tensors):
            raise ValueError(f"tensors must be a list of {len(self._tensors)} dicts, one per exported layer, got "
                             f"{len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__}")
        for index, (ours, theirs) in enumerate(zip(self._tensors, tensors)):
            if not isinstance(theirs, dict) or set(theirs) != set(ours):
                raise ValueError(f"tensors[{index}] must hold {sorted(ours)}, got "
                                 f"{sorted(theirs) if isinstance(theirs, dict) else type(theirs).__name__}")
            for key, value in ours.items():
                given = theirs[key]
                if not isinstance(given, Tensor) or given.shape != value.shape or given.dtype != value.dtype:
                    got = f"a {given.dtype} tensor of shape {tuple(given.shape)}" if isinstance(given, Tensor) \
                        else repr(given)
                    raise ValueError(f"tensors[{index}][{key!r}] must be a {value.dtype} tensor of shape "
                                     f"{tuple(value.shape)}, got {got}")
        report = copy.deepcopy(self.report)
        report.file = None
        return CompressedModel(self._specs, [dict(values) for values in tensors], dict(self._bits), report,
                               self.masks, self.input_shape)._exponent_from_grid()

    def surviving_groups(self, name: str) -> Tensor:
        """Boolean per group of Bayesian layer ``name`` (its input units for a linear layer, its
        filters for a convolution): does any of the group's weights survive? Needs :attr:`masks`
        (empty for a network read with :meth:`from_file`)."""
        if name not in self.masks:
            raise ValueError(f"name must be a layer of masks {sorted(self.masks)}, got {name!r} (a network read "
                             "from a file has no masks: prune_further at the file's thresholds gives them)")
        mask = self.masks[name][0]
        return _any_per_output(mask.bool()) if mask.dim() == 4 else _any_per_input(mask.bool())

    def reduced_precision_model(self) -> nn.Sequential:
        """The exported model with each layer's weights rounded to its grid ``q 2^-t_l`` and biases to float16.

        This is exactly what :meth:`save` stores: :func:`bclib.load_compressed` gives the same predictions.
        """
        tensors = [self._reduced(index, values) for index, values in enumerate(self._tensors)]
        model = build_module(self._specs, tensors)
        model.input_shape = self.input_shape
        return model

    def _reduced(self, index: int, values: dict) -> dict:
        if index not in self._bits:
            return values
        reduced = {"weight": dequantize(self._grid_integers[index], self._bits[index])}
        if "bias" in values:
            reduced["bias"] = _stored_bias(values["bias"])
        return reduced

    def save(self, path, *, entropy_coding: bool = True) -> SavedFile:
        """Write the reduced-precision model to ``path`` (atomically) and return its size summary.

        Args:
            path: the file to write (missing parent folders are created).
            entropy_coding: compress the rounded weights losslessly (LZMA2) after packing them; with
                ``False`` the file stores each layer's integers bit-packed at the layer's width, the
                storage the after-precision rate counts. Either file loads to the same model.

        The summary is also stored as ``report.file``. See :mod:`bclib.fileformat` for the layout.
        """
        size = write_compressed(path, self.input_shape, self._specs, self._file_tensors(),
                                entropy_coding=entropy_coding)
        self.report.file = SavedFile(str(path), size, self.report.dense_float32_bytes, self.report.compression_precision)
        return self.report.file

    def file_bytes(self, *, entropy_coding: bool = True) -> int:
        """Size in bytes of the file :meth:`save` would write, without writing it."""
        return len(encode_compressed(self.input_shape, self._specs, self._file_tensors(),
                                     entropy_coding=entropy_coding))

    def _exponent_from_grid(self) -> "CompressedModel":
        """This network, its report's exponent bits and rates set from the largest weight it stores on its
        grids, the rule :func:`compress` applies to the posterior means it rounds (a retrained network's
        grid values need not stay near those)."""
        largest = max((float(dequantize(q, self._bits[index]).abs().max()) for index, q in self._grid_integers.items()
                       if q.numel()), default=0.0)
        exponent = exponent_bits(largest)
        self.report = replace(self.report, exponent_bits=exponent, **_rates(self.report.layers, exponent))
        return self

    @functools.cached_property
    def _grid_integers(self) -> dict[int, Tensor]:
        """Per weighted layer (by index), its weights as integers on the layer's fixed-point grid,
        computed once for the reduced-precision model and the file alike."""
        return {index: quantize(self._tensors[index]["weight"], bits) for index, bits in self._bits.items()}

    def _file_tensors(self) -> list[dict]:
        """Per layer, what the file stores: grid integers ``q``, input mask and bias for weighted layers."""
        file_tensors = []
        for index, values in enumerate(self._tensors):
            if index in self._bits:
                values = {"q": self._grid_integers[index], "in_mask": values["in_mask"],
                          **({"bias": values["bias"]} if "bias" in values else {})}
            file_tensors.append(values)
        return file_tensors


def _stored_bias(bias: Tensor) -> Tensor:
    """A bias as the file stores it: rounded to float16 (and back to float32)."""
    return bias.half().float()


class FixedPointGrid(nn.Module):
    r"""Parametrization that puts a weight on its layer's fixed-point grid, with a straight-through gradient.

    Forward: :math:`\tilde w = m \odot 2^{-t}\,\mathrm{round}(2^{t} w)`, the weight the reduced-precision
    model and the file hold (``t`` the layer's bits, ``m`` the pruning mask). Backward: the rounding is
    treated as the identity (Bengio et al. 2013's straight-through estimator), so the latent float
    weight ``w`` keeps moving while the network sees only grid values; pruned weights get no gradient.

    Args:
        bits: the layer's bits ``t`` (grid step ``2^-t``).
        mask: 1 where the weight survives, 0 where it was pruned (shaped like the weight).

    Example:
        >>> grid = FixedPointGrid(2, torch.tensor([1.0, 1.0, 0.0]))
        >>> grid(torch.tensor([0.3, -0.6, 0.9]))
        tensor([ 0.2500, -0.5000,  0.0000])
    """

    def __init__(self, bits: int, mask: Tensor) -> None:
        super().__init__()
        self.scale = math.ldexp(1.0, _check_bits(bits))
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        on_grid = torch.round(weight * self.scale) / self.scale  # exact: the scale is a power of two
        return (weight + (on_grid - weight).detach()) * self.mask

    def extra_repr(self) -> str:
        return f"bits={int(math.log2(self.scale))}"


class _Float16Bias(nn.Module):
    """Parametrization: the bias rounded to float16, as the file stores it (straight-through gradient)."""

    def forward(self, bias: Tensor) -> Tensor:
        return bias + (_stored_bias(bias) - bias).detach()


def _surviving_weights(weight: Tensor, in_mask: Tensor, row: LayerReport) -> Tensor:
    """1.0 where an exported weight survived pruning, else 0.0: the weights of the surviving input
    columns (``in_mask``) when every weight between surviving units survives (the group priors), so
    a survivor that a file stores as 0 on its grid still trains; else the nonzero weights (per-weight
    pruning, Sparse VD: read from a file, a survivor rounded to 0 cannot be told from a pruned weight
    and stays 0)."""
    if row.weights_nonzero == row.weights_kept:
        columns = in_mask.to(weight.dtype).reshape(1, -1, *([1] * (weight.dim() - 2)))
        return columns.expand_as(weight).clone()
    return (weight != 0).to(weight.dtype)


@torch.no_grad()
def _draw_fresh(layer: nn.Module, survivors: Tensor) -> None:
    """Weights and bias drawn from ``U(-1/sqrt(n), 1/sqrt(n))``, ``n`` the surviving inputs of an output
    (on average, under per-weight pruning): the law of ``nn.Linear`` / ``nn.Conv2d.reset_parameters``
    for a layer of that fan-in (an exported layer's padded columns would otherwise shrink the draw)."""
    fan_in = max(1.0, float(survivors.flatten(1).sum(1).mean()))
    bound = 1 / math.sqrt(fan_in)
    layer.weight.uniform_(-bound, bound)
    if layer.bias is not None:
        layer.bias.uniform_(-bound, bound)


def fine_tune(compressed: "CompressedModel", train: TensorSplit, test: TensorSplit, config: TrainConfig, *,
              reinitialize: bool = False, progress: bool = False) -> tuple["CompressedModel", list[dict]]:
    """Retrain the surviving weights of a compressed network on its fixed-point grids (not in the paper).

    The paper stops after pruning and rounding. Deep Compression (Han et al. 2016) retrains what is
    left; here the exported network is trained on the cross-entropy with every weight held on its
    layer's grid (:class:`FixedPointGrid`) and every bias on float16, so the architecture, the bits
    and the rate after pruning stay exactly those of ``compressed``: only the values of the
    surviving weights (the grid integers) and biases change, and with them the error, and the
    exponent bits where the largest weight crosses a boundary of their rule (:func:`exponent_bits`),
    and with those the after-precision rates. Pruned weights
    (zero in the export) stay zero; a surviving weight stored as 0 on its grid (a network read with
    :meth:`CompressedModel.from_file`) trains like the others, except under per-weight pruning
    (Sparse VD), where a file cannot tell it from a pruned one. BatchNorm layers train as usual.

    Args:
        compressed: the result of :func:`compress` (left unchanged).
        train, test: :class:`bclib.data.TensorSplit` s; ``test`` only reports the error per epoch.
        config: a :class:`bclib.train.TrainConfig` (epochs, learning-rate schedule, seed, device).
        reinitialize: first draw every weight and bias afresh, seeded by ``config.seed``, as
            ``nn.Linear`` and ``nn.Conv2d`` draw theirs for the pruned layer's own fan-in (the
            inputs that survive into each output): ``U(-1/sqrt(n), 1/sqrt(n))``; BatchNorm
            layers are reset. The pruned architecture and its masks trained alone, without the
            weights Bayesian training left it (a control for what those weights are worth). The
            grids stay ``compressed``'s, set by the posterior's variances, and can be too coarse
            for weights this small to start on: give finer ones with :meth:`CompressedModel.with_bits`.
        progress: show the per-epoch bar.

    Returns:
        ``(fine_tuned, history)``: a new :class:`CompressedModel` (same architecture and bits, new weights:
        its ``reduced_precision_model()`` and file hold the trained grid values, its ``model`` the
        latent float weights they round) and the per-epoch metrics of :func:`bclib.train.fit`, where
        errors are those of the reduced-precision network.
    """
    if not isinstance(compressed, CompressedModel):
        raise TypeError(f"compressed must be a CompressedModel (the result of bclib.compress), "
                        f"got {type(compressed).__name__}")
    if not isinstance(reinitialize, bool):
        raise TypeError(f"reinitialize must be a bool, got {type(reinitialize).__name__} {reinitialize!r}")
    network = build_module(compressed._specs, compressed._tensors)
    survivors = {index: _surviving_weights(network[index].weight.detach(), compressed._tensors[index]["in_mask"], row)
                 for index, row in zip(sorted(compressed._bits), compressed.report.layers)}
    if reinitialize:
        torch.manual_seed(config.seed)  # as fit seeds its noise and batches: one seed, one retraining
        for index, module in enumerate(network):
            if index in survivors:
                _draw_fresh(module, survivors[index])
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for index, bits in sorted(compressed._bits.items()):
        layer = network[index]
        parametrize.register_parametrization(layer, "weight", FixedPointGrid(bits, survivors[index]))
        if layer.bias is not None:
            parametrize.register_parametrization(layer, "bias", _Float16Bias())
    history = fit(network, train, test, config, progress=progress)
    network.cpu()
    tensors = []
    for index, values in enumerate(compressed._tensors):
        values = dict(values)
        if index in compressed._bits:
            layer = network[index]
            with torch.no_grad():
                values["weight"] = layer.parametrizations.weight.original * layer.parametrizations.weight[0].mask
                if "bias" in values:
                    values["bias"] = layer.parametrizations.bias.original.detach().clone()
        elif values:  # only BatchNorm carries tensors among the other layers: its trained state
            values = {key: getattr(network[index], key).detach().clone() for key in values}
        tensors.append(values)
    report = copy.deepcopy(compressed.report)
    report.file = None
    # Retraining can carry the largest weight across a boundary of the exponent rule (e = 2 holds
    # |w| up to 2): the exponent bits and the after-precision rates follow the trained grid values.
    return CompressedModel(compressed._specs, tensors, dict(compressed._bits), report, compressed.masks,
                           compressed.input_shape)._exponent_from_grid(), history


def _exported_units(alive: list[Tensor]) -> list[Tensor | None]:
    """Unit indices the export keeps at every boundary (``None``: all of them, at the network's
    inputs and outputs). With no unit alive a placeholder unit with zero weights keeps every layer
    non-empty."""
    exported = [None] * len(alive)
    for b in range(1, len(alive) - 1):
        exported[b] = alive[b].nonzero().flatten() if alive[b].any() else torch.zeros(1, dtype=torch.long)
    return exported


def _leaf_unit_indices(leaves, layers: list[_Weighted], exported, shapes) -> list[Tensor | None]:
    """Per leaf that is not a Bayesian layer, the indices of the features it sees that the export
    keeps (the units after the last Bayesian layer before it, expanded to positions after a
    flatten); ``None`` for Bayesian layers and where every feature is kept."""
    indices, number, flattened = [], 0, False
    for index, (_, module) in enumerate(leaves):
        if isinstance(module, BayesianLayer):
            indices.append(None)
            number, flattened = number + 1, False
            continue
        keep = exported[number]
        if keep is not None and flattened:
            keep = _expand_units(keep, layers[number].positions)
        indices.append(keep)
        flattened = flattened or (isinstance(module, nn.Flatten) and len(shapes[index][0]) > 1)
    return indices


def _expand_units(units: Tensor, positions: int) -> Tensor:
    """Column indices of whole units after a flatten: unit u covers ``u*positions ... u*positions + positions - 1``."""
    return (units[:, None] * positions + torch.arange(positions)).flatten()


def _export_weighted(layer: _Weighted, mask, outputs, in_units, out_units, columns) -> tuple[dict, dict]:
    """Spec and tensors of one exported layer: surviving rows, surviving units' columns (all of them
    for the network's inputs), zeros where a weight was pruned."""
    # Not mean * mask: a pruned horseshoe group's E[z] can be inf, and inf * 0 is NaN.
    weight = torch.where(mask, layer.mean, 0.0)
    bias = None if layer.bias is None else torch.where(outputs, layer.bias, 0.0)
    in_columns = torch.arange(weight.shape[1]) if in_units is None else _expand_units(in_units, layer.positions)
    if out_units is not None:
        weight = weight[out_units]
        bias = None if bias is None else bias[out_units]
    weight = weight[:, in_columns]
    geometry = layer.layer
    if layer.is_conv:
        spec = {"type": "conv2d", "in": weight.shape[1], "out": weight.shape[0], "kernel": list(geometry.kernel_size),
                "stride": list(geometry.stride), "padding": list(geometry.padding),
                "dilation": list(geometry.dilation), "bias": bias is not None}
    else:
        spec = {"type": "linear", "in": weight.shape[1], "out": weight.shape[0], "bias": bias is not None}
    values = {"weight": weight.contiguous(), "in_mask": columns[in_columns]}
    if bias is not None:
        values["bias"] = bias.contiguous()
    return spec, values


def _layer_report(layer: _Weighted, mask, columns, outputs, bits) -> LayerReport:
    out_total, in_total = layer.mean.shape[:2]
    per_unit = math.prod(layer.mean.shape[2:])
    in_kept, out_kept = int(columns.sum()), int(outputs.sum())
    spatial = math.prod(layer.out_shape[1:]) if layer.is_conv else 1
    return LayerReport(
        name=layer.name, kind=type(layer.layer).__name__,
        in_kept=in_kept, in_total=in_total, out_kept=out_kept, out_total=out_total,
        weights_kept=in_kept * out_kept * per_unit, weights_total=layer.mean.numel(),
        weights_nonzero=int(mask.sum()), bits=bits, threshold=layer.threshold,
        flops_before=layer.mean.numel() * spatial, flops_after=in_kept * out_kept * per_unit * spatial,
        groups_kept=out_kept if layer.is_conv else in_kept,
    )


def _summarise(layers: list[_Weighted], rows: list[LayerReport]) -> CompressionReport:
    """The report of the exported layers, its exponent bits and the rates that use them not yet set
    (:meth:`CompressedModel._exponent_from_grid` sets them from the stored weights)."""
    dense_bytes = 4 * sum(layer.mean.numel() + (0 if layer.bias is None else layer.bias.numel()) for layer in layers)
    return CompressionReport(
        layers=rows,
        exponent_bits=0,
        **_rates(rows, 0),
        flops_before=sum(r.flops_before for r in rows),
        flops_after=sum(r.flops_after for r in rows),
        dense_float32_bytes=dense_bytes,
    )


def _rates(rows: list[LayerReport], exponent: int) -> dict[str, float]:
    """The four compression rates of :class:`CompressionReport` (see its formulas)."""
    total = sum(r.weights_total for r in rows)
    return {
        "compression_pruning": _ratio(total, sum(r.weights_kept for r in rows)),
        "compression_precision": _ratio(32 * total, sum(r.weights_kept * (1 + exponent + r.bits) for r in rows)),
        "compression_sparse": _ratio(total, sum(r.weights_nonzero for r in rows)),
        "compression_sparse_precision": _ratio(32 * total, sum(r.weights_nonzero * (1 + exponent + r.bits)
                                                               for r in rows)),
    }


# ----------------------------------------------------------------------------- evaluation and thresholds
def model_error(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Classification error of any model: the fraction of examples whose arg-max prediction differs from ``y`` (model in eval mode, no gradients).

    Args:
        model: any classifier returning logits of shape ``(N, classes)``.
        x: inputs, shape ``(N, *input_shape)``; floating-point inputs are cast to the model's
            parameter dtype (an export of a float64 network is float32).
        y: integer labels, shape ``(N,)``.
        batch_size: examples per forward pass.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be torch.Tensors")
    if y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same number (> 0) of examples, y of shape (N,); "
                         f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
    check_positive_int("batch_size", batch_size)
    parameter = next(model.parameters(), None)
    device = x.device if parameter is None else parameter.device
    dtype = input_dtype(model, x)
    wrong = 0
    with torch.no_grad(), evaluating(model):
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start:start + batch_size].to(device, dtype))
            wrong += int((logits.argmax(1).cpu() != y[start:start + batch_size].cpu()).sum())
    return wrong / x.shape[0]


def propose_threshold(log_alpha, bins: int = 64, fallback: float | None = None) -> float:
    """A log-alpha threshold between the two modes of the histogram of ``log_alpha``.

    Rule: build a histogram with ``bins`` equal bins over the values' range; split it in two
    classes by Otsu's method (the split that maximises the between-class variance); take each
    class's highest bin as its mode; between the two modes, find the longest run of bins with the
    lowest count and return the centre of that run. A histogram whose valley holds more than half
    the smaller mode's count is not bimodal: then ``fallback`` is returned, or ``ValueError`` is raised.

    With few values for the bins (tens of groups, as in a convolution's filters or an output
    layer's inputs) empty bins inside one cluster can pass for that valley: a layer whose log
    alphas form a single cluster then gets a threshold through its middle (about half its groups
    pruned). Look at the histogram before trusting the proposal for such a layer, or give its
    threshold yourself.

    Args:
        log_alpha: log alphas of one layer (tensor or array, any shape; non-finite values are ignored).
        bins: histogram bins (>= 4).
        fallback: value to return when the histogram has no two separated modes.

    Example:
        >>> la = torch.cat([torch.randn(300) * 0.5 - 6, torch.randn(700) + 4])
        >>> -4.5 < propose_threshold(la) < 1.5
        True
    """
    _check_bins(bins)
    values = np.asarray(log_alpha.detach().cpu() if isinstance(log_alpha, Tensor) else log_alpha, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2 or values.min() == values.max():
        return _no_two_modes(fallback, "needs at least two distinct finite values")
    counts, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    split = _otsu_split(counts, centres)
    low_mode = int(np.argmax(counts[:split]))
    high_mode = split + int(np.argmax(counts[split:]))
    between = counts[low_mode:high_mode + 1]
    valley = between.min()
    if valley > 0.5 * min(counts[low_mode], counts[high_mode]):
        return _no_two_modes(fallback, "the histogram has no two separated modes")
    # Longest run of bins at the valley's count, then the centre of that run.
    best_start, best_length, start = 0, 0, None
    for offset, count in enumerate(list(between) + [None]):
        if count == valley and start is None:
            start = offset
        elif count != valley and start is not None:
            if offset - start > best_length:
                best_start, best_length = start, offset - start
            start = None
    first, last = low_mode + best_start, low_mode + best_start + best_length - 1
    return float(0.5 * (edges[first] + edges[last + 1]))


def _check_bins(bins) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 4:
        raise ValueError(f"bins must be an int >= 4, got {bins!r}")


def _otsu_split(counts: np.ndarray, centres: np.ndarray) -> int:
    """Index k that splits bins into [0, k) and [k, bins) with the largest between-class variance."""
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)
    weight_high = counts.sum() - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    sum_high = (counts * centres).sum() - sum_low
    with np.errstate(divide="ignore", invalid="ignore"):
        between = weight_low * weight_high * (sum_low / weight_low - sum_high / weight_high) ** 2
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between)) + 1


def _no_two_modes(fallback, why: str) -> float:
    if fallback is None:
        raise ValueError(f"propose_threshold: {why}; pass fallback= to get a value anyway")
    return float(fallback)


def propose_thresholds(model: nn.Module, bins: int = 64, fallback: float | None = None) -> dict[str, float]:
    """:func:`propose_threshold` for every Bayesian layer: ``{module name: threshold}``, ready for :func:`compress`.

    Raises:
        ValueError: a layer without two separated modes (named in the message) and no ``fallback``.
    """
    _check_bins(bins)
    thresholds = {}
    for name, layer in bayesian_layers(model):
        try:
            thresholds[name] = propose_threshold(layer.log_alpha(), bins=bins, fallback=fallback)
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
    return thresholds


def threshold_sweep(model: nn.Module, thresholds_grid, x: Tensor, y: Tensor, input_shape=None) -> list[dict]:
    """Compress with each entry of ``thresholds_grid`` and measure error and compression, for trade-off plots.

    Args:
        model: a Bayesian model accepted by :func:`compress`.
        thresholds_grid: an iterable whose entries are anything :func:`compress` accepts as
            ``thresholds`` (one number for all layers, a list, or a dict).
        x, y: evaluation inputs and labels.
        input_shape: as for :func:`compress`.

    Returns:
        A list with one dict per entry, holding ``thresholds`` (as given), ``error`` (exported
        float32 model), ``error_reduced_precision``, ``compression_pruning``, ``compression_precision``,
        ``compression_sparse``, ``weights_kept``, ``architecture``, ``flop_reduction``.

    Raises:
        TypeError: ``thresholds_grid`` is a single number or string, not a collection of entries.
    """
    if isinstance(thresholds_grid, (numbers.Number, str)) or (isinstance(thresholds_grid, Tensor)
                                                              and thresholds_grid.dim() == 0):
        raise TypeError(f"thresholds_grid must be a collection of thresholds entries, e.g. [-4.0, -3.0, -2.0] "
                        f"(one entry per compression), got {thresholds_grid!r}")
    structure = _Structure.of(model, input_shape)
    rows = []
    for thresholds in thresholds_grid:
        result = structure.compress(thresholds)
        report = result.report
        rows.append({
            "thresholds": thresholds.tolist() if isinstance(thresholds, (Tensor, np.ndarray)) else thresholds,
            "error": model_error(result.model, x, y),
            "error_reduced_precision": model_error(result.reduced_precision_model(), x, y),
            "compression_pruning": report.compression_pruning,
            "compression_precision": report.compression_precision,
            "compression_sparse": report.compression_sparse,
            "weights_kept": sum(r.weights_kept for r in report.layers),
            "architecture": report.architecture,
            "flop_reduction": report.flop_reduction,
        })
    return rows


def within_tolerance(error: float, allowed: float) -> bool:
    """``error <= allowed``, robust to float rounding: errors are counts over the examples (and means
    over seeds), and a candidate exactly at the allowance (``base + tolerance``) is within it however
    the sums round. The margin, 1e-9, is far below one example in a million.

    Example:
        >>> base, tolerance = 6 / 10_000, 0.001  # 6 errors in 10,000; 0.1 points more: 16
        >>> 16 / 10_000 <= base + tolerance, within_tolerance(16 / 10_000, base + tolerance)
        (False, True)
    """
    return error <= allowed + 1e-9


def select_thresholds(model: nn.Module, x: Tensor, y: Tensor, *, tolerance: float = 0.001, max_candidates: int = 64,
                      fixed: dict[int, float] | None = None, input_shape=None) -> list[float]:
    """Per layer, the lowest log-alpha threshold whose pruning keeps the error on ``(x, y)`` within
    ``tolerance`` of the unpruned model's: the most compression at a bounded cost, chosen on data.

    Use held-out or training data, never the test set. Layers are visited from the first to the last
    that ``forward`` runs (the order in which :func:`compress` reads a list of thresholds);
    each search keeps the thresholds already chosen and leaves later layers unpruned. Candidates are
    cut points between the layer's sorted log-alpha values (at most ``max_candidates``, at
    quantiles); the search is a bisection, which assumes the error grows as the threshold falls.
    This replaces the histogram rule (:func:`propose_threshold`) where short training leaves no
    clear gap between the two modes.

    Args:
        model: a Bayesian model accepted by :func:`compress`.
        x, y: selection data.
        tolerance: allowed rise of the error (a fraction: 0.001 is 0.1 percentage points).
        max_candidates: candidate thresholds per layer.
        fixed: ``{layer index: threshold}`` for layers whose threshold is given (e.g. Sparse VD's 3).
        input_shape: as for :func:`compress`.

    Returns:
        One threshold per Bayesian layer, in forward order.

    Raises:
        ValueError: ``tolerance`` not a number in [0, 1), ``max_candidates`` not an int >= 2, or a key
            of ``fixed`` that is not the index of a Bayesian layer (0 ... layers - 1).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 2:
        raise ValueError(f"max_candidates must be an int >= 2, got {max_candidates!r}")
    structure = _Structure.of(model, input_shape)  # the Bayesian layers in the order forward runs them
    signals = [structure.leaves[i][1].log_alpha().detach().flatten().float().cpu() for i in structure.weighted_at]
    fixed = dict(fixed or {})
    unknown = [key for key in fixed if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(signals)]
    if unknown:
        raise ValueError(f"fixed must map Bayesian layer indices 0 ... {len(signals) - 1} (forward order) to "
                         f"thresholds, got keys {unknown}")
    # +inf where a log alpha is (keeps every group too); all at -inf: the finite cut that keeps them.
    keep_all = [max(float(s.max()) + 1.0, -_FLOAT32_MAX) for s in signals]
    thresholds = [fixed.get(i, keep_all[i]) for i in range(len(signals))]

    def error(candidate: list[float]) -> float:
        return model_error(structure.compress(candidate).model, x, y)

    allowed = error(thresholds) + tolerance
    for index, signal in enumerate(signals):
        if index in fixed:
            continue
        values = torch.unique(signal)
        if len(values) > max_candidates:
            # Quantiles of the finite values: interpolating next to an infinite one gives NaN.
            infinite = values.isinf()
            quantiles = torch.linspace(0, 1, max_candidates - int(infinite.sum()))
            values = torch.unique(torch.cat([values[infinite], torch.quantile(values[~infinite], quantiles)]))
        # Cut points below each value: threshold = value keeps only groups strictly below it.
        candidates = [_finite_cut(float(v)) for v in values] + [keep_all[index]]
        low, high = 0, len(candidates) - 1  # candidates[high] is known to be acceptable
        while low < high:
            middle = (low + high) // 2
            trial = thresholds[:index] + [candidates[middle]] + thresholds[index + 1:]
            if within_tolerance(error(trial), allowed):
                high = middle
            else:
                low = middle + 1
        thresholds[index] = candidates[high]
    return thresholds
