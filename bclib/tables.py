"""The book's result tables, as text: each function reads the committed runs' JSON (reports,
analyses, benchmark files) and returns lines of at most 80 characters, so a chapter prints a table
with one call and the numbers always come from the runs.

* :func:`release_comparison`, :func:`results_at_a_glance`, :func:`results_table`: our runs against
  the paper's table;
* :func:`retraining_against_release`, :func:`seed_spread_table`: the retraining searches;
* :func:`bit_search_table`, :func:`bit_search_steps`: the bits searches;
* :func:`pipeline_table`, :func:`cut_costs_per_weight`, :func:`layer_search_steps`, :func:`layer_search_summary`,
  :func:`selection_optimism_table`, :func:`repeated_retrainings_table`, :func:`per_weight_agreement_table`:
  the layer searches beside the other steps, how far their selection split flattered them, how far
  chance moves a retraining, and where ranking cuts per weight would change a search;
* :func:`group_cut_table`: networks cut to a given architecture (the paper's) and retrained;
* :func:`speed_table`, :func:`bench_trials_summary`: the inference benchmark;
* :func:`compression_at_offset`: what the interactive threshold explorer prints.

Figures live in :mod:`bclib.viz`.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from .compression import within_tolerance
from .experiments import SCRATCH_SEEDS, predates_zero_survivor_fix, read_run_json, search_order
from .layers.base import check_positive_int

__all__ = [
    "speed_table", "release_comparison", "results_at_a_glance", "results_table", "seed_spread_table", "bench_trials_summary",
    "retraining_against_release", "compression_at_offset", "bit_search_table", "bit_search_steps",
    "pipeline_table", "cut_costs_per_weight", "layer_search_steps", "layer_search_summary", "selection_optimism_table",
    "repeated_retrainings_table", "per_weight_agreement_table", "group_cut_table",
]


_MODEL_LABELS = {"lenet300": ("LeNet-300-100", "LeNet-300-100"), "lenet5": ("LeNet-5", "LeNet-5-Caffe")}
_PRIOR_LABELS = {"nj": "BC-GNJ", "hs": "BC-GHS", "svd": "Sparse VD"}
_DENSE_RATES = ("compression_pruning", "compression_precision")
_SPARSE_RATES = ("compression_sparse", "compression_sparse_precision")


def _split_run_name(name: str) -> tuple[str, str]:
    """``("lenet5", "nj")`` from ``"lenet5_nj"`` or ``"lenet5_nj_ft"``."""
    parts = str(name).split("_")
    if len(parts) < 2 or parts[0] not in _MODEL_LABELS or parts[1] not in _PRIOR_LABELS:
        raise ValueError(f"run name must look like 'lenet5_nj' (model {sorted(_MODEL_LABELS)}, prior "
                         f"{sorted(_PRIOR_LABELS)}), got {name!r}")
    return parts[0], parts[1]


def _run_label(name: str) -> str:
    """``"LeNet-5 BC-GNJ"`` for ``"lenet5_nj"``; a variant recipe's name adds its words
    (``"LeNet-5 BC-GHS, scratch"`` for ``"lenet5_hs_scratch"``, ``"LeNet-5 BC-GNJ, seed 1"`` for
    ``"lenet5_nj_scratch_seed1"``)."""
    model, prior = _split_run_name(name)
    variant = _variant_row_label(_variant_words(name))
    return f"{_MODEL_LABELS[model][0]} {_PRIOR_LABELS[prior]}" + (f", {variant}" if variant else "")


def _variant_words(name: str) -> str:
    """What a variant recipe's name adds to its paper run's (``"scratch"`` for ``"lenet5_hs_scratch"``;
    ``""`` for a paper run)."""
    model, prior = _split_run_name(name)
    return name.removeprefix(f"{model}_{prior}").removeprefix("_").replace("_", " ")


def _variant_of(name: str, runs) -> str | None:
    """The run among ``runs`` whose recipe ``name`` varies (``"lenet5_hs"`` for ``"lenet5_hs_scratch"``),
    else None."""
    base = "_".join(_split_run_name(name))
    return base if name != base and base in runs else None


def _rate_keys(name: str) -> tuple[str, str]:
    """The rates to compare with the release: Sparse VD's count nonzero weights, as the release counts them."""
    return _SPARSE_RATES if _split_run_name(name)[1] == "svd" else _DENSE_RATES


def speed_table(result: Mapping) -> str:
    """The result of :func:`bclib.bench.run_compression_bench` as a table of at most 80 characters a line.

    The report's ``flops_*`` fields count multiply-accumulates (MACs): one per weight use.

    Args:
        result: the dict returned by ``run_compression_bench`` (or ``run_compression_bench_from_run``).

    Returns:
        The table: MACs before and after pruning, then per layout and batch size the median times,
        the pruned network's throughput, the speed-up and the speed-up over the MAC reduction (for
        a summary of several trials, their range too); then per layout the time of each module.

    Example:
        >>> result = {"architecture": "8-13-88-13", "threads": 2, "flops_before": 2_293_000,
        ...           "flops_after": 282_874, "flop_reduction": 8.106, "layers": {},
        ...           "runs": [{"layout": "contiguous", "batch": 1000, "dense_ms": 120.0,
        ...                     "pruned_ms": 30.0, "pruned_examples_per_s": 33_333.3,
        ...                     "speedup": 4.0, "speedup_over_flop_reduction": 0.4935}]}
        >>> print(speed_table(result).splitlines()[-1])
        contiguous     1000   120.000    30.000       33,333    4.00x       0.49
    """
    if not isinstance(result, Mapping) or not {"architecture", "runs", "flops_before", "flops_after"} <= set(result):
        raise ValueError("result must be the dict of bclib.bench.run_compression_bench")
    lines = [
        f"architecture {result['architecture']}; {result['threads']} CPU threads; malloc: "
        f"{'freed memory kept' if result.get('freed_memory_kept') else 'settings untouched'}",
        f"multiply-accumulates (MACs) per example: {result['flops_before']:,} -> "
        f"{result['flops_after']:,} ({result['flop_reduction']:.1f}x fewer)",
        f"{'layout':<13} {'batch':>5} {'dense ms':>9} {'pruned ms':>9} {'pruned ex/s':>12} "
        f"{'speed-up':>8} {'/ MAC cut':>11}",
    ]
    for row in result["runs"]:
        lines.append(f"{row['layout']:<13} {row['batch']:>5} {row['dense_ms']:>9.3f} {row['pruned_ms']:>9.3f} "
                     f"{row['pruned_examples_per_s']:>12,.0f} {row['speedup']:>7.2f}x "
                     f"{row['speedup_over_flop_reduction']:>11.2f}")
    if "trials" in result:  # bench.run_compression_trials: medians, and the range over the trials
        lines += ["", f"medians of {len(result['trials'])} trials (fresh processes); speed-up / MAC cut over them:",
                  f"{'layout':<13} {'batch':>5} {'min':>6} {'median':>6} {'max':>6}"]
        for row in result["runs"]:
            low, high = row["speedup_over_flop_reduction_range"]
            lines.append(f"{row['layout']:<13} {row['batch']:>5} {low:>6.2f} "
                         f"{row['speedup_over_flop_reduction']:>6.2f} {high:>6.2f}")
    if result.get("layers") and not result.get("runs"):
        raise ValueError("result has per-module timings but no runs: pass a result of bclib.bench.run_compression_bench")
    for layout, rows in result.get("layers", {}).items():
        batch = max(row["batch"] for row in result["runs"])
        lines += ["", f"per module, {layout}, batch {batch} (each timed alone)",
                  f"{'module':<22}  {'dense ms':>9}  {'pruned ms':>9}  {'share of pruned':>15}"]
        total = sum(row["pruned_ms"] for row in rows)
        for row in rows:
            lines.append(f"{row['layer']:<22}  {row['dense_ms']:>9.3f}  {row['pruned_ms']:>9.3f}  "
                         f"{row['pruned_ms'] / total:>15.0%}")
    return "\n".join(lines)


