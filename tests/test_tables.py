"""The result tables of :mod:`bclib.tables` on hand-made reports, checked cell by cell."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bclib
from bclib import tables


def _report(error, pruning, precision, sparse=None, ratio=100.0):
    sparse = sparse or (pruning, precision)
    return {"precision_error": error, "file_error": error, "compression_pruning": pruning,
            "compression_precision": precision, "compression_sparse": sparse[0],
            "compression_sparse_precision": sparse[1], "file": {"ratio": ratio}}


TARGETS = {"lenet5_nj": (0.010, 108.0, 361.0), "lenet5_svd": (0.010, 63.0, 228.0), "lenet300_nj": (0.018, None, None)}


def test_tables_fit_80_characters():
    reports = {"lenet300_nj": _report(0.0178, 5.38, 24.69), "lenet5_svd": _report(0.0086, 15.3, 50.3, (118.2, 1390.2)),
               "lenet5_nj": _report(0.0141, 78.66, 320.4, ratio=526.0)}
    texts = [tables.release_comparison(reports, TARGETS),
             tables.results_at_a_glance(reports, {"lenet5_nj_ft": _report(0.0093, 78.66, 320.4)}, TARGETS)]
    assert all(len(line) <= 80 for text in texts for line in text.splitlines())


def test_release_comparison_names_the_shortfalls():
    reports = {"lenet300_nj": _report(0.0178, 5.4, 24.7), "lenet5_svd": _report(0.0086, 15.3, 50.3, (118.2, 390.2)),
               "lenet5_nj": _report(0.0141, 78.66, 320.4)}
    text = tables.release_comparison(reports, TARGETS)
    lines = text.splitlines()
    # LeNet-300-100 has no rates in the targets: no row. Order: that of the reports.
    assert [line.split("(")[0].strip() for line in lines[1:5]] == ["Sparse VD", "Sparse VD", "BC-GNJ", "BC-GNJ"]
    assert lines[1].split() == ["Sparse", "VD", "(release)", "1.0", "63x", "228x"]
    # Sparse VD is judged by its sparse rates (118.2 >= 63, 390.2 >= 228) and its error 0.86 <= 1.0.
    assert "LeNet-5 Sparse VD: at or beyond the release on all three numbers" in lines
    at = lines.index("LeNet-5 BC-GNJ, short of the release in:")
    assert lines[at + 1:] == ["  error 1.41 % vs 1.0 %", "  compression 78.7x vs 108x",
                              "  after precision 320.4x vs 361x"]


def test_results_at_a_glance_rows():
    reports = {"lenet300_nj": _report(0.0178, 5.382, 24.69, ratio=47.3),
               "lenet5_svd": _report(0.0086, 15.3, 50.3, (118.2, 390.2), ratio=300.4)}
    retrained = {"lenet300_nj_ft": _report(0.0168, 6.355, 29.15, ratio=54.0)}
    lines = tables.results_at_a_glance(reports, retrained, TARGETS).splitlines()
    rows = [line.split() for line in lines]
    assert lines[0].startswith("LeNet-300-100") and rows[0][-4:] == ["%", "pruning", "precision", "file"]
    assert rows[1] == ["BC-GNJ", "paper", "1.80", "-", "-", "-"]
    assert rows[2] == ["ours", "1.78", "5.4x", "24.7x", "47x"]
    assert rows[3] == ["ours", "+", "retraining", "1.68", "6.4x", "29.1x", "54x"]
    block = lines.index(next(line for line in lines if line.startswith("LeNet-5-Caffe")))
    # Sparse VD: the sparse rates; no retrained run, so no retrained row.
    assert rows[block + 1] == ["Sparse", "VD", "paper", "1.00", "63x", "228x", "-"]
    assert rows[block + 2] == ["ours", "0.86", "118.2x", "390.2x", "300x"]
    assert rows[block + 3] == []
    with pytest.raises(ValueError, match="run name"):
        tables.results_at_a_glance({"vgg_nj": reports["lenet300_nj"]}, {}, TARGETS)
    lowered = {"lenet5_svd_ft_bits": _report(0.0095, 15.3, 70.0, (276.7, 1500.0), ratio=720.4)}
    rows = [line.split() for line in tables.results_at_a_glance(reports, retrained, TARGETS, lowered).splitlines()]
    # No retrained row to stand under: the bits row says what it lowered.
    assert rows[block + 3] == ["retraining", "+", "bits", "0.95", "276.7x", "1500.0x", "720x"]


def test_seed_spread_counts_overlaps_and_checks_the_release():
    def seeds(*tests):
        return [{"selection_error": 0.005, "test_error": t} for t in tests]
    analyses = {
        # Kept 0.93-0.95 and rejected 0.94-0.99 overlap.
        "lenet5_nj_ft": {"offset": 0.0, "candidates": [
            {"offset": 0.0, "architecture": "9-16-93-16", "seeds": seeds(0.0093, 0.0095, 0.0094)},
            {"offset": -0.25, "architecture": "9-13-69-14", "seeds": seeds(0.0099, 0.0094, 0.0120),
             "compression_pruning": 120.0, "compression_precision": 400.0}]},
        # Kept 0.80-0.81 and rejected 0.90-0.92 do not.
        "lenet300_nj_ft": {"offset": -0.5, "candidates": [
            {"offset": 0.0, "architecture": "411-114-21"},
            {"offset": -0.5, "architecture": "365-113-19", "seeds": seeds(0.0080, 0.0081, 0.0080)},
            {"offset": -0.75, "architecture": "350-113-19", "seeds": seeds(0.0090, 0.0092, 0.0091)}]},
    }
    lines = tables.seed_spread_table(analyses, TARGETS).splitlines()
    assert lines[2].split() == ["lenet5_nj_ft", "+0.00", "9-16-93-16", "kept", "0.50", "0.50", "0.50",
                                "0.93", "0.95", "0.94"]
    assert lines[3].split()[3] == "rejected" and len(lines[2:6]) == 4
    assert "overlap across seeds in 1 of 2 searches" in lines[7]
    # 120 >= 108 and 400 >= 361: rates reached; test errors 0.99, 0.94 <= 1.0 but not 1.20.
    assert lines[-2] == "LeNet-5 BC-GNJ, rejected 9-13-69-14: 120.0x / 400.0x"
    assert lines[-1] == "  release's rates reached; test error <= 1.0 % for 2 of 3 seeds"
    # A run name past 15 characters widens the run column for every row: the columns stay aligned.
    analyses["lenet5_hs_scratch_ft"] = analyses.pop("lenet5_nj_ft")
    lines = tables.seed_spread_table(analyses, TARGETS).splitlines()
    selection_end = lines[0].index("selection %") + len("selection %")
    assert lines[1].index("(seeds 0 1 2)") + len("(seeds 0 1 2)") == selection_end
    assert {lines[2].index("0.50 0.50 0.50") + len("0.50 0.50 0.50"), len(lines[0])} == {selection_end, len(lines[2])}
    assert max(map(len, lines)) <= 80


def test_retraining_against_release_and_the_file_goal():
    reports = {"lenet5_nj_ft": _report(0.0093, 78.66, 320.4, ratio=507.0),
               "lenet5_svd_ft": _report(0.0082, 30.0, 90.0, (276.7, 1068.7), ratio=538.0),
               "lenet300_nj_ft": _report(0.0168, 6.4, 29.2, ratio=54.0)}
    lines = tables.retraining_against_release(reports, TARGETS, (700.0, 0.010)).splitlines()
    assert lines[:4] == ["LeNet-5 BC-GNJ + retraining, against the release:", "  error 0.93 % vs 1.0 %: met",
                         "  compression 78.7x vs 108x: short", "  after precision 320.4x vs 361x: short"]
    assert lines[5:8] == ["  error 0.82 % vs 1.0 %: met", "  compression 276.7x vs 63x: met",
                          "  after precision 1068.7x vs 228x: met"]
    assert "lenet300" not in "\n".join(lines)  # no rates to compare with, and not a LeNet-5 file
    lowered = tables.retraining_against_release({"lenet5_nj_ft_bits": _report(0.0097, 78.66, 401.2, ratio=701.0)},
                                                TARGETS, (700.0, 0.010)).splitlines()
    assert lowered[:4] == ["LeNet-5 BC-GNJ + retraining, fewer bits, against the release:",
                           "  error 0.97 % vs 1.0 %: met", "  compression 78.7x vs 108x: short",
                           "  after precision 401.2x vs 361x: met"]
    assert lowered[-2:] == ["lenet5_nj_ft_bits:", "701x smaller than the float32 dense network (goal 700x: reached)"]
    assert lines[-3:] == ["smallest retrained LeNet-5 file at <= 1.0 % error:",
                          "lenet5_svd_ft:", "538x smaller than the float32 dense network (goal 700x: not reached)"]
    # A bits search without the zero-survivor record is marked, with a footnote.
    stale = {**_report(0.0097, 78.66, 401.2, ratio=701.0), "bit_search": {"bits": [3, 2]}}
    marked = tables.retraining_against_release({"lenet5_nj_ft_bits": stale}, TARGETS, (700.0, 0.010)).splitlines()
    assert marked[0] == "LeNet-5 BC-GNJ + retraining, fewer bits, against the release *:"
    assert marked[-2].startswith("*: retrained before fine_tune") and "*" not in "\n".join(lowered)


def test_speed_table_fits_and_names_macs():
    result = {"architecture": "9-16-93-16", "threads": 2, "flops_before": 2_293_000, "flops_after": 361_648,
              "flop_reduction": 2_293_000 / 361_648, "freed_memory_kept": False,
              "runs": [{"layout": "channels_last", "batch": 1000, "dense_ms": 140.316, "pruned_ms": 36.707,
                        "pruned_examples_per_s": 1000 / 0.036707, "speedup": 140.316 / 36.707,
                        "speedup_over_flop_reduction": 140.316 / 36.707 / (2_293_000 / 361_648)}],
              "layers": {"channels_last": [{"layer": "0 Conv2d", "dense_ms": 3.0, "pruned_ms": 1.0},
                                           {"layer": "1 MaxPool2d", "dense_ms": 6.0, "pruned_ms": 3.0}]}}
    text = tables.speed_table(result)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "multiply-accumulates (MACs) per example: 2,293,000 -> 361,648 (6.3x fewer)" in text
    row = next(line for line in text.splitlines() if line.startswith("channels_last  "))
    assert row.split() == ["channels_last", "1000", "140.316", "36.707", "27,243", "3.82x", "0.60"]
    assert text.splitlines()[-1].split() == ["1", "MaxPool2d", "6.000", "3.000", "75%"]
    with pytest.raises(ValueError, match="per-module timings but no runs"):
        tables.speed_table({**result, "runs": []})


def test_bench_trials_summary_judges_the_median_and_compares_the_allocators():
    def measured(kept, ratio):
        runs = [{"layout": "compiled", "batch": 1000, "speedup": 6.0 * ratio, "speedup_over_flop_reduction": ratio,
                 "speedup_over_flop_reduction_range": [ratio - 0.1, ratio + 0.1]},
                {"layout": "compiled", "batch": 1, "speedup": 1.5, "speedup_over_flop_reduction": 0.24}]
        return {"command": "python -m bclib bench compression", "cpu": "cpu", "torch": "2",
                "results": {"compression": {"threads": 2, "architecture": "9-16-93-16", "flop_reduction": 6.3,
                                            "freed_memory_kept": kept, "trials": [{}] * 5, "runs": runs}}}
    text = tables.bench_trials_summary({"a.json": measured(False, 0.85), "b.json": measured(True, 0.58)}, 0.8)
    lines = text.splitlines()
    assert lines[5].split() == ["compiled", "1000", "5.10x", "0.85", "0.75-0.95", "met"]
    assert lines[6].split() == ["compiled", "1", "1.50x", "0.24", "0.24-0.24"]
    assert "medians of 5 trial(s)" in lines[3]
    assert lines[-2:] == ["compiled, batch 1000, 2 threads: 0.85 of the FLOP cut with glibc's defaults,",
                          "0.58 with freed memory kept"]
    assert all(len(line) <= 80 for line in lines)


@pytest.fixture
def pair():
    """fc1: 4 -> 3 with group log alphas (-9, 0, -9, -9); fc2: 3 -> 2 with (-9, -9, 0)."""
    fc1, fc2 = bclib.LinearGroupNJ(4, 3), bclib.LinearGroupNJ(3, 2)
    with torch.no_grad():
        for layer, log_alpha in ((fc1, [-9.0, 0.0, -9.0, -9.0]), (fc2, [-9.0, -9.0, 0.0])):
            layer.weight_mu.copy_(torch.where(torch.rand(layer.weight_shape) < 0.5, -1.0, 1.0))
            layer.z_mu.fill_(1.0)
            layer.z_logvar.copy_(torch.tensor(log_alpha))
    return nn.Sequential(fc1, nn.ReLU(), fc2).eval()


def test_compression_at_offset_by_hand(pair):
    """Offset 3.5 moves the thresholds -3 to 0.5: every log alpha (-9 or 0) is below, all is kept. Offset
    2.5 moves them to -0.5: fc1 loses input 1 and fc2 input 2, which kills fc1's unit 2 (the AND rule):
    3 x 2 + 2 x 2 = 10 of 18 weights, 1.8x. The error is that of a forward pass done here with the
    surviving +-1 weights (exact on any grid) and the biases rounded to float16, as the file stores them."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(1))
    lines = tables.compression_at_offset(pair, [-3.0, -3.0], x, y, offset=3.5).splitlines()
    assert lines[0] == "thresholds [0.5, 0.5]" and lines[1].startswith("architecture 4-3, error ")
    assert lines[2].startswith("compression 1.0x after pruning")
    fc1, fc2 = pair[0], pair[2]
    inputs, units = [0, 2, 3], [0, 1]
    with torch.no_grad():
        hidden = torch.relu(x[:, inputs] @ fc1.weight_mu[units][:, inputs].T + fc1.bias_mu[units].half().float())
        logits = hidden @ fc2.weight_mu[:, units].T + fc2.bias_mu.half().float()
    error = float((logits.argmax(1) != y).float().mean())
    lines = tables.compression_at_offset(pair, [-3.0, -3.0], x, y, offset=2.5).splitlines()
    assert lines[0] == "thresholds [-0.5, -0.5]"
    assert lines[1] == f"architecture 3-2, error {100 * error:.2f} %"
    assert lines[2].startswith("compression 1.8x after pruning")


