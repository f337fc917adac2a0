"""The committed results (book/results) against the files beside them: every ``model.bcz`` loads and
scores on the real MNIST test set the error its report records, has the size and ratio it records,
and a bit-lowered run keeps its base's architecture with no layer given more bits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import bclib
from bclib.fileformat import read_compressed

RESULTS = Path(__file__).resolve().parents[1] / "book" / "results"
RUNS = sorted(path.parent.name for path in RESULTS.glob("*/model.bcz"))


def _read(name: str, file: str) -> dict:
    return json.loads((RESULTS / name / file).read_text())


def test_the_results_are_there():
    assert {"lenet5_nj", "lenet5_hs_ft", "lenet5_hs_ft_bits", "lenet300_nj"} <= set(RUNS)


@pytest.mark.parametrize("name", RUNS)
def test_committed_file_scores_its_recorded_error(name, mnist):
    report, config = _read(name, "report.json"), _read(name, "config.json")
    path = RESULTS / name / "model.bcz"
    assert path.stat().st_size == report["file"]["bytes"]
    assert report["file"]["ratio"] == pytest.approx(report["file"]["dense_float32_bytes"] / path.stat().st_size)
    low, high = config["input_range"]
    _, test = mnist  # in [0, 1]; mapped onto the run's range here, not by bclib
    x = test.x * (high - low) + low
    model = bclib.load_compressed(path)
    with torch.no_grad():
        wrong = sum(int((model(x[i:i + 2000]).argmax(1) != test.y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    assert config["test_examples"] == len(test) == 10_000
    assert wrong / len(test) == pytest.approx(report["file_error"], abs=1e-12)


@pytest.mark.parametrize("name", [run for run in RUNS if run.endswith("_bits")])
def test_bit_lowered_run_keeps_the_architecture_and_lowers_bits(name):
    report = _read(name, "report.json")
    base = _read(report["bit_search"]["from"], "report.json")
    assert report["architecture"] == base["architecture"]
    assert report["compression_pruning"] == base["compression_pruning"]
    bits, base_bits = ([row["bits"] for row in r["layers"]] for r in (report, base))
    assert all(1 <= b <= old for b, old in zip(bits, base_bits, strict=True))
    _, specs, _ = read_compressed(RESULTS / name / "model.bcz")
    assert [spec["bits"] for spec in specs if "bits" in spec] == bits


LAYER_SEARCHED = [run for run in RUNS if "prunes_layers_of" in _read(run, "config.json")]
GROUP_CUT = [run for run in RUNS if "prunes_to_groups_of" in _read(run, "config.json")]


@pytest.mark.parametrize("name", RUNS)
def test_exponent_bits_are_those_of_the_largest_weight_the_file_stores(name):
    """e = ceil(log2(|log2 max|w|| + 1) + 1), the release's rule, of the largest weight the run's file
    stores (retrained or not), and the after-precision rate 32 |W| / sum_l |W_l kept| (1 + e + t_l)."""
    report = _read(name, "report.json")
    stored = bclib.load_compressed(RESULTS / name / "model.bcz")
    largest = max(float(m.weight.detach().abs().max()) for m in stored if isinstance(m, (nn.Linear, nn.Conv2d)))
    exponent = math.ceil(math.log2(abs(math.log2(largest)) + 1) + 1)
    assert report["exponent_bits"] == exponent
    rows = report["layers"]
    assert report["compression_precision"] == pytest.approx(
        32 * sum(r["weights_total"] for r in rows) / sum(r["weights_kept"] * (1 + exponent + r["bits"]) for r in rows))


@pytest.mark.parametrize("name", LAYER_SEARCHED + GROUP_CUT)
def test_layer_searched_run_is_its_base_file_cut_at_the_recorded_thresholds(name):
    """A layer-searched (or group-cut) run's architecture, weights kept and rates are those of its base
    run's file cut at the thresholds it records (by the base run's recorded log alphas), with the base's
    bits (or the run's own, where it retrained on other grids); no threshold is above the base's."""
    from bclib.compression import CompressedModel, prune_further
    from bclib.experiments import _recorded_log_alpha
    from bclib.models import build_model

    report, config = _read(name, "report.json"), _read(name, "config.json")
    base_name = config.get("prunes_layers_of") or config["prunes_to_groups_of"]
    base, layers = _read(base_name, "report.json"), _read(base_name, "analysis.json")["layers"]
    log_alpha = [_recorded_log_alpha(layers[row["name"]]["log_alpha"], threshold)
                 for row, threshold in zip(base["layers"], base["thresholds"])]
    compressed = CompressedModel.from_file(RESULTS / base_name / "model.bcz", base)
    cut = prune_further(compressed, build_model(config["model"], config["prior"]), log_alpha, report["thresholds"])
    assert cut.report.architecture == report["architecture"]
    assert [row.weights_kept for row in cut.report.layers] == [row["weights_kept"] for row in report["layers"]]
    # The base's bits, or those the run retrained on (prune-to-groups --bits) for every layer.
    bits = [config["bits"]] * len(report["layers"]) if "bits" in config else [row["bits"] for row in base["layers"]]
    assert [row["bits"] for row in report["layers"]] == bits
    assert cut.report.compression_pruning == pytest.approx(report["compression_pruning"])
    # The exponent bits follow the retrained weights, which can cross a boundary the cut's did not
    # (checked against the file for every run below): the rate after precision is the cut's rows at them.
    exponent = report["exponent_bits"]
    rows = cut.report.layers
    assert report["compression_precision"] == pytest.approx(
        32 * sum(r.weights_total for r in rows) / sum(r.weights_kept * (1 + exponent + b) for r, b in zip(rows, bits)))
    assert all(new <= old for new, old in zip(report["thresholds"], base["thresholds"]))


@pytest.mark.parametrize("name", [run for run in LAYER_SEARCHED if _read(run, "config.json").get("seeds", 1) > 1])
def test_seeded_layer_search_took_the_cut_its_rule_names(name):
    """Each candidate's selection error is the mean of its seeds' (recomputed here); every step took,
    among the candidates within the allowed error (the base's mean + the tolerance, or the fixed
    allowance of a held-out run's search), the one of
    lowest mean (rule "least_error", the default), of highest compression after pruning
    ("most_pruning") or of least mean error added per weight removed ("least_error_per_weight"), and
    the last step none; the run's file is the taken network's first seed."""
    config, report = _read(name, "config.json"), _read(name, "report.json")
    analysis = _read(name, "analysis.json")
    candidates = analysis["candidates"]
    for row in candidates:
        errors = [entry["selection_error"] for entry in row["seeds"]]
        assert [entry["seed"] for entry in row["seeds"]] == list(range(config["seeds"]))
        assert row["selection_error"] == pytest.approx(sum(errors) / len(errors), abs=1e-12)
    # A search with a fixed allowance (allowed_error) records it; otherwise the base's mean + the tolerance.
    allowed = config.get("allowed_error") or candidates[0]["selection_error"] + config["selection_tolerance"]
    assert analysis["allowed"] == pytest.approx(allowed)
    steps = sorted({row["step"] for row in candidates if row["step"] > 0})
    for step in steps:
        within = [row for row in candidates if row["step"] == step and row["selection_error"] <= analysis["allowed"]]
        taken = [row for row in candidates if row["step"] == step and row["taken"]]
        if config.get("take", "least_error") == "least_error":
            best = min(within, key=lambda row: (row["selection_error"], -row["compression_pruning"]), default=None)
        elif config["take"] == "least_error_per_weight":  # error added over 1/compression removed
            current = [row for row in candidates if row["taken"] and row["step"] < step][-1]
            best = min(within, key=lambda row: (row["selection_error"] - current["selection_error"])
                       / (1 / current["compression_pruning"] - 1 / row["compression_pruning"]), default=None)
        else:
            best = max(within, key=lambda row: (row["compression_pruning"], -row["selection_error"]), default=None)
        assert taken == ([best] if step < steps[-1] else [])
    last = [row for row in candidates if row["taken"]][-1]
    assert last["architecture"] == report["architecture"]
    assert last["seeds"][0]["test_error"] == pytest.approx(report["file_error"], abs=1e-12)


@pytest.mark.parametrize("name", GROUP_CUT)
def test_group_cut_run_keeps_at_most_the_groups_asked_and_records_each_seed(name):
    """Each layer keeps at most the groups asked for, exactly as many where it cut (threshold lowered)
    unless log alphas tie; the recorded selection error is the mean of the seeds'; the file is seed 0's."""
    config, report, analysis = (_read(name, file) for file in ("config.json", "report.json", "analysis.json"))
    kept = [int(count) for count in report["architecture"].split("-")]
    before = report["group_cut"]["thresholds_before"]
    for count, asked, threshold, old in zip(kept, config["groups"], report["thresholds"], before, strict=True):
        assert count <= asked and (threshold == old or count == asked)
    errors = [seed["selection_error"] for seed in analysis["seeds"]]
    assert [seed["seed"] for seed in analysis["seeds"]] == list(range(config["seeds"]))
    assert report["group_cut"]["selection_error"] == pytest.approx(sum(errors) / len(errors), abs=1e-12)
    assert analysis["seeds"][0]["test_error"] == pytest.approx(report["file_error"], abs=1e-12)


CONFIGURED = sorted(path.parent.name for path in RESULTS.glob("*/config.json"))


@pytest.mark.parametrize("name", CONFIGURED)
def test_committed_config_is_the_registered_recipe(name):
    """``python -m bclib reproduce --only NAME`` reruns what is committed: each run's config.json
    holds the recipe registered under its name (where and how fast it ran aside)."""
    from bclib.experiments import EXPERIMENTS, SEARCH_KINDS
    from bclib.train import TrainConfig

    experiment, config = EXPERIMENTS[name], _read(name, "config.json")
    assert (config["model"], config["prior"]) == (experiment.model, experiment.prior)
    assert config["input_range"] == list(experiment.input_range)
    ignored = {"device", "keep_freed_memory"}
    # Settings added after a run was made are missing from its config: their defaults applied.
    recorded = {k: v for k, v in TrainConfig.from_dict(config["train"]).to_dict().items() if k not in ignored}
    assert recorded == {k: v for k, v in experiment.config.to_dict().items() if k not in ignored}
    if experiment.refines is None:
        assert config["init_from"] == experiment.init_from
        assert config.get("model_options", {}) == experiment.model_options
    else:
        key = next(k for k in SEARCH_KINDS if getattr(experiment, k))
        assert config[key] == getattr(experiment, key)
        if experiment.prunes_to_groups_of:
            assert (config["groups"], config["seeds"]) == (list(experiment.kept_groups), experiment.search_seeds)
            assert config.get("reinitialize", False) == experiment.reinitialize
            assert config.get("bits") == experiment.retrain_bits
        if experiment.prunes_layers_of:
            assert config.get("seeds", 1) == experiment.search_seeds
            assert config.get("allowed_error") == experiment.search_allowed_error
            # The tolerance is recorded only where it set the allowed error.
            assert config.get("selection_tolerance") == (
                experiment.search_tolerance if experiment.search_allowed_error is None else None)
    assert config.get("holds_out_selection", False) == experiment.holds_out_selection


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_results_name_no_folder_of_the_machine_they_ran_on(path):
    """Paths in a result, the recorded command's arguments included, are relative (a reader's clone has
    no /work or /home/someone)."""
    absolute = [word for text in _strings(json.loads(path.read_text())) for word in text.split()
                if word.rpartition("=")[2].strip("'\"").startswith("/")]
    assert absolute == []