def _release_checks(report: Mapping, name: str, target: Sequence, error_key: str) -> list[tuple[str, str, bool]]:
    """``(ours, the release's, met)`` for the error (``report[error_key]``) and the two rates of run
    ``name`` against its ``target`` (error, after pruning, after precision); Sparse VD by its sparse rates."""
    (error, pruning, precision), keys = target, _rate_keys(name)
    return [(f"error {100 * report[error_key]:.2f} %", f"{100 * error:.1f} %", report[error_key] <= error),
            (f"compression {report[keys[0]]:.1f}x", f"{pruning:g}x", report[keys[0]] >= pruning),
            (f"after precision {report[keys[1]]:.1f}x", f"{precision:g}x", report[keys[1]] >= precision)]


def release_comparison(reports: Mapping[str, Mapping], targets: Mapping[str, Sequence]) -> str:
    """Our LeNet-5 rows (paper's pipeline) under the release's, and where ours fall short.

    Args:
        reports: ``report.json`` of each run by name (``"lenet5_nj"``, ...).
        targets: the release's ``(error, after pruning, after precision)`` by run name, the error
            as a fraction (:data:`bclib.bench.PAPER_TARGETS`); runs without rates are skipped.

    Returns:
        The table (error %, both dense rates and both sparse rates), then per run the numbers on
        which it falls short of the release. Sparse VD is compared by its sparse rates, which
        count nonzero weights as the release's Sparse VD row does.

    Example:
        >>> report = {"precision_error": 0.0141, "compression_pruning": 78.7,
        ...           "compression_precision": 320.4, "compression_sparse": 78.7,
        ...           "compression_sparse_precision": 320.4}
        >>> print(release_comparison({"lenet5_nj": report}, {"lenet5_nj": (0.01, 108.0, 361.0)}))
        LeNet-5-Caffe error % pruning precision sparse sparse,prec.
        BC-GNJ (release) 1.0 108x 361x
        BC-GNJ (ours) 1.41 78.7x 320.4x 78.7x 320.4x
        <BLANKLINE>
        LeNet-5 BC-GNJ, short of the release in:
          error 1.41 % vs 1.0 %
          compression 78.7x vs 108x
          after precision 320.4x vs 361x
    """
    names = [name for name in reports if name in targets and None not in tuple(targets[name])[1:]]
    lines = [f"{'LeNet-5-Caffe':<21} {'error %':>7} {'pruning':>8} {'precision':>9} {'sparse':>8} {'sparse,prec.':>12}"]
    for name in names:
        error, pruning, precision = targets[name]
        method, r = _PRIOR_LABELS[_split_run_name(name)[1]], reports[name]
        lines.append(f"{method + ' (release)':<21} {100 * error:>7.1f} {pruning:>7g}x {precision:>8g}x")
        lines.append(f"{method + ' (ours)':<21} {100 * r['precision_error']:>7.2f} {r['compression_pruning']:>7.1f}x "
                     f"{r['compression_precision']:>8.1f}x {r['compression_sparse']:>7.1f}x "
                     f"{r['compression_sparse_precision']:>11.1f}x")
    lines.append("")
    for name in names:
        checks = _release_checks(reports[name], name, targets[name], "precision_error")
        shortfalls = [f"{ours} vs {theirs}" for ours, theirs, met in checks if not met]
        if shortfalls:
            lines.append(f"{_run_label(name)}, short of the release in:")
            lines += [f"  {shortfall}" for shortfall in shortfalls]
        else:
            lines.append(f"{_run_label(name)}: at or beyond the release on all three numbers")
    return "\n".join(lines)


def results_at_a_glance(reports: Mapping[str, Mapping], retrained: Mapping[str, Mapping],
                        targets: Mapping[str, Sequence], lowered: Mapping[str, Mapping] | None = None,
                        layered: Mapping[str, Mapping] | None = None) -> str:
    """Per model and prior: the paper's (release's) numbers, ours with the paper's pipeline, ours retrained.

    Args:
        reports: ``report.json`` of each base run by name (``"lenet300_nj"``, ``"lenet5_hs"``, ...).
            A run whose name extends another's (``"lenet5_hs_scratch"``: another recipe for that row)
            is shown under it with its steps, named by the extension ("scratch + retraining", ...).
        retrained: ``report.json`` of the retrained runs by name (``"lenet5_hs_ft"``, ...); a base
            run without one gets no retrained row.
        lowered: ``report.json`` of the bit-lowered runs by name (``"lenet5_hs_ft_bits"``,
            ``"lenet5_hs_layers_bits"``, ...), a row "+ fewer bits" under the run they start from.
        layered: ``report.json`` of the layer-searched runs by name (``"lenet5_hs_layers"``,
            ``"lenet5_hs_layers_3seeds_tol2"``, ...): a row each, in this order, named by its search
            ("ours + layer search", "ours + 3 seeds, 0.2 pts", ...), its bits row under it.
        targets: the paper's ``(error, after pruning, after precision)`` by base run name, error as a
            fraction, ``None`` for a number the constants do not hold (:data:`bclib.bench.PAPER_TARGETS`).

    Returns:
        One block per model, a row per prior and step: error of the compressed file in %, compression
        after pruning and after precision, and the file ratio (``model.bcz`` against the float32
        dense network). Sparse VD rows give the sparse rates (nonzero weights), as the release's
        Sparse VD row counts them. ``-``: not known.

    Example:
        >>> report = {"file_error": 0.0141, "compression_pruning": 78.7,
        ...           "compression_precision": 320.4, "file": {"ratio": 526.0}}
        >>> table = results_at_a_glance({"lenet5_nj": report}, {}, {"lenet5_nj": (0.01, 108.0, 361.0)})
        >>> print(table.splitlines()[1])
        BC-GNJ     paper                               1.00     108x       361x      -
    """
    def cells(error, pruning, precision, ratio, rate_format=".1f"):
        return (f"{'-' if error is None else f'{100 * error:.2f}':>7} "
                f"{'-' if pruning is None else f'{pruning:{rate_format}}x':>8} "
                f"{'-' if precision is None else f'{precision:{rate_format}}x':>10} "
                f"{'-' if ratio is None else f'{ratio:.0f}x':>6}")

    lowered, layered = lowered or {}, layered or {}
    # 32 characters fit a variant's label and a search's ("shared seed 1 + 3 seeds, 0.2 pts") in a
    # 78-character row.
    label_width = 32

    def steps(name: str, who: str) -> list[tuple[str, Mapping | None]]:
        found = [(who, reports[name]), (f"{who} + retraining", retrained.get(f"{name}_ft")),
                 ("  + fewer bits" if f"{name}_ft" in retrained else "retraining + bits",
                  lowered.get(f"{name}_ft_bits"))]
        if f"{name}_layers" not in layered:  # bits lowered from a search not shown
            found.append(("layer search + bits", lowered.get(f"{name}_layers_bits")))
        for search in (search for search in layered if _refinement(search)[0] == name):
            found += [(f"{who} + {_refinement(search)[2]}", layered[search]),
                      ("  + fewer bits", lowered.get(f"{search}_bits"))]
        return found

    lines = []
    for model, (_, model_label) in _MODEL_LABELS.items():
        names = [name for name in reports if _split_run_name(name)[0] == model and _variant_of(name, reports) is None]
        if not names:
            continue
        if lines:
            lines.append("")
        lines.append(f"{model_label:<{11 + label_width}} {'error %':>7} {'pruning':>8} {'precision':>10} {'file':>6}")
        for name in names:
            prior = _PRIOR_LABELS[_split_run_name(name)[1]]
            keys = _rate_keys(name)
            target = tuple(targets.get(name, (None, None, None)))
            rows = [("paper", cells(*target, None, rate_format="g"))]
            found = steps(name, "ours")
            for variant in (variant for variant in reports if _variant_of(variant, reports) == name):
                found += steps(variant, _variant_row_label(_variant_words(variant)))
            for label, r in found:
                if r is not None:
                    rows.append((label, cells(r["file_error"], r[keys[0]], r[keys[1]], r["file"]["ratio"])
                                 + zero_survivor_mark(r)))
            for k, (label, text) in enumerate(rows):
                lines.append(f"{prior if k == 0 else '':<10} {label:<{label_width}} {text}")
    lines += ["", "paper: the paper's and release's table; -: a number not quoted in this book.",
              "error: of the compressed file on the test set; file: model.bcz against the",
              "float32 dense network."]
    if any(line.endswith(ZERO_SURVIVOR_MARK) for line in lines):
        lines += ZERO_SURVIVOR_FOOTNOTE
    variants = sorted({_variant_words(name) for name in reports if _variant_of(name, reports)})
    lines += [f"{_variant_row_label(variant)}: {_VARIANT_NOTES[variant]}" for variant in variants
              if variant in _VARIANT_NOTES]
    shown = {_refinement(name)[2] for name in layered}
    lines += [note for short, note in _SEARCH_NOTES.items() if short in shown]
    if any(_split_run_name(name)[1] == "svd" for name in reports):
        lines.append("Sparse VD: sparse rates (nonzero weights counted), as the release counts them.")
    return "\n".join(lines)


