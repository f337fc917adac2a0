"""The committed results (book/results) against the files beside them: every ``model.bcz`` loads and
scores on the real MNIST test set the error its report records, has the size and ratio it records,
and a bit-lowered run keeps its base's architecture with no layer given more bits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
