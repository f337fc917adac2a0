"""Tests of the command line (``python -m bclib``) and of :mod:`bclib.experiments`: one fast
training run of LeNet-300-100 with the group NJ prior on real MNIST, shared by the module, whose
files are read back and checked against independent computations.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bclib
from bclib import compression, experiments
from bclib.__main__ import _with_flag, main
from bclib.data import TensorSplit
from bclib.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("config.json", "metrics.json", "report.json", "analysis.json", "model.bcz", "checkpoint.pt")
METRIC_KEYS = {"epoch", "loss", "ce", "kl", "beta", "lr", "train_error", "test_error", "test_ce", "seconds"}


def _python_m_bclib(args: list[str], env_extra: dict | None = None, cwd: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k != "BCLIB_FAST"}
    env.update({"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "bclib", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(mnist_root, tmp_path_factory) -> Path:
    """``python -m bclib train --model lenet300 --prior nj --out DIR --fast`` with ``BCLIB_DATA`` set."""
    out = tmp_path_factory.mktemp("cli") / "lenet300_nj"
    result = _python_m_bclib(["train", "--model", "lenet300", "--prior", "nj", "--out", str(out), "--fast"],
                             env_extra={"BCLIB_DATA": str(mnist_root)})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _read(run_dir: Path, name: str):
    return json.loads((run_dir / name).read_text())


# ----------------------------------------------------------------------------- help
def test_help_lists_the_commands():
    result = _python_m_bclib(["--help"])
    assert result.returncode == 0, result.stderr
    for command in ("train", "compress", "fine-tune", "lower-bits", "prune-layers", "prune-to-groups", "reproduce",
                    "results", "recount", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command, options", [
    ("train", ["--model", "--prior", "--out", "--fast", "--init-from", "--epochs", "--variance-dtype", "--autocast",
               "--memory-format"]),
    ("bench", ["--out", "--threads", "--variants", "--run", "--results", "--trials", "--keep-freed-memory"]),
    ("compress", ["--thresholds", "--data"]),
    ("fine-tune", ["--out", "--epochs", "--seeds", "--data"]),
    ("prune-layers", ["--out", "--epochs", "--seeds", "--take", "--tolerance", "--allowed-error", "--cut-fraction",
                      "--data"]),
    ("prune-to-groups", ["--out", "--epochs", "--groups", "--seeds", "--data"]),
    ("reproduce", ["--out", "--only"]),
    ("recount", ["--results"]),
])
def test_subcommand_help_lists_its_options(capsys, command, options):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text


@pytest.mark.parametrize("arguments, flag", [
    (["bench", "compression", "--trials", "0"], "--trials"), (["bench", "layers", "--threads", "-1"], "--threads"),
    (["train", "--model", "lenet300", "--prior", "nj", "--out", "unused", "--epochs", "0"], "--epochs"),
    (["fine-tune", "run", "--out", "unused", "--seeds", "0"], "--seeds"),
    (["prune-layers", "run", "--out", "unused", "--epochs", "-3"], "--epochs"),
    (["prune-to-groups", "run", "--out", "unused", "--groups", "1", "--seeds", "two"], "--seeds"),
])
def test_counts_below_one_are_refused_naming_the_flag(capsys, arguments, flag):
    with pytest.raises(SystemExit) as info:
        main(arguments)
    assert info.value.code == 2
    assert f"argument {flag}: must be a positive int, got" in capsys.readouterr().err


def test_bench_compression_refuses_a_run_folder_that_is_not_one(tmp_path, capsys):
    # Only the default folder may fall back to an untrained network; a typo must not time something else.
    with pytest.raises(SystemExit) as info:
        main(["bench", "compression", "--run", str(tmp_path / "lenet5_nk")])
    assert info.value.code == 2 and "--run: " in capsys.readouterr().err


def test_bench_refuses_a_folder_as_out_before_it_measures(tmp_path, capsys, monkeypatch):
    from bclib import bench
    monkeypatch.setattr(bench, "run_layers_bench", lambda **kwargs: pytest.fail("measured before checking --out"))
    with pytest.raises(SystemExit) as info:
        main(["bench", "layers", "--out", str(tmp_path)])
    assert info.value.code == 2 and f"--out: {str(tmp_path)!r} is a folder" in capsys.readouterr().err


def test_bench_refuses_an_out_path_below_a_file_before_it_measures(tmp_path, capsys, monkeypatch):
    from bclib import bench
    monkeypatch.setattr(bench, "run_layers_bench", lambda **kwargs: pytest.fail("measured before checking --out"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as info:
        main(["bench", "layers", "--out", str(tmp_path / "a_file" / "bench.json")])
    assert info.value.code == 2 and f"{str(tmp_path / 'a_file')!r} is a file" in capsys.readouterr().err


def test_bench_compression_refuses_a_named_run_it_cannot_time(tmp_path, capsys, monkeypatch):
    """A folder with config.json but neither checkpoint.pt nor report.json and model.bcz (a
    deterministic pretraining run's, say) is refused, not replaced by an untrained LeNet-5."""
    from bclib import bench
    monkeypatch.setattr(bench, "run_compression_bench", lambda *a, **k: pytest.fail("timed another network"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        main(["bench", "compression", "--run", str(tmp_path)])
    assert info.value.code == 2 and "--run: " in capsys.readouterr().err


def test_library_errors_name_the_flag_on_the_command_line():
    assert _with_flag("out_dir '/x' holds another run", "train") == "--out '/x' holds another run"
    assert _with_flag("thresholds: run '/x' is deterministic", "compress") == "--thresholds: run '/x' is deterministic"
    assert _with_flag("base_dir '/x' must be a run", "prune-layers") == "run '/x' must be a run"
    # reproduce names no run folder: its bases are found in --out, so the library's name stays.
    assert _with_flag("base_dir '/x' must be a run", "reproduce") == "base_dir '/x' must be a run"
    # reproduce's run folders lie inside its --out: naming one --out would mislead.
    assert _with_flag("out_dir '/x/run' holds another run", "reproduce") == "out_dir '/x/run' holds another run"
    for untouched in ("tolerance_scale must be", "groups[0] must be", "MNIST files not found", "'/x' is a file"):
        assert _with_flag(untouched, "prune-layers") == untouched


def test_bench_writes_its_results_with_the_command(tmp_path, capsys):
    out, runs = tmp_path / "bench.json", tmp_path / "runs"
    (runs / "lenet300_dense").mkdir(parents=True)
    (runs / "lenet300_dense" / "metrics.json").write_text(json.dumps([{"seconds": 5.0}, {"seconds": 7.0}]))
    (runs / "lenet300_dense" / "report.json").write_text(json.dumps({"dense_error": 0.02}))
    main(["bench", "training", "--results", str(runs), "--out", str(out)])
    saved = json.loads(out.read_text())
    # absolute paths are recorded relative to the folder the command ran in
    relative = {path: os.path.relpath(path) for path in (runs, out)}
    assert saved["command"] == f"python -m bclib bench training --results {relative[runs]} --out {relative[out]}"
    assert list(saved["results"]["training"]) == ["lenet300_dense"]
    assert saved["results"]["training"]["lenet300_dense"]["seconds"] == 12.0
    assert saved["torch"] == torch.__version__ and saved["threads"] >= 1 and saved["cpu"]
    # A folder without a finished run is an error (it used to report "all 0 runs: 0.0 h"), naming the flag.
    with pytest.raises(SystemExit) as info:
        main(["bench", "training", "--results", str(tmp_path / "no-runs")])
    assert info.value.code == 2 and "--results: no finished registered run" in capsys.readouterr().err


def test_results_prints_the_table_of_a_results_folder(tmp_path, capsys):
    def report(name, error, pruning, precision, ratio):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({
            "file_error": error, "compression_pruning": pruning, "compression_precision": precision,
            "file": {"ratio": ratio}}))

    report("lenet5_hs", 0.0106, 43.5, 161.4, 276.4)
    report("lenet5_hs_ft", 0.0085, 89.1, 323.6, 449.6)
    report("lenet5_hs_layers_3seeds_tol2", 0.0087, 98.3, 358.3, 494.0)
    report("lenet5_hs_layers_3seeds_tol2_bits", 0.0098, 98.3, 557.1, 869.4)
    report("lenet5_hs_layers_3seeds", 0.0090, 64.9, 240.0, 380.0)  # a search the table does not show
    main(["results", "--results", str(tmp_path)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][0] == "LeNet-5-Caffe" and rows[1] == ["BC-GHS", "paper", "1.00", "156x", "419x", "-"]
    assert rows[2:6] == [["ours", "1.06", "43.5x", "161.4x", "276x"],
                         ["ours", "+", "retraining", "0.85", "89.1x", "323.6x", "450x"],
                         ["ours", "+", "3", "seeds,", "0.2", "pts", "0.87", "98.3x", "358.3x", "494x"],
                         ["+", "fewer", "bits", "0.98", "98.3x", "557.1x", "869x"]]
    assert rows[6] == []
    with pytest.raises(SystemExit) as info:
        main(["results", "--results", str(tmp_path / "missing")])
    assert info.value.code == 2 and "--results: no report.json" in capsys.readouterr().err
    # A report that is no compressed run's (a deterministic run's, or no object) is named, not a traceback.
    (tmp_path / "lenet5_hs" / "report.json").write_text(json.dumps({"dense_error": 0.009}))
    with pytest.raises(SystemExit) as info:
        main(["results", "--results", str(tmp_path)])
    assert info.value.code == 2 and "report.json' is no compressed run's report: it lacks file_error" in \
        capsys.readouterr().err
    (tmp_path / "lenet5_hs" / "report.json").write_text("[]")
    with pytest.raises(SystemExit) as info:
        main(["results", "--results", str(tmp_path)])
    assert info.value.code == 2 and "must hold a JSON object, got a list" in capsys.readouterr().err


def test_train_starts_from_the_init_from_folder_whatever_its_name(mnist_root, tmp_path, monkeypatch, capsys):
    from bclib import experiments

    dense = tmp_path / "my_dense"  # not the recipe's "lenet300_dense"
    data = ["--data", str(mnist_root), "--fast", "--epochs", "1"]
    assert main(["train", "--model", "lenet300", "--prior", "none", "--out", str(dense), *data]) == 0
    loaded = []
    original = experiments.load_run_model
    monkeypatch.setattr(experiments, "load_run_model",
                        lambda folder, **options: loaded.append(Path(folder)) or original(folder, **options))
    out = tmp_path / "runs" / "hs"
    assert main(["train", "--model", "lenet300", "--prior", "hs", "--out", str(out), "--init-from", str(dense),
                 *data]) == 0
    assert loaded == [dense]
    config = _read(out, "config.json")
    assert config["init_dir"] == str(dense) and config["init_from"] == "lenet300_dense"
    capsys.readouterr()
    # A recipe that starts from a deterministic run needs the flag; one that trains from scratch refuses it.
    for arguments, message in ((["--prior", "hs"], "--init-from is required"),
                               (["--prior", "none", "--init-from", str(dense)], "--init-from: the lenet300 none"),
                               (["--prior", "hs", "--init-from", str(out)],
                                "is a lenet300 hs run; 'lenet300_hs' starts from a deterministic lenet300 run")):
        with pytest.raises(SystemExit) as info:
            main(["train", "--model", "lenet300", *arguments, "--out", str(tmp_path / "refused"), *data])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_train_records_the_layout_it_trained_in(mnist_root, tmp_path):
    out = tmp_path / "lenet5"
    assert main(["train", "--model", "lenet5", "--prior", "none", "--out", str(out), "--data", str(mnist_root),
                 "--fast", "--epochs", "1", "--memory-format", "channels_last"]) == 0
    assert _read(out, "config.json")["train"]["memory_format"] == "channels_last"


def test_reproduce_runs_each_registered_run_after_those_it_needs(monkeypatch, tmp_path, capsys):
    ran = []
    monkeypatch.setattr(experiments, "run_experiment", lambda name, out_dir, **kwargs: ran.append((name, out_dir)))
    main(["reproduce", "--only", "lenet5_dense", "lenet5_hs", "--out", str(tmp_path)])
    assert ran == [("lenet5_dense", tmp_path / "lenet5_dense"), ("lenet5_hs", tmp_path / "lenet5_hs")]
    assert "== lenet5_dense" in capsys.readouterr().out
    ran.clear()
    # A run whose base is neither in --out nor named before it is refused before anything runs.
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "--only", "lenet5_dense", "lenet5_hs_ft", "--out", str(tmp_path)])
    assert info.value.code == 2 and ran == []
    assert "lenet5_hs_ft starts from lenet5_hs (checkpoint.pt), which is neither in" in capsys.readouterr().err
    (tmp_path / "lenet5_hs").mkdir()
    (tmp_path / "lenet5_hs" / "checkpoint.pt").write_bytes(b"")  # present: enough for the check
    main(["reproduce", "--only", "lenet5_hs_ft", "--out", str(tmp_path)])
    assert ran == [("lenet5_hs_ft", tmp_path / "lenet5_hs_ft")]
    ran.clear()
    main(["reproduce", "--out", str(tmp_path)])
    order = [name for name, _ in ran]
    assert sorted(order) == sorted(experiments.EXPERIMENTS)
    for name, experiment in experiments.EXPERIMENTS.items():
        for needed in (experiment.init_from, experiment.refines):
            if needed is not None:
                assert order.index(needed) < order.index(name), (needed, name)


def test_reproduce_skip_finished_skips_only_runs_finished_with_the_same_fast_setting(monkeypatch, tmp_path, capsys):
    ran = []
    monkeypatch.setattr(experiments, "run_experiment", lambda name, out_dir, **kwargs: ran.append(name))
    monkeypatch.delenv("BCLIB_FAST", raising=False)
    for name, files in (("lenet5_dense", {"config.json": {"fast": False}}),  # started, not finished: resumes
                        ("lenet5_nj", {"config.json": {"fast": True}, "report.json": {}}),  # a --fast run
                        ("lenet5_hs", {"config.json": {"fast": False}, "report.json": {}}),  # finished
                        ("lenet5_svd", {"config.json": [False], "report.json": {}})):  # a damaged config: rerun
        (tmp_path / name).mkdir()
        for file, content in files.items():
            (tmp_path / name / file).write_text(json.dumps(content))
    names = ["lenet5_dense", "lenet5_nj", "lenet5_hs", "lenet5_svd"]
    main(["reproduce", "--only", *names, "--out", str(tmp_path), "--skip-finished"])
    assert ran == ["lenet5_dense", "lenet5_nj", "lenet5_svd"]
    assert "== lenet5_hs: finished in" in capsys.readouterr().out
    ran.clear()
    main(["reproduce", "--only", *names, "--out", str(tmp_path), "--skip-finished", "--fast"])
    assert ran == ["lenet5_dense", "lenet5_hs", "lenet5_svd"]
    ran.clear()
    main(["reproduce", "--only", *names, "--out", str(tmp_path)])  # the default: run them all
    assert ran == names
    # Smoke runs never land in the committed results by default.
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "--only", "lenet5_dense", "--fast"])
    assert info.value.code == 2 and "--out: a --fast (or BCLIB_FAST=1) reproduce needs a folder" in capsys.readouterr().err


