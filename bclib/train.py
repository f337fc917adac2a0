"""Training: the negative-ELBO objective, the loop, callbacks and checkpoints.

The objective per data point is (Louizos et al. 2017, Eq. 2 divided by N)

.. math::
    \\mathcal{L} = \\frac{1}{B}\\sum_{b} -\\log p(y_b | x_b, w) + \\beta\\,\\frac{\\mathrm{KL}(q\\,\\|\\,p)}{N},

with ``beta`` rising linearly from 0 to 1 over ``kl_warmup_epochs`` (KL warm-up) and ``N`` the
number of training examples. After every optimiser step each layer's variances are clipped
(:meth:`bclib.BayesianLayer.clip_variances`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ._allocator import keep_freed_memory
from ._compiled import original_module
from ._io import write_atomically
from .data import TensorSplit, batches
from .layers import bayesian_layers, kl_divergence, set_variance_dtype
from .layers.base import check_positive_int

__all__ = ["TrainConfig", "fit", "evaluate", "elbo_loss", "default_device", "save_checkpoint", "load_checkpoint",
           "keep_freed_memory"]

Callback = Callable[[int, nn.Module, dict], None]


# Names accepted for TrainConfig.variance_dtype (None: the weights' own precision). Not float16:
# x^2 overflows it from |x| > 256.
VARIANCE_DTYPES = {None: None, "bfloat16": torch.bfloat16}
# Names accepted for TrainConfig.memory_format (None: the model's layout as it is).
MEMORY_FORMATS = {None: None, "channels_last": torch.channels_last}
# Names accepted for TrainConfig.autocast. Not float16: its narrow exponent needs a gradient
# scaler (torch.amp.GradScaler), which this loop does not run.
AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (saved beside the results as JSON).

    Args:
        epochs: passes over the training set.
        batch_size: minibatch size.
        lr: initial Adam learning rate.
        lr_final: learning rate at the last epoch; the rate decays geometrically per epoch in between.
        variance_lr_scale: the learning rate of log-variance parameters is ``lr * variance_lr_scale``
            (log-variances start at -9 and must travel several units; a larger step gets them there
            in fewer epochs).
        kl_warmup_epochs: epochs over which ``beta`` rises linearly from 0 to 1 (0: no warm-up).
        grad_clip: maximum global gradient norm (``None``: no clipping).
        seed: seeds parameters' sampling noise and the shuffling.
        device: ``"cpu"``, ``"cuda"``, ... (``None``: CUDA when available).
        variance_dtype: ``"bfloat16"`` runs the Bayesian layers' variance path in bfloat16
            (:func:`bclib.set_variance_dtype`; faster on CPUs with bfloat16 units and on GPUs);
            it stays set on the layers after :func:`fit`, like the device. ``None`` leaves the
            layers as they are (full precision unless set otherwise).
        autocast: ``"bfloat16"`` runs the forward pass under ``torch.autocast`` (mixed precision):
            the matrix products and convolutions of every layer, Bayesian or not, in bfloat16,
            while parameters, the sampled pre-activations, the loss, the KL and the optimiser stay
            float32. Faster where bfloat16 units exist (recent GPUs; CPUs with AMX). Evaluation
            stays in full precision. ``None``: full precision.
        memory_format: ``"channels_last"`` converts the model's convolution weights (its 4-d
            tensors) and each batch of images to the channels-last (NHWC) layout before training, so
            that convolutions, pooling and the Bayesian layers' sampling all run in it; on CPUs
            (oneDNN) that is faster (``python -m bclib bench epochs`` measures it beside the default
            layout; chapter 3 of the book shows the committed numbers). It stays set on the model
            after :func:`fit`, like the device. Networks without convolutions are unaffected.
            ``None`` leaves the layout as it is. The layers draw their noise in the tensors' memory
            order, so the numbers differ from the default layout's as another seed's would: a
            checkpoint resumes only in the layout it was written in.
        keep_freed_memory: on CPU, first call :func:`bclib.train.keep_freed_memory` (glibc's
            ``malloc`` keeps freed blocks for reuse, process-wide): without it a Bayesian step
            can fault fresh pages in for its temporaries every time (LeNet-5-Caffe NJ: thousands a
            step in most processes here, up to a fifth of its time). ``False`` leaves the allocator
            alone (it does not undo an earlier call in the same process).
    """

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    lr_final: float = 1e-3
    variance_lr_scale: float = 1.0
    kl_warmup_epochs: int = 0
    grad_clip: float | None = None
    seed: int = 0
    device: str | None = None
    variance_dtype: str | None = None
    autocast: str | None = None
    memory_format: str | None = None
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "lr_final", "variance_lr_scale", "grad_clip", "kl_warmup_epochs"):
            value = getattr(self, name)
            if name == "grad_clip" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
        for name in ("lr", "lr_final", "variance_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        if not 0 <= self.seed < 2**32:  # each epoch's shuffle seed, seed * 100_003 + epoch, must fit int64
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be None or a torch device name such as 'cpu', 'cuda' or "
                                 f"'cuda:1', got {self.device!r}") from None
        if self.variance_dtype not in VARIANCE_DTYPES:
            raise ValueError(f"variance_dtype must be one of {sorted(VARIANCE_DTYPES, key=str)}, "
                             f"got {self.variance_dtype!r}")
        if not isinstance(self.keep_freed_memory, bool):
            raise TypeError(f"keep_freed_memory must be True or False, got {self.keep_freed_memory!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {sorted(MEMORY_FORMATS, key=str)}, "
                             f"got {self.memory_format!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES, key=str)}, got {self.autocast!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**values)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def elbo_loss(logits: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, dataset_size: int,
              beta: float = 1.0) -> torch.Tensor:
    """Negative ELBO per data point: mean cross-entropy + ``beta * KL / N``."""
    return F.cross_entropy(logits, target) + beta * kl / dataset_size