def _bits_report(bits, precision, size, ratio, error):
    return {"layers": [{"bits": b} for b in bits], "compression_precision": precision,
            "compression_sparse_precision": 2 * precision, "file": {"bytes": size, "ratio": ratio},
            "file_error": error}


def test_bit_search_table_rows():
    retrained = {"lenet5_nj_ft": _bits_report([13, 4, 2, 5], 320.4, 3403, 506.7, 0.0093),
                 "lenet5_svd_ft": _bits_report([6, 4, 5, 8], 100.0, 3204, 538.2, 0.0082),
                 "lenet5_hs_ft": _bits_report([7, 6, 5, 9], 323.6, 3836, 449.5, 0.0085)}
    lowered = {"lenet5_nj_ft_bits": _bits_report([13, 2, 1, 5], 401.3, 2601, 662.9, 0.0096),
               "lenet5_svd_ft_bits": _bits_report([3, 2, 3, 4], 150.0, 2400, 718.5, 0.0099)}
    lines = tables.bit_search_table(retrained, lowered).splitlines()
    assert all(len(line) <= 80 for line in lines)
    # The longest label of the book, with a large file: still 80 characters.
    widest = {"lenet300_svd_ft": _bits_report([10, 10, 10], 1000.0, 123_456, 999.0, 0.0186)}
    assert max(map(len, tables.bit_search_table(widest, {"lenet300_svd_ft_bits": widest["lenet300_svd_ft"]})
                   .splitlines())) <= 80
    rows = [line.split() for line in lines]
    assert rows[1] == ["LeNet-5", "BC-GNJ", "retrained", "13-4-2-5", "320.4x", "3,403", "B", "507x", "0.93"]
    assert rows[2] == ["fewer", "bits", "13-2-1-5", "401.3x", "2,601", "B", "663x", "0.96"]
    # Sparse VD shows the sparse after-precision rate (twice the dense one in these reports).
    assert rows[3][:5] == ["LeNet-5", "Sparse", "VD", "retrained", "6-4-5-8"] and rows[3][5] == "200.0x"
    assert rows[4][2:4] == ["3-2-3-4", "300.0x"]
    assert rows[5][:4] == ["LeNet-5", "BC-GHS", "retrained", "7-6-5-9"] and len(rows) == 6  # no lowered run


