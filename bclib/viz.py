"""Animations and figures of Bayesian compression: weights fading as their groups are pruned,
per-pixel input importance, log-alpha histograms, the error/compression trade-off, the
architecture before and after pruning, and learning curves (the result tables are in
:mod:`bclib.tables`).

Two training callbacks record what the animations need, one frame per recorded epoch; two functions
render the frames and write looping GIFs. Their use with :func:`bclib.train.fit`::

    from bclib import viz
    weights = viz.WeightEvolutionRecorder(thresholds=[-2.8, -3.0, -5.0], every=5)
    pixels = viz.PixelImportanceRecorder(every=5)
    fit(model, train, test, config, callbacks=[weights, pixels])
    viz.write_weight_gifs(weights, "book/figures")                    # one GIF per layer
    viz.write_pixel_importance_gif(pixels, test.x, "book/figures/pixel_importance.gif")  # inputs in [0, 1]

The static figures are functions that return a :class:`matplotlib.figure.Figure` and save it
when given a ``path``: :func:`plot_log_alpha_histograms` (or, from the histograms a run saved
without its weights, :func:`plot_saved_log_alpha_histograms`), :func:`plot_tradeoff`,
:func:`plot_architecture`, :func:`plot_learning_curves`, :func:`plot_run_comparison`.

Everything draws on its own :class:`~matplotlib.figure.Figure` with the Agg canvas, never
through ``pyplot``: it works headless and leaves a notebook's figures and backend alone.
Files are written to a temporary name in the target folder (created when missing) and renamed
when complete, so a failure never leaves half a file. GIF frames stay in memory.

What the 2017 release got wrong here, and what this module does instead: its weight masks
combined the input and output masks with OR (here AND: a weight is drawn only when its input
unit and its output unit both survive); ``ax.grid("off")`` turned the grid *on* in matplotlib 3
(here the axes are switched off); frame durations were written as 0 ms because imageio now
reads ``duration`` in milliseconds (here ``duration`` is in milliseconds); the threshold of the
plots was hard-coded (here it is an argument); frames went through hidden PNG files in the
working folder (left there when a run stopped early); and the GIFs went into a ``figures/``
folder that had to exist, or the run crashed after training (here frames stay in memory and the
folder is created).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import imageio.v3 as iio
import matplotlib
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from ._io import write_atomically
from .compression import resolve_thresholds, weight_masks
from .data import DEFAULT_INPUT_RANGE, _check_input_range
from .layers import BayesianLayer, bayesian_layers
from .layers.base import check_positive_float, check_positive_int

__all__ = [
    "DEFAULT_THRESHOLD", "DEFAULT_FRAME_DURATION_MS", "WEIGHT_AXES_RECT",
    "WeightEvolutionRecorder", "PixelImportanceRecorder", "pixel_importance",
    "render_weight_frames", "write_weight_gifs", "render_pixel_importance_frames",
    "write_pixel_importance_gif", "choose_digits", "pixel_panel_rect",
    "plot_log_alpha_histograms", "plot_saved_log_alpha_histograms", "plot_tradeoff", "plot_architecture",
    "plot_learning_curves", "plot_retraining_tradeoff", "plot_run_comparison",
]

#: Log-alpha threshold used for every layer when none is given (keep a group iff log alpha < -3).
DEFAULT_THRESHOLD = -3.0
#: Display time of one GIF frame, in milliseconds.
DEFAULT_FRAME_DURATION_MS = 200
#: Where the weight matrix sits in a weight frame, as (left, bottom, width, height) in fractions of
#: the frame. The matrix fills this rectangle exactly (one block of pixels per weight, nearest
#: neighbour), so weight ``(i, j)`` of a ``(rows, cols)`` matrix in a ``W x H`` pixel frame is at
#: ``x = (left + width * (j + 0.5) / cols) * W`` and ``y = (1 - bottom - height + height * (i + 0.5) / rows) * H``
#: (y counted from the top). The band above it holds the title.
WEIGHT_AXES_RECT = (0.02, 0.02, 0.96, 0.86)

_WEIGHT_FIGSIZE = (8.0, 4.0)
# Title size of the GIF frames, in points: the frames are shown scaled to the page width.
_GIF_TITLE_FONTSIZE = 14
_DPI = 100
# Browsers replace GIF delays under 20 ms (2 hundredths of a second) by 100 ms.
_MIN_DURATION_MS = 20
_MAX_DURATION_MS = 655_350  # GIF delays are 16-bit counts of hundredths of a second


# ----------------------------------------------------------------------------- argument checks
def _check_number(name: str, value) -> float:
    # numbers.Real takes NumPy's scalars (np.float32(-3)) too, as compress does.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_duration(duration) -> int:
    if (isinstance(duration, bool) or not isinstance(duration, (int, float))
            or not _MIN_DURATION_MS <= duration <= _MAX_DURATION_MS):
        raise ValueError(
            f"duration must be a number of milliseconds from {_MIN_DURATION_MS} (browsers show shorter "
            f"GIF frames for 100 ms) to {_MAX_DURATION_MS} (a GIF's longest delay), got {duration!r}"
        )
    return int(round(duration))


def _threshold_values(thresholds):
    """``thresholds`` checked without a model and made plain: ``None``, a float, a list of floats (from a
    sequence, a 1-d array or tensor) or a dict of floats by layer name."""
    if thresholds is None:
        return None
    if isinstance(thresholds, (Tensor, np.ndarray)):
        if thresholds.ndim > 1:
            raise ValueError(f"thresholds must be a number or 1-d, got shape {tuple(thresholds.shape)}")
        thresholds = thresholds.tolist()
    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        return _check_number("thresholds", thresholds)
    if isinstance(thresholds, Mapping):
        return {name: _check_number("thresholds", value) for name, value in thresholds.items()}
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise TypeError(f"thresholds must be a number, a sequence or a dict by layer name, got {thresholds!r}")
    return [_check_number("thresholds", value) for value in thresholds]


def _resolve_thresholds(thresholds, names: list[str]) -> list[float]:
    """One threshold per Bayesian layer, from ``None`` (the default), a number, a sequence or a dict by name."""
    thresholds = _threshold_values(thresholds)
    if thresholds is None:
        return [DEFAULT_THRESHOLD] * len(names)
    return resolve_thresholds(thresholds, names)


def _all_bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = list(bayesian_layers(model))
    if not layers:
        raise ValueError(f"model has no Bayesian layer (bclib.LinearGroupNJ, ...): {type(model).__name__}")
    return layers


def _select_layer(model: nn.Module, name: str, key, argument: str) -> int:
    """Position among the Bayesian layers of the module selected by ``key`` (module name or position)."""
    layers = _all_bayesian_layers(model)
    names = [n for n, _ in layers]
    if isinstance(key, int) and not isinstance(key, bool):
        if not -len(layers) <= key < len(layers):
            raise ValueError(f"{argument}: position {key} is out of range for the {len(layers)} Bayesian layers {names}")
        return key % len(layers)
    if not isinstance(key, str):
        raise TypeError(f"{argument} must name a module (str) or give a position among the Bayesian layers (int), got {key!r}")
    if key in names:
        return names.index(key)
    modules = dict(model.named_modules())
    if key in modules:
        raise ValueError(
            f"{argument}: module {key!r} ({type(modules[key]).__name__}) is not a Bayesian layer; "
            f"the Bayesian layers are {names}"
        )
    raise ValueError(f"{argument}: {name} has no module {key!r}; the Bayesian layers are {names}")


def _save_atomically(path, write) -> Path:
    """Call ``write(temporary_path)``, then rename onto ``path`` (see :func:`bclib._io.write_atomically`)."""
    return write_atomically(path, write)


def _save_figure(fig: Figure, path) -> None:
    suffix = Path(path).suffix.lstrip(".").lower()
    if not suffix:
        raise ValueError(f"path must end with an image suffix such as .png or .svg, got {str(path)!r}")
    _save_atomically(path, lambda temporary: fig.savefig(temporary, format=suffix))


def _write_gif(frames: list[np.ndarray], path, duration) -> Path:
    """Encode RGB frames (all the same size) with imageio: ``duration`` ms per frame, looping forever."""
    duration = _check_duration(duration)
    if not frames:
        raise ValueError("no frames to write: record at least one epoch first")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"all frames must have the same size, got {sorted({f.shape for f in frames})}")
    # GIF stores delays in hundredths of a second: durations are rounded to multiples of 10 ms.
    data = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=duration, loop=0)
    return _save_atomically(path, lambda temporary: Path(temporary).write_bytes(data))


def _check_image_shape(image_shape) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (NumPy's too), as a tuple of Python ints."""
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, (Sequence, np.ndarray, torch.Size)):
        raise TypeError(f"image_shape must be a tuple of positive ints, e.g. (28, 28), got {image_shape!r}")
    shape = tuple(image_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in shape):
        raise ValueError(f"image_shape must be a tuple of positive ints, got {image_shape!r}")
    return tuple(int(s) for s in shape)


