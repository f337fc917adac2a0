"""Smoke tests of bclib.bench: the benchmarks run and report what they say (no timing targets here)."""
import math

import pytest
import torch

from bclib import bench, models, tables
from bclib._allocator import freed_memory_kept
from bclib.compression import compress


def test_paper_lenet5_has_the_papers_architecture():
    report = compress(bench.paper_lenet5(), 0.0).report
    assert report.architecture == "8-13-88-13"
    # conv1 8 x 1 x 25 x 576, conv2 13 x 8 x 25 x 64, fc1 88 x 13, fc2 13 x 10 multiply-accumulates.
    assert report.flops_after == 8 * 25 * 576 + 13 * 8 * 25 * 64 + 88 * 13 + 13 * 10


def _timed_modules(monkeypatch) -> list[dict]:
    """Record the modules each call of bench._interleaved_medians times (what the ratios are ratios of)."""
    timed, measure = [], bench._interleaved_medians

    def recording(modules, *args):
        if set(modules) == {"dense", "pruned"}:  # the networks (the per-module rows are timed alike)
            timed.append(dict(modules))
        return measure(modules, *args)
    monkeypatch.setattr(bench, "_interleaved_medians", recording)
    return timed


def _weight_shapes(module) -> list[tuple]:
    return [tuple(p.shape) for name, p in module.named_parameters() if name.endswith("weight")]