def test_bit_search_steps_lists_each_candidate():
    analysis = {"allowed": 0.0084, "candidates": [
        {"layer": "3", "bits": [13, 2, 2, 5], "selection_error": 0.0077, "kept": True},
        {"layer": "3", "bits": [13, 1, 2, 5], "selection_error": 0.0091, "kept": False},
        {"layer": "0", "bits": [7, 2, 2, 5], "selection_error": 0.0080, "kept": True}]}
    lines = tables.bit_search_steps(analysis, ["0", "3", "7", "9"], {"0": "conv1", "3": "conv2"}).splitlines()
    assert "(allowed 0.84 %)" in lines[0]
    assert [line.split() for line in lines[1:]] == [["conv2", "2", "13-2-2-5", "0.77", "kept"],
                                                    ["conv2", "1", "13-1-2-5", "0.91", "over"],
                                                    ["conv1", "7", "7-2-2-5", "0.80", "kept"]]
    with pytest.raises(ValueError, match="do not match the candidate"):
        tables.bit_search_steps(analysis, ["0", "3", "7"])


def test_results_at_a_glance_adds_the_layer_search_rows():
    reports = {"lenet5_nj": _report(0.0141, 78.66, 320.4, ratio=526.0)}
    layered = {"lenet5_nj_layers": _report(0.0098, 110.2, 380.5, ratio=600.2)}
    lowered = {"lenet5_nj_layers_bits": _report(0.0099, 110.2, 450.0, ratio=810.6)}
    lines = tables.results_at_a_glance(reports, {}, TARGETS, lowered, layered).splitlines()
    assert [line.split() for line in lines[2:5]] == [["ours", "1.41", "78.7x", "320.4x", "526x"],
                                                     ["ours", "+", "layer", "search", "0.98", "110.2x", "380.5x", "600x"],
                                                     ["+", "fewer", "bits", "0.99", "110.2x", "450.0x", "811x"]]
    assert all(len(line) <= 80 for line in lines)
    # Every search given gets its rows, in the order given, named by the search.
    layered["lenet5_nj_layers_3seeds_tol2"] = _report(0.0097, 125.0, 410.0, ratio=520.0)
    lowered["lenet5_nj_layers_3seeds_tol2_bits"] = _report(0.0098, 125.0, 560.0, ratio=870.0)
    lines = tables.results_at_a_glance(reports, {}, TARGETS, lowered, layered).splitlines()
    assert [line.split()[-5:] for line in lines[5:7]] == [["pts", "0.97", "125.0x", "410.0x", "520x"],
                                                          ["bits", "0.98", "125.0x", "560.0x", "870x"]]
    assert lines[5].split()[:6] == ["ours", "+", "3", "seeds,", "0.2", "pts"] and len(lines[7].split()) == 0
    assert all(len(line) <= 80 for line in lines)
    # Without the run it starts from, a bits row says what it lowered.
    lines = tables.results_at_a_glance(reports, {}, TARGETS, lowered).splitlines()
    assert lines[3].split() == ["layer", "search", "+", "bits", "0.99", "110.2x", "450.0x", "811x"]