def test_reproduce_list_names_every_run_in_order_with_what_it_does(capsys):
    with pytest.raises(SystemExit) as info:  # --only would be silently ignored
        main(["reproduce", "--list", "--only", "lenet5_hs"])
    assert info.value.code == 2 and "--list names every registered run; leave --only out" in capsys.readouterr().err
    assert main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == list(experiments.EXPERIMENTS)
    described = dict(zip(lines[0::2], lines[1::2]))
    # Written out by hand from the registry's comments, not from describe_experiment.
    assert described["lenet5_hs_scratch_shared_seed1"] == (
        "    train lenet5 hs from scratch, 200 epochs, seed 1, channels_last, one global scale")
    assert described["lenet5_nj"] == "    train lenet5 nj from lenet5_dense, 200 epochs"
    assert described["lenet300_nj_release_scaling"] == "    train lenet300 nj from scratch, 100 epochs, inputs in [-1, 1]"
    assert described["lenet5_hs_layers_3seeds_most"] == (
        "    search per layer from lenet5_hs: 3 seeds, most pruning, +0.1 points")
    assert described["lenet5_nj_heldout_layers_3seeds_tol2_perweight"] == (
        "    search per layer from lenet5_nj_heldout: 3 seeds, least error per weight, +0.2 points")
    assert described["lenet5_svd_ft"] == "    prune lenet5_svd further, 10 epochs per candidate"


def test_reproduce_only_with_an_unknown_name_runs_nothing_and_says_where_the_names_are(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(experiments, "run_experiment", lambda name, out_dir, **kwargs: ran.append(name))
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "--only", "lenet5_dense", "lenet5_hs_sharde", "--out", "unused"])
    assert info.value.code == 2 and ran == []
    assert "--only: no registered run named 'lenet5_hs_sharde'; python -m bclib reproduce --list" in capsys.readouterr().err


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "resnet", "--prior", "nj", "--out", "unused"])
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train
def test_train_writes_every_file(trained_run):
    for name in RUN_FILES:
        assert (trained_run / name).is_file(), name
    config = _read(trained_run, "config.json")
    assert (config["model"], config["prior"], config["fast"]) == ("lenet300", "nj", True)
    assert (config["train_examples"], config["test_examples"], config["train"]["epochs"]) == (5000, 1000, 2)
    assert config["command"].startswith("python -m bclib train --model lenet300 --prior nj --out ")
    metrics = _read(trained_run, "metrics.json")
    assert [row["epoch"] for row in metrics] == [1, 2]
    assert all(set(row) == METRIC_KEYS for row in metrics)
    assert metrics[-1]["test_error"] < 0.5  # 2 epochs on 5000 examples; chance is 0.9
    analysis = _read(trained_run, "analysis.json")
    assert list(analysis["layers"]) == [name for name, _ in bclib.bayesian_layers(bclib.models.lenet_300_100("nj"))]
    assert len(analysis["sweep"]) == len(experiments.SWEEP_OFFSETS)
    # fc1 has one group per input pixel: its histogram counts all 784 log-alphas.
    assert sum(analysis["layers"]["1"]["histogram"]["counts"]) == 784


def test_checkpoint_loads_without_unpickling_code(trained_run):
    state = torch.load(trained_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert state["model"]["1.weight_mu"].shape == (300, 784)


def test_report_describes_the_saved_file(trained_run):
    report = _read(trained_run, "report.json")
    assert len(report["thresholds"]) == 3 and len(report["layers"]) == 3
    assert report["file"]["name"] == "model.bcz"
    assert report["file"]["bytes"] == (trained_run / "model.bcz").stat().st_size
    # float32 dense LeNet-300-100, biases included: 266,610 parameters * 4 bytes.
    assert report["file"]["dense_float32_bytes"] == 266_610 * 4
    assert report["file"]["ratio"] == pytest.approx(266_610 * 4 / report["file"]["bytes"])
    # model.bcz is entropy-coded; the bit-packed size is recorded beside it, and is larger.
    assert report["file"]["bit_packed_bytes"] > report["file"]["bytes"]
    assert report["file"]["bit_packed_ratio"] == pytest.approx(266_610 * 4 / report["file"]["bit_packed_bytes"])


def test_compressed_file_scores_the_reported_error(trained_run, mnist):
    """Fast mode evaluates on the first 1000 test examples: score the file there, by hand."""
    _, test = mnist
    test = test.subset(1000)
    report = _read(trained_run, "report.json")
    model = bclib.load_compressed(trained_run / "model.bcz")
    with torch.no_grad():
        predictions = model(test.x).argmax(1)
    error = (predictions != test.y).sum().item() / 1000
    assert error == pytest.approx(report["file_error"], abs=1e-12)
    # The file holds the pruned architecture of the report (first layer: kept inputs of 784).
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert first.out_features == report["layers"][0]["out_kept"]


# ----------------------------------------------------------------------------- compress
@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the run, since ``compress`` rewrites the report."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


class _Stop(Exception):
    """Stands for a run killed midway."""


def _stop_in_epoch_2(epoch, model, metrics):
    if epoch == 2:
        raise _Stop


def test_a_resumed_run_writes_no_animations_of_its_last_epochs_only(mnist_root, tmp_path):
    """lenet300_nj records animations; stopped inside its second (fast) epoch and run again, its
    recorders see epoch 2 alone: it warns and writes no GIF rather than GIFs of one epoch."""
    out = tmp_path / "lenet300_nj"
    with pytest.raises(_Stop):
        experiments.run_experiment("lenet300_nj", out, data_root=mnist_root, fast=True, callbacks=[_stop_in_epoch_2],
                                   progress=False)
    (out / "pixel_importance.gif").write_bytes(b"an earlier run's")  # removed, not left to pass for this run's
    with pytest.warns(UserWarning, match="resumed from its checkpoint, so its animations, which need every epoch, were"):
        experiments.run_experiment("lenet300_nj", out, data_root=mnist_root, fast=True, progress=False)
    assert not list(out.glob("*.gif")) and _read(out, "report.json")["architecture"]
    with pytest.raises(ValueError, match="name must be a registered run"):
        experiments.paper_row("lenet5_hs_nope")


def test_a_run_stopped_midway_leaves_no_old_report_and_another_recipe_rewrites_nothing(mnist_root, tmp_path):
    """report.json is what marks a finished run (reproduce --skip-finished): a run started in a folder
    that held one removes it before writing, and a checkpoint of another recipe is refused before
    anything is written."""
    out = tmp_path / "lenet300_nj"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"name": "lenet300_nj", "fast": True}))
    (out / "report.json").write_text(json.dumps({"architecture": "an older run's"}))
    with pytest.raises(_Stop):
        experiments.run_experiment("lenet300_nj", out, data_root=mnist_root, fast=True,
                                   callbacks=[_stop_in_epoch_2], progress=False)
    assert not (out / "report.json").exists() and (out / "checkpoint.pt").is_file()
    config = (out / "config.json").read_text()
    with pytest.raises(ValueError, match="written by another recipe .*epochs=2 there, 3 here"):
        experiments.run_experiment("lenet300_nj", out, data_root=mnist_root, fast=True, epochs=3, progress=False)
    assert (out / "config.json").read_text() == config


def test_a_run_that_holds_out_its_selection_split_never_trains_on_it(mnist_root, mnist, tmp_path, monkeypatch):
    """holds_out_selection: the network trains on the first 5000 - 5000 // 6 = 4167 of the fast run's
    5000 examples, and its thresholds are chosen on the other 833, none of which it saw."""
    from dataclasses import replace

    name = "lenet300_nj_heldout"
    monkeypatch.setitem(experiments.EXPERIMENTS, name, replace(experiments.EXPERIMENTS["lenet300_nj"],
                                                              holds_out_selection=True, animate=False))
    seen, fit, select = {}, experiments.fit, experiments.compression.select_thresholds

    def recording_fit(model, train, *args, **kwargs):
        seen["train"] = train
        return fit(model, train, *args, **kwargs)

    def recording_select(model, x, y, **kwargs):
        seen["selection"] = x
        return select(model, x, y, **kwargs)

    monkeypatch.setattr(experiments, "fit", recording_fit)
    monkeypatch.setattr(experiments.compression, "select_thresholds", recording_select)
    experiments.run_experiment(name, tmp_path / name, data_root=mnist_root, fast=True, progress=False)
    config = _read(tmp_path / name, "config.json")
    assert (config["train_examples"], config["selection_examples"], config["holds_out_selection"]) == (4167, 833, True)
    rows = lambda x: {bytes(row.cpu().numpy()) for row in x.flatten(1)}  # noqa: E731
    trained, selection, every = rows(seen["train"].x), rows(seen["selection"]), rows(mnist[0].x[:5000])
    assert len(seen["train"]) == 4167 and len(seen["selection"]) == 833
    assert trained.isdisjoint(selection) and trained | selection == every


def test_a_run_with_one_global_scale_records_it_and_is_rebuilt_with_it(mnist_root, tmp_path, monkeypatch):
    """shared_scale: config.json records the model option, and load_run_model rebuilds one scale
    shared by every layer (a per-layer model would load the same checkpoint keys without a word)."""
    name = "lenet300_hs_shared"
    monkeypatch.setitem(experiments.EXPERIMENTS, name, replace(experiments.EXPERIMENTS["lenet300_hs"],
                                                              init_from=None, shared_scale=True))
    experiments.run_experiment(name, tmp_path / name, data_root=mnist_root, fast=True, epochs=1, progress=False)
    assert _read(tmp_path / name, "config.json")["model_options"] == {"shared_scale": True}
    model = experiments.load_run_model(tmp_path / name)
    layers = [layer for layer in model if isinstance(layer, bclib.LinearGroupHS)]
    assert len(layers) == 3 and all(layer.shared_scale is layers[0].global_scale for layer in layers)
    saved = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
    for key in ("1", "3", "5"):  # every layer's copy of the scale is the one trained value
        torch.testing.assert_close(saved[f"{key}.global_scale.sb_mu"], layers[0].global_scale.sb_mu)