# What marks a row or run retrained before fine_tune trained the survivors a file stores as 0, and
# the footnote that says so, in every table that shows such runs.
ZERO_SURVIVOR_MARK = " *"
ZERO_SURVIVOR_FOOTNOTE = ("*: retrained before fine_tune trained the surviving weights its file stores as",
                          "0 (it held them at 0)")


def zero_survivor_mark(report: Mapping) -> str:
    """``" *"`` for a report of a search made before the zero-survivor fix
    (:func:`bclib.experiments.predates_zero_survivor_fix`), else ``""``."""
    return ZERO_SURVIVOR_MARK if predates_zero_survivor_fix(report) else ""


# The runs the results table at a glance shows, in the book's order, and the layer searches it
# shows of each (one seed; three seeds with the 0.2-point allowance, taking the cut of least error or
# of least error per weight; three seeds up to 0.9 % on a held-out split), each with its bits search.
GLANCE_RUNS = ("lenet300_nj", "lenet300_hs", "lenet300_svd", "lenet5_svd", "lenet5_nj", "lenet5_hs")
# Runs of another recipe for a row of GLANCE_RUNS, shown under it, and what the words each name adds mean.
GLANCE_VARIANTS = ("lenet5_hs_scratch", "lenet5_hs_scratch_seed1", "lenet5_hs_scratch_shared",
                   "lenet5_hs_scratch_shared_seed1", "lenet5_nj_scratch",
                   *(f"lenet5_nj_scratch_seed{seed}" for seed in SCRATCH_SEEDS), "lenet5_nj_heldout")
_VARIANT_NOTES = {"scratch": "trained from scratch, not from the pretrained network (chapter 4).",
                  **{f"scratch seed{seed}": f"the same recipe as scratch, with seed {seed} (chapter 4)."
                     for seed in SCRATCH_SEEDS},
                  "scratch shared": "scratch with one global scale for all layers, not one per layer.",
                  "scratch shared seed1": "shared, with seed 1 (chapter 4).",
                  "heldout": "scratch without the selection split; 0.9 %: a cut's error limit there."}
# Row labels of variants whose words would not fit the label column beside a search's name.
_VARIANT_ROW_LABELS = {**{f"scratch seed{seed}": f"seed {seed}" for seed in SCRATCH_SEEDS},
                       "scratch shared": "shared", "scratch shared seed1": "shared seed 1", "heldout": "held out"}
GLANCE_SEARCHES = ("_layers", "_layers_3seeds_tol2", "_layers_3seeds_tol2_perweight", "_layers_3seeds_max09",
                   "_paper_arch")
# Footnotes of the rows some searches add, by the search's short name (see _REFINEMENTS).
_SEARCH_NOTES = {"paper's arch.": "paper's arch.: cut to at most the paper's architecture, retrained (chapter 4)."}


def _variant_row_label(words: str) -> str:
    """How the table at a glance names a variant (``"seed 1"`` for ``"scratch seed1"``)."""
    return _VARIANT_ROW_LABELS.get(words, words)


def results_table(results_root: str | os.PathLike = "book/results") -> str:
    """:func:`results_at_a_glance` of the runs in a results folder: what ``python -m bclib results``
    prints and the README shows.

    Reads ``<results_root>/<run>/report.json`` for each run of :data:`GLANCE_RUNS` and
    :data:`GLANCE_VARIANTS` and, where present, its retraining (``_ft``), the layer searches of
    :data:`GLANCE_SEARCHES` and their bits searches (``_bits``); a run without a report is left out. The paper's numbers are
    :data:`bclib.bench.PAPER_TARGETS`.

    Raises:
        ValueError: when the folder holds no report of any run of :data:`GLANCE_RUNS`.
    """
    from .bench import PAPER_TARGETS  # bench imports this module

    root = Path(results_root)

    def read(names):
        return {name: _compressed_report(root / name) for name in names if (root / name / "report.json").is_file()}

    reports = read(GLANCE_RUNS)
    if not reports:
        raise ValueError(f"results_root: no report.json of any of {', '.join(GLANCE_RUNS)} in {str(root.resolve())!r}")
    reports.update(read(GLANCE_VARIANTS))
    searches = [f"{name}{search}" for name in reports for search in GLANCE_SEARCHES]
    return results_at_a_glance(reports, read(f"{name}_ft" for name in reports), PAPER_TARGETS,
                               read(f"{name}_bits" for name in [f"{base}_ft" for base in reports] + searches),
                               read(searches))


def _compressed_report(run_dir: Path) -> dict:
    """A compressed run's ``report.json`` (what the table at a glance prints), checked: a ValueError
    naming the file when it holds no object with the error, both rates and the file's ratio."""
    report = read_run_json(run_dir, "report.json")
    file = report.get("file")
    missing = [key for key in ("file_error", "compression_pruning", "compression_precision") if key not in report]
    if not isinstance(file, dict) or "ratio" not in file:
        missing.append("file.ratio")
    if missing:
        raise ValueError(f"{str(run_dir / 'report.json')!r} is no compressed run's report: it lacks {', '.join(missing)}")
    return report


def seed_spread_table(analyses: Mapping[str, Mapping], targets: Mapping[str, Sequence]) -> str:
    """The retraining searches' candidates retrained with three seeds, and what the seeds change.

    Args:
        analyses: ``analysis.json`` of each retrained run by name (``"lenet5_nj_ft"``, ...): its
            ``"candidates"`` (those retrained with more seeds carry ``"seeds"``) and the kept ``"offset"``.
        targets: the release's ``(error, after pruning, after precision)`` by base run name
            (:data:`bclib.bench.PAPER_TARGETS`).

    Returns:
        Per retrained run the kept and the first rejected candidate with the selection and test
        errors of each seed (at most 80 characters a line for run names of up to 20); the number of searches whose kept and rejected test errors overlap
        across seeds; and for the LeNet-5 group priors whether the rejected candidate reaches the
        release's rates and for how many seeds its test error is at most the release's.

    Example:
        >>> seeds = [{"selection_error": 0.007, "test_error": 0.009}] * 3
        >>> analysis = {"offset": 0.0, "candidates": [
        ...     {"offset": 0.0, "architecture": "9-16-93-16", "seeds": seeds},
        ...     {"offset": -0.25, "architecture": "9-13-69-14", "seeds": seeds,
        ...      "compression_pruning": 101.2, "compression_precision": 401.9}]}
        >>> print(seed_spread_table({"lenet5_nj_ft": analysis}, {"lenet5_nj": (0.01, 108.0, 361.0)})
        ...       .splitlines()[-1])
          release's rates not reached; test error <= 1.0 % for 3 of 3 seeds
    """
    width = max([15, *map(len, analyses)])  # the run column widens to the longest name
    lines = [f"{'run':<{width}} {'offset':>6} {'architecture':>12} {'':<8} {'selection %':>14}  {'test %':>14}",
             f"{'':<{width + 29}} {'(seeds 0 1 2)':>14}  {'(seeds 0 1 2)':>14}"]
    overlapping = 0
    for name, analysis in analyses.items():
        spread = []
        for row in analysis["candidates"]:
            if "seeds" not in row:
                continue
            status = "kept" if row["offset"] == analysis["offset"] else "rejected"
            errors = {key: " ".join(f"{100 * seed[key]:.2f}" for seed in row["seeds"])
                      for key in ("selection_error", "test_error")}
            lines.append(f"{name:<{width}} {row['offset']:>+6.2f} {row['architecture']:>12} {status:<8} "
                         f"{errors['selection_error']:>14}  {errors['test_error']:>14}")
            tests = [seed["test_error"] for seed in row["seeds"]]
            spread.append((min(tests), max(tests)))
        if len(spread) == 2:  # the kept and the rejected candidate's test errors
            (kept_low, kept_high), (rejected_low, rejected_high) = spread
            overlapping += kept_low <= rejected_high and rejected_low <= kept_high
    lines += ["", f"test errors of kept and rejected overlap across seeds in {overlapping} of "
                  f"{len(analyses)} searches", ""]
    for name, analysis in analyses.items():
        base = name.removesuffix("_ft")
        model, prior = _split_run_name(base)
        if model != "lenet5" or prior == "svd" or base not in targets:
            continue
        rejected = [row for row in analysis["candidates"] if "seeds" in row and row["offset"] != analysis["offset"]]
        if not rejected:
            lines.append(f"{_run_label(base)}: the search rejected no candidate")
            continue
        row, (error, pruning, precision) = rejected[0], targets[base]
        tests = [100 * seed["test_error"] for seed in row["seeds"]]
        rates = row["compression_pruning"] >= pruning and row["compression_precision"] >= precision
        below = sum(test <= 100 * error for test in tests)
        lines.append(f"{_run_label(base)}, rejected {row['architecture']}: {row['compression_pruning']:.1f}x / "
                     f"{row['compression_precision']:.1f}x")
        lines.append(f"  release's rates {'reached' if rates else 'not reached'}; test error <= {100 * error:.1f} % "
                     f"for {below} of {len(tests)} seeds")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines)