def _glance(reports, targets, layered=None, lowered=None, retrained=None) -> list[str]:
    """The lines of :func:`tables.results_at_a_glance` (no retrained, bits or layer-search rows unless given)."""
    return tables.results_at_a_glance(reports, retrained or {}, targets, lowered or {}, layered or {}).splitlines()


def _labels(lines: list[str]) -> list[str]:
    """The prior and row-label columns of table-at-a-glance lines (10 + 1 + 32 characters)."""
    return [line[:43].strip() for line in lines]


def test_results_at_a_glance_shows_another_recipe_under_its_row():
    reports = {"lenet5_hs": _report(0.0106, 43.5, 161.4, ratio=276.0),
               "lenet5_hs_scratch": _report(0.0094, 60.5, 210.6, ratio=375.0)}
    layered = {"lenet5_hs_layers_3seeds_tol2": _report(0.0087, 98.3, 358.3, ratio=494.0),
               "lenet5_hs_scratch_layers_3seeds_tol2": _report(0.0095, 120.0, 400.0, ratio=600.0)}
    lowered = {"lenet5_hs_scratch_layers_3seeds_tol2_bits": _report(0.0099, 120.0, 500.0, ratio=900.0)}
    retrained = {"lenet5_hs_scratch_ft": _report(0.0085, 60.5, 210.6, ratio=355.0)}
    lines = _glance(reports, {"lenet5_hs": (0.010, 156.0, 419.0)}, layered, lowered, retrained)
    # One BC-GHS block: the paper, the pretrained start's steps, then the scratch run's.
    assert _labels(lines[1:8]) == [
        "BC-GHS     paper", "ours", "ours + 3 seeds, 0.2 pts", "scratch", "scratch + retraining",
        "scratch + 3 seeds, 0.2 pts", "+ fewer bits"]
    assert lines[7].split()[-4:] == ["0.99", "120.0x", "500.0x", "900x"]
    assert "scratch: trained from scratch, not from the pretrained network (chapter 4)." in lines
    assert all(len(line) <= 80 for line in lines)


def test_results_at_a_glance_labels_other_seeds_in_the_label_column():
    reports = {"lenet5_nj": _report(0.0141, 78.7, 320.4, ratio=526.0),
               "lenet5_nj_scratch": _report(0.0125, 62.3, 280.4, ratio=452.0),
               "lenet5_nj_scratch_seed1": _report(0.0101, 79.9, 346.1, ratio=529.0),
               "lenet5_nj_scratch_seed2": _report(0.0093, 70.0, 300.0, ratio=480.0)}
    layered = {"lenet5_nj_scratch_seed1_layers_3seeds_tol2": _report(0.0101, 123.4, 495.6, ratio=694.0)}
    lines = _glance(reports, {"lenet5_nj": (0.010, 108.0, 361.0)}, layered)
    assert _labels(lines[1:7]) == [
        "BC-GNJ     paper", "ours", "scratch", "seed 1", "seed 1 + 3 seeds, 0.2 pts", "seed 2"]
    assert lines[5].split()[-4:] == ["1.01", "123.4x", "495.6x", "694x"]
    assert lines[6].split()[-4:] == ["0.93", "70.0x", "300.0x", "480x"]
    assert lines[-3:] == ["scratch: trained from scratch, not from the pretrained network (chapter 4).",
                          "seed 1: the same recipe as scratch, with seed 1 (chapter 4).",
                          "seed 2: the same recipe as scratch, with seed 2 (chapter 4)."]
    assert all(len(line) <= 80 for line in lines)