def test_a_search_records_its_base_runs_model_options(tmp_path):
    base_config = {"model": "lenet300", "prior": "hs", "model_options": {"shared_scale": True}, "fast": True}
    splits = [TensorSplit(torch.zeros(n, 784), torch.zeros(n, dtype=torch.long)) for n in (3, 2, 1)]
    experiments._write_search_config(tmp_path / "search", base_config, TrainConfig(epochs=1), splits,
                                     {"prunes_layers_of": "base"})
    config = _read(tmp_path / "search", "config.json")
    assert config["model_options"] == {"shared_scale": True}  # build_run_model built a scale per layer from it
    assert experiments.build_run_model(config)[1].shared_scale is not None


def test_compress_run_stopped_before_its_report_leaves_none(run_copy, mnist_root, monkeypatch):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "_analysis", stopped)
    with pytest.raises(KeyboardInterrupt):
        experiments.compress_run(run_copy, thresholds=[-3.0, -3.0, -3.0], data_root=mnist_root)
    assert not (run_copy / "report.json").exists()


def test_a_run_whose_base_is_missing_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"'lenet5_hs_ft' starts from the run 'lenet5_hs': .* has no checkpoint.pt "
                                         r"\(run it first, e.g. python -m bclib reproduce --only lenet5_hs"):
        experiments.run_experiment("lenet5_hs_ft", tmp_path / "lenet5_hs_ft")
    with pytest.raises(ValueError, match=r"'lenet5_hs_layers' starts from the run 'lenet5_hs': .* has no model.bcz"):
        experiments.run_experiment("lenet5_hs_layers", tmp_path / "lenet5_hs_layers")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("damage, message", [
    (lambda report: report.pop("dense_error"), "'dense_error' must be a finite number"),
    (lambda report: report.pop("layers"), "'layers' must be a list of objects"),
    (lambda report: report["thresholds"].pop(), r"'thresholds' must be a list with a number \(or Infinity"),
    (lambda report: report.__setitem__("thresholds", "x"), r"'thresholds' must be a list with a number \(or Infinity"),
    (lambda report: report["thresholds"].__setitem__(0, None), r"'thresholds' must be a list with a number"),
])
def test_a_search_refuses_a_damaged_base_report_before_any_work(run_copy, tmp_path, damage, message):
    report = _read(run_copy, "report.json")
    damage(report)
    (run_copy / "report.json").write_text(json.dumps(report))
    for search in (experiments.prune_layers_run, experiments.lower_bits_run):  # they failed at the end, half-written
        with pytest.raises(ValueError, match=r"report.json' is damaged: " + message):
            search(run_copy, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()


def test_a_search_runs_with_its_base_runs_fast_setting(trained_run, tmp_path):
    # trained_run is a --fast run: a full search of it would retrain with full epochs on its small
    # data, and its config.json would say fast, as the base's does.
    with pytest.raises(ValueError, match=r"fast: 'lenet300_nj_layers' starts from the run 'lenet300_nj' in .*, "
                                         r"trained with fast=True; a run takes its base's setting, got fast=False"):
        experiments.run_experiment("lenet300_nj_layers", tmp_path / "lenet300_nj_layers", fast=False,
                                   results_root=trained_run.parent)
    assert not (tmp_path / "lenet300_nj_layers").exists()


def test_compress_run_scores_the_test_split_it_is_given(run_copy, mnist_root, mnist):
    """Without thresholds it loads the training data for the selection split, and keeps the 7-example
    test split it was given (it used to score the loaded test set instead)."""
    _, test = mnist
    seven = test.subset(7)
    report = experiments.compress_run(run_copy, test=seven, data_root=mnist_root)
    dense = experiments.load_run_model(run_copy)
    loaded = bclib.load_compressed(run_copy / "model.bcz")
    with torch.no_grad():
        for key, model in (("dense_error", dense), ("file_error", loaded)):
            wrong = int((model(seven.x).argmax(1) != seven.y).sum())
            assert report[key] == pytest.approx(wrong / 7, abs=1e-12), key


def test_a_stopped_run_is_refused_until_it_is_resumed(run_copy):
    # As a run stopped after its first epoch would be: its config asks for more than its checkpoint holds.
    config = _read(run_copy, "config.json")
    config["train"]["epochs"] += 1
    (run_copy / "config.json").write_text(json.dumps(config))
    report = (run_copy / "report.json").read_text()
    with pytest.raises(ValueError, match=r"run .* is unfinished: its checkpoint holds (\d+) of its \d+ epochs \(resume it "
                                         r"first: python -m bclib reproduce --only lenet300_nj"):
        experiments.compress_run(run_copy)  # it wrote a report, which made the run look finished
    assert (run_copy / "report.json").read_text() == report


def test_loading_a_run_leaves_the_callers_random_stream(run_copy):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    experiments.load_run_model(run_copy)  # its checkpoint holds the random state its training ended with
    assert torch.equal(torch.rand(3), expected)


def test_thresholds_for_a_deterministic_run_are_refused_before_anything_is_written(run_copy, monkeypatch):
    deterministic = bclib.models.lenet_300_100(None)
    monkeypatch.setattr(experiments, "load_run_model", lambda folder: deterministic)
    report = (run_copy / "report.json").read_text()
    with pytest.raises(ValueError, match="thresholds: run .* is deterministic"):
        experiments.compress_run(run_copy, thresholds=[-3.0, -3.0, -3.0])
    assert (run_copy / "report.json").read_text() == report


def test_compress_command_refuses_a_deterministic_run_and_thresholds_json_cannot_hold(run_copy, capsys):
    """A deterministic run has nothing to compress (compress used to re-score it and exit 0); an infinite
    threshold would make report.json invalid JSON (Python writes a bare Infinity)."""
    report = (run_copy / "report.json").read_text()
    config = _read(run_copy, "config.json")
    (run_copy / "config.json").write_text(json.dumps({**config, "prior": None}))
    with pytest.raises(SystemExit) as info:
        main(["compress", str(run_copy)])
    assert info.value.code == 2
    assert "is deterministic (prior none): it has nothing to compress" in capsys.readouterr().err
    (run_copy / "config.json").write_text(json.dumps(config))
    for value in ("inf", "nan", "three"):
        with pytest.raises(SystemExit):
            main(["compress", str(run_copy), "--thresholds", "-3", value, "-3"])
        assert "argument --thresholds: must be a" in capsys.readouterr().err
    assert (run_copy / "report.json").read_text() == report


def test_a_damaged_report_or_analysis_of_a_base_run_is_named(run_copy, tmp_path, capsys):
    for name, text in (("report.json", "garbage"), ("report.json", "[1, 2]"), ("analysis.json", "{")):
        damaged = Path(shutil.copytree(run_copy, tmp_path / f"damaged_{name}_{len(text)}"))
        (damaged / name).write_text(text)
        with pytest.raises(SystemExit) as info:
            main(["prune-layers", str(damaged), "--out", str(tmp_path / "out")])
        assert info.value.code == 2 and f"{str(damaged / name)!r} " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recount_sets_the_exponent_bits_from_the_stored_weights(run_copy, capsys):
    """A report whose exponent bits disagree with the weights model.bcz stores (as retraining left some
    before the fix) is recounted: e from the largest stored weight, the after-precision rate from e,
    both worked out here from the loaded file; the old values are kept in rates_recounted."""
    report = _read(run_copy, "report.json")
    stale = {**report, "exponent_bits": report["exponent_bits"] + 3, "compression_precision": 1.0,
             "compression_sparse_precision": 1.0}
    (run_copy / "report.json").write_text(json.dumps(stale))
    main(["recount", str(run_copy)])
    assert f"{run_copy}: exponent_bits {report['exponent_bits'] + 3} -> " in capsys.readouterr().out
    recounted = _read(run_copy, "report.json")
    loaded = bclib.load_compressed(run_copy / "model.bcz")
    largest = max(float(m.weight.detach().abs().max()) for m in loaded if isinstance(m, torch.nn.Linear))
    exponent = math.ceil(math.log2(abs(math.log2(largest)) + 1) + 1)
    rows = recounted["layers"]
    assert recounted["exponent_bits"] == exponent
    assert recounted["compression_precision"] == pytest.approx(
        32 * sum(r["weights_total"] for r in rows) / sum(r["weights_kept"] * (1 + exponent + r["bits"]) for r in rows))
    assert recounted["file"]["fraction_of_theoretical"] == pytest.approx(
        recounted["file"]["ratio"] / recounted["compression_precision"])
    assert recounted["rates_recounted"]["exponent_bits"] == report["exponent_bits"] + 3
    assert recounted["rates_recounted"]["command"].startswith("python -m bclib recount")
    # Counted right, nothing changes and nothing is written.
    main(["recount", str(run_copy)])
    assert capsys.readouterr().out == "1 runs checked, 0 changed\n" and _read(run_copy, "report.json") == recounted
    # A folder without a finished run is an error, not a silent success.
    with pytest.raises(SystemExit) as info:
        main(["recount", "--results", str(run_copy / "nowhere")])
    assert info.value.code == 2


def test_thresholds_that_prune_a_whole_layer_are_warned_about(run_copy, mnist_root):
    with pytest.warns(UserWarning, match=r"prune every group of a layer .*architecture 0-0-0\): the compressed "
                                         r"network predicts one class"):
        report = experiments.compress_run(run_copy, thresholds=[100.0, -100.0, 100.0], data_root=mnist_root)
    assert report["architecture"] == "0-0-0"  # with fc2 cut away, the AND rule strands every unit before it


def test_compress_run_takes_one_threshold_for_all_layers_as_compress_does(run_copy, mnist_root):
    report = experiments.compress_run(run_copy, thresholds=100.0, data_root=mnist_root)  # a TypeError before
    assert report["thresholds"] == [100.0, 100.0, 100.0] and report["architecture"] == "784-300-100"
    # Infinity (keep every group) is written as such, and a search takes the run as its base.
    experiments.compress_run(run_copy, thresholds=math.inf, data_root=mnist_root)
    report = _read(run_copy, "report.json")
    assert report["thresholds"] == [math.inf] * 3
    experiments._check_base_report(run_copy, report)


def test_compress_with_explicit_thresholds(run_copy, mnist_root, capsys):
    """Thresholds above every log alpha keep every weight: the exported network is the dense one."""
    assert main(["compress", str(run_copy), "--thresholds", "100", "100", "100", "--data", str(mnist_root)]) == 0
    report = _read(run_copy, "report.json")
    assert json.loads(capsys.readouterr().out) == report
    assert report["thresholds"] == [100.0, 100.0, 100.0]
    assert [(row["in_kept"], row["out_kept"]) for row in report["layers"]] == [(784, 300), (300, 100), (100, 10)]
    assert report["compression_pruning"] == pytest.approx(1.0)
    # Nothing pruned, so the exported float32 network scores the Bayesian model's eval error
    # (on the full 10000-example test set, which compress uses without --fast).
    assert report["pruned_error"] == report["dense_error"]


def test_compress_with_a_wrong_number_of_thresholds_fails_clearly(run_copy, mnist_root, capsys):
    before = {name: (run_copy / name).read_bytes() for name in ("report.json", "model.bcz", "analysis.json")}
    with pytest.raises(SystemExit) as info:
        main(["compress", str(run_copy), "--thresholds", "-3", "-3", "--data", str(mnist_root)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --thresholds must have one value per Bayesian layer (3" in err and "got 2" in err
    assert "Traceback" not in err
    for name, content in before.items():  # nothing rewritten
        assert (run_copy / name).read_bytes() == content, name


# ----------------------------------------------------------------------------- fine-tune
def _search(command: str, base: Path, out: Path, mnist_root, *options: str) -> Path:
    """``python -m bclib COMMAND BASE --out OUT --epochs 1 [options]``, which must succeed."""
    result = _python_m_bclib([command, str(base), "--out", str(out), "--epochs", "1", *options,
                              "--data", str(mnist_root)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _check_search_folder(run: Path, command: str, refines: tuple[str, str]) -> dict:
    """Every run file but a checkpoint, the config naming the run it refines (``(field, name)``),
    the nj prior, one epoch and the command; returns the config."""
    for name in RUN_FILES:
        assert (run / name).is_file() == (name != "checkpoint.pt"), name
    config = _read(run, "config.json")
    assert (config[refines[0]], config["prior"], config["train"]["epochs"]) == (refines[1], "nj", 1)
    assert config["command"].startswith(f"python -m bclib {command} ")
    return config


@pytest.fixture(scope="module")
def fine_tuned_run(trained_run, mnist_root, tmp_path_factory) -> Path:
    """``python -m bclib fine-tune RUN --out DIR --epochs 1 --seeds 2`` on the fast LeNet-300-100 NJ run."""
    return _search("fine-tune", trained_run, tmp_path_factory.mktemp("fine-tune") / "lenet300_nj_ft", mnist_root,
                   "--seeds", "2")


def test_fine_tune_writes_every_file_but_a_checkpoint(fine_tuned_run, trained_run):
    config = _check_search_folder(fine_tuned_run, "fine-tune", ("fine_tunes", "lenet300_nj"))
    # Fast mode: the 5000 training examples split into 4167 to retrain on and the last 833 to choose.
    assert (config["train_examples"], config["selection_examples"]) == (5000 - 833, 833)
    assert [row["epoch"] for row in _read(fine_tuned_run, "metrics.json")] == [1]


def test_fine_tune_keeps_the_last_offset_within_the_tolerance(fine_tuned_run, trained_run):
    """The rule, checked on the recorded candidates: offsets in order from 0, every kept one within
    0.1 points of the first's selection error, the search stopping at the first that is not."""
    analysis, report = _read(fine_tuned_run, "analysis.json"), _read(fine_tuned_run, "report.json")
    candidates = analysis["candidates"]
    offsets = [row["offset"] for row in candidates]
    assert offsets == list(experiments.FINE_TUNE_OFFSETS[:len(offsets)])
    allowed = candidates[0]["selection_error"] + experiments.SELECTION_TOLERANCE
    within = [row["selection_error"] <= allowed for row in candidates]
    expected = len(within) if all(within) else within.index(False)
    assert analysis["offset"] == offsets[expected - 1] == report["fine_tuning"]["offset"]
    assert all(within[:expected]) and within[expected:] in ([], [False])
    base = _read(trained_run, "report.json")
    assert report["thresholds"] == pytest.approx([t + analysis["offset"] for t in base["thresholds"]])


def test_fine_tune_records_the_seed_spread_of_the_kept_and_first_rejected_candidates(fine_tuned_run, trained_run,
                                                                                    mnist):
    """The kept candidate and the first rejected one (if the search rejected any) carry the errors of
    seeds 0 and 1; seed 0's are the candidate's own, and seed 1's come back when that candidate is
    compressed and retrained again with seed 1 through the public API, on the same examples."""
    analysis, config = _read(fine_tuned_run, "analysis.json"), _read(fine_tuned_run, "config.json")
    assert config["seeds"] == 2
    candidates = analysis["candidates"]
    kept = [row["offset"] for row in candidates].index(analysis["offset"])
    assert [i for i, row in enumerate(candidates) if "seeds" in row] == list(range(kept, min(kept + 2,
                                                                                         len(candidates))))
    for row in candidates[kept:kept + 2]:
        assert [seed["seed"] for seed in row["seeds"]] == [0, 1]
        assert (row["seeds"][0]["selection_error"], row["seeds"][0]["test_error"]) == (row["selection_error"],
                                                                                    row["test_error"])
    # Fast mode: the first 5000 training examples (4167 retrain, 833 select) and 1000 test examples.
    train, test = mnist
    train = train.subset(5000)
    fit, selection = train.subset(4167), TensorSplit(train.x[4167:], train.y[4167:])
    row = candidates[kept]
    compressed = bclib.compress(experiments.load_run_model(trained_run), row["thresholds"])
    recipe = TrainConfig.from_dict({**config["train"], "seed": 1})
    assert recipe.epochs == 1
    tuned, history = compression.fine_tune(compressed, fit, test.subset(1000), recipe)
    network = tuned.reduced_precision_model()
    with torch.no_grad():
        selection_error = (network(selection.x).argmax(1) != selection.y).sum().item() / len(selection)
    assert row["seeds"][1]["selection_error"] == pytest.approx(selection_error, abs=1e-12)
    assert row["seeds"][1]["test_error"] == pytest.approx(history[-1]["test_error"], abs=1e-12)


def test_fine_tuned_rates_are_those_of_the_pruned_architecture(fine_tuned_run, trained_run):
    """Compressing the base run afresh at the kept thresholds gives the same architecture and rates:
    retraining changes weight values only."""
    report = _read(fine_tuned_run, "report.json")
    fresh = bclib.compress(experiments.load_run_model(trained_run), report["thresholds"]).report
    assert report["architecture"] == fresh.architecture
    assert report["compression_precision"] == pytest.approx(fresh.compression_precision)
    assert [row["bits"] for row in report["layers"]] == [row.bits for row in fresh.layers]
    assert report["dense_error"] == _read(trained_run, "report.json")["dense_error"]


def test_fine_tuned_file_scores_the_reported_error(fine_tuned_run, mnist):
    _, test = mnist
    test = test.subset(1000)
    model = bclib.load_compressed(fine_tuned_run / "model.bcz")
    with torch.no_grad():
        error = (model(test.x).argmax(1) != test.y).sum().item() / 1000
    report = _read(fine_tuned_run, "report.json")
    assert error == pytest.approx(report["file_error"], abs=1e-12) == report["precision_error"]
    chosen = next(row for row in _read(fine_tuned_run, "analysis.json")["candidates"]
                  if row["offset"] == report["fine_tuning"]["offset"])
    assert chosen["test_error"] == pytest.approx(error, abs=1e-12)


def test_fine_tune_rejects_a_deterministic_run_and_its_own_folder(tmp_path, mnist_root):
    dense = tmp_path / "lenet300_dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model": "lenet300", "prior": None}))
    (dense / "report.json").write_text(json.dumps({"dense_error": 0.02}))
    with pytest.raises(ValueError, match="must be a compressed Bayesian run"):
        experiments.fine_tune_run(dense, tmp_path / "out", data_root=mnist_root)
    with pytest.raises(ValueError, match="out_dir must be a new folder"):
        experiments.fine_tune_run(dense, dense, data_root=mnist_root)
    for seeds, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"seeds must be a positive int, got"):
            experiments.fine_tune_run(dense, tmp_path / "out", seeds=seeds, data_root=mnist_root)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- lower-bits
@pytest.fixture(scope="module")
def bits_run(fine_tuned_run, mnist_root, tmp_path_factory) -> Path:
    """``python -m bclib lower-bits FT --out DIR --epochs 1`` on the fine-tuned fast run."""
    return _search("lower-bits", fine_tuned_run, tmp_path_factory.mktemp("lower-bits") / "lenet300_nj_ft_bits",
                   mnist_root)


def test_recount_of_a_bits_search_names_a_damaged_or_missing_base(bits_run, fine_tuned_run, tmp_path):
    runs = tmp_path / "runs"
    search, base = (Path(shutil.copytree(run, runs / run.name)) for run in (bits_run, fine_tuned_run))
    analysis = _read(search, "analysis.json")
    (search / "analysis.json").write_text(json.dumps({**analysis, "candidates": {}}))
    with pytest.raises(ValueError, match=r"analysis.json' is damaged: 'candidates' must be a list of objects"):
        experiments.recount_precision_rates(search)  # a KeyError or AttributeError before
    (base / "model.bcz").unlink()
    with pytest.raises(FileNotFoundError, match=r"not a finished run beside it \(report.json and model.bcz\)"):
        experiments.recount_precision_rates(search)  # a bare FileNotFoundError before


def _selection_error(model, mnist) -> float:
    """Error on the fast mode's selection split (training examples 4167..4999), computed here."""
    train, _ = mnist
    x, y = train.x[4167:5000], train.y[4167:5000]
    with torch.no_grad():
        return (model(x).argmax(1) != y).sum().item() / len(y)


def test_lower_bits_writes_every_file_but_a_checkpoint(bits_run):
    _check_search_folder(bits_run, "lower-bits", ("lowers_bits_of", "lenet300_nj_ft"))


def test_lower_bits_follows_its_rule(bits_run, fine_tuned_run, mnist):
    """Replays the search from the recorded candidates: layers by surviving weights times bits, largest
    first; per layer a binary search over 1..bits, a candidate kept when its selection error is within
    0.1 points of the base file's (computed here); the final bits are where each search ended."""
    base = _read(fine_tuned_run, "report.json")
    analysis, report = _read(bits_run, "analysis.json"), _read(bits_run, "report.json")
    reference = _selection_error(bclib.load_compressed(fine_tuned_run / "model.bcz"), mnist)
    assert analysis["reference_selection_error"] == pytest.approx(reference, abs=1e-12)
    allowed = reference + experiments.SELECTION_TOLERANCE
    names = [row["name"] for row in base["layers"]]
    bits = {row["name"]: row["bits"] for row in base["layers"]}
    order = sorted(base["layers"], key=lambda row: -row["weights_nonzero"] * row["bits"])
    candidates = iter(analysis["candidates"])
    for row in order:
        low, high = 1, bits[row["name"]]
        while low < high:
            trial = (low + high) // 2
            candidate = next(candidates)
            assert candidate["layer"] == row["name"]
            assert candidate["bits"] == [trial if name == row["name"] else bits[name] for name in names]
            assert candidate["kept"] == (candidate["selection_error"] <= allowed)
            high, low = (trial, low) if candidate["kept"] else (high, trial + 1)
        bits[row["name"]] = high
    assert next(candidates, None) is None
    assert [row["bits"] for row in report["layers"]] == [bits[name] for name in names] == report["bit_search"]["bits"]
    assert report["bit_search"]["bits_before"] == [row["bits"] for row in base["layers"]]
    assert report["bit_search"]["zero_survivors_train"] is True  # marks searches made after the fine_tune fix


def test_lowered_bits_keep_the_architecture_and_set_the_precision_rate(bits_run, fine_tuned_run):
    base, report = _read(fine_tuned_run, "report.json"), _read(bits_run, "report.json")
    assert (report["architecture"], report["compression_pruning"]) == (base["architecture"], base["compression_pruning"])
    total = sum(row["weights_total"] for row in report["layers"])
    stored = sum(row["weights_kept"] * (1 + report["exponent_bits"] + row["bits"]) for row in report["layers"])
    assert report["compression_precision"] == pytest.approx(32 * total / stored)
    assert report["exponent_bits"] == base["exponent_bits"] and report["thresholds"] == base["thresholds"]


def test_bit_lowered_file_holds_the_reported_bits_and_scores_the_reported_error(bits_run, mnist):
    from bclib.fileformat import read_compressed

    _, test = mnist
    test = test.subset(1000)
    _, specs, _ = read_compressed(bits_run / "model.bcz")
    report = _read(bits_run, "report.json")
    assert [spec["bits"] for spec in specs if "bits" in spec] == [row["bits"] for row in report["layers"]]
    model = bclib.load_compressed(bits_run / "model.bcz")
    with torch.no_grad():
        error = (model(test.x).argmax(1) != test.y).sum().item() / 1000
    assert error == pytest.approx(report["file_error"], abs=1e-12)
    kept = [row for row in _read(bits_run, "analysis.json")["candidates"] if row["kept"]]
    if kept:  # the last kept candidate is the saved network
        assert kept[-1]["test_error"] == pytest.approx(error, abs=1e-12)
        assert kept[-1]["file_bytes"] == report["file"]["bytes"] == (bits_run / "model.bcz").stat().st_size


def test_lower_bits_rejects_a_run_without_a_file_and_its_own_folder(tmp_path, mnist_root):
    run = tmp_path / "lenet300_nj"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "lenet300", "prior": "nj"}))
    (run / "report.json").write_text(json.dumps({"dense_error": 0.02, "thresholds": [0.0, 0.0, 0.0]}))
    with pytest.raises(ValueError, match="must be a compressed Bayesian run with report.json .* and model.bcz"):
        experiments.lower_bits_run(run, tmp_path / "out", data_root=mnist_root)
    with pytest.raises(ValueError, match="out_dir must be a new folder"):
        experiments.lower_bits_run(run, run, data_root=mnist_root)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- prune-layers