# The steps that refine a paper run, by the suffix of the run's name (no suffix ends with another): the
# steps after the paper run, and their short name in pipeline_table.
_REFINEMENTS = (("_layers_3seeds_tol2_perweight_bits", "+ 3-seed search, 0.2 points, per weight, fewer bits",
                 "  + fewer bits"),
                ("_layers_3seeds_tol2_perweight", "+ 3-seed search, 0.2 points, per weight", "per weight, 0.2"),
                ("_layers_bits", "+ layer search, fewer bits", "  + fewer bits"),
                ("_layers_3seeds_tol2_bits", "+ 3-seed search, 0.2 points, fewer bits", "  + fewer bits"),
                ("_layers_3seeds_max09_bits", "+ 3-seed search, at most 0.9 %, fewer bits", "  + fewer bits"),
                ("_ft_bits", "+ retraining, fewer bits", "  + fewer bits"),
                ("_layers_3seeds_most", "+ layer search, 3 seeds, largest cuts", "3 seeds, largest"),
                ("_layers_3seeds_tol2", "+ 3-seed search, 0.2 points", "3 seeds, 0.2 pts"),
                ("_layers_3seeds_max09", "+ 3-seed search, at most 0.9 %", "3 seeds, 0.9 %"),
                ("_layers_3seeds", "+ layer search, 3 seeds", "search, 3 seeds"),
                ("_layers", "+ layer search", "layer search"),
                ("_paper_arch_bits", "+ cut to the paper's architecture, fewer bits", "  + fewer bits"),
                ("_paper_arch_reinit", "+ cut to the paper's architecture, fresh weights", "fresh weights"),
                ("_paper_arch", "+ cut to the paper's architecture", "paper's arch."),
                ("_ft", "+ retraining", "uniform offset"))


def _refinement(name: str) -> tuple[str, str, str]:
    """``("lenet5_nj", "+ retraining, fewer bits", "  + fewer bits")`` for ``"lenet5_nj_ft_bits"``: the
    paper run, the steps after it and their short name (``"paper pipeline"`` for the paper run)."""
    for suffix, steps, short in _REFINEMENTS:
        if name.endswith(suffix):
            return name.removesuffix(suffix), steps, short
    return name, "", "paper pipeline"


def retraining_against_release(reports: Mapping[str, Mapping], targets: Mapping[str, Sequence],
                               file_goal: tuple[float, float]) -> str:
    """The retrained LeNet-5 runs against the release's numbers, and the smallest accurate file.

    Args:
        reports: ``report.json`` of each retrained run by name (``"lenet5_nj_ft"``, ...; bit-lowered
            ones, ``"lenet5_nj_ft_bits"``, too).
        targets: the release's ``(error, after pruning, after precision)`` by base run name;
            runs whose base has no rates there are skipped.
        file_goal: ``(ratio, error)``: the file ratio sought at no more than that error
            (:data:`bclib.bench.FILE_RATIO_GOAL`).

    Returns:
        Per run "met" or "short" for the error and the two rates (Sparse VD by its sparse rates),
        then the smallest retrained LeNet-5 file within the goal's error and whether it reaches
        the goal's ratio. A run whose search predates the zero-survivor fix is marked ``*``
        (:func:`bclib.experiments.predates_zero_survivor_fix`).

    Example:
        >>> report = {"file_error": 0.0093, "compression_pruning": 78.7,
        ...           "compression_precision": 320.4, "file": {"ratio": 507.0}}
        >>> text = retraining_against_release({"lenet5_nj_ft": report},
        ...                                   {"lenet5_nj": (0.01, 108.0, 361.0)}, (700.0, 0.01))
        >>> print(text.splitlines()[1])
          error 0.93 % vs 1.0 %: met
    """
    lines = []
    for name, r in reports.items():
        base, steps, _ = _refinement(name)
        if base not in targets or None in tuple(targets[base])[1:]:
            continue
        checks = _release_checks(r, base, targets[base], "file_error")
        lines += textwrap.wrap(f"{_run_label(base)} {steps}, against the release{zero_survivor_mark(r)}:", 80)
        lines += [f"  {ours} vs {theirs}: {'met' if met else 'short'}" for ours, theirs, met in checks]
    goal_ratio, goal_error = file_goal
    accurate = {name: r for name, r in reports.items()
                if _split_run_name(name)[0] == "lenet5" and r["file_error"] <= goal_error}
    if accurate:
        best = max(accurate, key=lambda name: accurate[name]["file"]["ratio"])
        ratio = accurate[best]["file"]["ratio"]
        verdict = "reached" if ratio >= goal_ratio else "not reached"
        lines += ["", f"smallest retrained LeNet-5 file at <= {100 * goal_error:.1f} % error:",
                  f"{best}:", f"{ratio:.0f}x smaller than the float32 dense network (goal {goal_ratio:.0f}x: {verdict})"]
    else:
        lines += ["", f"no retrained LeNet-5 file at <= {100 * goal_error:.1f} % error"]
    if any(zero_survivor_mark(r) for r in reports.values()):
        lines += ["", *ZERO_SURVIVOR_FOOTNOTE]
    return "\n".join(lines)


def bench_trials_summary(measured: Mapping[str, Mapping], target: float) -> str:
    """The committed compression benchmarks (``python -m bclib bench compression --out FILE``), side by side.

    Args:
        measured: the JSON of each benchmark file by file name, in the order to show them.
        target: the speed-up over the MAC ("FLOP") reduction sought at batch 1000
            (:data:`bclib.bench.SPEEDUP_OVER_FLOP_TARGET`), judged on the median over the trials.

    Returns:
        Per file the command, machine and allocator setting, then per layout and batch size the
        median speed-up, its ratio to the MAC reduction with the range over the trials, and
        "met"/"missed" at batch 1000; last, where one file kept freed memory and another with the
        same threads did not, the compiled ratio at batch 1000 of both.

    Example:
        >>> row = {"layout": "compiled", "batch": 1000, "speedup": 4.7, "speedup_over_flop_reduction": 0.75}
        >>> result = {"threads": 2, "architecture": "9-16-93-16", "flop_reduction": 6.3, "runs": [row]}
        >>> measured = {"cpu": "x86", "torch": "2.5", "command": "python -m bclib bench compression",
        ...             "results": {"compression": result}}
        >>> print(bench_trials_summary({"a.json": measured}, 0.8).splitlines()[-1])
        compiled        1000     4.70x        0.75   0.75-0.75 missed
    """
    lines, compiled = [], {}
    for file_name, data in measured.items():
        result = data["results"]["compression"]
        kept = result.get("freed_memory_kept", False)
        if lines:
            lines.append("")
        lines += textwrap.wrap(data["command"], 72, subsequent_indent="    ")
        lines += [f"{data['cpu']}, {result['threads']} thread(s), torch {data['torch']}",
                  "malloc: " + ("freed memory kept" if kept else "settings untouched (glibc defaults)"),
                  f"architecture {result['architecture']}, {result['flop_reduction']:.1f}x fewer FLOPs; "
                  f"medians of {len(result.get('trials', [None]))} trial(s)",
                  f"{'layout':<14} {'batch':>5} {'speed-up':>9} {'/ FLOP cut':>11} {'range':>11}"]
        for row in result["runs"]:
            ratio = row["speedup_over_flop_reduction"]
            low, high = row.get("speedup_over_flop_reduction_range", (ratio, ratio))
            verdict = ""
            if row["batch"] == 1000:  # judged on the median
                verdict = "met" if ratio >= target else "missed"
                if row["layout"] == "compiled":
                    compiled[(result["threads"], kept)] = ratio
            lines.append(f"{row['layout']:<14} {row['batch']:>5} {row['speedup']:>8.2f}x {ratio:>11.2f} "
                         f"{f'{low:.2f}-{high:.2f}':>11} {verdict}")
    pairs = [threads for threads, kept in compiled if kept and (threads, False) in compiled]
    for threads in pairs:
        lines += ["", f"compiled, batch 1000, {threads} threads: {compiled[(threads, False)]:.2f} of the FLOP cut "
                      f"with glibc's defaults,", f"{compiled[(threads, True)]:.2f} with freed memory kept"]
    return "\n".join(lines)