def input_dtype(model: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype ``model`` takes ``x`` in: that of its floating-point parameters for floating-point
    ``x`` (so float64 data meets a float32 network, such as the export of a float64 one), else
    ``x``'s own."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    return parameter.dtype if parameter is not None and x.is_floating_point() else x.dtype


@torch.no_grad()
def evaluate(model: nn.Module, split: TensorSplit, batch_size: int = 1000) -> dict:
    """Error (fraction) and mean cross-entropy of ``model`` in eval mode (posterior means).

    Args:
        model: a classifier returning logits ``(N, classes)``; its training mode is restored after.
        split: the examples (moved batch by batch to the model's device; floating-point inputs
            cast to its parameters' dtype).
        batch_size: examples per forward pass, a positive int.

    Returns:
        ``{"error": fraction misclassified, "ce": mean cross-entropy in nats}``.
    """
    if not isinstance(split, TensorSplit):
        raise TypeError(f"split must be a bclib.data.TensorSplit, got {type(split).__name__}")
    if len(split) == 0:
        raise ValueError("split must hold at least one example, got an empty split")
    split_batches = batches(split, batch_size)  # checks batch_size before the model is touched
    was_training = model.training
    model.eval()
    wrong, total_ce = 0, 0.0
    # A model without parameters runs wherever its input is.
    device = next(model.parameters(), split.x).device
    dtype = input_dtype(model, split.x)
    try:
        for x, y in split_batches:
            logits = model(x.to(device, dtype))
            y = y.to(device)
            total_ce += F.cross_entropy(logits, y, reduction="sum").item()
            wrong += (logits.argmax(1) != y).sum().item()
    finally:
        model.train(was_training)
    return {"error": wrong / len(split), "ce": total_ce / len(split)}


def _autocast(device: torch.device, name: str | None):
    """``torch.autocast`` for ``device`` in the dtype named ``name`` (``None``: a no-op context)."""
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[name])


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    logvars = [p for n, p in model.named_parameters() if n.endswith("logvar")]
    others = [p for n, p in model.named_parameters() if not n.endswith("logvar")]
    groups = [{"params": others, "lr": config.lr, "base_lr": config.lr}]
    if logvars:
        lr = config.lr * config.variance_lr_scale
        groups.append({"params": logvars, "lr": lr, "base_lr": lr})
    return groups