@pytest.fixture(scope="module")
def layers_run(trained_run, mnist_root, tmp_path_factory) -> Path:
    """``python -m bclib prune-layers RUN --out DIR --epochs 1`` on the fast Bayesian run."""
    return _search("prune-layers", trained_run, tmp_path_factory.mktemp("prune-layers") / "lenet300_nj_layers",
                   mnist_root)


def test_prune_layers_writes_every_file_but_a_checkpoint(layers_run):
    _check_search_folder(layers_run, "prune-layers", ("prunes_layers_of", "lenet300_nj"))


def test_prune_layers_follows_its_rule(layers_run, trained_run):
    """Replays the search from the recorded candidates and the Bayesian run itself: at each step every
    layer with two or more surviving groups offers to cut a quarter of them (at least one), those of
    highest log alpha, the threshold midway; the cut of lowest selection error within 0.1 points of
    the retrained base is taken; the search ends at a step with none within. Surviving groups and
    architectures come from compress on the base run's checkpoint, independently of the file."""
    base, base_analysis = _read(trained_run, "report.json"), _read(trained_run, "analysis.json")["layers"]
    analysis, report = _read(layers_run, "analysis.json"), _read(layers_run, "report.json")
    model = experiments.load_run_model(trained_run)
    first, *candidates = analysis["candidates"]
    assert (first["step"], first["layer"], first["thresholds"]) == (0, None, base["thresholds"])
    assert first["architecture"] == base["architecture"]
    allowed = first["selection_error"] + experiments.SELECTION_TOLERANCE
    assert analysis["allowed"] == pytest.approx(allowed, abs=1e-12)
    names = [row["name"] for row in base["layers"]]
    log_alpha = {name: torch.tensor(base_analysis[name]["log_alpha"]) for name in names}
    thresholds, step, candidates = list(base["thresholds"]), 1, iter(candidates)
    while True:
        masks = bclib.compress(model, thresholds).masks
        tried = []
        for k, name in enumerate(names):
            mask = masks[name][0]
            # A convolution's groups are its output channels, a linear layer's its inputs.
            groups = mask.flatten(1).any(1) if mask.dim() == 4 else mask.any(0)
            surviving = sorted(log_alpha[name][groups].tolist())
            if len(surviving) < 2:
                continue
            keep = len(surviving) - max(1, round(len(surviving) / 4))
            candidate = next(candidates)
            trial = thresholds[:k] + [(surviving[keep - 1] + surviving[keep]) / 2] + thresholds[k + 1:]
            assert (candidate["step"], candidate["layer"], candidate["groups"]) == (step, name, keep)
            assert candidate["thresholds"] == pytest.approx(trial, abs=1e-5)
            assert candidate["architecture"] == bclib.compress(model, candidate["thresholds"]).report.architecture
            tried.append(candidate)
        within = [c for c in tried if c["selection_error"] <= allowed]
        taken = min(within, key=lambda c: (c["selection_error"], -c["compression_pruning"])) if within else None
        assert [c["taken"] for c in tried] == [c is taken for c in tried]
        if taken is None:
            break
        thresholds, step = taken["thresholds"], step + 1
    assert next(candidates, None) is None
    assert report["thresholds"] == thresholds == report["layer_search"]["thresholds"]
    assert report["layer_search"]["zero_survivors_train"] is True