def test_compression_bench_reports_every_layout_and_batch(capsys, monkeypatch):
    timed = _timed_modules(monkeypatch)
    result = bench.run_compression_bench(batch_sizes=(4, 1), layouts=("contiguous", "channels_last"), repeats=1,
                                         min_seconds=0.0)
    # What is timed: the dense LeNet-5-Caffe, counted by hand (conv 20x1x5x5, conv 50x20x5x5, fc 800->500,
    # fc 500->10, with biases: 431,080 parameters), against the paper's 8-13-88-13 cut of it: fc1 reads
    # the 13 x 4 x 4 = 208 values conv2's 13 filters leave (88 of them through nonzero weights) into 13 units.
    assert len(timed) == 4
    for modules in timed:
        assert sum(p.numel() for p in modules["dense"].parameters()) == 431_080
        assert _weight_shapes(modules["pruned"]) == [(8, 1, 5, 5), (13, 8, 5, 5), (13, 208), (10, 13)]
    assert [(row["layout"], row["batch"]) for row in result["runs"]] == [
        ("contiguous", 4), ("contiguous", 1), ("channels_last", 4), ("channels_last", 1)]
    for row in result["runs"]:
        assert row["speedup"] == row["dense_ms"] / row["pruned_ms"]
        assert math.isclose(row["speedup_over_flop_reduction"], row["speedup"] / result["flop_reduction"])
    # One row per module of the exported nn.Sequential, in order, for each layout.
    expected = ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]
    for layout in ("contiguous", "channels_last"):
        rows = result["layers"][layout]
        assert [row["layer"] for row in rows] == [f"{i} {name}" for i, name in enumerate(expected)]
        assert all(row["dense_ms"] > 0 and row["pruned_ms"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "8-13-88-13" in out and "per module, channels_last, batch 4" in out
    assert result["freed_memory_kept"] is freed_memory_kept()  # the process's state, recorded


def test_compression_bench_can_keep_freed_memory_first(capsys, glibc):
    result = bench.run_compression_bench(batch_sizes=(2,), layouts=("contiguous",), repeats=1, min_seconds=0.0,
                                         keep_freed=True)
    assert result["freed_memory_kept"] is glibc is freed_memory_kept()
    assert ("malloc: freed memory kept" in capsys.readouterr().out) is glibc


def test_compiled_layout_times_the_compiled_models_and_has_no_per_module_rows():
    model = models.lenet_300_100("nj")
    result = bench.run_compression_bench(model, thresholds=0.0, batch_sizes=(3,), layouts=("compiled",), repeats=1,
                                         min_seconds=0.0, verbose=False)
    assert [(row["layout"], row["batch"]) for row in result["runs"]] == [("compiled", 3)]
    assert result["layers"] == {}


def test_compression_bench_refuses_a_layout_whose_outputs_differ(monkeypatch):
    class OffByOne(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 1e-3

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: OffByOne(module))
    with pytest.raises(RuntimeError, match="layout 'compiled' differs from its plain export by 0.001"):
        bench.run_compression_bench(models.lenet_300_100("nj"), thresholds=0.0, batch_sizes=(2,),
                                    layouts=("compiled",), repeats=1, min_seconds=0.0, verbose=False)
    with pytest.raises(ValueError, match="layout must be one of 'contiguous', 'channels_last', 'compiled', got 'fast'"):
        bench.run_compression_bench(models.lenet_300_100("nj"), thresholds=0.0, batch_sizes=(2,),
                                    layouts=("fast",), repeats=1, min_seconds=0.0, verbose=False)


def test_compression_bench_without_a_run_folder_times_the_paper_model(tmp_path, capsys):
    result = bench.run_compression_bench_from_run(tmp_path / "missing", batch_sizes=(2,), layouts=("contiguous",),
                                                  repeats=1, min_seconds=0.0)
    assert result["architecture"] == "8-13-88-13" and "no trained run" in capsys.readouterr().out


def test_compression_bench_of_a_committed_run_times_its_file(tmp_path, capsys):
    """A run folder without its checkpoint (as committed): the pruned network is the file's."""
    import json

    model = models.lenet5_caffe("nj").eval()
    with torch.no_grad():  # untrained (log alpha near -9): switch off all but the first groups
        for layer, keep in zip([m for m in model if hasattr(m, "z_logvar")], (7, 11, 11 * 16, 60)):
            layer.z_logvar[keep:] = 5.0
    result = compress(model, [0.0] * 4)
    result.save(tmp_path / "model.bcz")
    (tmp_path / "report.json").write_text(json.dumps(result.report.to_dict()))
    (tmp_path / "config.json").write_text(json.dumps({"model": "lenet5", "prior": "nj"}))
    timed = bench.run_compression_bench_from_run(tmp_path, batch_sizes=(2,), layouts=("contiguous",),
                                                 repeats=1, min_seconds=0.0)
    assert "its model.bcz" in capsys.readouterr().out
    assert timed["architecture"] == result.report.architecture == "7-11-176-60"
    assert (timed["flops_before"], timed["flops_after"]) == (result.report.flops_before, result.report.flops_after)


def _trial(ratios, dense_ms, module_ms):
    """A hand-made result of run_compression_bench: two rows, one per-module layout."""
    return {"architecture": "2-1", "flops_before": 8, "flops_after": 2, "flop_reduction": 4.0, "threads": 1,
            "runs": [{"layout": "contiguous", "batch": batch, "dense_ms": dense, "pruned_ms": 1.0,
                      "dense_examples_per_s": batch / dense, "pruned_examples_per_s": float(batch),
                      "speedup": 4 * ratio, "speedup_over_flop_reduction": ratio}
                     for batch, ratio, dense in zip((10, 1), ratios, dense_ms)],
            "layers": {"contiguous": [{"layer": "0 Linear", "dense_ms": module_ms, "pruned_ms": 1.0}]}}


def test_summarise_trials_takes_medians_and_ranges_by_hand(capsys):
    trials = [_trial((0.5, 0.2), (2.0, 1.0), 3.0), _trial((0.9, 0.1), (6.0, 1.0), 1.0),
              _trial((0.7, 0.3), (4.0, 2.0), 2.0)]
    summary = bench.summarise_trials(trials)
    first, second = summary["runs"]
    assert (first["batch"], first["speedup_over_flop_reduction"], first["dense_ms"]) == (10, 0.7, 4.0)
    assert first["speedup_over_flop_reduction_range"] == [0.5, 0.9] and first["speedup"] == 2.8
    assert (second["speedup_over_flop_reduction"], second["speedup_over_flop_reduction_range"]) == (0.2, [0.1, 0.3])
    assert summary["layers"]["contiguous"] == [{"layer": "0 Linear", "dense_ms": 2.0, "pruned_ms": 1.0}]
    assert summary["trials"] == [trial["runs"] for trial in trials] and summary["architecture"] == "2-1"
    table = tables.speed_table(summary)
    assert "medians of 3 trials" in table and "contiguous       10   0.50   0.70   0.90" in table
    other = _trial((0.5, 0.2), (2.0, 1.0), 3.0)
    other["runs"].reverse()
    with pytest.raises(ValueError, match="every result must time the same layouts and batches"):
        bench.summarise_trials([trials[0], other])


def test_compression_trials_run_in_fresh_processes(tmp_path, capsys, monkeypatch):
    def in_this_process(*args, **kwargs):
        raise AssertionError("a trial ran in the test's own process")
    # A spawned interpreter imports bclib afresh and never sees this patch: only a trial run here would.
    monkeypatch.setattr(bench, "run_compression_bench_from_run", in_this_process)
    summary = bench.run_compression_trials(2, tmp_path / "missing", batch_sizes=(2,), layouts=("contiguous",),
                                           repeats=1, min_seconds=0.0)
    assert len(summary["trials"]) == 2 and summary["architecture"] == "8-13-88-13"
    # The summary's median and range, recomputed from the two trials' own rows.
    ratios = sorted(trial[0]["speedup_over_flop_reduction"] for trial in summary["trials"])
    assert summary["runs"][0]["speedup_over_flop_reduction_range"] == ratios
    assert summary["runs"][0]["speedup_over_flop_reduction"] == pytest.approx(sum(ratios) / 2)
    assert "trial 2/2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="trials must be a positive int, got 0"):
        bench.run_compression_trials(0)


def test_layers_bench_ratios_are_relative_to_the_deterministic_network():
    result = bench.run_layers_bench(steps=1, repeats=1, batch_size=8, model_names=("lenet300",), threads=1,
                                    verbose=False)
    rows = result["lenet300"]
    assert list(rows) == ["none", "none+autocast", "nj", "nj+bfloat16", "nj+autocast", "hs", "hs+bfloat16",
                          "hs+autocast", "svd", "svd+bfloat16", "svd+autocast"]
    assert rows["none"]["ratio"] == rows["none+autocast"]["ratio"] == 1.0
    for key, row in rows.items():
        baseline = rows["none+autocast" if key.endswith("+autocast") else "none"]
        assert math.isclose(row["ratio"], row["step_ms"] / baseline["step_ms"])
    assert rows["nj+bfloat16"]["matmul_floor"] == rows["nj+autocast"]["matmul_floor"] == 1_597_200 / 563_400
    assert rows["nj"]["matmul_floor"] == 1_597_200 / 563_400 and rows["none+autocast"]["matmul_floor"] == 1.0
    # LeNet-5-Caffe has convolutions, so the channels-last layout gets rows of its own, its baseline too.
    rows = bench.run_layers_bench(steps=1, repeats=1, batch_size=4, priors=("nj",), model_names=("lenet5",),
                                  threads=1, variants=("channels_last",), verbose=False)["lenet5"]
    assert list(rows) == ["none", "none+channels_last", "nj", "nj+channels_last"]
    assert math.isclose(rows["nj+channels_last"]["ratio"],
                        rows["nj+channels_last"]["step_ms"] / rows["none+channels_last"]["step_ms"])
    assert math.isclose(rows["nj"]["ratio"], rows["nj"]["step_ms"] / rows["none"]["step_ms"])
    with pytest.raises(ValueError, match="variants must be drawn from"):
        bench.run_layers_bench(steps=1, repeats=1, batch_size=8, model_names=("lenet300",), variants=("fp8",))


def test_layers_bench_weighs_the_windowed_weight_gradients(windowed_calls):
    rows = bench.run_layers_bench(steps=1, repeats=1, batch_size=4, priors=("nj",), model_names=("lenet5",),
                                  threads=1, variants=("onednn", "windowed"), verbose=False)["lenet5"]
    assert list(rows) == ["none", "none+windowed", "nj", "nj+onednn"]
    for key, row in rows.items():
        assert math.isclose(row["ratio"], row["step_ms"] / rows["none"]["step_ms"])
    # A warm-up step and a timed one each: only the first convolution (25 terms per output) goes the
    # windowed way, once a step in none+windowed, twice (mean and variance) in nj, never in none and
    # nj+onednn.
    assert windowed_calls == [(20, 1, 5, 5)] * 6
    # LeNet-300-100 has no convolution: no such rows.
    rows = bench.run_layers_bench(steps=1, repeats=1, batch_size=4, priors=("nj",), model_names=("lenet300",),
                                  threads=1, variants=("onednn", "windowed"), verbose=False)["lenet300"]
    assert list(rows) == ["none", "nj"]


def test_matmul_macs_by_hand():
    # LeNet-300-100, per example: 784x300, 300x100, 100x10 weights. Deterministic: the first layer needs
    # no input gradient (2 products), the others 3. Group layers: twice the products (mean and variance),
    # and the first layer's input gradient too (z scales the inputs). Sparse VD: no input groups.
    linear = (235_200, 30_000, 1_000)
    assert bench.matmul_macs_per_example(models.lenet_300_100(None)) == 2 * 235_200 + 3 * 31_000 == 563_400
    for prior in ("nj", "hs"):
        assert bench.matmul_macs_per_example(models.lenet_300_100(prior)) == 2 * 3 * sum(linear)
    assert bench.matmul_macs_per_example(models.lenet_300_100("svd")) == 2 * (2 * 235_200 + 3 * 31_000)
    # LeNet-5-Caffe: conv1 20x1x5x5 over 24x24 outputs, conv2 50x20x5x5 over 8x8, fc 800x500, 500x10.
    conv1, rest = 500 * 576, 25_000 * 64 + 400_000 + 5_000
    assert bench.matmul_macs_per_example(models.lenet5_caffe(None)) == 2 * conv1 + 3 * rest
    for prior in ("nj", "hs", "svd"):  # conv groups are output channels: no input gradient for conv1
        assert bench.matmul_macs_per_example(models.lenet5_caffe(prior)) == 2 * (2 * conv1 + 3 * rest)


def test_training_time_report_sums_epochs_with_pretraining_and_checks_targets(tmp_path, capsys):
    import json

    from bclib.bench import run_training_time_report

    def run(name, seconds, report, analysis=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps([{"seconds": s} for s in seconds]))
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        if analysis is not None:
            (tmp_path / name / "analysis.json").write_text(json.dumps(analysis))

    run("lenet5_dense", [60.0, 60.0], {"dense_error": 0.008})
    run("lenet5_hs", [100.0, 200.0, 300.0],
        {"file_error": 0.0095, "compression_pruning": 160.0, "compression_precision": 400.0})
    run("lenet5_nj", [10.0], {"file_error": 0.009, "compression_pruning": 120.0, "compression_precision": 370.0,
                              "file": {"ratio": 650.0}})
    # Sparse VD is judged on its sparse rates: 70x / 250x meet 63x / 228x although its dense blocks do not.
    run("lenet5_svd", [10.0], {"file_error": 0.0099, "compression_pruning": 10.0, "compression_precision": 30.0,
                               "compression_sparse": 70.0, "compression_sparse_precision": 250.0,
                               "file": {"ratio": 710.0}})
    # Fine-tuned runs: their base run's seconds (its pretraining included) plus every retrained
    # candidate's, judged on the base's targets. The report counts each candidate's first retraining
    # (30 s); the kept candidate's other seeds (8 s and 12 s; the first entry is its own) add 20 s.
    seeds = [{"seconds": 10.0}, {"seconds": 8.0}, {"seconds": 12.0}]
    run("lenet5_hs_ft", [5.0], {"file_error": 0.0098, "compression_pruning": 157.0, "compression_precision": 420.0,
                                "fine_tuning": {"seconds": 30.0}},
        {"candidates": [{"seconds": 20.0}, {"seconds": 10.0, "seeds": seeds}]})
    run("lenet5_nj_ft", [5.0], {"file_error": 0.012, "compression_pruning": 130.0, "compression_precision": 400.0,
                                "fine_tuning": {"seconds": 6.0}, "file": {"ratio": 900.0}},
        {"candidates": [{"seconds": 6.0}]})
    # A bit-lowered run: its fine-tuned base's seconds plus its own search's, judged on the paper run's targets.
    run("lenet5_hs_ft_bits", [5.0], {"file_error": 0.0099, "compression_pruning": 157.0,
                                     "compression_precision": 500.0, "fine_tuning": {"seconds": 30.0},
                                     "bit_search": {"seconds": 100.0}, "file": {"ratio": 720.0}})
    # A layer-searched run and its bits: the Bayesian run's 10 s and its pretraining's 120 s, then
    # 40 s of search, then 20 s.
    run("lenet5_nj_layers", [5.0], {"file_error": 0.0099, "compression_pruning": 110.0,
                                    "compression_precision": 365.0, "layer_search": {"seconds": 40.0}})
    run("lenet5_nj_layers_bits", [5.0], {"file_error": 0.0101, "compression_pruning": 110.0,
                                         "compression_precision": 500.0, "layer_search": {"seconds": 40.0},
                                         "bit_search": {"seconds": 20.0}})
    # Another recipe for the BC-GHS row (from scratch, no pretraining): judged on lenet5_hs's targets.
    run("lenet5_hs_scratch", [1000.0], {"file_error": 0.0099, "compression_pruning": 150.0,
                                        "compression_precision": 420.0})
    rows = run_training_time_report(tmp_path)
    assert rows["lenet5_hs_scratch"]["seconds"] == 1000.0 and rows["lenet5_hs_scratch"]["targets_met"] is False
    assert rows["lenet5_nj_layers"]["seconds"] == 170.0 and rows["lenet5_nj_layers"]["targets_met"] is True
    assert rows["lenet5_nj_layers_bits"]["seconds"] == 190.0 and rows["lenet5_nj_layers_bits"]["targets_met"] is False
    assert rows["lenet5_hs_ft_bits"]["seconds"] == 870.0 and rows["lenet5_hs_ft_bits"]["targets_met"] is True
    assert rows["lenet5_hs_ft"]["seconds"] == 770.0 and rows["lenet5_hs_ft"]["targets_met"] is True
    assert rows["lenet5_nj_ft"]["seconds"] == 136.0 and rows["lenet5_nj_ft"]["targets_met"] is False
    assert rows["lenet5_svd"]["targets_met"] is True and rows["lenet5_svd"]["rates"] == "sparse"
    assert rows["lenet5_svd"]["compression_pruning"] == 70.0 and rows["lenet5_nj"]["rates"] == "dense"
    # 600 s of its own plus the 120 s of the pretrained network it starts from.
    assert rows["lenet5_hs"]["seconds"] == 720.0
    assert rows["lenet5_hs"]["targets_met"] is False  # 400x < 419x after precision
    assert rows["lenet5_nj"]["targets_met"] is True
    assert "targets_met" not in rows["lenet5_dense"]
    out = capsys.readouterr().out
    assert "BC-GHS LeNet-5 target reached by lenet5_hs_ft; wall time 12.8 min" in out
    # The largest LeNet-5 file ratio at <= 1.0 % is judged against 700x: 710x at 0.99 % reaches it
    # (lenet5_nj_ft's 900x at 1.2 % does not count).
    assert rows["lenet5_nj"]["file_ratio"] == 650.0 and rows["lenet5_hs"]["file_ratio"] is None
    # Its bits search has no zero_survivors_train record: made before the fix, marked.
    assert rows["lenet5_hs_ft_bits"]["before_fix"] is True and rows["lenet5_hs_ft"]["before_fix"] is False
    assert "smallest LeNet-5 file at the goal error: lenet5_hs_ft_bits *, 720x smaller than the float32 dense network at 0.99 % error" in out
    assert "*: retrained before fine_tune" in out
    assert "700x at <= 1.0 %: reached" in out
    # Each run counted once: epochs 120 + 600 + 10 + 10 + 1000, searches 50 + 6 + 100 + 40 + 20 = 1956 s.
    assert rows["lenet5_nj_layers_bits"]["own_seconds"] == 20.0 and rows["lenet5_hs"]["own_seconds"] == 600.0
    assert "all 10 runs: 0.5 h of training and retraining, each run counted once" in out


def _fake_run(root, name, metrics, report, analysis=None):
    """A run folder holding the given files: JSON-encoded, or written as they are if text."""
    import json

    (root / name).mkdir()
    for file, data in (("metrics.json", metrics), ("report.json", report), ("analysis.json", analysis)):
        if data is not None:
            (root / name / file).write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize("name, damaged, metrics, report, analysis", [
    ("lenet300_dense", "report.json", [{"seconds": 1.0}], '{"dense_error": 0.0', None),  # truncated
    ("lenet300_dense", "report.json", [{"seconds": 1.0}], [], None),
    ("lenet300_dense", "report.json", [{"seconds": 1.0}], {"dense_error": "0.02"}, None),
    ("lenet300_dense", "report.json", [{"seconds": 1.0}], {"dense_error": 0.02, "file": {"ratio": "9x"}}, None),
    ("lenet300_dense", "metrics.json", {"seconds": 3.0}, {"dense_error": 0.02}, None),
    ("lenet300_dense", "metrics.json", [{"seconds": 1.0}, {"second": 2.0}], {"dense_error": 0.02}, None),
    ("lenet300_dense", "metrics.json", [{"seconds": "2"}], {"dense_error": 0.02}, None),
    ("lenet300_nj_ft_bits", "report.json", [], {"file_error": 0.02, "bit_search": {"bits": [3]}}, None),
    ("lenet300_nj_ft", "report.json", [], {"file_error": 0.02, "fine_tuning": 4.0}, {"candidates": []}),
    ("lenet300_nj_ft", "analysis.json", [], {"file_error": 0.02, "fine_tuning": {"seconds": 4.0}},
     {"candidates": [{"seeds": [{"seconds": 1.0}, {}]}]}),
], ids=["truncated", "array", "error not a number", "ratio not a number", "metrics an object", "epoch without seconds",
        "seconds not a number", "search without seconds", "fine_tuning a number", "seed without seconds"])
def test_training_time_report_names_a_damaged_run_file(tmp_path, name, damaged, metrics, report, analysis):
    """A run folder's damaged JSON is a ValueError naming the file (it was a JSONDecodeError without
    the name, an AttributeError, a TypeError or a KeyError, or went unnoticed)."""
    import re

    from bclib.bench import run_training_time_report

    _fake_run(tmp_path, name, metrics, report, analysis)
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path / name / damaged)))):
        run_training_time_report(tmp_path, verbose=False)