def _frame(figsize, dpi) -> tuple[Figure, FigureCanvasAgg]:
    if isinstance(figsize, np.ndarray):
        figsize = tuple(figsize.tolist())
    if (isinstance(figsize, (str, bytes)) or not isinstance(figsize, Sequence) or len(figsize) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                       for v in figsize)):
        raise ValueError(f"figsize must be (width, height) in inches, two positive numbers, got {figsize!r}")
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, FigureCanvasAgg(fig)


def _to_rgb(canvas: FigureCanvasAgg) -> np.ndarray:
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _bare_axes(fig: Figure, rect):
    ax = fig.add_axes(rect)
    # set_axis_off removes ticks, labels, spines and any grid (``ax.grid("off")`` would turn it on).
    ax.set_axis_off()
    return ax


# ----------------------------------------------------------------------------- masks
# ----------------------------------------------------------------------------- weight evolution
class WeightEvolutionRecorder:
    r"""Training callback that records, every ``every``-th epoch, the posterior mean weights of Bayesian layers
    and the AND mask of the thresholds in use.

    Call it as ``recorder(epoch, model, metrics)`` (the callback signature of :func:`bclib.train.fit`).
    For each chosen layer it stores ``E[w]`` (``layer.posterior_weight()[0]``, detached, on the CPU)
    and a boolean mask of the same shape: group ``g`` of layer ``l`` is kept iff
    :math:`\log\alpha_g < t_l`, and a weight is kept iff its input unit and its output unit are
    both kept (a linear layer's outputs are the next layer's input groups; the last layer's
    outputs are always kept).

    Args:
        layers: which Bayesian layers to record: module names (as in ``model.named_modules()``) or
            positions among the Bayesian layers; ``None`` records all of them.
        thresholds: the log-alpha threshold of every Bayesian layer of the model (all of them,
            recorded or not, since a layer's outputs are pruned by the next layer): a sequence in
            the order the layers were registered (:func:`bclib.bayesian_layers`), a dict by module
            name, or one number for all layers. ``None`` uses
            :data:`DEFAULT_THRESHOLD` (-3) everywhere. A wrong length is a ``ValueError``.
            The masks are those of :func:`bclib.compression.weight_masks` (the AND rule of
            :func:`bclib.compress`), so a conv model needs its ``input_shape`` attribute.
        every: record only the epochs divisible by ``every`` (fewer frames, smaller GIFs). Every
            call checks the model, so a wrong layer or threshold count fails at the first epoch.

    Attributes:
        epochs: the recorded epochs, in order.
        layer_names: module names of the recorded layers.
        layer_positions: their positions among the model's Bayesian layers (0-based).
        weights, masks: dicts from layer name to a list with one tensor per recorded epoch.

    Example:
        >>> from bclib.models import lenet_300_100
        >>> model = lenet_300_100("nj")
        >>> recorder = WeightEvolutionRecorder(thresholds=[-2.8, -3, -5])
        >>> recorder(1, model, {})
        >>> recorder.layer_names, recorder.masks["1"][0].shape
        (['1', '3', '5'], torch.Size([300, 784]))
    """

    def __init__(self, layers: Sequence[str | int] | None = None, thresholds=None, *, every: int = 1) -> None:
        if layers is not None and (isinstance(layers, (str, int)) or not isinstance(layers, Sequence) or not layers):
            raise TypeError(f"layers must be None or a non-empty sequence of module names or positions, got {layers!r}")
        # Check the values now; their number is checked against the model at the first call.
        self.thresholds = _threshold_values(thresholds)
        self.layers = None if layers is None else list(layers)
        self.every = check_positive_int("every", every)
        self.epochs: list[int] = []
        self.layer_names: list[str] = []
        self.layer_positions: list[int] = []
        self.weights: dict[str, list[Tensor]] = {}
        self.masks: dict[str, list[Tensor]] = {}

    @torch.no_grad()
    def __call__(self, epoch: int, model: nn.Module, metrics: Mapping | None = None) -> None:
        due = _due(epoch, self.every)
        # Checked at every call, so that a wrong layer or threshold count fails at the first epoch,
        # not at the first recorded one.
        all_layers = _all_bayesian_layers(model)
        names = [n for n, _ in all_layers]
        thresholds = _resolve_thresholds(self.thresholds, names)
        keys = range(len(all_layers)) if self.layers is None else self.layers
        positions = [_select_layer(model, "model", key, "layers") for key in keys]
        if len(set(positions)) != len(positions):
            raise ValueError(f"layers names a layer twice: {self.layers} are {[names[p] for p in positions]}")
        if self.epochs and positions != self.layer_positions:
            raise ValueError(f"model: recorded layers {self.layer_names} before, now {[names[p] for p in positions]}")
        if not due:
            return
        # The AND masks of bclib.compress: what the compressed network would keep at this epoch.
        # By name: weight_masks orders its layers as forward runs them, this recorder as they were
        # registered, and the two orders can differ.
        masks = weight_masks(model, dict(zip(names, thresholds)))
        unrun = [names[p] for p in positions if names[p] not in masks]
        if unrun:  # no mask: the compressed network would not hold them
            raise ValueError(f"layers: {unrun} never run in the model's forward; record the layers it runs, "
                             f"layers={list(masks)}")
        self.layer_positions = positions
        self.layer_names = [names[p] for p in positions]
        for p in positions:
            name, layer = all_layers[p]
            self.weights.setdefault(name, []).append(layer.posterior_weight()[0].detach().float().cpu().clone())
            self.masks.setdefault(name, []).append(masks[name])
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.epochs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers}, thresholds={self.thresholds}, every={self.every}, "
                f"epochs recorded={len(self)})")