def test_layer_pruned_network_is_what_compress_gives_the_bayesian_network(layers_run, trained_run):
    """The search worked from the files; compressing the base run's trained Bayesian network (its
    checkpoint) at the chosen thresholds gives the same architecture and rates, with the base bits."""
    report, base = _read(layers_run, "report.json"), _read(trained_run, "report.json")
    fresh = bclib.compress(experiments.load_run_model(trained_run), report["thresholds"])
    fresh = fresh.with_bits([row["bits"] for row in base["layers"]]).report
    assert report["architecture"] == fresh.architecture
    assert [row["weights_kept"] for row in report["layers"]] == [row.weights_kept for row in fresh.layers]
    assert report["compression_pruning"] == pytest.approx(fresh.compression_pruning)
    assert report["compression_pruning"] >= base["compression_pruning"]


def test_layer_pruned_file_scores_the_reported_error(layers_run, mnist):
    _, test = mnist
    test = test.subset(1000)
    model = bclib.load_compressed(layers_run / "model.bcz")
    with torch.no_grad():
        error = (model(test.x).argmax(1) != test.y).sum().item() / 1000
    report = _read(layers_run, "report.json")
    assert error == pytest.approx(report["file_error"], abs=1e-12)
    taken = [row for row in _read(layers_run, "analysis.json")["candidates"] if row["taken"]]
    assert taken[-1]["test_error"] == pytest.approx(error, abs=1e-12)  # the base network if no cut was taken
    assert taken[-1]["architecture"] == report["architecture"]


def _retraining_by_cost(base: dict, count: str, cost: dict):
    """A stand-in for ``experiments._retrain``: no training; the error is 1 % plus, per layer,
    ``cost[layer]`` times the share of the base report's ``count`` (``"weights_kept"`` or
    ``"groups_kept"``) that the candidate cut."""
    kept = {row["name"]: row[count] for row in base["layers"]}

    def retrain(compressed, fit_split, selection, test, config, progress, reinitialize=False):
        error = 0.01 + sum(cost[row.name] * (1 - getattr(row, count) / kept[row.name])
                           for row in compressed.report.layers)
        return compressed, [{"epoch": 1, "seconds": 0.0}], {"selection_error": error, "test_error": error,
                                                           "seconds": 0.0}
    return retrain


def test_prune_layers_takes_the_least_harmful_cut_until_none_fits(trained_run, mnist_root, tmp_path, monkeypatch):
    """With retraining replaced by an error that grows with the share of each layer's weights cut
    (fc1's cuts cost little, fc3's much), the search takes several steps, each time the cheapest cut
    within the budget, and stops at a step where every cut costs too much."""
    base = _read(trained_run, "report.json")
    # error per share of the layer's weights cut
    monkeypatch.setattr(experiments, "_retrain", _retraining_by_cost(base, "weights_kept",
                                                                     {"1": 0.0008, "3": 0.002, "5": 0.02}))
    report = experiments.prune_layers_run(trained_run, tmp_path / "out", data_root=mnist_root, progress=False)
    candidates = _read(tmp_path / "out", "analysis.json")["candidates"]
    allowed = 0.01 + experiments.SELECTION_TOLERANCE
    steps = sorted({c["step"] for c in candidates if c["step"] > 0})
    assert len(steps) >= 3
    for step in steps:
        tried = [c for c in candidates if c["step"] == step]
        within = [c for c in tried if c["selection_error"] <= allowed]
        taken = [c for c in tried if c["taken"]]
        if step < steps[-1]:
            assert taken == [min(within, key=lambda c: c["selection_error"])]
        else:
            assert within == [] and taken == []
    assert {c["layer"] for c in candidates if c["taken"] and c["step"] > 0} <= {"1", "3"}  # fc3 costs too much
    assert report["compression_pruning"] > base["compression_pruning"]


def test_prune_layers_ranks_cuts_by_the_mean_over_seeds(trained_run, mnist_root, tmp_path, monkeypatch):
    """Two seeds per candidate. Seed 1 finds every cut of fc1's groups 0.4 points worse: alone, seed 0 would take
    fc1's cut first (it costs least); the mean takes fc2's, and fc1's mean is over the allowed error."""
    base = _read(trained_run, "report.json")
    kept = {row["name"]: row["weights_kept"] for row in base["layers"]}
    cost = {"1": 0.0008, "3": 0.002, "5": 0.02}
    groups = {row["name"]: row["groups_kept"] for row in base["layers"]}
    seen = []

    def retrain(compressed, fit_split, selection, test, config, progress, reinitialize=False):
        share = {row.name: 1 - row.weights_kept / kept[row.name] for row in compressed.report.layers}
        error = 0.01 + sum(cost[name] * cut for name, cut in share.items())
        if config.seed == 1 and compressed.report.layers[0].groups_kept < groups["1"]:
            error += 0.004  # fc1's own groups cut
        seen.append(config.seed)
        return compressed, [{"epoch": 1, "seconds": 1.0}], {"selection_error": error, "test_error": error + 1e-4,
                                                           "seconds": 1.0}

    monkeypatch.setattr(experiments, "_retrain", retrain)
    with pytest.raises(ValueError, match="seeds must be a positive int, got 0"):
        experiments.prune_layers_run(trained_run, tmp_path / "bad", seeds=0, data_root=mnist_root, progress=False)
    experiments.prune_layers_run(trained_run, tmp_path / "out", seeds=2, data_root=mnist_root, progress=False)
    analysis = _read(tmp_path / "out", "analysis.json")
    candidates = analysis["candidates"]
    assert seen == [0, 1] * len(candidates)
    for c in candidates:
        assert [entry["seed"] for entry in c["seeds"]] == [0, 1]
        assert c["selection_error"] == pytest.approx(sum(e["selection_error"] for e in c["seeds"]) / 2, abs=1e-12)
        assert c["test_error"] == c["seeds"][0]["test_error"] and c["seconds"] == 2.0
    assert analysis["allowed"] == pytest.approx(0.01 + experiments.SELECTION_TOLERANCE, abs=1e-12)
    first = {c["layer"]: c for c in candidates if c["step"] == 1}
    assert first["1"]["seeds"][0]["selection_error"] < first["3"]["seeds"][0]["selection_error"]  # seed 0 alone
    assert first["3"]["taken"] and not first["1"]["taken"]
    assert first["1"]["selection_error"] > analysis["allowed"]
    assert _read(tmp_path / "out", "config.json")["seeds"] == 2


def test_prune_layers_counts_a_cut_on_the_allowance_as_within_and_ties_by_counts(trained_run, mnist_root,
                                                                                 tmp_path, monkeypatch):
    """Errors as counts over 10,000 examples. One cut of a layer (a quarter of its groups) makes
    ``counts[layer][seed]`` errors, the base 6 per seed, anything else 9000."""
    base = _read(trained_run, "report.json")
    groups = {row["name"]: row["groups_kept"] for row in base["layers"]}

    def retraining(counts):
        def retrain(compressed, fit_split, selection, test, config, progress, reinitialize=False):
            cut = [row.name for row in compressed.report.layers if row.groups_kept < groups[row.name]]
            once = len(cut) == 1 and compressed.report.layers[[r.name for r in compressed.report.layers].index(
                cut[0])].groups_kept >= 0.7 * groups[cut[0]]
            count = 6 if not cut else counts[cut[0]][config.seed] if once and cut[0] in counts else 9000
            return compressed, [{"epoch": 1, "seconds": 0.0}], {"selection_error": count / 10_000,
                                                               "test_error": count / 10_000, "seconds": 0.0}
        return retrain

    # fc1's cut makes 16 errors: exactly 0.1 points above the base's 6, which float arithmetic puts
    # over (16 / 10,000 > 6 / 10,000 + 0.001); it is within the allowance.
    assert 16 / 10_000 > 6 / 10_000 + 0.001
    monkeypatch.setattr(experiments, "_retrain", retraining({"1": (16,)}))
    experiments.prune_layers_run(trained_run, tmp_path / "boundary", data_root=mnist_root, progress=False)
    first = {c["layer"]: c for c in _read(tmp_path / "boundary", "analysis.json")["candidates"] if c["step"] == 1}
    assert first["1"]["taken"]
    # Three seeds: fc2's cut makes 80, 80 and 83 errors, fc1's 81 each: the same 243, whose means
    # float sums round apart; the tie goes to the cut that prunes more (fc2's, which also removes rows of fc1).
    monkeypatch.setattr(experiments, "_retrain", retraining({"3": (80, 80, 83), "1": (81, 81, 81)}))
    experiments.prune_layers_run(trained_run, tmp_path / "tie", seeds=3, tolerance=0.008, data_root=mnist_root,
                                 progress=False)
    first = {c["layer"]: c for c in _read(tmp_path / "tie", "analysis.json")["candidates"] if c["step"] == 1}
    assert first["3"]["selection_error"] > first["1"]["selection_error"]  # as float sums round them
    assert first["3"]["compression_pruning"] > first["1"]["compression_pruning"]
    assert first["3"]["taken"] and not first["1"]["taken"]


