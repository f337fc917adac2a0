"""Command line: ``python -m bclib {train,compress,fine-tune,lower-bits,prune-layers,prune-to-groups,reproduce,results,recount,bench} ...``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

__all__ = ["main"]

DATA_HELP = "MNIST root (default: $BCLIB_DATA or the user cache)"


def _positive_int(text: str) -> int:
    """argparse type of the counts (epochs, seeds, threads, trials): argparse names the flag in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type of the thresholds: a finite number (JSON, where the report records them, has no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .bench import LAYOUTS, VARIANTS
    from .experiments import EXPERIMENTS, LAYER_CUT_FRACTION, SEARCH_RULES, SELECTION_TOLERANCE
    from .train import AUTOCAST_DTYPES, MEMORY_FORMATS, VARIANCE_DTYPES

    parser = argparse.ArgumentParser(
        prog="python -m bclib",
        description="Bayesian Compression for Deep Learning: train, compress, reproduce the results, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one model with one prior, compress it, write results into --out")
    train.add_argument("--model", choices=["lenet300", "lenet5"], required=True,
                       help="LeNet-300-100 or LeNet-5-Caffe, on MNIST")
    train.add_argument("--prior", choices=["nj", "hs", "svd", "none"], required=True,
                       help="group normal-Jeffreys, group horseshoe, Sparse VD (per weight), or 'none': the "
                            "deterministic network; python -m bclib reproduce --list shows each recipe")
    train.add_argument("--out", required=True, help="run folder (resumed when it holds a checkpoint)")
    pretrained = ", ".join(f"{e.model} {e.prior}" for name, e in EXPERIMENTS.items()
                           if e.init_from and name == f"{e.model}_{e.prior}")
    train.add_argument("--init-from", default=None,
                       help="a deterministic run folder (train --prior none) whose weights become the posterior "
                            f"means; required by the recipes that start from one ({pretrained}); for lenet300 nj "
                            "it selects the 10-epoch recipe from a pretrained network")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help="override the recipe's epoch count (e.g. 200 for lenet5 hs)")
    train.add_argument("--variance-dtype", choices=sorted(name for name in VARIANCE_DTYPES if name), default=None,
                       help="run the Bayesian layers' variance path in this precision (faster on CPUs with "
                            "bfloat16 units and on GPUs; default: full precision)")
    train.add_argument("--autocast", choices=sorted(name for name in AUTOCAST_DTYPES if name), default=None,
                       help="mixed precision: run every layer's products in this precision under torch.autocast "
                            "(faster on GPUs and CPUs with bfloat16 units; default: full precision)")
    train.add_argument("--memory-format", choices=sorted(name for name in MEMORY_FORMATS if name), default=None,
                       help="train in this layout: channels_last is faster for convolutions on CPUs (bench epochs "
                            "measures it; default: the contiguous layout)")
    train.add_argument("--data", default=None, help=DATA_HELP)
    train.add_argument("--fast", action="store_true",
                       help="5,000 training examples and 2 epochs, a smoke test (also set by BCLIB_FAST=1)")

    compress = sub.add_parser("compress", help="(re)compress a trained run folder")
    compress.add_argument("run", help="run folder with config.json and checkpoint.pt")
    compress.add_argument("--thresholds", type=_finite_float, nargs="+", default=None,
                          help="one log-alpha threshold per Bayesian layer (default: the group priors' chosen on the last "
                               "10,000 training examples by bclib.compression.select_thresholds; Sparse VD's 3)")
    compress.add_argument("--data", default=None, help=DATA_HELP)

    fine_tune = sub.add_parser("fine-tune", help="prune a trained run further and retrain the survivors on their "
                                                 "fixed-point grids (not in the paper), writing into --out")
    fine_tune.add_argument("run", help="trained Bayesian run folder with config.json, report.json and checkpoint.pt")
    fine_tune.add_argument("--out", required=True, help="folder for the fine-tuned run")
    fine_tune.add_argument("--epochs", type=_positive_int, default=None, help="retraining epochs per candidate (default 10)")
    fine_tune.add_argument("--seeds", type=_positive_int, default=None,
                           help="retraining seeds for the error spread of the kept and first rejected candidates "
                                "(default 3; 1: none)")
    fine_tune.add_argument("--data", default=None, help=DATA_HELP)

    # Searches that start from a run's committed files and retrain every candidate.
    for command, what, run_help in (
            ("lower-bits", "lower a compressed run's bits below the posterior's rule, retraining on each coarser "
                           "grid", "compressed run folder with config.json, report.json and model.bcz (e.g. a "
                                   "fine-tune output)"),
            ("prune-layers", "search one threshold per layer of a group-prior run, retraining each candidate",
             "compressed group-prior run folder with config.json, report.json, analysis.json (its log alphas) "
             "and model.bcz"),
            ("prune-to-groups", "cut a group-prior run to at most --groups groups per layer (those of lowest log "
                                "alpha) and retrain it",
             "compressed group-prior run folder with config.json, report.json, analysis.json (its log alphas) "
             "and model.bcz")):
        search = sub.add_parser(command, help=f"{what} (not in the paper), into --out")
        search.add_argument("run", help=run_help)
        search.add_argument("--out", required=True, help="folder for the new run")
        search.add_argument("--epochs", type=_positive_int, default=None,
                            help=f"retraining epochs per {'seed' if command == 'prune-to-groups' else 'candidate'} "
                                 "(default 10)")
        if command == "prune-to-groups":
            search.add_argument("--groups", type=int, nargs="+", required=True, metavar="N",
                                help="the most groups each layer keeps, in order (filters of a convolution, inputs "
                                     "of a linear layer), e.g. 8 13 88 13, the paper's BC-GNJ LeNet-5")
            search.add_argument("--seeds", type=_positive_int, default=3, help="retrainings, each with its own seed (default 3)")
            search.add_argument("--reinitialize", action="store_true",
                                help="retrain from freshly drawn weights, not the run's: the cut architecture "
                                     "trained alone")
            search.add_argument("--bits", type=_positive_int, default=None,
                                help="retrain on grids of this many bits in every layer (default: the cut's own, "
                                     "from the posterior's variances; e.g. 16, as fine as float here)")
        if command == "prune-layers":
            search.add_argument("--seeds", type=_positive_int, default=1,
                                help="retrainings per candidate, ranked by their mean selection error (default 1)")
            search.add_argument("--take", choices=SEARCH_RULES, default=SEARCH_RULES[0],
                                help="which cut within the allowed error a step takes: the one of least selection "
                                     "error (default), the one that prunes most, or the one of least selection "
                                     "error added per weight removed")
            allowance = search.add_mutually_exclusive_group()
            allowance.add_argument("--tolerance", type=float, default=SELECTION_TOLERANCE,
                                help="how far a cut's selection error may rise above the base network's, as a "
                                     f"fraction (default {SELECTION_TOLERANCE}: 0.1 points)")
            allowance.add_argument("--allowed-error", type=float, default=None,
                                help="instead, the highest selection error a cut may reach, as a fraction (e.g. "
                                     "0.009); only for a run trained without its selection split")
            search.add_argument("--cut-fraction", type=float, default=LAYER_CUT_FRACTION,
                                help=f"share of a layer's surviving groups one cut removes (default {LAYER_CUT_FRACTION})")
        search.add_argument("--data", default=None, help=DATA_HELP)

    reproduce = sub.add_parser("reproduce", help="run the registered experiments behind the book into --out: all, "
                                                 "each after the runs it starts from, or --only NAMES in the order "
                                                 "given (--list names them; the runs they start from must be in --out)")
    reproduce.add_argument("--out", default=None, help="results folder (default: book/results; a --fast "
                                                        "reproduce must name its own)")
    reproduce.add_argument("--only", nargs="+", default=None, metavar="NAME",
                           help="run only these registered runs (--list names them all)")
    reproduce.add_argument("--list", action="store_true",
                           help="print each registered run's name and what it does, in the order a full reproduce "
                                "runs them, and exit")
    reproduce.add_argument("--data", default=None, help=DATA_HELP)
    reproduce.add_argument("--fast", action="store_true", help="small data and 2 epochs per run (a smoke test)")
    reproduce.add_argument("--skip-finished", action="store_true",
                           help="skip the runs finished in --out (a report.json, made with the same --fast), to "
                                "go on after an interruption; by default each named run is run again (a training "
                                "whose checkpoint is complete only compresses again)")

    results = sub.add_parser("results", help="the results table at a glance, read from a results folder's reports "
                                             "(the paper's numbers beside ours)")
    results.add_argument("--results", default="book/results",
                         help="results folder (default: book/results, relative to the current folder)")

    recount = sub.add_parser("recount", help="set the exponent bits and after-precision rates of finished runs "
                                             "from the weights their model.bcz stores (reports made before bclib "
                                             "took them from retrained weights)")
    recount.add_argument("runs", nargs="*", help="run folders (default: every folder in --results)")
    recount.add_argument("--results", default="book/results",
                         help="results folder (default: book/results, relative to the current folder)")

    bench = sub.add_parser("bench", help="benchmarks: layers (train-step time ratios), epochs (MNIST epoch times), compression "
                                           "(inference speed-up), training (wall time of the committed runs)")
    bench.add_argument("which", choices=["layers", "compression", "epochs", "training", "all"],
                       help="epochs: one training epoch on MNIST per network; training: wall time of the "
                            "committed runs and the targets they met")
    bench.add_argument("--data", default=None, help="MNIST root for 'epochs' (default: $BCLIB_DATA or the user cache)")
    bench.add_argument("--results", default="book/results",
                       help="results folder for 'training' (default: book/results, relative to the current folder)")
    bench.add_argument("--run", default=None,
                       help="trained run folder for the compression benchmark (default: book/results/lenet5_nj, "
                            "or, where that is missing, an untrained LeNet-5 cut to the paper's 8-13-88-13)")
    bench.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: PyTorch's setting)")
    bench.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS),
                       help="what 'layers' and 'epochs' time beside float32 (default: all; none named: float32 "
                            "only; the bfloat16 ones are slow on CPUs without bfloat16 units)")
    bench.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                       help="how the compression benchmark runs both exports (default: all; 'compiled' uses "
                            "torch.compile and needs a C++ compiler)")
    bench.add_argument("--keep-freed-memory", action="store_true",
                       help="compression: keep freed memory for reuse as training does (bclib.train.keep_freed_memory); "
                            "default: leave malloc's settings alone")
    bench.add_argument("--trials", type=_positive_int, default=1,
                       help="run the compression benchmark in this many fresh processes and report medians and "
                            "ranges (default: 1, this process)")
    bench.add_argument("--out", default=None,
                       help="also write the results as JSON here, with the command, machine and versions")
    return parser