def compression_at_offset(model: nn.Module, thresholds: Sequence[float], x: Tensor, y: Tensor,
                          offset: float = 0.0) -> str:
    """Compress ``model`` with every threshold moved by ``offset`` and describe the result.

    What the book's interactive threshold explorer prints at each position of its slider.

    Args:
        model: a trained model with Bayesian layers.
        thresholds: the chosen log-alpha threshold of each Bayesian layer.
        x, y: the examples and labels to measure the error on (the test set).
        offset: added to every threshold.

    Returns:
        Three lines: the thresholds, the architecture and the error of the reduced-precision
        network, and the two compression rates.

    Example:
        >>> from bclib.models import lenet_300_100
        >>> text = compression_at_offset(lenet_300_100("nj"), [-3.0, -3.0, -3.0],
        ...                              torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
        >>> text.splitlines()[0]
        'thresholds [-3.0, -3.0, -3.0]'
    """
    from .compression import compress, model_error

    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise TypeError(f"offset must be a finite number, got {offset!r}")
    moved = [float(t) + offset for t in thresholds]
    result = compress(model, moved)
    error = model_error(result.reduced_precision_model(), x, y)
    r = result.report
    return (f"thresholds {[round(t, 2) for t in moved]}\n"
            f"architecture {r.architecture}, error {100 * error:.2f} %\n"
            f"compression {r.compression_pruning:.1f}x after pruning, "
            f"{r.compression_precision:.1f}x after precision")


def bit_search_table(retrained: Mapping[str, Mapping], lowered: Mapping[str, Mapping]) -> str:
    """Each retrained run beside the same network with its bits lowered (:func:`bclib.experiments.lower_bits_run`).

    Args:
        retrained: ``report.json`` of the retrained runs by name (``"lenet5_nj_ft"``, ...).
        lowered: ``report.json`` of the bit-lowered runs by name (``"lenet5_nj_ft_bits"``, ...); a
            retrained run without one gets no second row.

    Returns:
        Two rows per run: bits per layer, the after-precision rate (Sparse VD: over nonzero
        weights), the file in bytes and as a ratio to the float32 dense network, and the error of
        the file on the test set in %. Lines fit 80 characters for every run of the book.

    Example:
        >>> ft = {"layers": [{"bits": 13}, {"bits": 4}], "compression_precision": 320.4,
        ...       "file": {"bytes": 3403, "ratio": 506.7}, "file_error": 0.0093}
        >>> low = {**ft, "layers": [{"bits": 13}, {"bits": 2}], "compression_precision": 350.0,
        ...        "file": {"bytes": 2890, "ratio": 596.7}, "file_error": 0.0095}
        >>> print(bit_search_table({"lenet5_nj_ft": ft}, {"lenet5_nj_ft_bits": low}))
        run            network     bits      precision           file  error %
        LeNet-5 BC-GNJ retrained   13-4         320.4x  3,403 B  507x     0.93
                       fewer bits  13-2         350.0x  2,890 B  597x     0.95
    """
    width = max([len("run"), *(len(_run_label(name.removesuffix("_ft"))) for name in retrained)])
    lines = [f"{'run':<{width}} {'network':<11} {'bits':<9} {'precision':>9} {'file':>14} {'error %':>8}"]
    for name, report in retrained.items():
        base = name.removesuffix("_ft")
        key = _rate_keys(base)[1]
        rows = [("retrained", report), ("fewer bits", lowered.get(f"{name}_bits"))]
        for k, (label, r) in enumerate(rows):
            if r is None:
                continue
            bits = "-".join(str(layer["bits"]) for layer in r["layers"])
            file = f"{r['file']['bytes']:,} B {r['file']['ratio']:4.0f}x"
            lines.append(f"{_run_label(base) if k == 0 else '':<{width}} {label:<11} {bits:<9} {r[key]:>8.1f}x "
                         f"{file:>14} {100 * r['file_error']:>8.2f}")
    return "\n".join(lines)


def bit_search_steps(analysis: Mapping, layers: Sequence[str], labels: Mapping[str, str] | None = None) -> str:
    """The candidates of one bits search in the order they were tried, one line each.

    Args:
        analysis: ``analysis.json`` of a bit-lowered run.
        layers: the report's layer names in order (``[row["name"] for row in report["layers"]]``).
        labels: readable names by layer name (``{"0": "conv1", ...}``); default the names.

    Returns:
        Per candidate: the layer searched, the bits it tried, the bits of every layer, the error on
        the selection split and whether it was kept (within the allowed error, printed above).

    Example:
        >>> analysis = {"allowed": 0.0084, "candidates": [
        ...     {"layer": "3", "bits": [13, 2, 2, 5], "selection_error": 0.0077, "kept": True}]}
        >>> print(bit_search_steps(analysis, ["0", "3", "7", "9"], {"3": "conv2"}))
        layer    tried   all layers    selection %   (allowed 0.84 %)
        conv2        2   13-2-2-5             0.77   kept
    """
    labels = labels or {}
    layers = list(layers)
    lines = [f"{'layer':<8} {'tried':>5}   {'all layers':<12} {'selection %':>11}   "
             f"(allowed {100 * analysis['allowed']:.2f} %)"]
    for row in analysis["candidates"]:
        if row["layer"] not in layers or len(row["bits"]) != len(layers):
            raise ValueError(f"layers {layers} do not match the candidate {row}")
        tried = row["bits"][layers.index(row["layer"])]
        lines.append(f"{labels.get(row['layer'], row['layer']):<8} {tried:>5}   "
                     f"{'-'.join(map(str, row['bits'])):<12} {100 * row['selection_error']:>11.2f}   "
                     f"{'kept' if row['kept'] else 'over'}")
    return "\n".join(lines)


def training_end_table(runs: Mapping[str, object], tail: int = 50) -> str:
    """How Bayesian trainings ended, side by side: the test error of the unpruned posterior mean at the
    end, its mean over the last ``tail`` epochs (one epoch's error moves by a few hundredths of a
    point), and the final KL.

    Args:
        runs: per row label, a run read back (:class:`bclib.experiments.RunResult`): its ``report``
            (``"dense_error"``) and ``metrics`` (per-epoch ``"test_error"`` and ``"kl"``). The label
            column widens to the longest label.
        tail: how many final epochs the mean covers (at most the shortest run's, as the header says).

    Example:
        >>> from types import SimpleNamespace
        >>> run = SimpleNamespace(report={"dense_error": 0.0093}, metrics=[
        ...     {"test_error": 0.0100, "kl": 6100.0}, {"test_error": 0.0090, "kl": 6021.8}])
        >>> print(training_end_table({"BC-GHS from scratch": run}, tail=2))
        test error before pruning    at the end   mean of last 2   final KL
        BC-GHS from scratch              0.93 %           0.95 %      6,022
    """
    check_positive_int("tail", tail)
    tail = min([tail, *(len(run.metrics) for run in runs.values())])  # what the header says is what is averaged
    width = max([28, *map(len, runs)])
    lines = [f"{'test error before pruning':<{width}} {'at the end':>10} {f'mean of last {tail}':>16} {'final KL':>10}"]
    for label, run in runs.items():
        last = [row["test_error"] for row in run.metrics[-tail:]]
        lines.append(f"{label:<{width}} {100 * run.report['dense_error']:>8.2f} % {100 * sum(last) / len(last):>14.2f} % "
                     f"{run.metrics[-1]['kl']:>10,.0f}")
    return "\n".join(lines)