def test_prune_layers_can_take_the_cut_that_prunes_most(trained_run, mnist_root, tmp_path, monkeypatch):
    """take="most_pruning": the error grows with the share of each layer's groups cut, fc2's (which also
    removes fc1's rows) costing more than fc1's but staying within the allowed error. The rule of least
    error would take fc1's cut first; this one takes fc2's, and at every step the cut of highest
    compression within the allowed error, until none fits."""
    # error per share of the layer's groups cut
    monkeypatch.setattr(experiments, "_retrain", _retraining_by_cost(_read(trained_run, "report.json"), "groups_kept",
                                                                     {"1": 0.0008, "3": 0.0028, "5": 0.02}))
    with pytest.raises(ValueError, match=r"take must be one of \('least_error', 'most_pruning', "
                       r"'least_error_per_weight'\), got 'largest'"):
        experiments.prune_layers_run(trained_run, tmp_path / "bad", take="largest", data_root=mnist_root,
                                     progress=False)
    assert not (tmp_path / "bad").exists()
    report = experiments.prune_layers_run(trained_run, tmp_path / "out", take="most_pruning", data_root=mnist_root,
                                          progress=False)
    analysis = _read(tmp_path / "out", "analysis.json")
    candidates, allowed = analysis["candidates"], analysis["allowed"]
    first = {c["layer"]: c for c in candidates if c["step"] == 1}
    assert first["1"]["selection_error"] < first["3"]["selection_error"] <= allowed
    assert first["3"]["compression_pruning"] > first["1"]["compression_pruning"]
    assert first["3"]["taken"] and not first["1"]["taken"]
    steps = sorted({c["step"] for c in candidates if c["step"] > 0})
    assert len(steps) >= 2
    for step in steps:
        within = [c for c in candidates if c["step"] == step and c["selection_error"] <= allowed]
        taken = [c for c in candidates if c["step"] == step and c["taken"]]
        assert taken == ([max(within, key=lambda c: c["compression_pruning"])] if step < steps[-1] else [])
    assert report["architecture"] == [c for c in candidates if c["taken"]][-1]["architecture"]
    assert _read(tmp_path / "out", "config.json")["take"] == "most_pruning"


def test_prune_layers_can_take_the_cut_of_least_error_per_weight(trained_run, mnist_root, tmp_path, monkeypatch):
    """take="least_error_per_weight": each step takes, among the cuts within the allowed error, the one
    whose selection error rises least per weight removed from the network it cuts from (weights read
    here from each row's compression and the base report's weight count). The costs make fc2's cut
    (which also removes fc1's rows) dearer than fc1's but cheaper per weight, so the rule differs from
    the least-error rule at the first step."""
    base = _read(trained_run, "report.json")
    monkeypatch.setattr(experiments, "_retrain", _retraining_by_cost(base, "groups_kept",
                                                                     {"1": 0.0008, "3": 0.00086, "5": 0.02}))
    experiments.prune_layers_run(trained_run, tmp_path / "out", take="least_error_per_weight",
                                 data_root=mnist_root, progress=False)
    analysis = _read(tmp_path / "out", "analysis.json")
    candidates, allowed = analysis["candidates"], analysis["allowed"]
    weights = sum(row["weights_total"] for row in base["layers"])
    first = {c["layer"]: c for c in candidates if c["step"] == 1}
    assert first["1"]["selection_error"] < first["3"]["selection_error"] <= allowed
    assert first["3"]["taken"] and not first["1"]["taken"]
    current = candidates[0]
    steps = sorted({c["step"] for c in candidates if c["step"] > 0})
    assert len(steps) >= 2
    for step in steps:
        within = [c for c in candidates if c["step"] == step and c["selection_error"] <= allowed]
        taken = [c for c in candidates if c["step"] == step and c["taken"]]

        def per_weight(c):
            removed = weights / current["compression_pruning"] - weights / c["compression_pruning"]
            assert removed >= 1
            return (c["selection_error"] - current["selection_error"]) / removed
        assert taken == ([min(within, key=per_weight)] if step < steps[-1] else [])
        current = taken[0] if taken else current
    assert _read(tmp_path / "out", "config.json")["take"] == "least_error_per_weight"


def test_prune_layers_tolerance_and_cut_fraction(trained_run, mnist_root, tmp_path, monkeypatch):
    """cut_fraction=0.5 halves a layer's surviving groups per cut (at least one); tolerance=0.003 allows
    the base's error + 0.3 points. With the error growing with each layer's share of groups cut, the
    wider allowance takes more steps than the default one. Values outside (0, 1) are refused."""
    base = _read(trained_run, "report.json")
    monkeypatch.setattr(experiments, "_retrain", _retraining_by_cost(base, "groups_kept",
                                                                     {"1": 0.0018, "3": 0.0018, "5": 0.02}))
    for label, bad in (("tolerance", 0), ("tolerance", 1.5), ("cut_fraction", 1), ("cut_fraction", True),
                       ("cut_fraction", "0.5")):
        with pytest.raises(ValueError, match=f"{label} must be a number in \\(0, 1\\), got {bad!r}"):
            experiments.prune_layers_run(trained_run, tmp_path / "bad", data_root=mnist_root, progress=False,
                                         **{label: bad})
    assert not (tmp_path / "bad").exists()
    runs = {}
    for tolerance in (0.001, 0.003):
        out = tmp_path / f"out{tolerance}"
        experiments.prune_layers_run(trained_run, out, tolerance=tolerance, cut_fraction=0.5, data_root=mnist_root,
                                     progress=False)
        runs[tolerance] = _read(out, "analysis.json")
        assert runs[tolerance]["allowed"] == pytest.approx(0.01 + tolerance, abs=1e-12)
        config = _read(out, "config.json")
        assert (config["selection_tolerance"], config["cut_fraction"]) == (tolerance, 0.5)
        surviving = {row["name"]: row["groups_kept"] for row in base["layers"]}
        for step in sorted({c["step"] for c in runs[tolerance]["candidates"] if c["step"] > 0}):
            for c in (c for c in runs[tolerance]["candidates"] if c["step"] == step):
                n = surviving[c["layer"]]
                assert c["groups"] == n - max(1, round(0.5 * n))
            taken = [c for c in runs[tolerance]["candidates"] if c["step"] == step and c["taken"]]
            if taken:
                surviving[taken[0]["layer"]] = taken[0]["groups"]
    steps_taken = {t: sum(c["taken"] for c in run["candidates"]) for t, run in runs.items()}
    assert steps_taken[0.003] > steps_taken[0.001] >= 1

    # Free cuts of 99 %: on small layers 99 % rounds to every group, yet each cut leaves at least one
    # and removes at least one, so the search ends with one group per layer.
    monkeypatch.setattr(experiments, "_retrain", _retraining_by_cost(base, "groups_kept", {"1": 0, "3": 0, "5": 0}))
    deep = experiments.prune_layers_run(trained_run, tmp_path / "deep", cut_fraction=0.99, data_root=mnist_root,
                                        progress=False)
    surviving, small_cuts = {row["name"]: row["groups_kept"] for row in base["layers"]}, 0
    for step in sorted({c["step"] for c in _read(tmp_path / "deep", "analysis.json")["candidates"] if c["step"] > 0}):
        tried = [c for c in _read(tmp_path / "deep", "analysis.json")["candidates"] if c["step"] == step]
        assert all(1 <= c["groups"] < surviving[c["layer"]] for c in tried)
        # up to 50 groups, 99 % rounds to all of them: exactly one is left
        small = [c for c in tried if surviving[c["layer"]] <= 50]
        assert all(c["groups"] == 1 for c in small)
        small_cuts += len(small)
        for c in tried:
            surviving[c["layer"]] = c["groups"] if c["taken"] else surviving[c["layer"]]
    assert small_cuts > 0 and deep["architecture"] == "1-1-1"


def test_prune_layers_can_spend_a_fixed_allowance(trained_run, mnist_root, tmp_path, monkeypatch):
    """allowed_error=0.0125: cuts may reach 1.25 % selection error whatever the base network's (1 %
    here), so the search goes further than with the base's 1 % + 0.1 points, and stops at a step
    with every cut above 1.25 %. Refused for a base run that trained on its selection split, and for
    values outside (0, 1), before anything is written."""
    base = _read(trained_run, "report.json")
    monkeypatch.setattr(experiments, "_retrain", _retraining_by_cost(base, "groups_kept",
                                                                     {"1": 0.0018, "3": 0.0018, "5": 0.02}))
    with pytest.raises(ValueError, match="allowed_error needs a base run that held out its selection split"):
        experiments.prune_layers_run(trained_run, tmp_path / "bad", allowed_error=0.0125, data_root=mnist_root,
                                     progress=False)
    held_out = Path(shutil.copytree(trained_run, tmp_path / "lenet300_nj"))
    config = _read(held_out, "config.json")
    (held_out / "config.json").write_text(json.dumps({**config, "holds_out_selection": True}))
    for bad in (0, 1.5, True, "0.01"):
        with pytest.raises(ValueError, match=f"allowed_error must be a number in \\(0, 1\\), got {bad!r}"):
            experiments.prune_layers_run(held_out, tmp_path / "bad", allowed_error=bad, data_root=mnist_root,
                                         progress=False)
    assert not (tmp_path / "bad").exists()
    experiments.prune_layers_run(held_out, tmp_path / "fixed", allowed_error=0.0125, data_root=mnist_root,
                                 progress=False)
    experiments.prune_layers_run(held_out, tmp_path / "relative", data_root=mnist_root, progress=False)
    fixed, relative = _read(tmp_path / "fixed", "analysis.json"), _read(tmp_path / "relative", "analysis.json")
    assert fixed["candidates"][0]["selection_error"] == pytest.approx(0.01, abs=1e-12)
    assert (fixed["allowed"], relative["allowed"]) == (0.0125, pytest.approx(0.011, abs=1e-12))
    last = max(c["step"] for c in fixed["candidates"])
    for c in fixed["candidates"][1:]:
        assert c["taken"] <= (c["selection_error"] <= 0.0125)
        assert not (c["step"] == last and c["selection_error"] <= 0.0125)
    taken = {name: sum(c["taken"] for c in run["candidates"][1:]) for name, run in (("fixed", fixed),
                                                                                   ("relative", relative))}
    assert taken["fixed"] > taken["relative"] >= 1
    fixed_config, relative_config = _read(tmp_path / "fixed", "config.json"), _read(tmp_path / "relative", "config.json")
    assert (fixed_config["allowed_error"], relative_config["selection_tolerance"]) == (0.0125, 0.001)
    # Each records only what set its allowed error.
    assert "selection_tolerance" not in fixed_config and "allowed_error" not in relative_config