def test_results_at_a_glance_shows_the_cut_to_the_papers_architecture_with_its_note():
    reports = {"lenet5_nj": _report(0.0141, 78.7, 320.4, ratio=526.0)}
    layered = {"lenet5_nj_paper_arch": _report(0.0104, 111.4, 444.6, ratio=665.0)}
    lowered = {"lenet5_nj_paper_arch_bits": _report(0.0110, 111.4, 560.3, ratio=882.0)}
    lines = _glance(reports, {"lenet5_nj": (0.010, 108.0, 361.0)}, layered, lowered)
    assert _labels(lines[1:5]) == ["BC-GNJ     paper", "ours", "ours + paper's arch.", "+ fewer bits"]
    assert lines[3].split()[-4:] == ["1.04", "111.4x", "444.6x", "665x"]
    assert lines[4].split()[-4:] == ["1.10", "111.4x", "560.3x", "882x"]
    assert "paper's arch.: cut to at most the paper's architecture, retrained (chapter 4)." in lines
    assert "paper's arch.: cut to at most the paper's architecture, retrained (chapter 4)." not in _glance(
        reports, {"lenet5_nj": (0.010, 108.0, 361.0)})  # only beside such rows
    assert all(len(line) <= 80 for line in lines)


def test_results_at_a_glance_shows_the_held_out_run_and_its_fixed_allowance_search():
    reports = {"lenet5_nj": _report(0.0141, 78.7, 320.4, ratio=526.0),
               "lenet5_nj_heldout": _report(0.0110, 65.0, 280.0, ratio=450.0)}
    layered = {"lenet5_nj_heldout_layers_3seeds_tol2": _report(0.0101, 125.0, 450.0, ratio=650.0),
               "lenet5_nj_heldout_layers_3seeds_max09": _report(0.0096, 112.0, 430.0, ratio=610.0)}
    lowered = {"lenet5_nj_heldout_layers_3seeds_max09_bits": _report(0.0099, 112.0, 580.0, ratio=880.0)}
    lines = _glance(reports, {"lenet5_nj": (0.010, 108.0, 361.0)}, layered, lowered)
    assert _labels(lines[1:7]) == [
        "BC-GNJ     paper", "ours", "held out", "held out + 3 seeds, 0.2 pts", "held out + 3 seeds, 0.9 %",
        "+ fewer bits"]
    assert lines[4].split()[-4:] == ["1.01", "125.0x", "450.0x", "650x"]
    assert lines[5].split()[-4:] == ["0.96", "112.0x", "430.0x", "610x"]
    assert lines[6].split()[-4:] == ["0.99", "112.0x", "580.0x", "880x"]
    # The longest label leaves a space before the numbers, which line up under the header's.
    assert lines[4][43] == " " and lines[0].index("error %") + 7 == lines[4].index("1.01") + 4
    assert lines[-1].startswith("held out: scratch without the selection split")
    assert all(len(line) <= 80 for line in lines)

def test_pipeline_table_names_each_step():
    reports = {"lenet5_hs": {**_report(0.0106, 43.51, 161.43, ratio=276.4), "architecture": "11-17-196-24"},
               "lenet5_hs_ft": {**_report(0.0085, 89.13, 323.57, ratio=449.6), "architecture": "9-13-110-14"},
               "lenet5_hs_layers": {**_report(0.0095, 120.0, 400.0, ratio=500.0), "architecture": "7-11-80-14"},
               "lenet5_hs_layers_bits": {**_report(0.0099, 120.0, 600.0, ratio=810.0), "architecture": "7-11-80-14"},
               "lenet5_hs_layers_3seeds": {**_report(0.0093, 110.0, 380.0, ratio=480.0), "architecture": "8-11-80-14"},
               "lenet5_hs_layers_3seeds_tol2": {**_report(0.0097, 125.0, 410.0, ratio=520.0),
                                                "architecture": "8-10-80-14"},
               "lenet5_svd_ft": {**_report(0.0082, 9.0, 30.0, (276.7, 1068.7), ratio=538.0),
                                 "architecture": "14-18-210-65"}}
    reports["lenet300_nj"] = {**_report(0.0178, 5.38, 24.69, ratio=47.3), "architecture": "411-114-21"}
    lines = tables.pipeline_table(reports).splitlines()
    assert [line.split() for line in lines[1:]] == [
        ["LeNet-5", "BC-GHS"], ["paper", "pipeline", "11-17-196-24", "43.5x", "161.4x", "276x", "1.06"],
        ["uniform", "offset", "9-13-110-14", "89.1x", "323.6x", "450x", "0.85"],
        ["layer", "search", "7-11-80-14", "120.0x", "400.0x", "500x", "0.95"],
        ["+", "fewer", "bits", "7-11-80-14", "120.0x", "600.0x", "810x", "0.99"],
        ["search,", "3", "seeds", "8-11-80-14", "110.0x", "380.0x", "480x", "0.93"],
        ["3", "seeds,", "0.2", "pts", "8-10-80-14", "125.0x", "410.0x", "520x", "0.97"],
        ["LeNet-5", "Sparse", "VD"], ["uniform", "offset", "14-18-210-65", "276.7x", "1068.7x", "538x", "0.82"],
        ["LeNet-300-100", "BC-GNJ"], ["paper", "pipeline", "411-114-21", "5.4x", "24.7x", "47x", "1.78"]]
    assert all(len(line) <= 80 for line in lines)
    # Every row's columns line up with the header's, the longest step names included.
    assert len({len(line) for line in lines if line.startswith("  ")} | {len(lines[0])}) == 1