def _set_lr(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> float:
    """Geometric decay from ``lr`` at epoch 0 to ``lr_final`` at the last epoch."""
    progress = epoch / max(1, config.epochs - 1)
    factor = (config.lr_final / config.lr) ** progress
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return config.lr * factor


# Settings that may differ between a checkpoint and the run resuming it. keep_freed_memory changes
# only how fast it runs. The device changes the generator the noise comes from, but a stopped run must
# resume on the machine at hand (and device=None, the recipes' value, is resolved only at run time).
# Not memory_format: the layers draw their noise in memory order, so a run resumed in another layout
# would silently be half one recipe, half another.
_RESUMABLE_ACROSS = ("device", "keep_freed_memory")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, epoch: int, history: list,
                    config: TrainConfig | None = None) -> None:
    """Atomically write model, optimiser, epoch, history, RNG states and the config (loadable with
    ``weights_only=True``).

    Args:
        path: the file to write (replaced whole, never half-written).
        model, optimizer: their ``state_dict()`` s are saved (of a ``torch.compile`` wrapper, the
            module it runs: one checkpoint for the network compiled or not).
        epoch: epochs done.
        history: the per-epoch metrics so far (JSON-serialisable dicts).
        config: the recipe, checked by :func:`load_checkpoint` when it is given one.
    """
    state = {
        "model": original_module(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history_json": json.dumps(history),
        "rng_cpu": torch.get_rng_state(),
    }
    if config is not None:
        state["config_json"] = json.dumps(config.to_dict())
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def _read_checkpoint(path: str | os.PathLike, with_optimizer: bool = False) -> dict:
    """The checkpoint's contents, loaded with ``weights_only=True``; a damaged file, or one that holds
    anything but what :func:`save_checkpoint` writes (its optimiser's state only ``with_optimizer``,
    when one is to be loaded too), is a ``ValueError``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # What damaged files raise: a truncated zip archive can surface as OSError (errno 22) from torch.
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:
        if isinstance(error, OSError) and type(error) is not OSError:  # a missing file, no permission, ...
            raise
        problem = str(error)
    else:
        # Checked whole here, before anything is restored: a file torch reads but that holds something
        # else (a bare state_dict, an edited checkpoint) would otherwise fail half-way through
        # load_checkpoint, with the weights already replaced.
        problem = _checkpoint_problem(state, with_optimizer)
    if problem is not None:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read back as a bclib checkpoint ({problem}); "
                         f"delete it to train afresh")
    return state


def _parsed_json(text):
    """``text`` parsed as JSON; ``None`` when it is not a str of JSON."""
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _checkpoint_problem(state, with_optimizer: bool) -> str | None:
    """What makes ``state`` other than what :func:`save_checkpoint` writes (``None``: nothing), in
    what :func:`load_checkpoint` uses of it."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not the dict save_checkpoint writes"
    needed = ("model", "optimizer", "epoch", "history_json", "rng_cpu")
    missing = [key for key in needed if key not in state and (key != "optimizer" or with_optimizer)]
    if missing:
        return f"no {', '.join(map(repr, missing))} in it" + (
            ": a bare state_dict of a network is not a checkpoint" if "model" in missing else "")
    if not isinstance(state["model"], dict) or not all(
            isinstance(name, str) and torch.is_tensor(tensor) for name, tensor in state["model"].items()):
        return "its 'model' is not a dict of named tensors"
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"its 'epoch' is not an int >= 0 but {type(epoch).__name__} {epoch!r}"
    history = _parsed_json(state["history_json"])
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        return "its 'history_json' is not JSON of a list of per-epoch dicts"
    if "config_json" in state and not isinstance(_parsed_json(state["config_json"]), dict):
        return "its 'config_json' is not JSON of a dict"
    rng = state["rng_cpu"]
    if not torch.is_tensor(rng) or rng.dtype != torch.uint8:
        return f"its 'rng_cpu' is not a uint8 tensor but {rng.dtype if torch.is_tensor(rng) else type(rng).__name__}"
    try:
        torch.Generator().set_state(rng)  # a generator of its own: the global one is set only once all is checked
    except RuntimeError as error:
        return f"its 'rng_cpu' is not the state of a CPU generator ({error})"
    if "rng_cuda" in state and not (isinstance(state["rng_cuda"], (list, tuple)) and all(
            torch.is_tensor(rng) and rng.dtype == torch.uint8 for rng in state["rng_cuda"])):
        return "its 'rng_cuda' is not a list of uint8 tensors"
    if with_optimizer:
        saved = state["optimizer"]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not (isinstance(groups, list) and isinstance(saved.get("state"), dict) and all(
                isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups)):
            return "its 'optimizer' is not an optimiser's state_dict"
    return None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer=None,
                    config: TrainConfig | None = None) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns ``(epochs_done, history)``.

    Loaded with ``weights_only=True``: a checkpoint never runs code. The optimiser's moments are laid
    out like ``model``'s parameters, whatever layout the checkpoint was written in.

    Args:
        path: a file written by :func:`save_checkpoint`.
        model: the network to load into (the same architecture; compiled or not, as the one saved).
        optimizer: loaded too when given (built over ``model``'s parameters).
        config: the recipe of the run resuming; checked against the checkpoint's.

    Raises:
        ValueError: a file that cannot be read back as a checkpoint or holds anything but what
            :func:`save_checkpoint` writes; when ``config`` is given and differs from the config the
            checkpoint was written with in anything but ``device`` and ``keep_freed_memory`` (resuming
            would silently mix two recipes; checkpoints written without a config are not checked), or when the
            checkpoint holds the tensors of another network than ``model``. Each is raised before
            ``model``, ``optimizer`` or the random state is changed.
    """
    state = _read_checkpoint(path, with_optimizer=optimizer is not None)
    if config is not None:
        _check_recipe(state, config, path)
    model = original_module(model)
    _check_network(state, model, path, None if optimizer is None else optimizer.param_groups)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        _lay_out_state_like_parameters(optimizer)
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available() and len(state["rng_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["epoch"]), json.loads(state["history_json"])


def check_checkpoint_recipe(path: str | os.PathLike, config: TrainConfig, model: nn.Module | None = None) -> None:
    """Raise the :func:`load_checkpoint` errors now, before anything of a run is written, when the
    checkpoint at ``path`` was written by another recipe than ``config`` (checkpoints written
    without a config pass) or, given ``model``, holds tensors of other names or shapes or an
    optimiser's state that :func:`fit`'s cannot take, or cannot be read back as a checkpoint at all
    (loaded with ``weights_only=True``; nothing is changed)."""
    state = _read_checkpoint(path, with_optimizer=True)  # fit resumes its optimiser too
    _check_recipe(state, config, path)
    if model is not None:
        _check_network(state, model, path, _param_groups(model, config))


def _check_network(state: dict, model: nn.Module, path, param_groups: list[dict] | None = None) -> None:
    """Refuse a checkpoint whose tensors differ from ``model``'s in names or shapes (another network),
    naming the first ones, rather than let ``load_state_dict`` raise its RuntimeError; given the
    ``param_groups`` of an optimiser to load too, likewise one whose optimiser's groups hold other
    numbers of parameters (``Optimizer.load_state_dict`` would raise after the weights were loaded)."""
    saved = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
    wanted = {name: tuple(tensor.shape) for name, tensor in original_module(model).state_dict().items()}
    if saved != wanted:
        differing = sorted(set(saved) ^ set(wanted)) or sorted(n for n in saved if saved[n] != wanted[n])
        raise ValueError(f"checkpoint {path} holds another network than the one to resume (tensors "
                         f"{', '.join(differing[:4])}{' ...' if len(differing) > 4 else ''} differ): "
                         "train into another folder")
    if param_groups is not None:
        saved_sizes = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        sizes = [len(group["params"]) for group in param_groups]
        if saved_sizes != sizes:
            raise ValueError(f"checkpoint {path} holds the state of an optimiser whose parameter groups hold "
                             f"{saved_sizes} parameters, not {sizes} as the one to resume: train into another folder")


def _check_recipe(state: dict, config: TrainConfig, path) -> None:
    if "config_json" not in state:
        return
    saved, wanted = json.loads(state["config_json"]), config.to_dict()
    differing = [key for key in sorted(set(saved) | set(wanted))
                 if key not in _RESUMABLE_ACROSS and saved.get(key) != wanted.get(key)]
    if differing:
        changes = ", ".join(f"{key}={saved.get(key)!r} there, {wanted.get(key)!r} here" for key in differing)
        raise ValueError(f"checkpoint {path} was written by another recipe ({changes}): resume with its "
                         "config, or train into another folder")


def _to_memory_format(model: nn.Module, memory_format: str | None) -> nn.Module:
    """Convert ``model``'s 4-d tensors (convolution weights) to the layout named ``memory_format``
    (a key of :data:`MEMORY_FORMATS`; ``None`` leaves it as it is), in place, as :func:`fit` does."""
    if MEMORY_FORMATS[memory_format] is not None:
        model.to(memory_format=MEMORY_FORMATS[memory_format])
    return model


def _batch_in_memory_format(x: torch.Tensor, memory_format: str | None) -> torch.Tensor:
    """A batch of images (4-d) in the layout named ``memory_format``; other tensors as they are."""
    if MEMORY_FORMATS[memory_format] is None or x.dim() != 4:
        return x
    return x.contiguous(memory_format=MEMORY_FORMATS[memory_format])


def _lay_out_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Copy each state tensor of ``optimizer`` that has its parameter's shape but other strides into
    the parameter's layout. The fused Adam kernel walks a parameter, its gradient and its moments
    in memory order: moments loaded from a checkpoint written in another layout (channels-last or
    not) would silently be paired with the wrong weights."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def fit(model: nn.Module, train: TensorSplit, test: TensorSplit, config: TrainConfig, *,
        callbacks: Iterable[Callback] = (), checkpoint: str | os.PathLike | None = None,
        progress: bool = True) -> list[dict]:
    """Train ``model`` by minimising the negative ELBO; returns the per-epoch metrics.

    Deterministic networks (no Bayesian layer) train on the cross-entropy alone with the same loop.

    Args:
        model: any ``nn.Module``; its Bayesian layers contribute their KL.
        train, test: in-memory splits (moved, with the model, to ``config.device``: CUDA when
            available unless it says otherwise; floating-point inputs cast to the model's dtype).
        config: a :class:`TrainConfig`.
        callbacks: each called as ``callback(epoch, model, metrics)`` after each epoch's evaluation,
            with the model in eval mode (the animations record here).
        checkpoint: a path; when it exists training resumes from it, and it is rewritten after
            every epoch.
        progress: show a ``tqdm`` bar per epoch with loss, error and KL.

    Returns:
        A list with one dict per epoch, holding ``epoch, loss, ce, kl, beta, lr, train_error,
        test_error, test_ce, seconds``. The model is left in eval mode (in the mode it came in
        when training raises).

    Raises:
        TypeError: ``train`` or ``test`` not a :class:`bclib.data.TensorSplit`, ``config`` not a
            :class:`TrainConfig`.
        ValueError: an empty split; a ``checkpoint`` written for another network or recipe.
        FloatingPointError: a non-finite loss, error or KL at the end of an epoch.
    """
    for name, value in (("train", train), ("test", test)):
        if not isinstance(value, TensorSplit):
            raise TypeError(f"{name} must be a bclib.data.TensorSplit (in-memory tensors x, y; "
                            f"e.g. from bclib.data.load_mnist), got {type(value).__name__}")
        if len(value) == 0:
            raise ValueError(f"{name} must hold at least one example, got an empty split")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a bclib.train.TrainConfig, got {type(config).__name__}")
    device = default_device(config.device)
    if config.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed)
    model.to(device)
    _to_memory_format(model, config.memory_format)
    if config.variance_dtype is not None:
        set_variance_dtype(model, VARIANCE_DTYPES[config.variance_dtype])
    dtype = input_dtype(model, train.x)  # floating inputs in the network's dtype
    train, test = train.to(device, dtype), test.to(device, dtype)
    # The fused kernel updates all parameters in one pass (CPU and CUDA), noticeably faster for
    # Bayesian layers, which carry twice the parameters of their deterministic counterparts.
    optimizer = torch.optim.Adam(_param_groups(model, config), lr=config.lr, fused=True)
    layers = [layer for _, layer in bayesian_layers(model)]
    history: list[dict] = []
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start_epoch, history = load_checkpoint(checkpoint, model, optimizer, config)
        # The optimiser's state brought back the rates it was built with; this config's rule them.
        for group, fresh in zip(optimizer.param_groups, _param_groups(model, config)):
            group["base_lr"] = fresh["base_lr"]
    n = len(train)
    steps = math.ceil(n / config.batch_size)
    was_training = model.training
    try:
        for epoch in range(start_epoch, config.epochs):
            lr = _set_lr(optimizer, config, epoch)
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            model.train()
            started = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, cross-entropy, errors
            bar = tqdm(batches(train, config.batch_size, shuffle=True, generator=generator), total=steps,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False,
                       mininterval=1.0)
            for step, (x, y) in enumerate(bar):
                beta = min(1.0, (epoch + step / steps) / config.kl_warmup_epochs) if config.kl_warmup_epochs else 1.0
                x = _batch_in_memory_format(x, config.memory_format)
                with _autocast(device, config.autocast):
                    logits = model(x)
                ce = F.cross_entropy(logits.float(), y)
                kl = kl_divergence(model)
                loss = ce + beta * kl / n
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                for layer in layers:
                    layer.clip_variances()
                # Summed on the device: no host synchronisation per step on a GPU.
                with torch.no_grad():
                    sums += torch.stack([loss * len(y), ce * len(y), (logits.argmax(1) != y).sum()]).double()
                if progress and step % 50 == 0:
                    wrong = sums[2].item()
                    seen = min(n, (step + 1) * config.batch_size)
                    bar.set_postfix(loss=f"{loss.item():.3f}", err=f"{wrong / seen:.3f}", kl=f"{kl.item():.3g}")
            bar.close()
            kl_value = kl.item()
            loss_sum, ce_sum, wrong = sums.tolist()
            result = evaluate(model, test)
            metrics = {
                "epoch": epoch + 1,
                "loss": loss_sum / n,
                "ce": ce_sum / n,
                "kl": kl_value,
                "beta": beta,
                "lr": lr,
                "train_error": wrong / n,
                "test_error": result["error"],
                "test_ce": result["ce"],
                "seconds": time.perf_counter() - started,
            }
            if not all(math.isfinite(v) for v in metrics.values()):
                raise FloatingPointError(f"non-finite metrics at epoch {epoch + 1}: {metrics}")
            history.append(metrics)
            if progress:
                tqdm.write(
                    f"epoch {epoch + 1:3d}  loss {metrics['loss']:.4f}  train err {metrics['train_error']:.4f}  "
                    f"test err {metrics['test_error']:.4f}  KL {kl_value:.4g}  ({metrics['seconds']:.1f} s)"
                )
            model.eval()
            for callback in callbacks:
                callback(epoch + 1, model, metrics)
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, optimizer, epoch + 1, history, config)
    except BaseException:  # an error or an interrupt mid-epoch: the model keeps the mode it came in
        model.train(was_training)
        raise
    model.eval()
    return history