def test_prune_layers_command_passes_its_options(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(experiments, "prune_layers_run", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    main(["prune-layers", "RUN", "--out", str(tmp_path / "out"), "--seeds", "3", "--take", "most_pruning",
          "--cut-fraction", "0.5", "--allowed-error", "0.009"])
    main(["prune-layers", "RUN", "--out", str(tmp_path / "out"), "--tolerance", "0.002"])
    assert [(kwargs["seeds"], kwargs["take"], kwargs["tolerance"], kwargs["cut_fraction"], kwargs["allowed_error"])
            for _, kwargs in calls] == [(3, "most_pruning", 0.001, 0.5, 0.009), (1, "least_error", 0.002, 0.25, None)]
    with pytest.raises(SystemExit):
        main(["prune-layers", "RUN", "--out", str(tmp_path / "out"), "--take", "largest"])
    assert "invalid choice: 'largest'" in capsys.readouterr().err
    # The tolerance plays no part beside a fixed allowance: asking for both is refused.
    with pytest.raises(SystemExit):
        main(["prune-layers", "RUN", "--out", str(tmp_path / "out"), "--tolerance", "0.002", "--allowed-error", "0.009"])
    assert "argument --allowed-error: not allowed with argument --tolerance" in capsys.readouterr().err
    assert len(calls) == 2


# ----------------------------------------------------------------------------- prune-to-groups
def _fewer_groups(report: dict) -> list[int]:
    """Groups to ask of the fast LeNet-300-100 run: 5 fewer inputs, half its fc2 inputs, all of fc3's."""
    counts = [int(count) for count in report["architecture"].split("-")]
    return [counts[0] - 5, max(1, counts[1] // 2), counts[2]]


@pytest.fixture(scope="module")
def groups_run(trained_run, mnist_root, tmp_path_factory) -> Path:
    """``python -m bclib prune-to-groups RUN --groups ... --seeds 2 --out DIR --epochs 1`` on the fast run."""
    groups = _fewer_groups(_read(trained_run, "report.json"))
    return _search("prune-to-groups", trained_run, tmp_path_factory.mktemp("prune-to-groups") / "lenet300_nj_groups",
                   mnist_root, "--groups", *map(str, groups), "--seeds", "2")


def test_prune_to_groups_writes_every_file_but_a_checkpoint(groups_run, trained_run):
    config = _check_search_folder(groups_run, "prune-to-groups", ("prunes_to_groups_of", "lenet300_nj"))
    assert (config["groups"], config["seeds"]) == (_fewer_groups(_read(trained_run, "report.json")), 2)
    assert "selection_tolerance" not in config  # nothing is selected
    assert [row["epoch"] for row in _read(groups_run, "metrics.json")] == [1]


def test_prune_to_groups_keeps_the_groups_of_lowest_log_alpha(groups_run, trained_run):
    """Checked on the Bayesian run itself, independently of the file: fc1 keeps the inputs of lowest
    log alpha among those the base kept, its threshold midway between the last kept and the first
    cut; compress at the run's thresholds gives its architecture; fc3 keeps its threshold."""
    base, report = _read(trained_run, "report.json"), _read(groups_run, "report.json")
    model = experiments.load_run_model(trained_run)
    asked = _fewer_groups(base)
    kept = [int(count) for count in report["architecture"].split("-")]
    assert all(k <= a for k, a in zip(kept, asked)) and kept[0] == asked[0]
    fc1 = next(layer for _, layer in bclib.bayesian_layers(model))
    log_alpha = fc1.log_alpha().detach()
    surviving = torch.sort(log_alpha[log_alpha < base["thresholds"][0]]).values
    assert report["thresholds"][0] == pytest.approx(float(surviving[asked[0] - 1] + surviving[asked[0]]) / 2)
    assert report["thresholds"][2] == base["thresholds"][2]
    assert bclib.compress(model, report["thresholds"]).report.architecture == report["architecture"]
    assert report["group_cut"]["thresholds_before"] == base["thresholds"]


def test_prune_to_groups_records_each_seed_and_the_file_scores_the_report(groups_run, mnist):
    _, test = mnist
    analysis, report = _read(groups_run, "analysis.json"), _read(groups_run, "report.json")
    assert [seed["seed"] for seed in analysis["seeds"]] == [0, 1]
    mean = sum(seed["selection_error"] for seed in analysis["seeds"]) / 2
    assert report["group_cut"]["selection_error"] == pytest.approx(mean, abs=1e-12)
    assert analysis["architecture"] == report["architecture"] and analysis["thresholds"] == report["thresholds"]
    test = test.subset(1000)
    model = bclib.load_compressed(groups_run / "model.bcz")
    with torch.no_grad():
        error = (model(test.x).argmax(1) != test.y).sum().item() / 1000
    assert error == pytest.approx(report["file_error"], abs=1e-12)
    assert analysis["seeds"][0]["test_error"] == pytest.approx(error, abs=1e-12)


def test_prune_to_groups_reinitialized_retrains_the_same_cut_from_fresh_weights(groups_run, trained_run, mnist_root,
                                                                              tmp_path):
    """``--reinitialize --bits 12``: groups_run's cut, recorded as such, on 12-bit grids, and each seed's
    retraining scores otherwise than groups_run's from the run's weights with the same seed."""
    groups = _fewer_groups(_read(trained_run, "report.json"))
    run = _search("prune-to-groups", trained_run, tmp_path / "fresh", mnist_root, "--groups", *map(str, groups),
                  "--seeds", "2", "--reinitialize", "--bits", "12")
    config, report, cut = _read(run, "config.json"), _read(run, "report.json"), _read(groups_run, "report.json")
    assert (config["reinitialize"], config["bits"]) == (True, 12)
    assert (report["group_cut"]["reinitialize"], report["group_cut"]["bits"]) == (True, 12)
    assert not {"reinitialize", "bits"} & set(_read(groups_run, "config.json"))  # recorded only when set
    assert report["architecture"] == cut["architecture"]
    assert [row["bits"] for row in report["layers"]] == [12, 12, 12]
    fresh, from_run = (_read(folder, "analysis.json")["seeds"] for folder in (run, groups_run))
    for seed in (0, 1):
        assert fresh[seed]["seed"] == from_run[seed]["seed"] == seed
        assert fresh[seed]["selection_error"] != from_run[seed]["selection_error"]


def test_prune_to_groups_rejects_bad_groups_and_seeds_before_writing(trained_run, mnist_root, tmp_path):
    with pytest.raises(ValueError, match=r"groups must hold one positive int per Bayesian layer \(3: "):
        experiments.prune_to_groups_run(trained_run, tmp_path / "out", groups=[10, 10], data_root=mnist_root)
    with pytest.raises(ValueError, match="seeds must be a positive int, got 0"):
        experiments.prune_to_groups_run(trained_run, tmp_path / "out", groups=[10, 10, 10], seeds=0,
                                        data_root=mnist_root)
    # Groups no layer exceeds: nothing to cut, so no retraining of the file as it is under the name of a cut.
    architecture = _read(trained_run, "report.json")["architecture"]
    at_most = [int(count) for count in architecture.split("-")]
    for groups in (at_most, [count + 1 for count in at_most]):
        with pytest.raises(ValueError, match=re.escape(f"groups {groups} cut nothing from ") + f".*its layers keep {architecture} groups"):
            experiments.prune_to_groups_run(trained_run, tmp_path / "out", groups=groups, data_root=mnist_root)
    assert not (tmp_path / "out").exists()


class _Stopped(Exception):
    """Stands for a search killed midway (the end of a session)."""


def _without_seconds(data):
    """JSON data with every ``"seconds"`` left out (a resumed search keeps the first run's timings)."""
    if isinstance(data, dict):
        return {k: _without_seconds(v) for k, v in data.items() if k != "seconds"}
    if isinstance(data, list):
        return [_without_seconds(v) for v in data]
    return data


def test_prune_layers_resumes_where_it_stopped(trained_run, mnist_root, tmp_path, monkeypatch):
    """A real search (one-epoch retrainings) stopped in the middle of a step, then run again: it
    retrains only the candidates it had not reached, and writes the same files as a search run in one
    go (the timings aside); its checkpoint is gone at the end."""
    config, real, calls = replace(experiments.FINE_TUNE_CONFIG, epochs=1), experiments._retrain, []

    def counted(*args, **kwargs):
        calls.append(args[0].report.architecture)
        return real(*args, **kwargs)

    def stopping(*args, **kwargs):
        if len(calls) == stop_after:
            raise _Stopped
        return counted(*args, **kwargs)

    monkeypatch.setattr(experiments, "_retrain", counted)
    # A wide allowance (2 points), so that the one-epoch retrainings take several steps.
    search = {"config": config, "tolerance": 0.02, "data_root": mnist_root, "progress": False}
    experiments.prune_layers_run(trained_run, tmp_path / "whole", **search)
    whole = {name: _read(tmp_path / "whole", name) for name in ("analysis.json", "metrics.json", "report.json")}
    total, steps = len(calls), max(c["step"] for c in whole["analysis.json"]["candidates"])
    assert steps >= 2 and not (tmp_path / "whole" / experiments.SEARCH_CHECKPOINT).exists()
    stop_after = total - 2  # the resumed search replays all but the last two retrainings
    calls.clear()
    monkeypatch.setattr(experiments, "_retrain", stopping)
    with pytest.raises(_Stopped):
        experiments.prune_layers_run(trained_run, tmp_path / "resumed", **search)
    checkpoint = tmp_path / "resumed" / experiments.SEARCH_CHECKPOINT
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [experiments.SEARCH_CHECKPOINT]
    assert len(_read(checkpoint, "progress.json")["candidates"]) == stop_after
    calls.clear()
    monkeypatch.setattr(experiments, "_retrain", counted)
    experiments.prune_layers_run(trained_run, tmp_path / "resumed", **search)
    assert len(calls) == total - stop_after == 2
    for name, data in whole.items():
        assert _without_seconds(_read(tmp_path / "resumed", name)) == _without_seconds(data), name
    assert (tmp_path / "resumed" / "model.bcz").read_bytes() == (tmp_path / "whole" / "model.bcz").read_bytes()
    assert not checkpoint.exists()


def test_prune_layers_sets_aside_a_checkpoint_of_other_settings(trained_run, mnist_root, tmp_path, monkeypatch,
                                                                 capsys):
    """A checkpoint left by a search with another allowance is not mixed in: every candidate is retrained."""
    base, calls = _read(trained_run, "report.json"), []
    stand_in = _retraining_by_cost(base, "weights_kept", {"1": 0.0008, "3": 0.002, "5": 0.02})

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and stopping:
            raise _Stopped
        return stand_in(*args, **kwargs)

    monkeypatch.setattr(experiments, "_retrain", counted)
    stopping = True
    with pytest.raises(_Stopped):
        experiments.prune_layers_run(trained_run, tmp_path / "out", tolerance=0.002, data_root=mnist_root)
    stopping, calls[:] = False, []
    experiments.prune_layers_run(trained_run, tmp_path / "fresh", data_root=mnist_root, progress=False)
    fresh = len(calls)
    calls.clear()
    experiments.prune_layers_run(trained_run, tmp_path / "out", data_root=mnist_root)
    assert len(calls) == fresh
    assert "held a search with other settings: moved to" in capsys.readouterr().out
    assert _without_seconds(_read(tmp_path / "out", "analysis.json")) == _without_seconds(
        _read(tmp_path / "fresh", "analysis.json"))
    # The other search's two candidates are kept aside, untouched by this one.
    aside = tmp_path / "out" / experiments.SEARCH_CHECKPOINT_SET_ASIDE
    progress = _read(aside, "progress.json")
    assert progress["settings"]["tolerance"] == 0.002 and len(progress["candidates"]) == 2
    assert sorted(p.name for p in aside.iterdir()) == ["0.pt", "1.pt", "progress.json"]
    # Nor is one of a search made before fine_tune trained the survivors stored as 0.
    stopping, calls[:] = True, []
    with pytest.raises(_Stopped):
        experiments.prune_layers_run(trained_run, tmp_path / "old", data_root=mnist_root, progress=False)
    path = tmp_path / "old" / experiments.SEARCH_CHECKPOINT / "progress.json"
    recorded = json.loads(path.read_text())
    del recorded["settings"]["zero_survivors_train"]
    path.write_text(json.dumps(recorded))
    stopping, calls[:] = False, []
    experiments.prune_layers_run(trained_run, tmp_path / "old", data_root=mnist_root)
    assert len(calls) == fresh and "held a search with other settings: moved to" in capsys.readouterr().out


def test_prune_layers_names_a_damaged_checkpoint(trained_run, mnist_root, tmp_path, monkeypatch):
    """A checkpoint cut short, rewritten or missing a file is an error naming the file; nothing is
    retrained from it and nothing else is written."""
    base, calls = _read(trained_run, "report.json"), []
    stand_in = _retraining_by_cost(base, "weights_kept", {"1": 0.0008, "3": 0.002, "5": 0.02})

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _Stopped
        return stand_in(*args, **kwargs)

    monkeypatch.setattr(experiments, "_retrain", stopping)
    with pytest.raises(_Stopped):
        experiments.prune_layers_run(trained_run, tmp_path / "out", data_root=mnist_root, progress=False)
    checkpoint = tmp_path / "out" / experiments.SEARCH_CHECKPOINT
    text, tensors = (checkpoint / "progress.json").read_text(), (checkpoint / "1.pt").read_bytes()
    monkeypatch.setattr(experiments, "_retrain", stand_in)
    progress = json.loads(text)
    damages = [
        ("progress.json", text[: len(text) // 2], r"progress.json is damaged \(not JSON"),
        ("progress.json", json.dumps({**progress, "candidates": [{**progress["candidates"][0], "file": "../x.pt"}]}),
         r"progress.json is damaged \(expected settings and candidates"),
        ("1.pt", tensors[: len(tensors) // 2], r"1.pt cannot be read back"),
        ("1.pt", b"", r"1.pt cannot be read back"),
        ("1.pt", b"abc", r"1.pt cannot be read back"),
        ("1.pt", "some text", r"1.pt cannot be read back"),
    ] + [("progress.json", json.dumps({**progress, "candidates": [{**progress["candidates"][0], **change}]}),
          r"progress.json is damaged \(expected settings and candidates")
         for change in ({"thresholds": None}, {"thresholds": ["abc"]}, {"errors": None}, {"errors": {}},
                        {"history": "x"},
                        # the search replayed to its end, then failed with a KeyError, leaving a half-written folder
                        {"errors": {key: value for key, value in progress["candidates"][0]["errors"].items()
                                    if key != "seconds"}})]
    for name, damaged, message in damages:
        (checkpoint / "progress.json").write_text(text)
        (checkpoint / "1.pt").write_bytes(tensors)
        if isinstance(damaged, str):
            (checkpoint / name).write_text(damaged)
        else:
            (checkpoint / name).write_bytes(damaged)
        with pytest.raises(ValueError, match=message + r".*delete the folder .*search_checkpoint to start the search"):
            experiments.prune_layers_run(trained_run, tmp_path / "out", data_root=mnist_root, progress=False)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [experiments.SEARCH_CHECKPOINT]
    (checkpoint / "progress.json").write_text(text)
    (checkpoint / "1.pt").unlink()
    with pytest.raises(ValueError, match=r"1.pt cannot be read back \(.*No such file"):
        experiments.prune_layers_run(trained_run, tmp_path / "out", data_root=mnist_root, progress=False)


def test_registered_layer_searches_pass_their_seeds_rule_and_allowance(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(experiments, "prune_layers_run", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    for base in ("lenet5_hs", "lenet5_nj_heldout"):  # the base must be there, a full run as the searches are
        (tmp_path / base).mkdir()
        (tmp_path / base / "model.bcz").write_bytes(b"")
        (tmp_path / base / "config.json").write_text(json.dumps({"name": base, "fast": False}))
    for name in ("lenet5_hs_layers", "lenet5_hs_layers_3seeds_most", "lenet5_hs_layers_3seeds_tol2",
                 "lenet5_nj_heldout_layers_3seeds_max09"):
        experiments.run_experiment(name, tmp_path / name, fast=False)
    assert [(args[0].name, kwargs["seeds"], kwargs["take"], kwargs["tolerance"], kwargs["allowed_error"])
            for args, kwargs in calls] == [
        ("lenet5_hs", 1, "least_error", 0.001, None), ("lenet5_hs", 3, "most_pruning", 0.001, None),
        ("lenet5_hs", 3, "least_error", 0.002, None), ("lenet5_nj_heldout", 3, "least_error", 0.001, 0.009)]


def test_prune_layers_rejects_a_run_without_group_log_alphas(tmp_path, trained_run, mnist_root):
    run = tmp_path / "lenet300_svd"
    shutil.copytree(trained_run, run)
    analysis = _read(run, "analysis.json")
    del analysis["layers"]["3"]["log_alpha"]  # as Sparse VD's per-weight signals: histograms only
    (run / "analysis.json").write_text(json.dumps(analysis))
    with pytest.raises(ValueError, match=r"analysis.json with the log alpha of every group of layers \['1', '3', '5'\]"):
        experiments.prune_layers_run(run, tmp_path / "out", data_root=mnist_root)
    config = _read(run, "config.json")
    (run / "config.json").write_text(json.dumps({**config, "prior": "svd"}))
    with pytest.raises(ValueError, match=r"must be a run of a group prior \('nj', 'hs'\), got prior 'svd'"):
        experiments.prune_layers_run(run, tmp_path / "out", data_root=mnist_root)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- load_or_run
def test_load_or_run_in_fast_mode_trains_into_a_scratch_root(monkeypatch, tmp_path, mnist_root):
    monkeypatch.setenv("BCLIB_FAST", "1")
    committed = tmp_path / "committed"
    run = experiments.load_or_run("lenet300_hs", committed, data_root=mnist_root,
                                  scratch_root=tmp_path / "scratch", progress=False)
    assert isinstance(run, experiments.RunResult)
    assert run.trained_here and run.run_dir == tmp_path / "scratch" / "lenet300_hs"
    assert not committed.exists()
    assert run.config["fast"] is True and run.config["prior"] == "hs"
    assert [row["epoch"] for row in run.metrics] == [1, 2]
    assert {"file_error", "dense_error", "thresholds", "architecture"} <= set(run.report)
    assert set(run.analysis) == {"layers", "sweep"} and len(run.analysis["layers"]) == 3
    assert run.compressed_file.is_file()
    assert isinstance(run.model().get_submodule("1"), bclib.LinearGroupHS)


def test_load_or_run_reads_committed_results_without_training(monkeypatch, tmp_path, trained_run):
    monkeypatch.setenv("BCLIB_FAST", "0")
    committed = tmp_path / "results"
    shutil.copytree(trained_run, committed / "lenet300_nj", ignore=shutil.ignore_patterns("checkpoint.pt"))

    def no_training(*args, **kwargs):
        raise AssertionError("load_or_run trained although results were committed")

    monkeypatch.setattr(experiments, "run_experiment", no_training)
    run = experiments.load_or_run("lenet300_nj", committed)
    assert not run.trained_here and run.run_dir == committed / "lenet300_nj"
    assert run.metrics == _read(trained_run, "metrics.json")
    assert run.report == _read(trained_run, "report.json")
    assert run.analysis == _read(trained_run, "analysis.json")


def test_load_or_run_trains_the_chain_a_retrained_run_needs(monkeypatch, tmp_path):
    """lenet5_nj_ft retrains lenet5_nj, which starts from lenet5_dense: with nothing in the scratch
    root, all three run, in that order; a run whose checkpoint exists is not trained again."""
    monkeypatch.setenv("BCLIB_FAST", "1")
    trained = []

    def record(name, out_dir, **kwargs):
        trained.append(name)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "checkpoint.pt").write_bytes(b"")
        (Path(out_dir) / "report.json").write_text("{}")
        return {}

    monkeypatch.setattr(experiments, "run_experiment", record)
    run = experiments.load_or_run("lenet5_nj_ft", tmp_path / "committed", scratch_root=tmp_path / "scratch")
    assert trained == ["lenet5_dense", "lenet5_nj", "lenet5_nj_ft"]
    assert run.trained_here and run.run_dir == tmp_path / "scratch" / "lenet5_nj_ft"
    trained.clear()
    (tmp_path / "scratch" / "lenet5_nj_ft").rename(tmp_path / "scratch" / "old")
    experiments.load_or_run("lenet5_nj_ft", tmp_path / "committed", scratch_root=tmp_path / "scratch")
    assert trained == ["lenet5_nj_ft"]
    # A base with a checkpoint but no report was stopped midway: it runs again (and resumes).
    trained.clear()
    (tmp_path / "scratch" / "lenet5_nj_ft").rename(tmp_path / "scratch" / "older")
    shutil.rmtree(tmp_path / "scratch" / "lenet5_nj")
    (tmp_path / "scratch" / "lenet5_nj").mkdir()
    (tmp_path / "scratch" / "lenet5_nj" / "checkpoint.pt").write_bytes(b"")
    experiments.load_or_run("lenet5_nj_ft", tmp_path / "committed", scratch_root=tmp_path / "scratch")
    assert trained == ["lenet5_nj", "lenet5_nj_ft"]


def test_unknown_experiment_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="name"):
        experiments.load_or_run("lenet7_nj", tmp_path)
    with pytest.raises(ValueError, match="name"):
        experiments.run_experiment("lenet7_nj", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scratch_folder_is_deleted_when_the_process_exits(tmp_path):
    script = ("import os, sys; from bclib.experiments import scratch_folder\n"
              "folder = scratch_folder('bclib-test-')\n"
              "(folder / 'run').mkdir(); (folder / 'run' / 'checkpoint.pt').write_bytes(b'x' * 1000)\n"
              "print(folder)\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("bclib-test-")
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_scratch_folder_deletes_the_folders_of_killed_processes(tmp_path, monkeypatch):
    script = ("import os, signal; from bclib.experiments import scratch_folder\n"
              "folder = scratch_folder('bclib-test-'); (folder / 'checkpoint.pt').write_bytes(b'x')\n"
              "print(folder, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")  # no atexit
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert killed.returncode == -9
    orphan = Path(killed.stdout.strip())
    assert orphan.is_dir()  # the killed process could not clean up
    unrelated = tmp_path / "bclib-test-notapid"
    unrelated.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = experiments.scratch_folder("bclib-test-")
    assert not orphan.exists()
    assert mine.is_dir() and mine.name.startswith(f"bclib-test-{os.getpid()}-")
    assert unrelated.is_dir()  # names without a process id are left alone


def test_out_must_be_free_or_the_same_run_and_is_checked_before_any_work(run_copy, tmp_path, capsys, monkeypatch):
    """An --out that holds another run would end up with two runs' files; one that is a file would
    fail only when the first file is written, after the training or search."""
    monkeypatch.delenv("BCLIB_FAST", raising=False)  # the test command sets it for the notebooks
    work = []
    monkeypatch.setattr(experiments, "_load_data", lambda *a, **k: work.append("data") or 1 / 0)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("a folder of one's own files")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[1, 2]")
    refused = [
        (["train", "--model", "lenet300", "--prior", "nj", "--out", str(tmp_path / "notes")],
         f"--out {str(tmp_path / 'notes')!r} holds files of no run (notes.txt); choose a new or empty folder"),
        (["train", "--model", "lenet300", "--prior", "nj", "--out", str(tmp_path / "listed")],
         "config.json' must hold a JSON object, got a list"),
        (["train", "--model", "lenet300", "--prior", "none", "--fast", "--out", str(run_copy)],
         "holds another run (name 'lenet300_nj' there, 'lenet300_dense' here)"),
        (["train", "--model", "lenet300", "--prior", "nj", "--out", str(run_copy)], "(fast True there, False here)"),
        (["train", "--model", "lenet300", "--prior", "nj", "--out", str(tmp_path / "afile" / "sub")],
         "cannot be a folder: '" + str(tmp_path / "afile") + "' is a file"),
        (["lower-bits", str(run_copy), "--out", str(tmp_path / "afile")], "is a file"),
        (["lower-bits", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")], "is not a run folder: it has no config.json"),
    ]
    for arguments, message in refused:
        with pytest.raises(SystemExit) as info:
            main(arguments)
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert work == [] and not (tmp_path / "new").exists()
    # A search's folder holding another search of the same base is refused too, naming what differs.
    other = tmp_path / "other_search"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model": "lenet300", "prior": "nj", "fine_tunes": "lenet300_nj",
                                                   "fast": True}))
    with pytest.raises(ValueError, match="lowers_bits_of None there, 'run' here"):
        experiments.check_out_dir(other, {"model": "lenet300", "prior": "nj", "lowers_bits_of": "run", "fast": True})
    # The same run's folder (to resume or redo it), an empty one, one with a search's checkpoint only
    # (a search writes its config.json last) and a new one pass.
    (tmp_path / "empty").mkdir()
    (tmp_path / "searching" / experiments.SEARCH_CHECKPOINT).mkdir(parents=True)
    for free in (run_copy, tmp_path / "empty", tmp_path / "searching", tmp_path / "new" / "deeper"):
        assert experiments.check_out_dir(free, {"name": "lenet300_nj", "fast": True}) == free


def test_a_run_folder_without_a_checkpoint_or_with_a_damaged_one_is_named(run_copy, capsys):
    checkpoint = run_copy / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.raises(SystemExit) as info:
        main(["compress", str(run_copy)])
    assert info.value.code == 2 and "cannot be read back as a bclib checkpoint" in capsys.readouterr().err
    checkpoint.unlink()  # as in the committed runs
    with pytest.raises(SystemExit):
        main(["compress", str(run_copy)])
    assert "has no checkpoint.pt, which this needs (the committed runs keep none" in capsys.readouterr().err
    # A run of no registered name is told to train again by its own command; a search's run has none by design.
    config = _read(run_copy, "config.json")
    for changes, hint in (({"name": "my_run", "command": "python -m bclib train --out X"},
                           "(train it again, e.g. python -m bclib train --out X)"),
                          ({"fine_tunes": "lenet300_nj"}, "(it is a search's run: its network is saved compressed")):
        (run_copy / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(FileNotFoundError, match=re.escape(hint)):
            experiments.load_run_model(run_copy)