def test_pipeline_table_names_variant_runs_as_the_results_table_does():
    """A seed's or held-out run's group is named by its row label ("seed 1", "held out"), not its
    raw name words ("scratch seed1", "heldout")."""
    reports = {name: {**_report(0.0100, 60.0, 250.0, ratio=430.0), "architecture": "9-18-107-24"}
               for name in ("lenet5_hs_scratch", "lenet5_hs_scratch_seed1", "lenet5_nj_heldout")}
    groups = [line for line in tables.pipeline_table(reports).splitlines()[1:] if not line.startswith(" ")]
    assert groups == ["LeNet-5 BC-GHS, scratch", "LeNet-5 BC-GHS, seed 1", "LeNet-5 BC-GNJ, held out"]


def test_every_registered_refinement_is_labelled_with_its_paper_run():
    """Each run that refines another is named by a suffix the tables know: following ``refines`` back
    to the paper run gives the base name the tables find (a new suffix left out of the tables would
    make its run a paper run of its own)."""
    from bclib.experiments import EXPERIMENTS
    for name, experiment in EXPERIMENTS.items():
        root = name
        while EXPERIMENTS[root].refines is not None:
            root = EXPERIMENTS[root].refines
        base, steps, _ = tables._refinement(name)
        assert (base, bool(steps)) == (root, experiment.refines is not None), name
        if experiment.prior is None:
            continue  # the deterministic runs are in no table of steps
        # and its label keeps the tables within 80 characters
        lines = tables.retraining_against_release({name: _report(0.0099, 110.0, 450.0, ratio=800.0)},
                                                  {base: (0.010, 108.0, 361.0)}, (700.0, 0.01)).splitlines()
        assert lines and all(len(line) <= 80 for line in lines), lines


def test_layer_search_steps_lists_each_candidate():
    analysis = {"allowed": 0.0079, "candidates": [
        {"step": 0, "layer": None, "architecture": "11-17-196-24", "selection_error": 0.0069, "taken": True},
        {"step": 1, "layer": "0", "groups": 8, "architecture": "8-17-196-24", "selection_error": 0.0078,
         "taken": False},
        {"step": 1, "layer": "7", "groups": 147, "architecture": "11-17-147-24", "selection_error": 0.0071,
         "taken": True},
        {"step": 2, "layer": "7", "groups": 110, "architecture": "11-17-110-24", "selection_error": 0.0081,
         "taken": False}]}
    lines = tables.layer_search_steps(analysis, ["0", "3", "7", "9"], {"0": "conv1", "7": "fc1"}).splitlines()
    assert "(allowed 0.79 %)" in lines[0]
    assert [line.split() for line in lines[1:]] == [["0", "base", "-", "11-17-196-24", "0.69", "reference"],
                                                    ["1", "conv1", "8", "8-17-196-24", "0.78", "within"],
                                                    ["1", "fc1", "147", "11-17-147-24", "0.71", "taken"],
                                                    ["2", "fc1", "110", "11-17-110-24", "0.81", "over"]]
    with pytest.raises(ValueError, match="do not include the candidate's layer '7'"):
        tables.layer_search_steps(analysis, ["0", "3"])


def test_cut_costs_per_weight_by_hand():
    """600,000 weights: the base network (50x) keeps 12,000, the cut taken at step 1 (100x) 6,000,
    the other (60x) 10,000, and step 2's cut (200x, cutting the taken one) 3,000."""
    analysis = {"allowed": 0.0095, "candidates": [
        {"step": 0, "layer": None, "architecture": "9-16-93-16", "selection_error": 0.0070,
         "compression_pruning": 50.0, "taken": True},
        {"step": 1, "layer": "7", "groups": 46, "architecture": "9-16-46-16", "selection_error": 0.0078,
         "compression_pruning": 100.0, "taken": True},
        {"step": 1, "layer": "9", "groups": 12, "architecture": "9-16-93-12", "selection_error": 0.0075,
         "compression_pruning": 60.0, "taken": False},
        {"step": 2, "layer": "7", "groups": 23, "architecture": "9-16-23-16", "selection_error": 0.0090,
         "compression_pruning": 200.0, "taken": False}]}
    # 0.08 points over 6,000 weights, 0.05 over 2,000, 0.12 over 3,000
    expected = {1: 0.08 / 6, 2: 0.05 / 2, 3: 0.12 / 3}
    costs = tables.cut_costs_per_weight(analysis, 600_000)
    assert costs.keys() == expected.keys()
    assert all(costs[k] == pytest.approx(v, rel=1e-9) for k, v in expected.items())
    lines = tables.layer_search_steps(analysis, ["0", "3", "7", "9"], weights=600_000).splitlines()
    assert lines[0].endswith(" pts/1k w.") and "(allowed 0.95 %)" in lines[0]
    assert [line.split()[-1] for line in lines[1:]] == ["reference", "+0.013", "+0.025", "+0.040"]
    # each cost's last digit sits under the header's last character
    assert {len(line) for line in lines[2:]} == {len(lines[0])}
    with pytest.raises(ValueError, match="weights must be a positive weight count, got 0"):
        tables.cut_costs_per_weight(analysis, 0)
    analysis["candidates"][1]["taken"] = False
    with pytest.raises(ValueError, match="cut at step 2 but no network taken at step 1"):
        tables.cut_costs_per_weight(analysis, 600_000)