def _experiment_name(model: str, prior: str, init_from: str | None) -> str:
    from .experiments import EXPERIMENTS

    if prior == "none":
        return f"{model}_dense"
    name = f"{model}_{prior}"
    if init_from and f"{name}_pretrained" in EXPERIMENTS:
        return f"{name}_pretrained"
    return name


def _finished(run_dir: Path, fast: bool) -> bool:
    """Whether ``run_dir`` holds a finished run made with the given ``--fast`` setting (a run writes its
    ``report.json`` last and removes an old one before it rewrites anything)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (run_dir / "report.json").is_file() and bool(config.get("fast")) == fast


# The library's errors begin with the Python argument at fault; on the command line, the flag is named.
_FLAGS = {"out_dir": "--out", "init_dir": "--init-from", "results_root": "--results", "cut_fraction": "--cut-fraction",
          "tolerance": "--tolerance", "allowed_error": "--allowed-error", "groups": "--groups", "seeds": "--seeds",
          "thresholds": "--thresholds", "epochs": "--epochs"}


def _with_flag(message: str, command: str) -> str:
    """``message`` with its leading argument name replaced by the flag (or the positional ``run``) it came from."""
    flags = dict(_FLAGS)
    if command == "reproduce":  # its run folders lie inside --out: the library's name is the accurate one
        del flags["out_dir"]
    if command not in ("reproduce", "results", "bench", "recount"):
        flags["base_dir"] = "run"
    name = re.match(r"[a-z_]+", message)
    if name is None or name.group() not in flags or message[name.end():name.end() + 1] not in (" ", ":"):
        return message
    return flags[name.group()] + message[name.end():]


def main(argv: list[str] | None = None) -> int:
    from .experiments import bclib_command

    parser = _parser()
    args = parser.parse_args(argv)
    args.command_line = bclib_command(sys.argv[1:] if argv is None else argv)
    try:
        _dispatch(args)
    except (ValueError, OSError) as error:
        # Bad input (a wrong count of thresholds, missing data, a file where a folder belongs): a message
        # and exit status 2, no traceback.
        parser.exit(2, f"{parser.prog} {args.command}: error: {_with_flag(str(error), args.command)}\n")
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "train":
        from .experiments import EXPERIMENTS, run_experiment

        name = _experiment_name(args.model, args.prior, args.init_from)
        starts_from = EXPERIMENTS[name].init_from
        if args.init_from is not None and starts_from is None:
            raise ValueError(f"--init-from: the {args.model} {args.prior} recipe trains from scratch; leave it out")
        if args.init_from is None and starts_from is not None:
            raise ValueError(f"--init-from is required: the {args.model} {args.prior} recipe starts from a trained "
                             f"deterministic {args.model} (train one with --prior none, e.g. into runs/{starts_from})")
        report = run_experiment(name, args.out, data_root=args.data, epochs=args.epochs,
                                variance_dtype=args.variance_dtype, autocast=args.autocast,
                                memory_format=args.memory_format, fast=args.fast or None,
                                init_dir=args.init_from)
        print(json.dumps(report, indent=2))
    elif args.command == "compress":
        from .experiments import compress_run, read_run_config

        config = read_run_config(args.run)
        if "prior" in config and config["prior"] is None:
            raise ValueError(f"run {args.run!r} is deterministic (prior none): it has nothing to compress")
        print(json.dumps(compress_run(args.run, thresholds=args.thresholds, data_root=args.data), indent=2))
    elif args.command == "fine-tune":
        from .experiments import FINE_TUNE_CONFIG, FINE_TUNE_SEEDS, fine_tune_run

        config = FINE_TUNE_CONFIG if args.epochs is None else dataclasses.replace(FINE_TUNE_CONFIG, epochs=args.epochs)
        seeds = FINE_TUNE_SEEDS if args.seeds is None else args.seeds
        print(json.dumps(fine_tune_run(args.run, args.out, config=config, seeds=seeds, data_root=args.data), indent=2))
    elif args.command in ("lower-bits", "prune-layers", "prune-to-groups"):
        from .experiments import FINE_TUNE_CONFIG, lower_bits_run, prune_layers_run, prune_to_groups_run

        search = {"lower-bits": lower_bits_run, "prune-layers": prune_layers_run,
                  "prune-to-groups": prune_to_groups_run}[args.command]
        config = FINE_TUNE_CONFIG if args.epochs is None else dataclasses.replace(FINE_TUNE_CONFIG, epochs=args.epochs)
        options = {}  # lower-bits has no options of its own
        if args.command == "prune-layers":
            options = {"seeds": args.seeds, "take": args.take, "tolerance": args.tolerance,
                       "allowed_error": args.allowed_error, "cut_fraction": args.cut_fraction}
        elif args.command == "prune-to-groups":
            options = {"groups": args.groups, "seeds": args.seeds, "reinitialize": args.reinitialize, "bits": args.bits}
        print(json.dumps(search(args.run, args.out, config=config, data_root=args.data, **options), indent=2))
    elif args.command == "reproduce":
        from .data import fast_mode
        from .experiments import EXPERIMENTS, _bases, describe_experiment, run_experiment

        if args.list:
            if args.only:
                raise ValueError("--list names every registered run; leave --only out")
            for name in EXPERIMENTS:
                print(f"{name}\n    {describe_experiment(name)}")
            return
        unknown = [name for name in args.only or () if name not in EXPERIMENTS]
        if unknown:
            # Checked before any run starts: a typo in the last name must not cost the hours before it.
            raise ValueError(f"--only: no registered run named {', '.join(map(repr, unknown))}; "
                             "python -m bclib reproduce --list names them")
        fast = args.fast or fast_mode()
        if args.out is None and fast:
            raise ValueError("--out: a --fast (or BCLIB_FAST=1) reproduce needs a folder of its own; the default, "
                             "book/results, holds the committed full runs")
        root = Path(args.out or "book/results")
        earlier: set[str] = set()
        for name in args.only or ():
            # Checked before any run starts, like the names: a missing base must not end hours of runs.
            missing = [f"{base} ({needs})" for base, needs in _bases(EXPERIMENTS[name])
                       if base not in earlier and not (root / base / needs).is_file()]
            if missing:
                raise ValueError(f"--only: {name} starts from {', '.join(missing)}, which is neither in "
                                 f"{str(root)!r} nor named before it")
            earlier.add(name)
        for name in args.only or EXPERIMENTS:
            out_dir = root / name
            if args.skip_finished and _finished(out_dir, fast=fast):
                # Redoing a finished run costs up to hours: a finished search keeps no checkpoint.
                print(f"== {name}: finished in {out_dir}, skipped", flush=True)
                continue
            print(f"== {name}", flush=True)
            run_experiment(name, out_dir, data_root=args.data, fast=args.fast or None)
    elif args.command == "results":
        from .tables import results_table

        print(results_table(args.results))
    elif args.command == "recount":
        from .experiments import recount_precision_rates

        runs = [Path(run) for run in args.runs] or sorted(path.parent for path in Path(args.results).glob("*/report.json"))
        if not runs:
            raise ValueError(f"results_root: no finished run (report.json) in {str(Path(args.results).resolve())!r}")
        changed = 0
        for run in runs:
            changes = recount_precision_rates(run, command=args.command_line)
            changed += bool(changes)
            if changes:
                print(f"{run}: " + ", ".join(f"{key} {value[0]:g} -> {value[1]:g}" if isinstance(value, tuple)
                                             else f"{value} {key}" for key, value in changes.items()))
        print(f"{len(runs)} runs checked, {changed} changed")
    elif args.command == "bench":
        from . import bench

        if args.out is not None:  # found now, not after hours of benchmarks
            _check_out_file("--out", Path(args.out))
        results = {}
        # Compression first: the layers and epochs benchmarks keep freed memory for the rest of the process.
        if args.which in ("compression", "all"):
            if args.run is not None and not bench.is_compression_bench_run(args.run):
                # Only the default may fall back to an untrained network: a mistyped folder must not.
                raise ValueError(f"--run: {args.run!r} is not a trained run folder (config.json with checkpoint.pt, "
                                 "or with report.json and model.bcz)")
            args.run = args.run or "book/results/lenet5_nj"
            options = {"threads": args.threads, "layouts": tuple(args.layouts), "keep_freed": args.keep_freed_memory}
            results["compression"] = (bench.run_compression_trials(args.trials, args.run, **options) if args.trials != 1
                                      else bench.run_compression_bench_from_run(args.run, **options))
        if args.which in ("layers", "all"):
            results["layers"] = bench.run_layers_bench(threads=args.threads, variants=tuple(args.variants))
        if args.which in ("epochs", "all"):
            results["epochs"] = bench.run_epoch_bench(args.data, threads=args.threads, variants=tuple(args.variants))
        if args.which in ("training", "all"):
            results["training"] = bench.run_training_time_report(args.results)
        if args.out is not None:
            bench.write_bench_results(args.out, results, command=args.command_line, threads=args.threads)


def _check_out_file(flag: str, path: Path) -> None:
    """Refuse a path the results cannot be written to: a folder, or one below a file or an
    unwritable folder (the folders it lacks are made when writing)."""
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; give the path of the JSON file to write")
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} cannot be written: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {str(path)!r} cannot be written: no permission to write in {str(existing)!r}")


if __name__ == "__main__":
    sys.exit(main())
