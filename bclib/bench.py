"""The benchmarks behind ``python -m bclib bench``: speed targets live here, never in timed tests.

* :func:`run_compression_bench` -- CPU inference throughput of the exported (pruned) model against
  the dense original, at batch 1000 and batch 1, side by side in one run, next to the FLOP reduction.
* :func:`run_layers_bench` -- training-step time of each prior's LeNet-300-100 and LeNet-5-Caffe
  relative to the same deterministic network.
* :func:`run_epoch_bench` -- seconds of one training epoch on real MNIST, against the epoch-time targets.
* :func:`run_training_time_report` -- wall time of the committed runs against the release's targets.

Both measure interleaved (A, B, A, B, ...) and report medians, so a busy machine slows both sides
alike; both return a dict and print a table.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import importlib
import logging
import math
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import models, tables
from ._allocator import freed_memory_kept, keep_freed_memory
from .compression import CompressedModel, compress, propose_thresholds
from .experiments import PAPER_ARCHITECTURES
from .layers import (BayesianLayer, LinearGroupHS, LinearGroupNJ, bayesian_layers, conv_gradient, kl_divergence,
                     set_variance_dtype)
from .layers.base import check_positive_int
from .train import TrainConfig, _batch_in_memory_format, _to_memory_format

__all__ = ["run_compression_bench", "run_compression_bench_from_run", "run_compression_trials", "summarise_trials",
           "run_layers_bench", "paper_lenet5",
           "matmul_macs_per_example",
           "run_training_time_report", "run_epoch_bench", "write_bench_results"]

# The BC-GNJ architecture of the paper for LeNet-5-Caffe: filters of conv1, conv2, inputs of fc1, fc2.
PAPER_LENET5_ARCHITECTURE = PAPER_ARCHITECTURES["nj"]
# The project's inference target: speed-up of the pruned export at batch 1000 over its FLOP reduction.
SPEEDUP_OVER_FLOP_TARGET = 0.8

# How the compression benchmark runs both exports (see run_compression_bench).
LAYOUTS = ("contiguous", "channels_last", "compiled")


def paper_lenet5(seed: int = 0, architecture=PAPER_LENET5_ARCHITECTURE) -> nn.Sequential:
    """An untrained LeNet-5-Caffe NJ model whose log alphas prune it to ``architecture`` at threshold 0
    (filters of conv1 and conv2, inputs of fc1 and fc2; by default the paper's BC-GNJ 8-13-88-13).

    Random posterior means; only the architecture matters for timing and for the rates. The fc1
    inputs are spread over the surviving conv2 channels.
    """
    conv1, conv2, fc1, fc2 = architecture
    generator = torch.Generator().manual_seed(seed)
    model = models.lenet5_caffe("nj")
    layers = [layer for _, layer in bayesian_layers(model)]
    conv2_kept = torch.randperm(50, generator=generator)[:conv2]
    # fc1 inputs: the 16 positions of each surviving conv2 channel, fc1 of them drawn at random.
    candidates = (conv2_kept[:, None] * 16 + torch.arange(16)).flatten()
    fc1_kept = candidates[torch.randperm(candidates.numel(), generator=generator)[:fc1]]
    kept = [torch.randperm(20, generator=generator)[:conv1], conv2_kept, fc1_kept,
            torch.randperm(500, generator=generator)[:fc2]]
    with torch.no_grad():
        for layer, keep in zip(layers, kept):
            layer.z_logvar.fill_(2.0)
            layer.z_logvar[keep] = -9.0
    return model


def _per_call_seconds(module: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - start) / calls


def _interleaved_medians(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int, min_seconds: float) -> dict:
    """Median seconds per call of each module, measured in turns; each turn lasts about ``min_seconds``."""
    calls = {}
    for name, module in modules.items():
        _per_call_seconds(module, x, 2)  # warm-up: allocations, kernel selection
        calls[name] = max(1, math.ceil(min_seconds / max(_per_call_seconds(module, x, 1), 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, module in modules.items():
            times[name].append(_per_call_seconds(module, x, calls[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def _check_run_sizes(**sizes) -> None:
    """Refuse non-positive or non-integer counts (repeats, steps, batch sizes), naming the argument."""
    for name, value in sizes.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if (not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)):
            what = "a non-empty sequence of positive ints" if isinstance(value, (tuple, list)) else "a positive int"
            raise ValueError(f"{name} must be {what}, got {value!r}")


def run_compression_bench(model: nn.Module | None = None, compressed: CompressedModel | None = None,
                          thresholds=None, *, batch_sizes=(1000, 1), layouts=LAYOUTS,
                          repeats: int = 9, min_seconds: float = 0.2, threads: int | None = None,
                          keep_freed: bool = False, verbose: bool = True) -> dict:
    """CPU inference throughput of the exported model against the dense original, at each batch size.

    The dense original is the same network unpruned, exported to plain PyTorch the same way
    (posterior means, ``nn.Conv2d``/``nn.Linear``), so the comparison is of architectures, not of
    Bayesian against plain layers. Each memory layout is applied to both models alike:
    ``"contiguous"`` is the exported ``nn.Sequential`` as is, ``"channels_last"`` converts both
    models and the input (``torch.channels_last``, usually faster for convolutions and pooling on CPUs),
    and ``"compiled"`` runs both models (channels-last for image inputs) through ``torch.compile``
    (TorchInductor: it fuses pooling and activations into generated C++ loops; it needs a C++ compiler
    and takes up to half a minute per model and batch size). Before timing, every converted or compiled
    model's logits are checked against those of its plain export on the same input (max abs
    difference <= 1e-4), so a faster but wrong model is never timed.

    Args:
        model: a trained Bayesian model; default :func:`paper_lenet5` (the paper's 8-13-88-13 LeNet-5).
        compressed: its :func:`bclib.compress` result; default ``compress(model, thresholds)``.
        thresholds: as for :func:`bclib.compress`; default 0 for :func:`paper_lenet5`, else
            :func:`bclib.compression.propose_thresholds` (a layer with one mode keeps everything).
        batch_sizes: batch sizes to time, side by side.
        layouts: how to run the models: any of ``"contiguous"``, ``"channels_last"``, ``"compiled"``.
        repeats: interleaved turns per model (the median is reported).
        min_seconds: length of one turn.
        threads: CPU threads for the run (default: PyTorch's current setting).
        keep_freed: first call :func:`bclib.train.keep_freed_memory` (process-wide, as training
            does). It matters here: with glibc's defaults the dense network, whose activations are
            larger, spends more of its time faulting in fresh pages, which flatters the speed-up.
            ``False`` leaves the allocator as it is, which is glibc's defaults only in a process
            that has not trained (or run the layers benchmark); the result records which it was.
        verbose: print the table.

    Returns:
        ``{"architecture", "flops_before", "flops_after", "flop_reduction", "threads", "freed_memory_kept",
        "runs": [{"layout",
        "batch", "dense_ms", "pruned_ms", "dense_examples_per_s", "pruned_examples_per_s", "speedup",
        "speedup_over_flop_reduction"}, ...], "layers": {layout: [{"layer", "dense_ms", "pruned_ms"}, ...]}}``;
        ``"layers"`` times each module of both exports on its own, at the largest batch size (where
        the time goes: pooling and memory-bound layers are not counted by FLOPs); compiled models run
        fused across modules, so the ``"compiled"`` layout has no per-module rows.
    """
    _check_run_sizes(batch_sizes=tuple(batch_sizes), repeats=repeats)
    if not (isinstance(min_seconds, (int, float)) and math.isfinite(min_seconds) and min_seconds >= 0):
        raise ValueError(f"min_seconds must be a finite number >= 0, got {min_seconds!r}")
    if not layouts:
        raise ValueError(f"layouts must name at least one of {LAYOUTS}, got {layouts!r}")
    if keep_freed:
        keep_freed_memory()
    if model is None:
        model = paper_lenet5()
        thresholds = 0.0 if thresholds is None else thresholds
    if compressed is None:
        if thresholds is None:
            thresholds = propose_thresholds(model, fallback=math.inf)
        compressed = compress(model, thresholds)
    report = compressed.report
    # Both exports without subnormal weights: the unpruned one holds the tiny posterior means of
    # switched-off groups, many of them subnormal floats, which CPUs multiply ~20x more slowly; they
    # would inflate the speed-up. (inf: nothing pruned; the pruned model is copied, not changed.)
    plain = {"dense": compress(model, math.inf).model, "pruned": copy.deepcopy(compressed.model)}
    for module in plain.values():
        _zero_subnormal_parameters(module)
    result = {
        "architecture": report.architecture, "flops_before": report.flops_before, "flops_after": report.flops_after,
        "flop_reduction": report.flop_reduction, "threads": threads or torch.get_num_threads(),
        "freed_memory_kept": freed_memory_kept(), "runs": [], "layers": {},
    }
    # Subnormal activations are flushed too (on the calling thread).
    with _cpu_threads(threads), _flush_denormals(), torch.inference_mode():
        # One input per batch size, the same for every layout, and the plain exports' logits on it.
        inputs = {batch: torch.rand(batch, *compressed.input_shape) * 2 - 1 for batch in batch_sizes}
        references = {batch: {name: module(x) for name, module in plain.items()} for batch, x in inputs.items()}
        for layout in layouts:
            modules, convert = _in_layout(plain, layout, len(compressed.input_shape) == 3)
            for batch in batch_sizes:
                x = convert(inputs[batch])
                if modules is not plain:
                    _check_same_outputs(modules, references[batch], x, layout)
                seconds = _interleaved_medians(modules, x, repeats, min_seconds)
                speedup = seconds["dense"] / seconds["pruned"]
                result["runs"].append({
                    "layout": layout, "batch": batch,
                    "dense_ms": 1e3 * seconds["dense"], "pruned_ms": 1e3 * seconds["pruned"],
                    "dense_examples_per_s": batch / seconds["dense"],
                    "pruned_examples_per_s": batch / seconds["pruned"],
                    "speedup": speedup, "speedup_over_flop_reduction": speedup / report.flop_reduction,
                })
            if layout == "compiled":
                continue
            x = convert(inputs[max(batch_sizes)])
            per_module = {name: _module_medians(module, x, repeats, min_seconds) for name, module in modules.items()}
            result["layers"][layout] = [
                {"layer": layer, "dense_ms": 1e3 * dense, "pruned_ms": 1e3 * pruned}
                for layer, dense, pruned in zip(per_module["pruned"], per_module["dense"].values(),
                                                per_module["pruned"].values())]
    if verbose:
        print(tables.speed_table(result))
    return result


def _module_medians(model: nn.Sequential, x: torch.Tensor, repeats: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each module of ``model``, each fed the activations it gets in the model."""
    inputs = {}
    for index, module in enumerate(model):
        inputs[f"{index} {module._get_name()}"] = (module, x)
        x = module(x)
    return {name: _interleaved_medians({name: module}, x_in, repeats, min_seconds)[name]
            for name, (module, x_in) in inputs.items()}


@torch.no_grad()
def _zero_subnormal_parameters(module: nn.Module) -> None:
    """Set parameters below the smallest normal float to zero, in place.

    ``torch.set_flush_denormal`` sets the flag of the calling thread only; with more than one CPU
    thread the other threads would still multiply the subnormal weights, many times more slowly."""
    for parameter in module.parameters():
        parameter.masked_fill_(parameter.abs() < torch.finfo(parameter.dtype).tiny, 0.0)


@contextlib.contextmanager
def _flush_denormals():
    """Treat denormal floats as zero inside the block (where the CPU supports it), then restore."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """Run with ``threads`` intra-op CPU threads (``None``: leave PyTorch's setting), then restore it."""
    previous = torch.get_num_threads()
    if threads is not None:
        check_positive_int("threads", threads)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_layout(modules: dict[str, nn.Module], layout: str, image_input: bool):
    """Copies of ``modules`` and an input converter for a layout of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == "contiguous":
        return modules, _unchanged
    if layout == "channels_last" and not image_input:
        raise ValueError("layout 'channels_last' needs image inputs (C, H, W)")
    convert = _unchanged
    if image_input:
        modules = {name: copy.deepcopy(m).to(memory_format=torch.channels_last) for name, m in modules.items()}
        convert = _channels_last
    if layout == "compiled":
        # Inductor imports cpp_extension, which warns on CPU-only machines that it found no CUDA runtime.
        _import_quietly("torch.utils.cpp_extension")
        # dynamic=False: one graph specialised to each batch size, as a deployment would hold.
        modules = {name: torch.compile(m, dynamic=False) for name, m in modules.items()}
    return modules, convert


def _import_quietly(module_name: str) -> None:
    """Import ``module_name`` with its logger's warnings silenced (import time only)."""
    logger = logging.getLogger(module_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module(module_name)
    finally:
        logger.setLevel(level)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _check_same_outputs(modules: dict[str, nn.Module], references: dict[str, torch.Tensor], x: torch.Tensor,
                        layout: str, tolerance: float = 1e-4) -> None:
    """Raise if a model run in ``layout`` gives other logits on ``x`` than the ``references`` of the
    plain exports (the first call of a compiled model compiles it)."""
    for name, module in modules.items():
        difference = (module(x).float() - references[name].float()).abs().max().item()
        if not difference <= tolerance:
            raise RuntimeError(f"the {name} model in layout {layout!r} differs from its plain export by "
                               f"{difference:.3g} (max abs logit; tolerance {tolerance:g})")


def is_compression_bench_run(run_dir) -> bool:
    """Whether :func:`run_compression_bench_from_run` can time ``run_dir``: a folder with ``config.json``
    and either ``checkpoint.pt`` or ``report.json`` and ``model.bcz``."""
    if run_dir is None:
        return False
    present = {name for name in ("config.json", "checkpoint.pt", "report.json", "model.bcz")
               if (Path(run_dir) / name).is_file()}
    return "config.json" in present and ("checkpoint.pt" in present or {"report.json", "model.bcz"} <= present)


def run_compression_bench_from_run(run_dir=None, **kwargs) -> dict:
    """:func:`run_compression_bench` on a trained run folder (``config.json`` + ``checkpoint.pt``).

    The thresholds come from the run's ``report.json`` when it has them. A folder without a
    checkpoint but with ``report.json`` and ``model.bcz`` (as committed) times the network of its
    file against the unpruned network of the same architecture, untrained: the times depend on
    the architecture, not on the weights (subnormal weights are zeroed either way). Without a
    usable run folder the bench says so and times :func:`paper_lenet5` instead.
    """
    run_dir = None if run_dir is None else Path(run_dir)
    if not is_compression_bench_run(run_dir):
        print(f"no trained run at {run_dir}:\ntiming an untrained LeNet-5 pruned to the paper's 8-13-88-13")
        return run_compression_bench(**kwargs)
    if not (run_dir / "checkpoint.pt").is_file():
        from .experiments import build_run_model, read_run_config, read_run_json

        config = read_run_config(run_dir)
        compressed = CompressedModel.from_file(run_dir / "model.bcz", read_run_json(run_dir, "report.json"))
        print(f"run {run_dir}: its model.bcz, against the unpruned architecture")

        return run_compression_bench(build_run_model(config), compressed=compressed, **kwargs)
    from .experiments import load_run_model, read_run_json

    model = load_run_model(run_dir).cpu()
    if not any(True for _ in bayesian_layers(model)):
        raise ValueError(f"run {run_dir} holds a deterministic model: nothing to compress")
    report_path = run_dir / "report.json"
    if "thresholds" not in kwargs and report_path.is_file():
        kwargs["thresholds"] = read_run_json(run_dir, "report.json").get("thresholds")
    print(f"run {run_dir}")
    return run_compression_bench(model, **kwargs)


def run_compression_trials(trials: int, run_dir=None, *, verbose: bool = True, **kwargs) -> dict:
    """:func:`run_compression_bench_from_run` in ``trials`` fresh processes, one after another, summarised.

    Within one process the two exports are timed in turns, so a busy machine slows both alike. Between
    processes the ratio still moves: each process draws its own memory and thread placement and,
    compiled, its own generated code. One process is therefore one sample, and this runs several
    (:func:`summarise_trials`: medians, and the range of the speed-up over the FLOP cut). Targets are
    judged on the medians.

    Args:
        trials: how many processes (a positive int).
        run_dir, kwargs: as :func:`run_compression_bench_from_run`.
        verbose: print each trial's ratios and the summary table.
    """
    check_positive_int("trials", trials)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: it inherits nothing but the arguments
    results = []
    for trial in range(trials):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results.append(pool.submit(_silent_compression_bench, run_dir, kwargs).result())
        if verbose:
            ratios = ", ".join(f"{row['layout']} {row['batch']}: {row['speedup_over_flop_reduction']:.2f}"
                               for row in results[-1]["runs"])
            print(f"trial {trial + 1}/{trials}, speed-up / FLOP cut: {ratios}", flush=True)
    summary = summarise_trials(results)
    if verbose:
        print(tables.speed_table(summary))
    return summary


def _silent_compression_bench(run_dir, kwargs: dict) -> dict:
    with contextlib.redirect_stdout(None):
        return run_compression_bench_from_run(run_dir, verbose=False, **kwargs)


def summarise_trials(results: list[dict]) -> dict:
    """One result of :func:`run_compression_bench` from several runs of it (the same layouts and batches).

    ``"runs"`` and ``"layers"`` hold the median of every figure over the trials (each figure its own
    median); each run row adds ``"speedup_over_flop_reduction_range"``, ``[min, max]`` over the trials;
    ``"trials"`` keeps every trial's run rows.
    """
    if not results:
        raise ValueError("results must hold at least one benchmark result")
    first = results[0]
    keys = [(row["layout"], row["batch"]) for row in first["runs"]]
    for result in results[1:]:
        if [(row["layout"], row["batch"]) for row in result["runs"]] != keys:
            raise ValueError(f"every result must time the same layouts and batches as the first: {keys}")
    layouts = {layout: [row["layer"] for row in rows] for layout, rows in first.get("layers", {}).items()}
    for result in results[1:]:
        if {layout: [row["layer"] for row in rows] for layout, rows in result.get("layers", {}).items()} != layouts:
            raise ValueError(f"every result must time the same modules in the same layouts as the first: "
                             f"{sorted(layouts)}")
    summary = {key: value for key, value in first.items() if key not in ("runs", "layers")}
    summary["runs"] = []
    for index, row in enumerate(first["runs"]):
        samples = [result["runs"][index] for result in results]
        merged = {key: value if key in ("layout", "batch") else statistics.median(s[key] for s in samples)
                  for key, value in row.items()}
        ratios = [s["speedup_over_flop_reduction"] for s in samples]
        merged["speedup_over_flop_reduction_range"] = [min(ratios), max(ratios)]
        summary["runs"].append(merged)
    summary["layers"] = {
        layout: [{"layer": row["layer"],
                  **{key: statistics.median(result["layers"][layout][index][key] for result in results)
                     for key in ("dense_ms", "pruned_ms")}}
                 for index, row in enumerate(rows)]
        for layout, rows in first.get("layers", {}).items()}
    summary["trials"] = [result["runs"] for result in results]
    return summary


# Variants timed beside full float32 in the contiguous layout: "bfloat16" runs the Bayesian layers'
# variance path in bfloat16 (set_variance_dtype); "autocast" runs every network, the deterministic one
# included, under torch.autocast in bfloat16 (mixed precision); "channels_last" trains every network
# with convolutions in the channels-last layout (TrainConfig.memory_format), the deterministic one
# included. The ratios of "autocast" and "channels_last" rows are to the deterministic network so run.
# Two more, for networks with convolutions, weigh the windowed weight gradients (layers.conv_gradient)
# that the Bayesian convolutions take where oneDNN's are slow: "onednn" runs the Bayesian network with
# oneDNN's everywhere, as before them; "windowed" gives the deterministic network's convolutions the
# windowed ones too (a row of the deterministic network only). Both rows' ratios are to "none".
VARIANTS = ("bfloat16", "autocast", "channels_last", "onednn", "windowed")
# The variants that change the deterministic network too: their rows have a baseline of their own.
_BASELINE_VARIANTS = ("autocast", "channels_last")
# The deterministic network gets rows for these variants (the others change only Bayesian layers),
# and these need convolutions.
_DETERMINISTIC_VARIANTS = (*_BASELINE_VARIANTS, "windowed")
_CONVOLUTION_VARIANTS = ("channels_last", "onednn", "windowed")


def run_layers_bench(steps: int = 10, repeats: int = 7, batch_size: int = 128, priors=("nj", "hs", "svd"),
                     model_names=("lenet300", "lenet5"), threads: int | None = None,
                     variants=VARIANTS, verbose: bool = True) -> dict:
    """Training-step time of each prior relative to the deterministic network, per model.

    One step is forward, loss (mean cross-entropy, plus KL / 60000 for the Bayesian models), backward,
    an Adam step and the variance clipping, on random MNIST-shaped data. Models are timed in turns
    (``steps`` steps each, ``repeats`` turns) and the median per-step time is reported.

    Each prior is timed in full float32 and in each of ``variants`` (:data:`VARIANTS`):
    ``"bfloat16"``, the variance path in bfloat16 (:func:`bclib.set_variance_dtype`; rows like
    ``"nj+bfloat16"``, against the float32 deterministic network); ``"autocast"``, mixed precision
    (rows like ``"nj+autocast"``, against the deterministic network under autocast, ``"none+autocast"``);
    and ``"channels_last"``, the channels-last layout (``TrainConfig(memory_format="channels_last")``;
    rows like ``"nj+channels_last"``, against ``"none+channels_last"``; networks with convolutions only).
    Two more weigh the windowed weight gradients of :mod:`bclib.layers.conv_gradient` (networks with
    convolutions only, both against ``"none"``): ``"onednn"``, the Bayesian network with oneDNN's
    weight gradients everywhere (rows like ``"nj+onednn"``), and ``"windowed"``, the deterministic
    network with the windowed ones (``"none+windowed"``).
    ``threads`` sets the CPU threads for the run (default: PyTorch's setting). Every network runs
    with freed memory kept for reuse (:func:`bclib.train.keep_freed_memory`), as
    :func:`bclib.train.fit` trains.

    Returns:
        ``{model: {row: {"step_ms", "ratio", "matmul_floor"}}}`` (ratio: step time over the
        deterministic one of the same precision and layout; matmul_floor: the same ratio for the
        multiply-adds of the step's matrix products, :func:`matmul_macs_per_example`).
    """
    _check_run_sizes(steps=steps, repeats=repeats, batch_size=batch_size)
    with _cpu_threads(threads):
        result = _time_train_steps(steps, repeats, batch_size, priors, model_names, variants)
    for name, rows in result.items():
        macs = {prior: matmul_macs_per_example(models.build_model(name, prior)) for prior in (None, *priors)}
        for key, row in rows.items():  # a "+variant" row does the products of its prior
            prior = key.split("+")[0]
            row["matmul_floor"] = macs[None if prior == "none" else prior] / macs[None]
    if verbose:
        print(f"training step, batch {batch_size}, {threads or torch.get_num_threads()} CPU threads "
              f"(median of {repeats} turns of {steps} steps)")
        print(f"{'model':<9} {'network':<18} {'step ms':>8} {'vs deterministic':>17} {'matmul floor':>13}")
        for name, rows in result.items():
            for key, row in rows.items():
                print(f"{name:<9} {key:<18} {row['step_ms']:>8.2f} {row['ratio']:>16.2f}x "
                      f"{row['matmul_floor']:>12.2f}x")
        print("+bfloat16: variance path in bfloat16; +autocast: torch.autocast(bfloat16), against none+autocast; "
              "+channels_last: NHWC layout, against none+channels_last; +onednn: oneDNN's convolution weight "
              "gradients only; none+windowed: the deterministic network with the windowed ones")
        print("matmul floor: multiply-adds of the step's matrix products over the deterministic network's "
              "(bench.matmul_macs_per_example)")
    return result


def matmul_macs_per_example(model: nn.Module, input_shape=(1, 28, 28)) -> int:
    """Multiply-adds per example in the matrix products of one training step, forward and backward.

    Each ``nn.Linear`` / ``nn.Conv2d`` does one product forward, one for its weight gradient and one
    for its input gradient, except where its input needs no gradient (the network's first layer). A
    Bayesian layer does each twice, once for the mean (``x`` with ``mu``) and once for the variance
    (``x^2`` with ``sigma^2``); a group layer whose groups are its inputs (``LinearGroupNJ``,
    ``LinearGroupHS``) needs the input gradient even as the first layer, because the sampled scales
    ``z`` multiply its inputs. The noise, the element-wise work and the optimiser are not counted, so
    the ratio of two counts is a floor that arithmetic alone puts under the ratio of step times.
    """
    forward_macs = {}  # in the order the layers run

    def record(module, inputs, output):
        positions = output.shape[2] * output.shape[3] if output.dim() == 4 else 1
        weight_numel = math.prod(module.weight_shape) if isinstance(module, BayesianLayer) else module.weight.numel()
        forward_macs[module] = weight_numel * positions

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, BayesianLayer))]
    was_training = model.training
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, dtype=dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    total = 0
    for index, (module, macs) in enumerate(forward_macs.items()):
        input_groups = isinstance(module, (LinearGroupNJ, LinearGroupHS))
        products = 2 + (index > 0 or input_groups)  # forward, weight grad, input grad
        total += macs * products * (2 if isinstance(module, BayesianLayer) else 1)
    return total


def _networks(name: str, priors, variants) -> dict[str, tuple[nn.Module, TrainConfig]]:
    """The compared networks by row name, each with the settings of :class:`TrainConfig` it trains
    with (``autocast``, ``memory_format``): ``"none"`` (deterministic), each prior, and
    ``"<row>+<variant>"`` for each of ``variants`` (:data:`VARIANTS`) that applies to it. The rows of
    ``"channels_last"``, ``"onednn"`` and ``"windowed"`` are left out for networks without
    convolutions, which they do not change."""
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants must be drawn from {VARIANTS}, got {variant!r}")
    def network(prior, variant=None) -> tuple[nn.Module, TrainConfig]:
        model = models.build_model(name, prior)
        if variant == "bfloat16":
            set_variance_dtype(model, torch.bfloat16)
        if variant == "windowed":
            for module in model.modules():
                if type(module) is nn.Conv2d:
                    module.__class__ = _WindowedGradientConv2d  # the same module, its gradients routed
        config = TrainConfig(epochs=1, device="cpu", autocast="bfloat16" if variant == "autocast" else None,
                             memory_format="channels_last" if variant == "channels_last" else None)
        return model, config

    networks = {"none": network(None)}
    # The layout applies to 4-d tensors: convolution weights and images.
    if not any(parameter.dim() == 4 for parameter in networks["none"][0].parameters()):
        variants = [variant for variant in variants if variant not in _CONVOLUTION_VARIANTS]
    for variant in variants:
        if variant in _DETERMINISTIC_VARIANTS:
            networks[f"none+{variant}"] = network(None, variant)
    for prior in priors:
        networks[prior] = network(prior)
        for variant in variants:
            if variant != "windowed":
                networks[f"{prior}+{variant}"] = network(prior, variant)
    return networks


class _WindowedGradientConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose gradients come from :func:`bclib.layers.conv_gradient.conv2d` (the
    ``"windowed"`` rows): zero padding given as ints and one group, as LeNet-5-Caffe's."""

    def _conv_forward(self, input, weight, bias):
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("the windowed rows need convolutions of one group with zero padding given as ints")
        return conv_gradient.conv2d(input, weight, bias, self.stride, self.padding, self.dilation)


def _weight_gradient_route(row: str):
    """Where a row's convolution weight gradients come from while it is timed: all from oneDNN for
    the ``"onednn"`` rows, as the layers choose otherwise."""
    return (conv_gradient.windowed_weight_gradients(False) if row.endswith("+onednn")
            else contextlib.nullcontext())


def _baseline(row: str) -> str:
    """The deterministic row a row's ratio is taken against (the same precision and layout)."""
    variant = row.partition("+")[2]
    return f"none+{variant}" if variant in _BASELINE_VARIANTS else "none"


def _time_train_steps(steps, repeats, batch_size, priors, model_names, variants) -> dict:
    keep_freed_memory()  # as fit does on CPU
    torch.manual_seed(0)
    x = torch.rand(batch_size, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (batch_size,))
    result = {}
    for name in model_names:
        steppers = {key: _train_step(model, x, y, config)
                    for key, (model, config) in _networks(name, priors, variants).items()}
        times: dict[str, list[float]] = {key: [] for key in steppers}
        for key, stepper in steppers.items():
            with _weight_gradient_route(key):
                stepper()  # warm-up
        for _ in range(repeats):
            for key, stepper in steppers.items():
                with _weight_gradient_route(key):
                    start = time.perf_counter()
                    for _ in range(steps):
                        stepper()
                    times[key].append((time.perf_counter() - start) / steps)
        medians = {key: statistics.median(values) for key, values in times.items()}
        result[name] = {key: {"step_ms": 1e3 * value, "ratio": value / medians[_baseline(key)]}
                        for key, value in medians.items()}
    return result


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig | None = None):
    """One training step of ``model`` as :func:`bclib.train.fit` does it, with ``config``'s
    ``autocast`` and ``memory_format`` (default: neither)."""
    config = config or TrainConfig()
    autocast = config.autocast is not None
    _to_memory_format(model, config.memory_format)
    x = _batch_in_memory_format(x, config.memory_format)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    layers = [layer for _, layer in bayesian_layers(model)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if layers:
            loss = loss + kl_divergence(model) / 60000
        loss.backward()
        optimizer.step()
        for layer in layers:
            layer.clip_variances()

    return step


# The project's epoch-time targets on a 2-core CPU (the release took 14.9 s and 58.5 s).
EPOCH_SECONDS_TARGETS = {"lenet300": 3.0, "lenet5": 25.0}


def run_epoch_bench(data_root=None, *, model_names=("lenet300", "lenet5"), prior: str = "nj",
                    variants=VARIANTS, train_examples: int | None = None,
                    threads: int | None = None, verbose: bool = True) -> dict:
    """Seconds of one training epoch on real MNIST with :func:`bclib.train.fit`, per model: the
    deterministic network and the ``prior`` network in float32 and in each of ``variants`` (as
    :func:`run_layers_bench`; ``"autocast"`` trains with ``TrainConfig(autocast="bfloat16")``,
    ``"channels_last"`` with ``TrainConfig(memory_format="channels_last")``).

    One epoch each, one after the other in one process (an epoch is long enough that the
    order matters little). ``train_examples`` shortens the epoch (the tests use it); the
    seconds are then scaled to the 60,000 examples of a full epoch. Evaluation on the test set is
    part of an epoch of ``fit``, as in the runs.

    Returns:
        ``{model: {row: {"seconds", "ratio"}}, "targets": {model: seconds}}`` (ratio: to the
        deterministic network of the same precision and layout).
    """
    from .data import load_mnist
    from .train import fit

    train, test = load_mnist(data_root)
    full = len(train)
    if train_examples is not None:
        train, test = train.subset(train_examples), test.subset(max(1, train_examples // 6))
    result: dict = {"targets": {name: EPOCH_SECONDS_TARGETS[name] for name in model_names}}
    with _cpu_threads(threads):
        for name in model_names:
            rows = {}
            for key, (model, config) in _networks(name, (prior,), variants).items():
                with _weight_gradient_route(key):
                    seconds = fit(model, train, test, config, progress=False)[0]["seconds"]
                rows[key] = {"seconds": seconds * full / len(train)}
            for key, row in rows.items():
                row["ratio"] = row["seconds"] / rows[_baseline(key)]["seconds"]
            result[name] = rows
    if verbose:
        print(f"one training epoch on MNIST, {threads or torch.get_num_threads()} CPU threads")
        print(f"{'model':<9} {'network':<18} {'seconds':>8} {'vs deterministic':>17} {'target':>7}")
        for name in model_names:
            for key, row in result[name].items():
                print(f"{name:<9} {key:<18} {row['seconds']:>8.1f} {row['ratio']:>16.2f}x "
                      f"{result['targets'][name]:>6.0f}s")
    return result


def write_bench_results(path, results: dict, command: str, threads: int | None = None) -> None:
    """Write benchmark ``results`` as JSON with what they depend on: the command, the CPU, the thread
    count the benchmarks ran with (``None``: PyTorch's current setting) and the PyTorch version
    (the book reads these files; numbers are never typed in)."""
    from .experiments import write_json

    write_json(path, {
        "command": command,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    })


CPU_INFO = Path("/proc/cpuinfo")


def _cpu_name() -> str:
    """The processor's model name, with its family and model numbers when Linux gives them: a
    virtual machine's name can be as bare as "AMD EPYC", which two processor generations share
    (timings differ between them by a fifth and more)."""
    try:
        fields = {}
        for line in CPU_INFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block ends
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
               if key in fields]
    return f"{fields['model name']} ({', '.join(numbers)})" if numbers else fields["model name"]


# Targets of the results table (error, compression after pruning, after precision) from the release's
# README, and the project's wall-time goal for reaching the BC-GHS row on a 2-core CPU.
# The Sparse VD row of that table comes from Molchanov et al., who count nonzero weights: Sparse VD
# runs show (and are judged on) our sparse rates (compression_sparse, compression_sparse_precision).
PAPER_TARGETS = {
    "lenet5_hs": (0.010, 156.0, 419.0),
    "lenet5_nj": (0.010, 108.0, 361.0),
    "lenet5_svd": (0.010, 63.0, 228.0),
    "lenet300_nj": (0.018, None, None),
    "lenet300_hs": (0.018, None, None),
}
GHS_WALL_TIME_GOAL_S = 45 * 60
# The project's goal for the file: a LeNet-5-Caffe model.bcz this many times smaller than the float32
# dense network, at no more than this error (the release's "up to 700x" was a rate, not a file).
FILE_RATIO_GOAL = (700.0, 0.010)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(entry, path: Path, what: str) -> float:
    """``entry["seconds"]``; a ValueError naming ``path`` (the file ``entry`` comes from) if ``entry``
    is not an object with a number there."""
    if not (isinstance(entry, dict) and _number(entry.get("seconds"))):
        raise ValueError(f"{str(path)!r}: {what} must be an object with a number 'seconds', got {entry!r:.80}")
    return entry["seconds"]


def _run_report(run_dir: Path) -> dict:
    """A run's ``report.json``, with the fields the training-time report uses checked: a ValueError
    naming the file for a damaged one (not a TypeError from deep inside the table)."""
    from .experiments import read_run_json

    report, path = read_run_json(run_dir, "report.json"), run_dir / "report.json"
    error = report.get("file_error", report.get("dense_error"))
    if not _number(error):
        raise ValueError(f"{str(path)!r} must hold a number 'file_error' or 'dense_error', got {error!r:.80}")
    for key in ("compression_pruning", "compression_precision", "compression_sparse",
                "compression_sparse_precision"):
        if report.get(key) is not None and not _number(report[key]):
            raise ValueError(f"{str(path)!r}: {key!r} must be a number, got {report[key]!r:.80}")
    file = report.get("file", {})
    if not (isinstance(file, dict) and (file.get("ratio") is None or _number(file["ratio"]))):
        raise ValueError(f"{str(path)!r}: 'file' must be an object with a number 'ratio', got {file!r:.80}")
    for key in ("bit_search", "layer_search"):  # whether its search predates the zero-survivor fix
        if key in report and not isinstance(report[key], dict):
            raise ValueError(f"{str(path)!r}: {key!r} must be an object, got {report[key]!r:.80}")
    return report


def _own_seconds(name: str, root: Path) -> float:
    """Seconds of a run's own epochs (a search: all its retrained candidates, every seed), not of the
    runs it starts from."""
    from .experiments import EXPERIMENTS, fine_tuning_seconds, read_run_json

    experiment, run_dir = EXPERIMENTS[name], root / name
    if experiment.refines is not None:
        report, path = _run_report(run_dir), run_dir / "report.json"
        if experiment.fine_tunes:
            analysis, analysis_path = read_run_json(run_dir, "analysis.json"), run_dir / "analysis.json"
            _seconds(report.get("fine_tuning"), path, "'fine_tuning'")
            candidates = analysis.get("candidates")
            if not (isinstance(candidates, list) and all(isinstance(c, dict) and isinstance(c.get("seeds", []), list)
                                                         for c in candidates)):
                raise ValueError(f"{str(analysis_path)!r}: 'candidates' must be a list of objects whose 'seeds' "
                                 f"are lists, got {candidates!r:.80}")
            for candidate in candidates:
                for seed in candidate.get("seeds", [])[1:]:
                    _seconds(seed, analysis_path, "each entry of a candidate's 'seeds'")
            return fine_tuning_seconds(report, analysis)
        key = ("bit_search" if experiment.lowers_bits_of else
               "group_cut" if experiment.prunes_to_groups_of else "layer_search")
        return _seconds(report.get(key), path, repr(key))
    path = run_dir / "metrics.json"
    return sum(_seconds(epoch, path, "each epoch") for epoch in read_run_json(run_dir, "metrics.json", list))


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists() and (run_dir / "report.json").exists()


def _wall_seconds(name: str, root: Path, absent: list | None = None) -> float:
    """Seconds of a run's epochs plus those of the runs it starts from or refines (all candidates of
    a fine-tuning or bits search). A base run not in ``root`` adds nothing, nor do the runs it starts
    from; its name is appended to ``absent``."""
    from .experiments import EXPERIMENTS

    experiment = EXPERIMENTS[name]
    seconds = _own_seconds(name, root)
    # A refined base's seconds are in its report.json (a search's folder gets it last); a pretraining
    # run's are in metrics.json alone.
    base = experiment.refines or experiment.init_from
    if base is None:
        return seconds
    if _finished(root / base) if experiment.refines else (root / base / "metrics.json").exists():
        return seconds + _wall_seconds(base, root, absent)
    if absent is not None:
        absent.append(base)
    return seconds


def run_training_time_report(results_root="book/results", verbose: bool = True) -> dict:
    """Wall time of each committed run (sum of its epochs' seconds, its pretraining run included; for
    a fine-tuned, layer-searched or bit-lowered run, its base runs and every retraining of every
    candidate, all seeds included; its
    own share alone in ``row["own_seconds"]``, summed over all runs in the last lines) and whether it met
    the release's targets (a refined run, or another recipe for a row, is judged on that row's:
    :func:`bclib.experiments.paper_row`); the time to the BC-GHS row is compared
    with 45 min. The Sparse VD rows are judged on the sparse rates (nonzero weights), as their
    source counts them; ``row["rates"]`` says which rates a row shows. A base run missing from
    ``results_root`` (and the runs it starts from) is left out of a row's wall time, and named in
    ``row["bases_absent"]`` and below the table; the total is of the runs there.

    This reads ``metrics.json`` / ``report.json`` of runs made by ``python -m bclib reproduce``; the
    seconds are those measured while the run trained (on whatever machine made it).
    """
    from .experiments import EXPERIMENTS, paper_row, predates_zero_survivor_fix

    root = Path(results_root)
    rows = {}
    for name, experiment in EXPERIMENTS.items():
        if not _finished(root / name):
            continue
        absent = []
        seconds = _wall_seconds(name, root, absent)
        report = _run_report(root / name)
        error = report.get("file_error", report.get("dense_error"))
        sparse = experiment.prior == "svd"
        keys = ("compression_sparse", "compression_sparse_precision") if sparse else (
            "compression_pruning", "compression_precision")
        row = {"seconds": seconds, "own_seconds": _own_seconds(name, root), "error": error, "rates": "sparse" if sparse else "dense",
               "compression_pruning": report.get(keys[0]), "compression_precision": report.get(keys[1]),
               "file_ratio": report.get("file", {}).get("ratio"),
               "before_fix": predates_zero_survivor_fix(report)}
        if absent:  # its wall time lacks these runs' (and what they start from): said below the table
            row["bases_absent"] = absent
        target = PAPER_TARGETS.get(paper_row(name))
        if target is not None:
            met = [error <= target[0]]
            met += [row[k] is not None and row[k] >= t for k, t in
                    zip(("compression_pruning", "compression_precision"), target[1:]) if t is not None]
            row["targets_met"] = all(met)
        rows[name] = row
    if not rows:  # a wrong folder would otherwise report "all 0 runs: 0.0 h"
        raise ValueError(f"results_root: no finished registered run (metrics.json and report.json) in "
                         f"{str(root.resolve())!r}")
    if verbose:
        width = max([28, *(len(name) + 2 for name in rows)])

        def label(name):
            return name + (tables.ZERO_SURVIVOR_MARK if rows[name]["before_fix"] else "")
        print(f"{'run':<{width}} {'wall min':>8} {'error %':>8} {'pruning':>8} {'precision':>10} {'rates':>6} "
              f"{'file':>7} {'targets':>8}")
        for name, row in rows.items():
            rates = [f"{row[k]:.1f}x" if row[k] else "-" for k in ("compression_pruning", "compression_precision",
                                                                  "file_ratio")]
            met = {True: "met", False: "missed"}.get(row.get("targets_met"), "-")
            print(f"{label(name):<{width}} {row['seconds'] / 60:>8.1f} {100 * row['error']:>8.2f} {rates[0]:>8} {rates[1]:>10} "
                  f"{row['rates']:>6} {rates[2]:>7} {met:>8}")
        print("rates: dense = the release's (pruned matrices stored dense); sparse = nonzero weights counted, "
              "as Molchanov et al. count Sparse VD")
        if any(row["before_fix"] for row in rows.values()):
            print(" ".join(tables.ZERO_SURVIVOR_FOOTNOTE))
        short = [f"{name} (no {', '.join(row['bases_absent'])})" for name, row in rows.items() if "bases_absent" in row]
        if short:
            print(f"wall min leaves out base runs not in {str(root)!r} and the runs they start from: "
                  f"{', '.join(short)}")
        hours = sum(row["own_seconds"] for row in rows.values()) / 3600
        print(f"all {len(rows)} runs: {hours:.1f} h of training and retraining, each run counted once "
              "(compressing and evaluating not included)")
        ghs = {name: row for name, row in rows.items() if paper_row(name) == "lenet5_hs"}
        if ghs:
            met = [name for name, row in ghs.items() if row.get("targets_met")]
            name = min(met, key=lambda n: ghs[n]["seconds"]) if met else next(iter(ghs))
            verdict = f"reached by {name}" if met else "not reached"
            print(f"BC-GHS LeNet-5 target {verdict}; wall time {ghs[name]['seconds'] / 60:.1f} min "
                  f"(goal: under {GHS_WALL_TIME_GOAL_S / 60:.0f} min)")
        goal_ratio, goal_error = FILE_RATIO_GOAL
        files = {name: row for name, row in rows.items() if name.startswith("lenet5_") and row["file_ratio"]}
        accurate = {name: row for name, row in files.items() if row["error"] <= goal_error}
        if files:
            name = max(accurate or files, key=lambda n: files[n]["file_ratio"])
            ratio, error = files[name]["file_ratio"], files[name]["error"]
            verdict = "reached" if ratio >= goal_ratio and error <= goal_error else "not reached"
            print(f"smallest LeNet-5 file{' at the goal error' if accurate else ''}: {label(name)}, {ratio:.0f}x smaller than the float32 dense network at "
                  f"{100 * error:.2f} % error (goal {goal_ratio:.0f}x at <= {100 * goal_error:.1f} %: {verdict})")
    return rows