def test_repeated_retrainings_table_by_hand():
    """Two searches share the base network and one cut; each also retrained a network of its own."""
    def row(thresholds, architecture, selections, tests):
        return {"thresholds": thresholds, "architecture": architecture,
                "seeds": [{"selection_error": s, "test_error": t} for s, t in zip(selections, tests)]}
    first = {"candidates": [row([-3.0, -2.0], "8-19-100-24", (0.0060, 0.0070), (0.0080, 0.0090)),
                            row([-3.0, -1.0], "8-19-100-18", (0.0080, 0.0080), (0.0100, 0.0110)),
                            row([-2.0, -2.0], "6-19-100-24", (0.0090, 0.0090), (0.0120, 0.0120))]}
    second = {"candidates": [row([-3.0, -2.0], "8-19-100-24", (0.0062, 0.0070), (0.0080, 0.0094)),
                             row([-4.0, -2.0], "8-14-79-24", (0.0050, 0.0050), (0.0050, 0.0050)),
                             row([-3.0, -1.0], "8-19-100-18", (0.0075, 0.0081), (0.0100, 0.0110))]}
    lines = tables.repeated_retrainings_table(first, second).splitlines()
    # means: (0.60 + 0.70) / 2 = 0.65 against (0.62 + 0.70) / 2 = 0.66, and so on
    assert [line.split() for line in lines[2:4]] == [["8-19-100-24", "0.65", "0.66", "0.85", "0.87"],
                                                     ["8-19-100-18", "0.80", "0.78", "1.05", "1.05"]]
    # selection differences 0.02, 0.00, 0.05, 0.01 points; test 0.00, 0.04, 0.00, 0.00
    assert " ".join(lines[4:]) == ("2 networks in both, 2 retrainings each: selection errors differ by 0.05 "
                                   "points at most (0.02 on average), test errors by 0.04 (0.01)")
    assert all(len(line) <= 80 for line in lines)
    assert tables.repeated_retrainings_table(first, second, networks=False).splitlines() == lines[4:]
    assert tables.repeated_retrainings_table(first, second, networks=None).splitlines() == lines
    identical = tables.repeated_retrainings_table(first, first, networks=None).splitlines()
    assert " ".join(identical) == ("3 networks in both, 2 retrainings each: selection errors differ by 0.00 "
                                   "points at most (0.00 on average), test errors by 0.00 (0.00)")
    with pytest.raises(ValueError, match="must share a retrained network"):
        tables.repeated_retrainings_table(first, {"candidates": second["candidates"][1:2]})
    second["candidates"][0]["seeds"].pop()
    with pytest.raises(ValueError, match="8-19-100-24 was retrained with 2 seeds in first and 1 in second"):
        tables.repeated_retrainings_table(first, second)


def test_per_weight_agreement_table_by_hand():
    """400,000 weights; the base network (50x) keeps 8,000. Per 1,000 weights removed, search "split":
    conv2's cut (100x, keeps 4,000) costs 0.16 / 4 = 0.04 points, fc2's (52x, keeps 7,692.3) 0.05 /
    0.3077 = 0.1625, conv1's (1,000x, keeps 400) 0.22 / 7.6 = 0.029 but over the allowance. Search
    "same": the only cut within the allowance at each of two steps is the one taken, then none."""
    def row(step, layer, error, compression, taken):
        return {"step": step, "layer": layer, "selection_error": error, "compression_pruning": compression,
                "taken": taken}
    split = {"allowed": 0.0090, "candidates": [
        row(0, None, 0.0070, 50.0, True), row(1, "3", 0.0086, 100.0, False), row(1, "9", 0.0075, 52.0, True),
        row(1, "0", 0.0092, 1000.0, False)]}
    same = {"allowed": 0.0090, "candidates": [
        row(0, None, 0.0070, 50.0, True), row(1, "9", 0.0072, 52.0, True), row(1, "3", 0.0095, 100.0, False),
        row(2, "9", 0.0085, 55.0, True), row(3, "9", 0.0100, 60.0, False)]}
    labels = {"0": "conv1", "3": "conv2", "9": "fc2"}
    lines = tables.per_weight_agreement_table({"split": split, "same": same}, 400_000, labels).splitlines()
    assert lines[0].split() == ["search", "agreed", "then", "at", "step", "per", "weight", "least", "error"]
    assert lines[1].split() == ["split", "0", "of", "1", "1", "conv2", "fc2"]
    assert lines[2].split() == ["same", "2", "of", "2", "-", "-", "-"]
    assert {len(line) for line in lines} == {len(lines[0])}  # the columns line up


def test_retraining_against_release_names_the_layer_search_steps():
    text = tables.retraining_against_release(
        {"lenet5_nj_layers_bits": {**_report(0.0099, 110.0, 450.0, ratio=800.0)}}, TARGETS, (700.0, 0.01))
    assert text.splitlines()[0] == "LeNet-5 BC-GNJ + layer search, fewer bits, against the release:"
    assert "  compression 110.0x vs 108x: met" in text.splitlines()


def test_layer_search_summary_reads_the_kept_network():
    analysis = {"candidates": [
        {"step": 0, "taken": True, "architecture": "11-17-196-24", "test_error": 0.0069},
        {"step": 1, "taken": True, "architecture": "11-17-196-18", "test_error": 0.0074},
        {"step": 2, "taken": False, "architecture": "11-17-196-14", "test_error": 0.0061}]}
    text = tables.layer_search_summary("lenet5_hs_layers", {"layer_search": {"seconds": 90.0}}, analysis)
    assert text.splitlines() == ["lenet5_hs_layers: 1.5 min of retraining",
                                 "  python -m bclib reproduce --only lenet5_hs_layers",
                                 "  kept 11-17-196-18: test error 0.74 %"]
    # A registered name of 59 characters: the lines stay within 80, the command still pastes into a shell.
    long_name = "lenet5_hs_scratch_shared_seed1_layers_3seeds_tol2_perweight"
    text = tables.layer_search_summary(long_name, {"layer_search": {"seconds": 1908.0}}, analysis)
    assert text.splitlines()[:4] == [f"{long_name}:", "  31.8 min of retraining",
                                     "  python -m bclib reproduce \\", f"      --only {long_name}"]
    for row in analysis["candidates"]:
        row["taken"] = False
    with pytest.raises(ValueError, match="'lenet5_hs_layers' must have a taken candidate"):
        tables.layer_search_summary("lenet5_hs_layers", {"layer_search": {"seconds": 90.0}}, analysis)