def pipeline_table(reports: Mapping[str, Mapping]) -> str:
    """Runs of the same network side by side: the paper's pipeline and the steps after it.

    Args:
        reports: ``report.json`` by run name, in the order to print (``"lenet5_hs"``,
            ``"lenet5_hs_ft"``, ``"lenet5_hs_layers"``, ``"lenet5_hs_layers_bits"``, ...).

    Returns:
        A line naming each network, then one row per run: the step ("uniform offset":
        :func:`bclib.experiments.fine_tune_run`; "layer search":
        :func:`bclib.experiments.prune_layers_run`; "search, 3 seeds": the same with every
        candidate ranked by the mean of three retrainings; "3 seeds, largest": the same, each step
        taking the cut that prunes most within the allowed error; "+ fewer bits":
        :func:`bclib.experiments.lower_bits_run` on the row above it), the architecture, compression
        after pruning and after precision (Sparse VD: over nonzero weights), the file against the
        float32 dense network and its test error in %.

    Example:
        >>> base = {"architecture": "9-16-93-16", "compression_pruning": 78.7,
        ...         "compression_precision": 320.4, "file": {"ratio": 526.0}, "file_error": 0.0141}
        >>> print(pipeline_table({"lenet5_nj": base}))
        step                architecture  pruning  precision   file  error %
        LeNet-5 BC-GNJ
          paper pipeline      9-16-93-16    78.7x     320.4x   526x     1.41
    """
    lines = [f"{'step':<19} {'architecture':>12} {'pruning':>8} {'precision':>10} {'file':>6} {'error %':>8}"]
    previous = None
    for name, r in reports.items():
        base, _, step = _refinement(name)
        if base != previous:
            lines.append(_run_label(base))
        keys = _rate_keys(base)
        lines.append(f"  {step:<17} {r['architecture']:>12} {r[keys[0]]:>7.1f}x {r[keys[1]]:>9.1f}x "
                     f"{r['file']['ratio']:>5.0f}x {100 * r['file_error']:>8.2f}")
        previous = base
    return "\n".join(lines)


def cut_costs_per_weight(analysis: Mapping, weights: int) -> dict[int, float]:
    """What each cut of a layer search cost in selection error per weight it removed.

    A cut at step ``s`` works on the network the search took at step ``s - 1`` (the base network at
    step 1). With ``W`` the dense network's weights and ``c`` a network's compression after pruning,
    it keeps ``W / c`` weights, so a cut removes ``W / c_before - W / c_cut`` and costs

    .. math:: 1000 \\cdot \\frac{100\\,(e_{cut} - e_{before})}{W / c_{before} - W / c_{cut}}

    points of selection error per 1,000 weights removed: the quantity the rule
    ``take="least_error_per_weight"`` of :func:`bclib.experiments.prune_layers_run` ranks by.

    Args:
        analysis: ``analysis.json`` of a layer-searched run: ``"candidates"``, each with ``"step"``,
            ``"layer"`` (None for the base network), ``"selection_error"``, ``"compression_pruning"``
            and ``"taken"``.
        weights: the dense network's weight count (the sum of the report's ``weights_total``).

    Returns:
        The cost by the candidate's index in ``"candidates"``, for every cut (not the base network).

    Example:
        >>> analysis = {"candidates": [
        ...     {"step": 0, "layer": None, "selection_error": 0.0070, "compression_pruning": 50.0,
        ...      "taken": True},
        ...     {"step": 1, "layer": "3", "selection_error": 0.0078, "compression_pruning": 100.0,
        ...      "taken": False}]}
        >>> cut_costs_per_weight(analysis, 400_000)  # 0.08 points over 4,000 weights removed
        {1: 0.02}
    """
    if weights <= 0:
        raise ValueError(f"weights must be a positive weight count, got {weights!r}")
    taken = {row["step"]: row for row in analysis["candidates"] if row["taken"]}
    costs = {}
    for index, row in enumerate(analysis["candidates"]):
        if row["layer"] is None:
            continue
        before = taken.get(row["step"] - 1)
        if before is None:
            raise ValueError(f"analysis has a cut at step {row['step']} but no network taken at step {row['step'] - 1}")
        removed = weights / before["compression_pruning"] - weights / row["compression_pruning"]
        costs[index] = round(1000 * 100 * (row["selection_error"] - before["selection_error"]) / removed, 12)
    return costs


def layer_search_steps(analysis: Mapping, layers: Sequence[str], labels: Mapping[str, str] | None = None,
                       weights: int | None = None) -> str:
    """The candidates of one layer search (:func:`bclib.experiments.prune_layers_run`) step by step.

    Args:
        analysis: ``analysis.json`` of a layer-searched run: ``"allowed"`` and ``"candidates"``,
            the first of them the base network retrained (step 0, ``"layer"`` None).
        layers: the report's layer names in order.
        labels: readable names by layer name (``{"0": "conv1", ...}``); default the names.
        weights: the dense network's weight count; when given, a last column gives each cut's
            selection error added per 1,000 weights removed (:func:`cut_costs_per_weight`).

    Returns:
        Per candidate: the step, the layer cut, how many of its groups the cut keeps, the
        architecture, the error on the selection split, and "taken" (the step's cut), "within"
        (within the allowed error, but another cut cost less) or "over".

    Example:
        >>> analysis = {"allowed": 0.0084, "candidates": [
        ...     {"step": 0, "layer": None, "architecture": "9-16-93-16", "selection_error": 0.0074,
        ...      "taken": True},
        ...     {"step": 1, "layer": "3", "groups": 12, "architecture": "9-12-70-16",
        ...      "selection_error": 0.0096, "taken": False}]}
        >>> print(layer_search_steps(analysis, ["0", "3", "7", "9"], {"3": "conv2"}))
        step  layer  groups   architecture   selection %   (allowed 0.84 %)
           0  base        -   9-16-93-16            0.74   reference
           1  conv2      12   9-12-70-16            0.96   over
    """
    labels = labels or {}
    costs = {} if weights is None else cut_costs_per_weight(analysis, weights)
    lines = [f"{'step':>4}  {'layer':<6} {'groups':>6}   {'architecture':<14} {'selection %':>11}   "
             f"(allowed {100 * analysis['allowed']:.2f} %)"]
    width = len(lines[0])  # the cost column starts after the header's last word
    if weights is not None:
        lines[0] += " pts/1k w."
    for index, row in enumerate(analysis["candidates"]):
        if row["layer"] is None:
            layer, groups, verdict = "base", "-", "reference"
        elif row["layer"] in layers:
            layer, groups = labels.get(row["layer"], row["layer"]), row["groups"]
            verdict = "taken" if row["taken"] else "within" if row["selection_error"] <= analysis["allowed"] else "over"
        else:
            raise ValueError(f"layers {list(layers)} do not include the candidate's layer {row['layer']!r}")
        line = (f"{row['step']:>4}  {layer:<6} {groups:>6}   {row['architecture']:<14} "
                f"{100 * row['selection_error']:>11.2f}   {verdict}")
        if index in costs:
            line = f"{line:<{width}} {costs[index]:>+9.3f}"
        lines.append(line)
    return "\n".join(lines)