def _due(epoch, every: int) -> bool:
    """True when a recorder called at ``epoch`` should record (every ``every``-th epoch)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch must be an int, got {epoch!r}")
    return epoch % every == 0


def _check_recorded(recorder, kind) -> None:
    if not isinstance(recorder, kind):
        raise TypeError(f"recorder must be a {kind.__name__}, got {type(recorder).__name__}")
    if not recorder.epochs:
        raise ValueError("recorder has no recorded epochs: pass it to fit(..., callbacks=[recorder]) or call it first")


def render_weight_frames(recorder: WeightEvolutionRecorder, layer: str, *, vmax: float | None = None,
                         figsize=_WEIGHT_FIGSIZE, dpi: int = _DPI) -> list[np.ndarray]:
    """Draw one RGB frame per recorded epoch of one layer's weight matrix.

    Rows are output units, columns input units (a conv weight is drawn as ``(C_out, C_in*kh*kw)``).
    Colours: ``bwr`` with limits ``[-vmax, vmax]`` fixed across frames, red positive, blue negative;
    pruned weights and exact zeros are white. The matrix fills :data:`WEIGHT_AXES_RECT` with one
    block of pixels per weight (nearest neighbour); the title gives the epoch and the weights kept.

    Args:
        recorder: a :class:`WeightEvolutionRecorder` with at least one epoch.
        layer: one of ``recorder.layer_names``.
        vmax: colour limit; ``None`` takes the largest ``|E[w]|`` of the kept weights over all frames.
        figsize, dpi: frame size in inches and dots per inch (``figsize * dpi`` pixels).

    Returns:
        A list of ``(H, W, 3)`` ``uint8`` arrays, all of the same size.
    """
    _check_recorded(recorder, WeightEvolutionRecorder)
    if layer not in recorder.weights:
        raise ValueError(f"layer must be one of the recorded layers {recorder.layer_names}, got {layer!r}")
    matrices = [w.reshape(w.shape[0], -1).numpy() for w in recorder.weights[layer]]
    kept = [m.reshape(m.shape[0], -1).numpy() for m in recorder.masks[layer]]
    if vmax is None:
        vmax = max((float(np.abs(w[k]).max()) for w, k in zip(matrices, kept) if k.any()), default=0.0)
        vmax = vmax if vmax > 0 else 1.0  # everything pruned: any limit draws all white
    elif _check_number("vmax", vmax) <= 0:
        raise ValueError(f"vmax must be positive, got {vmax}")
    position = recorder.layer_positions[recorder.layer_names.index(layer)]
    colormap = matplotlib.colormaps["bwr"].with_extremes(bad="white")
    frames = []
    for epoch, weight, keep in zip(recorder.epochs, matrices, kept):
        fig, canvas = _frame(figsize, dpi)
        ax = _bare_axes(fig, WEIGHT_AXES_RECT)
        # Masked cells are drawn in the colormap's "bad" colour: pruned weights and exact zeros are white.
        shown = np.ma.masked_where(~keep | (weight == 0), weight)
        ax.imshow(shown, cmap=colormap, vmin=-vmax, vmax=vmax, interpolation="nearest", aspect="auto")
        fig.suptitle(
            f"layer {position + 1} ({weight.shape[0]} x {weight.shape[1]}), epoch {epoch}: "
            f"{int(keep.sum()):,} of {keep.size:,} weights kept",
            y=1 - (1 - WEIGHT_AXES_RECT[1] - WEIGHT_AXES_RECT[3]) / 2, va="center", fontsize=_GIF_TITLE_FONTSIZE,
        )
        frames.append(_to_rgb(canvas))
    return frames


def write_weight_gifs(recorder: WeightEvolutionRecorder, out_dir, *, duration: float = DEFAULT_FRAME_DURATION_MS,
                      vmax: float | None = None, figsize=_WEIGHT_FIGSIZE, dpi: int = _DPI) -> dict[str, Path]:
    """Write one looping GIF per recorded layer, ``out_dir/weights_layer{k}.gif`` (``k`` counts Bayesian layers from 1).

    Args:
        recorder: a :class:`WeightEvolutionRecorder` with at least one epoch.
        out_dir: folder for the GIFs (created when missing).
        duration: display time of each frame in milliseconds (>= 20; GIF rounds it to 10 ms).
        vmax, figsize, dpi: as :func:`render_weight_frames`.

    Returns:
        A dict from layer name to the path written.
    """
    _check_recorded(recorder, WeightEvolutionRecorder)
    _check_duration(duration)
    paths = {}
    for name, position in zip(recorder.layer_names, recorder.layer_positions):
        frames = render_weight_frames(recorder, name, vmax=vmax, figsize=figsize, dpi=dpi)
        paths[name] = _write_gif(frames, Path(out_dir) / f"weights_layer{position + 1}.gif", duration)
    return paths


# ----------------------------------------------------------------------------- pixel importance
def pixel_importance(log_alpha: Tensor, image_shape: Sequence[int] = (28, 28)) -> np.ndarray:
    r"""The pixel importance :math:`1 - \min(\alpha, 1)` of each input, as an image (the 2017 release's map).

    ``alpha = exp(log alpha)`` is the noise-to-signal ratio of an input unit of the first layer; for
    Gaussian dropout with drop probability ``p`` it is ``p / (1 - p)``. The map is 1 for a unit
    without noise and 0 once the noise is as large as the signal (``alpha >= 1``, ``p >= 1/2``). It is
    a score, not a probability: the keep probability of Gaussian dropout would be ``1 / (1 + alpha)``.

    Args:
        log_alpha: one value per input unit, ``prod(image_shape)`` of them.
        image_shape: the shape of one input image (``(28, 28)`` for MNIST).

    Returns:
        A float array of shape ``image_shape`` with values in ``[0, 1]``.

    Raises:
        ValueError: a count of values other than ``prod(image_shape)``, or a NaN among them.

    Example:
        >>> pixel_importance(torch.log(torch.tensor([0.25, 1.0, 4.0, 1e-6])), (2, 2)).round(3)
        array([[0.75, 0.  ],
               [0.  , 1.  ]])
    """
    image_shape = _check_image_shape(image_shape)
    values = torch.as_tensor(log_alpha).detach().double().cpu().reshape(-1)
    if values.numel() != math.prod(image_shape):
        raise ValueError(f"log_alpha must have {math.prod(image_shape)} values for image_shape {tuple(image_shape)}, got {values.numel()}")
    if bool(values.isnan().any()):  # a diverged training: no importance to show
        raise ValueError(f"log_alpha holds {int(values.isnan().sum())} NaN values")
    return (1.0 - values.exp().clamp(max=1.0)).reshape(tuple(image_shape)).numpy()


class PixelImportanceRecorder:
    """Training callback that records, every ``every``-th epoch, the log alpha of the input groups of a linear Bayesian layer.

    Call it as ``recorder(epoch, model, metrics)``. :meth:`pixel_importance` turns a record into the
    per-pixel map ``1 - min(alpha, 1)`` (:func:`pixel_importance`); :func:`write_pixel_importance_gif` animates it.

    Args:
        layer: the layer's module name or position among the Bayesian layers; ``None`` takes the
            first Bayesian layer. It must have one log alpha per input unit (``LinearGroupNJ``,
            ``LinearGroupHS``), and ``prod(image_shape)`` inputs.
        image_shape: the shape of one input image.
        every: record only the epochs divisible by ``every``. Every call checks the model.

    Attributes:
        epochs: the recorded epochs; log_alphas: one CPU tensor of shape ``(in_features,)`` per epoch.

    Example:
        >>> from bclib.models import lenet_300_100
        >>> recorder = PixelImportanceRecorder()
        >>> recorder(1, lenet_300_100("nj"), {})
        >>> recorder.pixel_importance().shape
        (28, 28)
    """

    def __init__(self, layer: str | int | None = None, image_shape: Sequence[int] = (28, 28), *,
                 every: int = 1) -> None:
        image_shape = _check_image_shape(image_shape)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (str, int))):
            raise TypeError(f"layer must be None, a module name (str) or a position among the Bayesian layers "
                            f"(int), got {layer!r}")
        self.layer = 0 if layer is None else layer
        self.image_shape = image_shape
        self.every = check_positive_int("every", every)
        self.epochs: list[int] = []
        self.log_alphas: list[Tensor] = []

    @torch.no_grad()
    def __call__(self, epoch: int, model: nn.Module, metrics: Mapping | None = None) -> None:
        due = _due(epoch, self.every)
        # Checked at every call, so that a wrong layer fails at the first epoch, not at the first recorded one.
        name, layer = _all_bayesian_layers(model)[_select_layer(model, "model", self.layer, "layer")]
        log_alpha = layer.log_alpha().detach()
        if not layer.groups_on_input or log_alpha.dim() != 1:
            raise ValueError(
                f"layer: {name!r} ({type(layer).__name__}) has no log alpha per input unit; pixel importance "
                "needs a linear group layer such as LinearGroupNJ or LinearGroupHS"
            )
        if log_alpha.numel() != math.prod(self.image_shape):
            raise ValueError(f"image_shape {self.image_shape} has {math.prod(self.image_shape)} pixels but layer {name!r} has {log_alpha.numel()} inputs")
        if not due:
            return
        self.log_alphas.append(log_alpha.float().cpu().clone())
        self.epochs.append(epoch)

    def pixel_importance(self, index: int = -1) -> np.ndarray:
        """The map ``1 - min(alpha, 1)`` of the ``index``-th recorded epoch (the last by default)."""
        _check_recorded(self, PixelImportanceRecorder)
        return pixel_importance(self.log_alphas[index], self.image_shape)

    def __len__(self) -> int:
        return len(self.epochs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layer={self.layer!r}, image_shape={self.image_shape}, every={self.every}, "
                f"epochs recorded={len(self)})")


def choose_digits(images, num_digits: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_digits`` images drawn without replacement with a seeded generator.

    Args:
        images: ``(N, ...)`` tensor or array of images (e.g. the MNIST test inputs ``(N, 1, 28, 28)``).
        num_digits: how many to draw.
        seed: seed of :func:`numpy.random.default_rng`, so the same digits come back each time.

    Returns:
        ``(indices, chosen)``: the drawn indices and the images, as float arrays shaped ``(num_digits, -1)``.
    """
    check_positive_int("num_digits", num_digits)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.ndim < 2 or array.shape[0] < num_digits:
        raise ValueError(f"images must be a batch (N, ...) with N >= num_digits={num_digits}, got shape {array.shape}")
    indices = np.sort(np.random.default_rng(seed).choice(array.shape[0], size=num_digits, replace=False))
    return indices, array[indices].reshape(num_digits, -1).astype(np.float64)


def pixel_panel_rect(panel: int, num_panels: int) -> tuple[float, float, float, float]:
    """Rectangle ``(left, bottom, width, height)`` (figure fractions) of panel ``panel`` of a pixel-importance frame.

    Panel 0 is the pixel-importance map, panels 1.. the digits; each image fills its rectangle
    (nearest neighbour), which is square on a frame of :func:`render_pixel_importance_frames`'s default size.

    Args:
        panel: the panel's index, in ``[0, num_panels)``.
        num_panels: panels in the frame (the map and the digits).
    """
    check_positive_int("num_panels", num_panels)
    if isinstance(panel, bool) or not isinstance(panel, int) or not 0 <= panel < num_panels:
        raise ValueError(f"panel must be an int in [0, {num_panels}), got {panel!r}")
    return (panel + 0.05) / num_panels, 0.04, 0.9 / num_panels, 0.72


def render_pixel_importance_frames(recorder: PixelImportanceRecorder, digits, *,
                                   input_range=DEFAULT_INPUT_RANGE, panel_size: float = 1.6,
                                   dpi: int = _DPI) -> list[np.ndarray]:
    """Draw one RGB frame per recorded epoch: the pixel-importance map, then each digit times the map.

    The map is drawn in ``Greys`` on ``[0, 1]`` (black: always kept, white: pruned). Each digit is
    first mapped from ``input_range`` onto ``x`` in ``[-1, 1]`` (background -1, ink 1), then drawn as
    ``x * (1 - min(alpha, 1))`` in ``Greys`` on ``[-1, 1]``: the kept background stays white, kept ink
    black, and pruned pixels, background or ink, fade to the middle grey. (The 2017 release drew
    ``(byte / 255 - 0.5) * (1 - min(alpha, 1))`` the same way, on symmetric limits, in a blue-red palette.)
    Without the mapping, a pruned pixel of a ``[0, 1]`` image would look like the blank background.
    Panels are laid out by :func:`pixel_panel_rect`.

    Args:
        recorder: a :class:`PixelImportanceRecorder` with at least one epoch.
        digits: ``(K, ...)`` images with ``prod(recorder.image_shape)`` values each (see :func:`choose_digits`).
        input_range: ``(low, high)``: the background and full-ink values of ``digits``, as the model
            saw them (default ``(0, 1)``, :func:`bclib.data.load_mnist`'s; the release used ``(-1, 1)``).
        panel_size: width of one panel in inches; the frame is ``(K + 1) * panel_size`` by ``1.25 * panel_size``.
        dpi: dots per inch.

    Returns:
        One ``(height, width, 3)`` uint8 array per recorded epoch.
    """
    _check_recorded(recorder, PixelImportanceRecorder)
    low, high = _check_input_range(input_range)
    check_positive_float("panel_size", panel_size, allow_none=False)
    array = digits.detach().cpu().numpy() if isinstance(digits, Tensor) else np.asarray(digits, dtype=np.float64)
    if array.ndim < 1 or array.size != array.shape[0] * math.prod(recorder.image_shape):
        raise ValueError(f"digits must be (K, ...) images of {math.prod(recorder.image_shape)} pixels, got shape {array.shape}")
    images = (array.reshape(array.shape[0], *recorder.image_shape).astype(np.float64) - low) * (2.0 / (high - low)) - 1.0
    num_panels = 1 + images.shape[0]
    frames = []
    for index, epoch in enumerate(recorder.epochs):
        keep = recorder.pixel_importance(index)
        fig, canvas = _frame((num_panels * panel_size, 1.25 * panel_size), dpi)
        ax = _bare_axes(fig, pixel_panel_rect(0, num_panels))
        ax.imshow(keep, cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
        for k, image in enumerate(images, start=1):
            ax = _bare_axes(fig, pixel_panel_rect(k, num_panels))
            ax.imshow(image * keep, cmap="Greys", vmin=-1.0, vmax=1.0, interpolation="nearest", aspect="auto")
        fig.suptitle(f"epoch {epoch}: pixel importance 1 - min(alpha, 1), alone and times {images.shape[0]} digits",
                     y=0.9, fontsize=_GIF_TITLE_FONTSIZE)
        frames.append(_to_rgb(canvas))
    return frames


def write_pixel_importance_gif(recorder: PixelImportanceRecorder, images, path, *, num_digits: int = 5,
                               seed: int = 0, input_range=DEFAULT_INPUT_RANGE,
                               duration: float = DEFAULT_FRAME_DURATION_MS, panel_size: float = 1.6,
                               dpi: int = _DPI) -> Path:
    """Write the pixel-importance animation (one frame per recorded epoch, looping) to ``path``.

    Args:
        recorder: a :class:`PixelImportanceRecorder` with at least one epoch.
        images: test images to draw the digits from, scaled as the model saw them.
        path: the GIF file (its folder is created when missing).
        num_digits: how many digits to show beside the map.
        seed: which digits (:func:`choose_digits` draws them with this seed).
        input_range: the ``(low, high)`` of ``images`` (as :func:`render_pixel_importance_frames`).
        duration: display time of each frame in milliseconds (>= 20).
        panel_size, dpi: as :func:`render_pixel_importance_frames`.

    Returns:
        The path of the GIF.
    """
    _check_recorded(recorder, PixelImportanceRecorder)
    _check_duration(duration)
    _check_input_range(input_range)
    _, digits = choose_digits(images, num_digits, seed)
    frames = render_pixel_importance_frames(recorder, digits, input_range=input_range, panel_size=panel_size, dpi=dpi)
    return _write_gif(frames, path, duration)


# ----------------------------------------------------------------------------- static figures
def _finish(fig: Figure, path) -> Figure:
    FigureCanvasAgg(fig)
    if path is not None:
        _save_figure(fig, path)
    return fig


def _legend_above_bars(ax, top: float) -> None:
    """The legend in a band above the tallest bar, so it covers none (the y axis is raised for it)."""
    ax.set_ylim(0.0, (top if top > 0 else 1.0) * _LEGEND_HEADROOM)
    ax.legend(fontsize=9, loc="upper center", frameon=True, framealpha=0.9, borderaxespad=0.3)


# The y axis of a histogram reaches this many times its tallest bar: the top band holds the legend.
_LEGEND_HEADROOM = 1.4


def plot_log_alpha_histograms(model: nn.Module, thresholds=None, *, bins: int = 60, path=None) -> Figure:
    """Histogram of log alpha for each Bayesian layer, its threshold as a dashed line.

    Pick a threshold between the histogram's two modes (the authors' advice): groups left of
    it are kept.

    Args:
        model: a model with Bayesian layers.
        thresholds: as in :class:`WeightEvolutionRecorder`; ``None`` marks no threshold.
        bins: number of histogram bins.
        path: optional file to save the figure to (format from the suffix).
    """
    layers = _all_bayesian_layers(model)
    names = [n for n, _ in layers]
    limits = None if thresholds is None else _resolve_thresholds(thresholds, names)
    check_positive_int("bins", bins)
    fig = Figure(figsize=(3.6 * len(layers), 3.0), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for k, (ax, (name, layer)) in enumerate(zip(axes, layers)):
        with torch.no_grad():
            log_alpha = layer.log_alpha().detach().float().cpu().reshape(-1).numpy()
        ax.hist(log_alpha, bins=bins, color="0.45")
        ax.set_title(f"layer {k + 1} ({name!r}, {type(layer).__name__})", fontsize=9)
        ax.set_xlabel(r"$\log\alpha$")
        if limits is not None:
            kept = int((log_alpha < limits[k]).sum())
            ax.axvline(limits[k], color="tab:red", linestyle="--",
                       label=f"threshold {limits[k]:g}: {kept} of {log_alpha.size} kept")
            _legend_above_bars(ax, max((p.get_height() for p in ax.patches), default=0.0))
    axes[0].set_ylabel("count")
    return _finish(fig, path)


def plot_saved_log_alpha_histograms(layers: Mapping[str, Mapping], *, ncols: int | None = None, path=None) -> Figure:
    """The figure of :func:`plot_log_alpha_histograms`, drawn from saved histograms instead of a model.

    A finished run keeps no weights in the book, only its ``analysis.json``
    (:func:`bclib.experiments.compress_run`): per layer the counts and bin edges of the log-alpha
    histogram, the threshold used, and for per-group signals the log alphas themselves.

    Args:
        layers: ``{layer name: {"histogram": {"counts": [...], "edges": [...]}, "threshold": t,
            "log_alpha": [...] (optional)}}`` in layer order, as ``analysis["layers"]``. With
            ``log_alpha`` the legend counts the groups kept (``log_alpha < t``); without it (the
            per-weight Sparse VD signal) it shows the threshold only.
        ncols: panels per row (default: all in one row); more layers wrap onto further rows.
        path: optional file to save the figure to (format from the suffix).

    Example:
        >>> saved = {"fc1": {"histogram": {"counts": [2, 0, 1], "edges": [-9.0, -5.0, -1.0, 3.0]},
        ...                  "threshold": -3.0, "log_alpha": [-8.0, -7.5, 1.0]}}
        >>> fig = plot_saved_log_alpha_histograms(saved)  # legend: "threshold -3: 2 of 3 kept"
    """
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError(f"layers must be a non-empty mapping of layer name to saved histogram, got {layers!r}")
    entries = []
    for name, entry in layers.items():
        histogram = entry.get("histogram") if isinstance(entry, Mapping) else None
        if not isinstance(histogram, Mapping) or not {"counts", "edges"} <= set(histogram) or "threshold" not in entry:
            raise ValueError(f"layers[{name!r}] must have 'histogram' with 'counts' and 'edges', and 'threshold'")
        counts = np.asarray(histogram["counts"], dtype=np.float64)
        edges = np.asarray(histogram["edges"], dtype=np.float64)
        if counts.ndim != 1 or edges.shape != (counts.size + 1,) or counts.size == 0 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"layers[{name!r}]: histogram must have n counts and n + 1 increasing edges, "
                             f"got {counts.size} counts and {edges.size} edges")
        threshold = _check_number(f"layers[{name!r}]['threshold']", entry["threshold"])
        entries.append((name, counts, edges, threshold, entry.get("log_alpha")))
    ncols = len(entries) if ncols is None else min(check_positive_int("ncols", ncols), len(entries))
    nrows = math.ceil(len(entries) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(entries):]:
        ax.set_axis_off()  # the unused panels of the last row
    for k, (ax, (name, counts, edges, threshold, log_alpha)) in enumerate(zip(axes, entries)):
        ax.stairs(counts, edges, fill=True, color="0.45")
        ax.set_title(f"layer {k + 1} ({name!r})", fontsize=9)
        ax.set_xlabel(r"$\log\alpha$")
        label = f"threshold {threshold:.3g}"
        if log_alpha is not None:
            values = np.asarray(log_alpha, dtype=np.float64)
            label += f": {int((values < threshold).sum())} of {values.size} kept"
        ax.axvline(threshold, color="tab:red", linestyle="--", label=label)
        _legend_above_bars(ax, float(counts.max()))
    for row in grid:
        row[0].set_ylabel("count")
    return _finish(fig, path)


_THRESHOLD_KEYS = ("threshold", "thresholds")
_COMPRESSION_KEYS = ("compression", "compression_pruning", "compression_precision")


def _threshold_label(threshold) -> str:
    """``-3`` for a number, ``-2.8, -3, -5`` for one per layer (a sequence or a dict by name); a string as it is."""
    if isinstance(threshold, str):
        return threshold
    if isinstance(threshold, Mapping):
        threshold = list(threshold.values())
    if isinstance(threshold, numbers.Real):
        return f"{float(threshold):g}"
    return ", ".join(f"{float(t):g}" for t in threshold)


#: Legend names of the compression rates of :func:`plot_tradeoff`.
RATE_LABELS = {"compression": "compression", "compression_pruning": "after pruning",
               "compression_precision": "after precision"}


def _log_rate_axis(ax) -> None:
    """Log x axis with plain numbers at 1, 2, 5 x 10^k instead of matplotlib's 2 x 10^1-style labels."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _place_labels(ax, points, texts, *, below=(), fontsize: float = 8) -> list:
    """Annotate ``points`` (data coordinates) with ``texts`` so that no two labels overlap.

    Each label tries positions around its point in turn (right-above, right-below, then higher and
    lower; below first for the indices in ``below``) and takes the first whose box meets no label
    placed before it.
    """
    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # final layout, so the boxes measured below stay where they are
    candidates = [(4, 4), (4, -12), (4, 16), (4, -24), (4, 28), (-4, 16), (4, -36), (4, 40), (4, 52)]
    placed = []
    boxes = []
    for index, ((x, y), text) in enumerate(zip(points, texts)):
        order = [c for c in candidates if c[1] < 0] if index in below else candidates
        for k, offset in enumerate(order):
            ha = "right" if offset[0] < 0 else "left"
            annotation = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=fontsize,
                                     ha=ha, bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                                                  "alpha": 0.8}, arrowprops=None if k < 2 else {"arrowstyle": "-", "color": "0.6",
                                                                              "lw": 0.6})
            box = annotation.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in boxes) or k == len(order) - 1:
                break
            annotation.remove()
        boxes.append(box)
        placed.append(annotation)
    return placed


def plot_tradeoff(rows: Sequence[Mapping], *, compression_keys: str | Sequence[str] | None = None,
                  error_key: str = "error", error_limit: float | None = None, title: str | None = None,
                  path=None) -> Figure:
    """Test error (in %) against compression, one point per threshold setting, labelled with its threshold.

    One line per compression rate, named as in :data:`RATE_LABELS` ("after pruning", "after
    precision"). The points of the first line carry their threshold, placed so that no two labels
    overlap. With ``error_limit`` the y axis ends there: a point above it is drawn on the edge as
    an open triangle, and its label gives its error.

    Args:
        rows: one mapping per threshold setting with a threshold under ``"threshold"`` or
            ``"thresholds"`` (a number, one per layer, or the label itself as a string), the error (a fraction) under
            ``error_key``, and one or more compression rates, e.g.
            ``{"threshold": -3, "error": 0.017, "compression": 12.5}`` or the rows of
            ``bclib.compression.threshold_sweep``.
        compression_keys: the rate(s) to draw, one line each; ``None`` draws those of
            ``"compression"``, ``"compression_pruning"``, ``"compression_precision"`` that the rows have.
        error_key: the key of the error.
        error_limit: top of the y axis in percent (e.g. ``5.0``); ``None`` shows every point.
        title: the axes title (default: what the labels mean).
        path: optional file to save the figure to.

    Returns:
        The :class:`~matplotlib.figure.Figure`; its axes hold one line per rate (y in percent,
        clipped to ``error_limit``).

    Example:
        >>> rows = [{"threshold": t, "error": e, "compression": c}
        ...         for t, e, c in ((-3, 0.30, 60.0), (-1, 0.02, 20.0), (0, 0.017, 12.0))]
        >>> fig = plot_tradeoff(rows, error_limit=5.0)
        >>> sorted(t.get_text() for t in fig.axes[0].texts)
        ['-1', '-3: 30 %', '0']
    """
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"rows must be a non-empty sequence of mappings, got {rows!r}")
    if not all(isinstance(row, Mapping) for row in rows):
        raise TypeError("rows must hold one mapping per threshold setting")
    if error_limit is not None and _check_number("error_limit", error_limit) <= 0:
        raise ValueError(f"error_limit must be positive (percent), got {error_limit}")
    if compression_keys is None:
        compression_keys = [key for key in _COMPRESSION_KEYS if key in rows[0]]
    elif isinstance(compression_keys, str):
        compression_keys = [compression_keys]
    threshold_key = next((key for key in _THRESHOLD_KEYS if key in rows[0]), _THRESHOLD_KEYS[0])
    required = {threshold_key, error_key, *compression_keys}
    for k, row in enumerate(rows):
        if not compression_keys or not required <= set(row):
            raise ValueError(
                f"rows[{k}] must have a threshold ({' or '.join(_THRESHOLD_KEYS)}), {error_key!r} and a "
                f"compression ({', '.join(compression_keys or _COMPRESSION_KEYS)}), got keys {sorted(row)}"
            )
    fig = Figure(figsize=(6.0, 4.3), layout="constrained")
    ax = fig.subplots()
    limit = math.inf if error_limit is None else float(error_limit)
    labelled, any_clipped = [], False
    for index, key in enumerate(compression_keys):
        ordered = sorted(rows, key=lambda row: float(row[key]))
        compression = [float(row[key]) for row in ordered]
        error = [100.0 * float(row[error_key]) for row in ordered]
        shown = [min(e, limit) for e in error]
        (line,) = ax.plot(compression, shown, marker="o", label=RATE_LABELS.get(key, key))
        clipped = [(x, y) for x, y, e in zip(compression, shown, error) if e > limit]
        if clipped:
            ax.plot(*zip(*clipped), linestyle="none", marker="^", markersize=9, markerfacecolor="white",
                    color=line.get_color(), clip_on=False,
                    label=f"above {limit:g} %, drawn at the edge" if not any_clipped else None)
            any_clipped = True
        if index == 0:  # label the points of the first line only, to keep the figure readable
            labelled = [(x, y, _threshold_label(row[threshold_key])
                         + (f": {e:.{0 if e >= 10 else 1}f} %" if e > limit else ""), e > limit)
                        for row, x, y, e in zip(ordered, compression, shown, error)]
    if min(float(row[key]) for row in rows for key in compression_keys) > 0:
        _log_rate_axis(ax)
    if error_limit is not None:
        ax.set_ylim(0.0, limit)
    else:
        ax.set_ylim(bottom=0.0)
    if len(compression_keys) > 1 or any_clipped or any(key in RATE_LABELS and key != "compression"
                                                        for key in compression_keys):
        # Under the axes, where it can cover no point and no label.
        fig.legend(fontsize=9, loc="outside lower center", ncols=3, frameon=False)
    ax.set_xlabel("compression rate")
    ax.set_ylabel("test error (%)" if error_key == "error" else f"{error_key} (%)")
    ax.set_title(title or "error against compression, labelled by log-alpha threshold", fontsize=10)
    # Labels right to left: the well-spaced points at high compression first, then the crowded ones.
    labelled.sort(key=lambda item: -item[0])
    _place_labels(ax, [(x, y) for x, y, _, _ in labelled], [text for _, _, text, _ in labelled],
                  below={k for k, item in enumerate(labelled) if item[3]})
    return _finish(fig, path)


def plot_architecture(before: Sequence[int], after: Sequence[int], *, names: Sequence[str] | None = None,
                      path=None) -> Figure:
    """Units per layer before and after pruning, as side-by-side bars with their counts.

    Args:
        before: units (or filters) of each layer of the dense network, e.g. ``[784, 300, 100, 10]``.
        after: the same layers after pruning, e.g. ``[278, 98, 19, 10]``; each entry at most its ``before``.
        names: optional label per layer (default ``layer 0``, ``layer 1``, ...).
        path: optional file to save the figure to.
    """
    for argument, counts in (("before", before), ("after", after)):
        if not isinstance(counts, Sequence) or not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"{argument} must be a non-empty sequence of non-negative ints, got {counts!r}")
    if len(before) != len(after):
        raise ValueError(f"after must have one count per layer of before ({len(before)}), got {len(after)}")
    if any(a > b for a, b in zip(after, before)):
        raise ValueError(f"after must not exceed before layer by layer, got before={list(before)}, after={list(after)}")
    names = [f"layer {k}" for k in range(len(before))] if names is None else list(names)
    if len(names) != len(before):
        raise ValueError(f"names must have one label per layer ({len(before)}), got {len(names)}")
    positions = np.arange(len(before))
    fig = Figure(figsize=(max(4.0, 1.3 * len(before) + 1.5), 3.5), layout="constrained")
    ax = fig.subplots()
    for offset, counts, colour, label in ((-0.2, before, "0.6", "before"), (0.2, after, "tab:red", "after pruning")):
        bars = ax.bar(positions + offset, counts, width=0.4, color=colour, label=label)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(positions, names)
    ax.set_ylabel("units")
    ax.set_title(f"architecture: {'-'.join(map(str, before))} to {'-'.join(map(str, after))}", fontsize=10)
    ax.legend(fontsize=8)
    return _finish(fig, path)


_CURVE_PANELS = (
    ("loss", ("loss",)),
    ("error", ("train_error", "test_error", "error")),
    ("KL (nats)", ("kl",)),
)


def plot_learning_curves(history: Sequence[Mapping], *, path=None) -> Figure:
    """Loss, error and KL over epochs, from per-epoch metric dicts (as :func:`bclib.train.fit` reports them).

    Panels: ``"loss"``; ``"train_error"`` / ``"test_error"`` (or ``"error"``); ``"kl"``. A panel
    whose keys no row has is left out. The x axis is ``"epoch"`` when every row has one, else 1, 2, ...

    Args:
        history: a non-empty sequence of metric mappings, one per epoch.
        path: optional file to save the figure to.
    """
    if isinstance(history, Mapping) or not isinstance(history, Sequence) or not history:
        raise ValueError(f"history must be a non-empty sequence of per-epoch metric dicts, got {history!r}")
    if not all(isinstance(row, Mapping) for row in history):
        raise TypeError("history must hold one mapping of metrics per epoch")
    epochs = [row["epoch"] for row in history] if all("epoch" in row for row in history) else list(range(1, len(history) + 1))
    panels = [(title, [key for key in keys if any(key in row for row in history)]) for title, keys in _CURVE_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ValueError(f"history has none of the keys {[k for _, keys in _CURVE_PANELS for k in keys]}")
    fig = Figure(figsize=(3.6 * len(panels), 3.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(x, float(row[key])) for x, row in zip(epochs, history) if key in row]
            ax.plot(*zip(*points), label=key, marker="o" if len(points) == 1 else None)  # one epoch: a dot
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_run_comparison(histories: Mapping[str, Sequence[Mapping]], *, reference_error: float | None = None,
                        reference_label: str = "reference", path=None) -> Figure:
    """Test error (in %) and KL (log scale) of several runs, epoch by epoch, side by side.

    Args:
        histories: per-epoch metrics (``"epoch"``, ``"test_error"`` as a fraction, ``"kl"`` in nats,
            as :func:`bclib.train.fit` reports them) of each run, by its label in the legend.
        reference_error: an error (a fraction) drawn as a dashed line on the error panel, e.g. that
            of the deterministic network the runs start from.
        reference_label: that line's legend entry.
        path: optional file to save the figure to.

    Example:
        >>> fig = plot_run_comparison({"run": [{"epoch": 1, "test_error": 0.02, "kl": 10.0}]})
        >>> [ax.get_title() for ax in fig.axes]
        ['test error', 'KL divergence']
    """
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError(f"histories must map run labels to per-epoch metrics, got {histories!r}")
    for label, history in histories.items():
        if isinstance(history, Mapping) or not isinstance(history, Sequence) or not history or not all(
                isinstance(row, Mapping) and {"epoch", "test_error", "kl"} <= row.keys() for row in history):
            raise ValueError(f"histories[{label!r}] must be a non-empty sequence of per-epoch dicts with "
                             "'epoch', 'test_error' and 'kl'")
    if reference_error is not None and not 0 <= _check_number("reference_error", reference_error) <= 1:
        raise ValueError(f"reference_error must be an error as a fraction, from 0 to 1, got {reference_error!r}")
    fig = Figure(figsize=(8.0, 3.2), layout="constrained")
    errors, kls = fig.subplots(1, 2)
    for label, history in histories.items():
        epochs = [row["epoch"] for row in history]
        errors.plot(epochs, [100 * row["test_error"] for row in history], "o-", ms=3, label=label)
        kls.semilogy(epochs, [row["kl"] for row in history], "o-", ms=3, label=label)
    if reference_error is not None:
        errors.axhline(100 * reference_error, color="grey", ls="--", label=reference_label)
    errors.set(xlabel="epoch", ylabel="test error (%)", title="test error")
    kls.set(xlabel="epoch", ylabel="nats", title="KL divergence")
    errors.legend(fontsize=8)
    return _finish(fig, path)


def plot_retraining_tradeoff(panels: Sequence[Mapping], *, error_limit: float = 3.0, path=None) -> Figure:
    """Error (in %) against compression after precision: the paper's pipeline, the retraining search, the release.

    One panel per run, side by side with a shared y axis. Each panel draws the threshold sweep of
    the paper's pipeline (pruned and rounded, no retraining: ``error_reduced_precision``), the
    candidates of the retraining search (``test_error``), a ring around the candidate that the
    search kept, and the release's point as a star. Points above ``error_limit`` are drawn on the
    top edge as open triangles.

    Args:
        panels: one mapping per panel with ``"title"``, ``"sweep"`` (the rows of
            ``analysis["sweep"]``), ``"candidates"`` and ``"offset"`` (of a retrained run's
            ``analysis.json``) and optionally ``"release"``, ``(error, pruning, precision)`` with
            the error as a fraction (as :data:`bclib.bench.PAPER_TARGETS`).
        error_limit: top of the y axis in percent.
        path: optional file to save the figure to.

    Returns:
        The :class:`~matplotlib.figure.Figure`.

    Example:
        >>> panel = {"title": "LeNet-5 BC-GNJ", "offset": 0.0,
        ...          "sweep": [{"compression_precision": 300.0, "error_reduced_precision": 0.014,
        ...                     "weights_kept": 10}],
        ...          "candidates": [{"offset": 0.0, "compression_precision": 300.0, "test_error": 0.009}],
        ...          "release": (0.010, 108.0, 361.0)}
        >>> [line.get_label() for line in plot_retraining_tradeoff([panel]).axes[0].lines][:2]
        ['pruned and rounded (paper)', '+ retraining (candidates)']
    """
    if isinstance(panels, Mapping) or not isinstance(panels, Sequence) or not panels:
        raise ValueError(f"panels must be a non-empty sequence of mappings, got {panels!r}")
    for k, panel in enumerate(panels):
        missing = {"title", "sweep", "candidates", "offset"} - set(panel)
        if missing:
            raise ValueError(f"panels[{k}] lacks {sorted(missing)}")
    limit = _check_number("error_limit", error_limit)
    if limit <= 0:
        raise ValueError(f"error_limit must be positive (percent), got {error_limit}")
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]

    def draw(ax, xs, errors, *args, **kwargs):
        ys = [100.0 * e for e in errors]
        (line,) = ax.plot(xs, [min(y, limit) for y in ys], *args, **kwargs)
        over = [(x, limit) for x, y in zip(xs, ys) if y > limit]
        if over:
            ax.plot(*zip(*over), linestyle="none", marker="^", markersize=8, markerfacecolor="white",
                    color=line.get_color(), clip_on=False)

    for ax, panel in zip(axes, panels):
        sweep = sorted((row for row in panel["sweep"] if row.get("weights_kept", 1) > 0),
                       key=lambda row: row["compression_precision"])
        draw(ax, [row["compression_precision"] for row in sweep],
             [row["error_reduced_precision"] for row in sweep], "o-", color="C0", label="pruned and rounded (paper)")
        tried = sorted(panel["candidates"], key=lambda row: row["compression_precision"])
        draw(ax, [row["compression_precision"] for row in tried], [row["test_error"] for row in tried], "s-",
             color="C1", label="+ retraining (candidates)")
        kept = [row for row in tried if row["offset"] == panel["offset"]]
        if kept:
            draw(ax, [kept[0]["compression_precision"]], [kept[0]["test_error"]], "s", ms=11, mfc="none",
                 color="C3", label="kept by the selection")
        if panel.get("release") is not None:
            error, _, precision = panel["release"]
            draw(ax, [precision], [error], "*", ms=12, color="k", label="release")
        _log_rate_axis(ax)
        ax.set_ylim(0.0, limit)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("compression after precision")
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=7, loc="upper left")
    return _finish(fig, path)


# ----------------------------------------------------------------------------- tables of the book
# The book's tables are returned as strings of lines of at most 80 characters (wider lines are cut
# off in the HTML). Runs are named as in bclib.experiments.EXPERIMENTS: "<model>_<prior>[_ft]".