def test_training_time_report_leaves_out_absent_base_runs_and_says_so(tmp_path, capsys):
    """A refined run whose base is not in the folder is reported without the base's seconds, as a
    run whose pretraining run is absent is (it was a FileNotFoundError); the table names what each
    row's wall time lacks, and the total is of the runs there."""
    from bclib.bench import run_training_time_report

    _fake_run(tmp_path, "lenet300_hs", [{"seconds": 240.0}], {"file_error": 0.02})  # no lenet300_dense
    _fake_run(tmp_path, "lenet300_nj_ft", [], {"file_error": 0.017, "fine_tuning": {"seconds": 30.0}},
              {"candidates": []})  # no lenet300_nj
    # Its base is present but refines a run that is not: only the absent one is named.
    _fake_run(tmp_path, "lenet300_nj_ft_bits", [], {"file_error": 0.017, "bit_search": {"seconds": 90.0}})
    rows = run_training_time_report(tmp_path)
    assert [rows[name]["seconds"] for name in rows] == [240.0, 30.0, 120.0]
    assert [rows[name]["bases_absent"] for name in rows] == [["lenet300_dense"], ["lenet300_nj"], ["lenet300_nj"]]
    out = capsys.readouterr().out
    assert (f"wall min leaves out base runs not in {str(tmp_path)!r} and the runs they start from: lenet300_hs "
            "(no lenet300_dense), lenet300_nj_ft (no lenet300_nj), lenet300_nj_ft_bits (no lenet300_nj)") in out
    assert "all 3 runs: 0.1 h" in out
    # With every base there, rows name none and the table has no such line.
    _fake_run(tmp_path, "lenet300_dense", [{"seconds": 6.0}], {"dense_error": 0.02})
    _fake_run(tmp_path, "lenet300_nj", [{"seconds": 6.0}], {"file_error": 0.02})
    rows = run_training_time_report(tmp_path)
    assert not any("bases_absent" in row for row in rows.values()) and "leaves out" not in capsys.readouterr().out