def layer_search_summary(name: str, report: Mapping, analysis: Mapping, bits: Mapping | None = None) -> str:
    """What one layer search cost, the command that repeats it, and the test error of what it kept.

    Args:
        name: the run's name in :data:`bclib.experiments.EXPERIMENTS`.
        report: its ``report.json`` (``layer_search["seconds"]``: all candidates' retraining).
        analysis: its ``analysis.json``; the last taken candidate is the kept network.
        bits: the ``report.json`` of the run that lowered its bits (``bit_search``), if any.

    Returns:
        Three lines: minutes of retraining, the ``reproduce`` command, and the kept architecture
        with its test error (one per seed for a seeded search); with ``bits``, a fourth: the bits per
        layer before and after lowering.

    Example:
        >>> analysis = {"candidates": [{"taken": True, "architecture": "9-16-93-12", "test_error": 0.0106,
        ...                             "seeds": [{"test_error": 0.0106}, {"test_error": 0.0104}]}]}
        >>> print(layer_search_summary("lenet5_nj_layers_3seeds", {"layer_search": {"seconds": 1908.0}},
        ...                            analysis))
        lenet5_nj_layers_3seeds: 31.8 min of retraining
          python -m bclib reproduce --only lenet5_nj_layers_3seeds
          kept 9-16-93-12: test error by seed 1.06 / 1.04 %
        >>> lowered = {"bit_search": {"bits_before": [6, 5, 5, 9], "bits": [3, 2, 3, 2]}}
        >>> print(layer_search_summary("lenet5_nj_layers_3seeds", {"layer_search": {"seconds": 1908.0}},
        ...                            analysis, bits=lowered).splitlines()[-1])
          bits per layer 6-5-5-9, lowered to 3-2-3-2
    """
    taken = [row for row in analysis["candidates"] if row["taken"]]
    if not taken:
        raise ValueError(f"analysis of {name!r} must have a taken candidate (the base network at least), got none")
    kept = taken[-1]
    errors = [seed["test_error"] for seed in kept.get("seeds", [])] or [kept["test_error"]]
    label = "test error by seed" if len(errors) > 1 else "test error"
    command = f"  python -m bclib reproduce --only {name}"
    if len(command) > 80:  # a shell continuation keeps the lines within 80
        command = f"  python -m bclib reproduce \\\n      --only {name}"
    head = f"{name}: {report['layer_search']['seconds'] / 60:.1f} min of retraining"
    if len(head) > 80:
        head = head.replace(": ", ":\n  ", 1)
    lines = [head, command,
             f"  kept {kept['architecture']}: {label} {' / '.join(f'{100 * e:.2f}' for e in errors)} %"]
    if bits is not None:
        lowered = bits["bit_search"]
        lines.append(f"  bits per layer {'-'.join(map(str, lowered['bits_before']))}, "
                     f"lowered to {'-'.join(map(str, lowered['bits']))}")
    return "\n".join(lines)


def selection_optimism_table(analyses: Mapping[str, Mapping]) -> str:
    """How far each layer search's selection error fell short of its test error, over every retraining.

    A network that trained on the selection split scores better there than on unseen data; one that
    held it out (:attr:`bclib.experiments.Experiment.holds_out_selection`) should not. A search that
    takes, at each step, the cut of least selection error also tends to take cuts whose selection
    error came out low by chance: their gap is compared with that of every retraining.

    Args:
        analyses: ``analysis.json`` of layer-searched runs by name (:func:`bclib.experiments.prune_layers_run`):
            its ``"candidates"``, each with ``"selection_error"`` and ``"test_error"``, or with one
            pair per retraining seed under ``"seeds"``; ``"taken"`` and ``"layer"`` (None for the
            base network) mark the cuts the search took.

    Returns:
        A row per search: the mean of test minus selection error in points over every retraining,
        the same over the retrainings of the cuts taken (``-`` when none was), and how many
        retrainings had a test error above the selection error (at most 80 characters a line for
        names of up to 42).

    Example:
        >>> base = {"layer": None, "taken": True, "seeds": [
        ...     {"selection_error": 0.0070, "test_error": 0.0085},
        ...     {"selection_error": 0.0080, "test_error": 0.0079}]}
        >>> cut = {"layer": "3", "taken": True, "seeds": [
        ...     {"selection_error": 0.0074, "test_error": 0.0090},
        ...     {"selection_error": 0.0078, "test_error": 0.0092}]}
        >>> print(selection_optimism_table({"lenet5_nj_scratch_layers_3seeds_tol2":
        ...                                 {"candidates": [base, cut]}}))
        search                                test - sel.   cuts taken  test above
        lenet5_nj_scratch_layers_3seeds_tol2    +0.11 pts    +0.15 pts      3 of 4
    """
    def gaps(rows) -> list[float]:
        return [seed["test_error"] - seed["selection_error"] for row in rows for seed in row.get("seeds", [row])]

    def points(values: list[float]) -> str:
        # + 0.0: a mean that rounds to zero prints +0.00, not -0.00.
        return f"{round(100 * sum(values) / len(values), 2) + 0.0:>+7.2f} pts" if values else f"{'-':>11}"

    width = max([len("search"), *map(len, analyses)])
    lines = [f"{'search':<{width}}  {'test - sel.':>11}  {'cuts taken':>11}  {'test above':>10}"]
    for name, analysis in analyses.items():
        every = gaps(analysis["candidates"])
        if not every:
            raise ValueError(f"analyses[{name!r}] must hold retrained candidates, got none")
        taken = gaps(row for row in analysis["candidates"] if row.get("taken") and row.get("layer") is not None)
        above = sum(gap > 0 for gap in every)
        lines.append(f"{name:<{width}}  {points(every)}  {points(taken)}  {f'{above} of {len(every)}':>10}")
    return "\n".join(lines)


def repeated_retrainings_table(first: Mapping, second: Mapping, *, networks: bool | None = True) -> str:
    """The networks two layer searches of one base run both retrained, side by side.

    Two searches from one base file (with another rule, say) meet the same candidates: the same
    thresholds give the same network, retrained with the same seeds. On the same processor with
    the same thread count the retrainings repeat exactly; otherwise floating-point sums round in
    another order and each retraining takes another path: their differences measure how far a
    candidate's errors move by chance alone, to set beside the differences a search ranks cuts by.

    Args:
        first, second: ``analysis.json`` of the two searches (:func:`bclib.experiments.prune_layers_run`):
            ``"candidates"`` with ``"thresholds"``, ``"architecture"``, and per retraining seed
            ``"selection_error"`` and ``"test_error"`` under ``"seeds"`` (or once, for one seed).
        networks: True: a row per network; False: the summary alone; None: the rows only when
            some retraining differs (for identical ones the summary says all there is).

    Returns:
        Per network both retrained (in ``first``'s order): its architecture and mean selection and
        test error in each search; then the number of retrainings compared and the largest and
        mean absolute difference between them, seed by seed.

    Raises:
        ValueError: when the two searches retrained no network in common, or retrained a common
            one with different numbers of seeds.

    Example:
        >>> row = lambda selection, test: {"thresholds": [-3.0, -2.5], "architecture": "8-19",
        ...                                "seeds": [{"selection_error": selection, "test_error": test}]}
        >>> print(repeated_retrainings_table({"candidates": [row(0.0063, 0.0083)]},
        ...                                  {"candidates": [row(0.0060, 0.0085)]}))
        architecture    selection % (mean)        test % (mean)
                           first    second      first    second
        8-19                0.63      0.60       0.83      0.85
        1 network in both, 1 retraining each: selection errors differ by 0.03 points at
        most (0.03 on average), test errors by 0.02 (0.02)
    """
    def retrainings(row) -> list:
        return row.get("seeds", [row])

    seconds = {tuple(row["thresholds"]): row for row in second["candidates"]}
    pairs = [(row, seconds[tuple(row["thresholds"])]) for row in first["candidates"]
             if tuple(row["thresholds"]) in seconds]
    if not pairs:
        raise ValueError("first and second must share a retrained network (the same thresholds), got none")
    lines = [f"{'architecture':<14} {'selection % (mean)':>19}  {'test % (mean)':>19}",
             f"{'':<14} {'first':>9} {'second':>9}  {'first':>9} {'second':>9}"]
    differences = {"selection_error": [], "test_error": []}
    for one, other in pairs:
        if len(retrainings(one)) != len(retrainings(other)):
            raise ValueError(f"the network {one['architecture']} was retrained with {len(retrainings(one))} seeds "
                             f"in first and {len(retrainings(other))} in second: they must match")
        means = []
        for key, values in differences.items():
            for row in (one, other):
                means.append(100 * sum(seed[key] for seed in retrainings(row)) / len(retrainings(row)))
            values += [abs(a[key] - b[key]) for a, b in zip(retrainings(one), retrainings(other))]
        lines.append(f"{one['architecture']:<14} {means[0]:>9.2f} {means[1]:>9.2f}  {means[2]:>9.2f} {means[3]:>9.2f}")

    def spread(values: list[float]) -> tuple[float, float]:
        return 100 * max(values), 100 * sum(values) / len(values)

    (selection_most, selection_mean), (test_most, test_mean) = map(spread, differences.values())
    count = len(differences["selection_error"]) // len(pairs)
    if not networks and (networks is not None or selection_most == test_most == 0):
        lines = []
    lines += textwrap.wrap(
        f"{len(pairs)} network{'s' * (len(pairs) > 1)} in both, {count} retraining{'s' * (count > 1)} each: "
        f"selection errors differ by {selection_most:.2f} points at most ({selection_mean:.2f} on average), "
        f"test errors by {test_most:.2f} ({test_mean:.2f})", 80)
    return "\n".join(lines)