def test_results_at_a_glance_marks_searches_retrained_before_the_zero_survivor_fix():
    reports = {"lenet5_nj": _report(0.0141, 78.66, 320.4, ratio=526.0)}
    layered = {"lenet5_nj_layers": {**_report(0.0098, 110.2, 380.5, ratio=600.2),
                                    "layer_search": {"thresholds": [1.0], "zero_survivors_train": True}}}
    # The bits row copies its base's layer search and adds its own bits search, which lacks the key.
    lowered = {"lenet5_nj_layers_bits": {**_report(0.0099, 110.2, 450.0, ratio=810.6),
                                         "layer_search": layered["lenet5_nj_layers"]["layer_search"],
                                         "bit_search": {"bits": [3]}}}
    lines = tables.results_at_a_glance(reports, {}, TARGETS, lowered, layered).splitlines()
    assert [line.split()[-1] for line in lines[2:5]] == ["526x", "600x", "*"]
    assert lines[-2].startswith("*: retrained before fine_tune")
    lowered["lenet5_nj_layers_bits"]["bit_search"]["zero_survivors_train"] = True
    lines = tables.results_at_a_glance(reports, {}, TARGETS, lowered, layered).splitlines()
    assert lines[4].split()[-1] == "811x" and not any(line.startswith("*") for line in lines)


def test_selection_optimism_table_counts_every_retraining():
    """Two searches by hand: one seeded (the base and a cut taken, two seeds each, and a cut passed
    over), one with one seed and no cut taken."""
    seeded = {"candidates": [
        {"layer": None, "taken": True,
         "seeds": [{"selection_error": 0.0070, "test_error": 0.0090},      # +0.20 points
                   {"selection_error": 0.0072, "test_error": 0.0080}]},    # +0.08
        {"layer": "3", "taken": False,
         "seeds": [{"selection_error": 0.0090, "test_error": 0.0082},      # -0.08
                   {"selection_error": 0.0081, "test_error": 0.0085}]},    # +0.04
        {"layer": "7", "taken": True,
         "seeds": [{"selection_error": 0.0080, "test_error": 0.0090},      # +0.10
                   {"selection_error": 0.0085, "test_error": 0.0099}]}]}   # +0.14
    single = {"candidates": [{"layer": None, "taken": True, "selection_error": 0.0100, "test_error": 0.0095},
                             {"layer": "1", "taken": False, "selection_error": 0.0110, "test_error": 0.0113}]}
    lines = tables.selection_optimism_table({"lenet5_nj_heldout_layers_3seeds_max09": seeded,
                                             "lenet5_nj_layers": single}).splitlines()
    # Every retraining: (0.20 + 0.08 - 0.08 + 0.04 + 0.10 + 0.14) / 6 = +0.08 points, 5 of 6 above;
    # the cut taken: (0.10 + 0.14) / 2 = +0.12 (the base is not a cut).
    assert lines[1].split() == ["lenet5_nj_heldout_layers_3seeds_max09", "+0.08", "pts", "+0.12", "pts",
                                "5", "of", "6"]
    # (-0.05 + 0.03) / 2 = -0.01 points; no cut taken.
    assert lines[2].split() == ["lenet5_nj_layers", "-0.01", "pts", "-", "1", "of", "2"]
    assert all(len(line) <= 80 for line in lines)
    # Each column's numbers end where its header does.
    for header, number in (("test - sel.", "+0.08 pts"), ("cuts taken", "+0.12 pts"), ("test above", "5 of 6")):
        assert lines[1].index(number) + len(number) == lines[0].index(header) + len(header), (header, lines)
    # A mean that rounds to zero prints as +0.00, not -0.00: (-0.004 + 0.002) / 2 = -0.001 points.
    tiny = {"candidates": [{"layer": None, "taken": True, "selection_error": 0.01004, "test_error": 0.0100},
                           {"layer": "1", "taken": False, "selection_error": 0.01, "test_error": 0.01002}]}
    assert tables.selection_optimism_table({"x": tiny}).splitlines()[1].split()[1] == "+0.00"
    with pytest.raises(ValueError, match=r"analyses\['lenet5_nj_layers'\] must hold retrained candidates"):
        tables.selection_optimism_table({"lenet5_nj_layers": {"candidates": []}})


def test_training_end_table_averages_the_last_epochs_by_hand():
    from types import SimpleNamespace

    history = [{"test_error": error, "kl": kl} for error, kl in ((0.05, 9e5), (0.012, 7000.0), (0.010, 6500.4),
                                                               (0.011, 6400.6))]
    run = SimpleNamespace(report={"dense_error": 0.0107}, metrics=history)
    # last 3 epochs: (1.2 + 1.0 + 1.1) / 3 = 1.10 %; final KL 6,400.6 -> 6,401
    assert tables.training_end_table({"a run": run}, tail=3).splitlines()[1].split() == \
        ["a", "run", "1.07", "%", "1.10", "%", "6,401"]
    with pytest.raises(ValueError, match="tail must be a positive int, got 0"):
        tables.training_end_table({"a run": run}, tail=0)
    # Fewer epochs than tail: the header names the 4 epochs averaged, (5 + 1.2 + 1.0 + 1.1) / 4 = 2.075 %.
    short = tables.training_end_table({"a run": run}, tail=50).splitlines()
    assert "mean of last 4" in short[0] and abs(float(short[1].split()[4]) - 2.075) < 0.006
    # A label longer than the column widens it for every row: the numbers stay under their headers.
    lines = tables.training_end_table({"a run": run, "BC-GHS from scratch, shared, seed 1": run}, tail=3).splitlines()
    for header, number in (("at the end", "1.07 %"), ("final KL", "6,401")):
        ends = {line.index(number) + len(number) for line in lines[1:]}
        assert ends == {lines[0].index(header) + len(header)}, (header, lines)