def test_epoch_bench_times_each_network_on_mnist(mnist_root, capsys):
    result = bench.run_epoch_bench(mnist_root, model_names=("lenet300",), train_examples=600, threads=1)
    rows = result["lenet300"]
    assert list(rows) == ["none", "none+autocast", "nj", "nj+bfloat16", "nj+autocast"]
    assert rows["none"]["ratio"] == rows["none+autocast"]["ratio"] == 1.0
    assert all(row["seconds"] > 0 for row in rows.values()) and result["targets"] == {"lenet300": 3.0}
    assert "one training epoch on MNIST" in capsys.readouterr().out


def test_epoch_bench_scales_to_a_full_epoch_and_divides_by_its_own_baseline(mnist_root, monkeypatch):
    """fit replaced by a stand-in that reports 1, 2, 3, 5 and 7 seconds for the five networks in turn:
    each is scaled from 600 examples to MNIST's 60,000 (x 100), and each ratio is to the deterministic
    network of the same precision (nj+autocast against none+autocast, the others against none)."""
    import bclib.train

    seconds = iter([1.0, 2.0, 3.0, 5.0, 7.0])
    examples = []

    def fake_fit(model, train, test, config, **kwargs):
        examples.append(len(train))
        return [{"seconds": next(seconds)}]
    monkeypatch.setattr(bclib.train, "fit", fake_fit)
    rows = bench.run_epoch_bench(mnist_root, model_names=("lenet300",), train_examples=600, verbose=False)["lenet300"]
    assert examples == [600] * 5
    assert {key: row["seconds"] for key, row in rows.items()} == pytest.approx(
        {"none": 100.0, "none+autocast": 200.0, "nj": 300.0, "nj+bfloat16": 500.0, "nj+autocast": 700.0})
    assert {key: row["ratio"] for key, row in rows.items()} == pytest.approx(
        {"none": 1.0, "none+autocast": 1.0, "nj": 3.0, "nj+bfloat16": 5.0, "nj+autocast": 3.5})