def per_weight_agreement_table(analyses: Mapping[str, Mapping], weights: int,
                               labels: Mapping[str, str] | None = None) -> str:
    """Where least-error layer searches would have gone another way, ranking cuts per weight removed.

    At each step a search of :func:`bclib.experiments.prune_layers_run` with ``take="least_error"``
    took, among the cuts within the allowance, the one of least mean selection error;
    ``take="least_error_per_weight"`` takes the one of least :func:`cut_costs_per_weight` (both
    ranked by :func:`bclib.experiments.search_order`, as the search ranks them). As long
    as the two agree, a per-weight search from the same base, retrained the same way (same seeds,
    processor and thread count), meets the same candidates and takes the same steps; from the first
    step where they differ, the least-error search's later steps say nothing about it, so only that
    step is reported.

    Args:
        analyses: ``analysis.json`` of least-error searches by name (any label; names of up to 33
            characters keep the lines within 80).
        weights: the dense network's weight count (the sum of a report's ``weights_total``).
        labels: readable names by layer name (``{"0": "conv1", ...}``); default the names.

    Returns:
        A row per search: on how many of the steps that took a cut the two rules agree, and at the
        first step where they do not, the cut each rule takes there (``-``: they agree throughout).

    Example:
        >>> row = lambda step, layer, error, compression, taken: {
        ...     "step": step, "layer": layer, "selection_error": error,
        ...     "compression_pruning": compression, "taken": taken}
        >>> analysis = {"allowed": 0.0090, "candidates": [
        ...     row(0, None, 0.0070, 50.0, True),
        ...     row(1, "3", 0.0078, 100.0, False),  # 0.08 points over 4,000 weights
        ...     row(1, "9", 0.0075, 52.0, True)]}   # 0.05 points over 307
        >>> print(per_weight_agreement_table({"search": analysis}, 400_000, {"3": "conv2"}))
        search    agreed  then at step  per weight  least error
        search    0 of 1             1       conv2            9
    """
    labels = labels or {}
    width = max([len("search"), *map(len, analyses)])
    lines = [f"{'search':<{width}}  {'agreed':>6}  {'then at step':>12}  {'per weight':>10}  {'least error':>11}"]
    for name, analysis in analyses.items():
        candidates = analysis["candidates"]
        taken = {row["step"]: index for index, row in enumerate(candidates) if row["taken"]}
        agreed, disagreement = 0, ("-", "-", "-")
        for step in sorted(taken)[1:]:  # the steps that took a cut; step 0 is the base network
            before = candidates[taken[step - 1]]
            current = (round(before["selection_error"], 9), before["compression_pruning"])
            within = [(round(row["selection_error"], 9), -row["compression_pruning"], index)
                      for index, row in enumerate(candidates) if row["step"] == step
                      and within_tolerance(row["selection_error"], analysis["allowed"])]
            *_, cheapest = min(within, key=lambda cut: search_order("least_error_per_weight", cut, current))
            if cheapest != taken[step]:
                disagreement = (step, *(labels.get(candidates[index]["layer"], candidates[index]["layer"])
                                        for index in (cheapest, taken[step])))
                break
            agreed += 1
        cuts = len(taken) - 1
        step, per_weight, least_error = disagreement
        lines.append(f"{name:<{width}}  {f'{agreed} of {cuts}':>6}  {step:>12}  {per_weight:>10}  {least_error:>11}")
    return "\n".join(lines)


def group_cut_table(runs: Mapping[str, tuple[Mapping, Mapping]],
                    targets: Mapping[str, tuple[Sequence[int], float, float]]) -> str:
    """Networks cut to at most a given architecture and retrained (:func:`bclib.experiments.prune_to_groups_run`).

    Args:
        runs: by row label (up to 24 characters), the run's ``(report.json, analysis.json)``: the report's
            ``architecture`` and ``compression_pruning``, the analysis's ``"seeds"``, each with
            ``"selection_error"`` and ``"test_error"``; the runs of one prior in a row.
        targets: by prior label (the first word of a row label, ``"BC-GNJ"``), the LeNet-5-Caffe
            architecture asked for, the error it is reported at (a fraction) and the compression
            after pruning reported with it, shown as a row before that prior's runs.

    Returns:
        A row per run: the architecture kept, the compression after pruning and each retraining
        seed's selection and test error in %; then, per prior, how many retrainings' test errors
        are at most the reported error, and the compression after pruning that the architecture
        asked for counts to by this book's rate (weights of the dense network over those kept,
        biases aside). Lines of at most 80 characters.

    Example:
        >>> report = {"architecture": "6-13-88-13", "compression_pruning": 127.6}
        >>> analysis = {"seeds": [{"selection_error": 0.0090, "test_error": 0.0095},
        ...                       {"selection_error": 0.0092, "test_error": 0.0103}]}
        >>> print(group_cut_table({"BC-GNJ seed 1": (report, analysis)},
        ...                       {"BC-GNJ": ((8, 13, 88, 13), 0.01, 108.0)}))
        network                   architecture  pruning  selection %     test %
        BC-GNJ paper                8-13-88-13     108x            -        1.0
        BC-GNJ seed 1               6-13-88-13   127.6x    0.90 0.92  0.95 1.03
        <BLANKLINE>
        BC-GNJ: test error <= 1.0 % in 1 of 2 retrainings; 8-13-88-13 counts to 105.7x
    """
    from .bench import paper_lenet5  # bench imports this module
    from .compression import compress

    def counted_rate(groups: Sequence[int]) -> float:
        return compress(paper_lenet5(architecture=groups), 0.0).report.compression_pruning

    rows, counts = [], {}
    for label, (report, analysis) in runs.items():
        prior = label.split()[0]
        groups, error, pruning = targets[prior]
        if prior not in counts:
            rows.append((f"{prior} paper", "-".join(map(str, groups)), f"{pruning:g}x", "-", f"{100 * error:.1f}"))
            counts[prior] = [0, 0]
        seeds = analysis["seeds"]
        counts[prior][0] += sum(seed["test_error"] <= error for seed in seeds)
        counts[prior][1] += len(seeds)
        rows.append((label, report["architecture"], f"{report['compression_pruning']:.1f}x",
                     " ".join(f"{100 * seed['selection_error']:.2f}" for seed in seeds),
                     " ".join(f"{100 * seed['test_error']:.2f}" for seed in seeds)))
    selection_width = max(11, *(len(row[3]) for row in rows))
    test_width = max(6, *(len(row[4]) for row in rows))
    lines = [f"{'network':<24}  {'architecture':>12}  {'pruning':>7}  {'selection %':>{selection_width}}  "
             f"{'test %':>{test_width}}"]
    lines += [f"{label:<24}  {architecture:>12}  {rate:>7}  {selection:>{selection_width}}  {test:>{test_width}}"
              for label, architecture, rate, selection, test in rows]
    lines.append("")
    for prior, (low, total) in counts.items():
        groups, error, _ = targets[prior]
        lines.append(f"{prior}: test error <= {100 * error:.1f} % in {low} of {total} retrainings; "
                     f"{'-'.join(map(str, groups))} counts to {counted_rate(groups):.1f}x")
    return "\n".join(lines)