def test_subnormal_weights_are_zeroed_for_timing_and_the_given_export_is_left_alone(monkeypatch):
    layer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-40, 1.0, -1e-39, 1e-37]]))
    bench._zero_subnormal_parameters(layer)
    # 1e-40 and -1e-39 are below the smallest normal float32 (about 1.18e-38); 1e-37 is not.
    assert layer.weight.tolist() == [[0.0, 1.0, 0.0, pytest.approx(1e-37)]]
    model = models.lenet5_caffe("nj")
    compressed = compress(model, 0.0)
    with torch.no_grad():
        compressed.model[0].weight[0, 0, 0, 0] = 1e-40
    timed = _timed_modules(monkeypatch)
    bench.run_compression_bench(model, compressed, batch_sizes=(2,), layouts=("contiguous",), repeats=1,
                                min_seconds=0.0, verbose=False)
    assert compressed.model[0].weight[0, 0, 0, 0].item() == pytest.approx(1e-40, rel=1e-3)
    # The timed copies hold no subnormal number, in either network.
    tiny = torch.finfo(torch.float32).tiny
    for module in timed[0].values():
        assert not any(bool(((p != 0) & (p.abs() < tiny)).any()) for p in module.parameters())


def test_bench_arguments_are_checked_before_anything_runs():
    for kwargs, message in (({"repeats": 0}, "repeats must be a positive int"),
                            ({"repeats": 2.5}, "repeats must be a positive int"),
                            ({"batch_sizes": ()}, "batch_sizes must be a non-empty sequence of positive ints"),
                            ({"batch_sizes": (0,)}, "batch_sizes must be a non-empty sequence of positive ints"),
                            ({"min_seconds": math.nan}, "min_seconds must be a finite number >= 0"),
                            ({"layouts": ()}, "layouts must name at least one")):
        with pytest.raises(ValueError, match=message):
            bench.run_compression_bench(verbose=False, **kwargs)
    for kwargs in ({"steps": 0}, {"repeats": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a positive int"):
            bench.run_layers_bench(verbose=False, **kwargs)


def test_counting_products_leaves_the_model_as_it_was():
    model = models.lenet_300_100("nj").double().train()
    assert bench.matmul_macs_per_example(model) == 2 * (3 * 784 * 300 + 3 * 300 * 100 + 3 * 100 * 10)
    assert model.training


def test_trials_that_time_other_modules_are_refused():
    row = {"layout": "contiguous", "batch": 1000, "speedup_over_flop_reduction": 0.5, "dense_ms": 2.0,
           "pruned_ms": 1.0}
    first = {"runs": [row], "layers": {"contiguous": [{"layer": "0 Linear", "dense_ms": 1.0, "pruned_ms": 0.5}]}}
    with pytest.raises(ValueError, match="same modules in the same layouts"):
        bench.summarise_trials([first, {"runs": [row], "layers": {}}])


def test_cpu_name_gives_the_first_processors_family_and_model(tmp_path, monkeypatch):
    # Two processors of a made-up machine; only the first one's block counts.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: Other\n")
    monkeypatch.setattr(bench, "CPU_INFO", cpuinfo)
    assert bench._cpu_name() == "AMD EPYC (family 25, model 17)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert bench._cpu_name() == "Some CPU"
    monkeypatch.setattr(bench, "CPU_INFO", tmp_path / "missing")
    monkeypatch.setattr(bench.platform, "processor", lambda: "aarch64-ish")
    assert bench._cpu_name() == "aarch64-ish"
