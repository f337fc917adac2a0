"""Tests of bclib.viz: GIFs read back with Pillow, pixel colours of hand-set weights, keep-probability
maps worked out by hand, the static figures' data, and bad input.

Hand-set layers: ``z_mu = 1`` and ``z_logvar = log(alpha)`` give ``log alpha = log(alpha)`` exactly
(the layer computes ``z_logvar - log(z_mu^2 + 1e-8)``), and ``E[w] = z_mu * weight_mu = weight_mu``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

import bclib
from bclib import viz

KEEP, PRUNE = -9.0, 0.0  # log alpha of a kept group and of a pruned one (alpha = 1)
SMALL = (3.2, 2.0)  # frame size in inches for the fast tests: 320 x 200 pixels at dpi 100


def set_group_layer(layer, weight_mu, log_alpha):
    """Give an NJ layer the posterior mean weights ``weight_mu`` and the group log alphas ``log_alpha``."""
    with torch.no_grad():
        layer.weight_mu.copy_(torch.as_tensor(weight_mu, dtype=torch.float32).reshape(layer.weight_shape))
        layer.z_mu.fill_(1.0)
        layer.z_logvar.copy_(torch.as_tensor(log_alpha, dtype=torch.float32))
    return layer


def read_gif(path):
    """(frames as RGB arrays, per-frame durations in ms, loop flag) of a GIF file."""
    with Image.open(path) as image:
        frames, durations = [], []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
            frames.append(np.asarray(image.convert("RGB")))
        return frames, durations, image.info.get("loop")


def weight_cell_pixel(frame, shape, i, j):
    """Pixel colour at the centre of weight (i, j), from the layout documented in viz.WEIGHT_AXES_RECT."""
    left, bottom, width, height = 0.02, 0.02, 0.96, 0.86
    assert viz.WEIGHT_AXES_RECT == (left, bottom, width, height)
    frame_height, frame_width = frame.shape[:2]
    x = (left + width * (j + 0.5) / shape[1]) * frame_width
    y = (1 - bottom - height + height * (i + 0.5) / shape[0]) * frame_height
    return frame[int(y), int(x)].astype(int)


def is_white(rgb):
    return bool(np.all(rgb >= 250))


def is_red(rgb):
    return rgb[0] >= 240 and rgb[1] <= 15 and rgb[2] <= 15


def is_blue(rgb):
    return rgb[2] >= 240 and rgb[0] <= 15 and rgb[1] <= 15


@pytest.fixture
def pair():
    """fc1: 4 -> 3, fc2: 3 -> 2. fc1 prunes input 1; fc2 prunes its input 2, i.e. fc1's output 2."""
    fc1 = set_group_layer(
        bclib.LinearGroupNJ(4, 3),
        # Signs by hand; one exact zero at (1, 2).
        [[1.0, -1.0, 1.0, -1.0],
         [-1.0, 1.0, 0.0, 1.0],
         [1.0, 1.0, -1.0, -1.0]],
        [KEEP, PRUNE, KEEP, KEEP],
    )
    fc2 = set_group_layer(bclib.LinearGroupNJ(3, 2), [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]], [KEEP, KEEP, PRUNE])
    return nn.Sequential(fc1, nn.ReLU(), fc2).eval()


# ----------------------------------------------------------------------------- recording and masks
def test_recorder_stores_posterior_means_and_and_masks(pair):
    # z_mu = 2 with z_var four times as large: the same log alphas (alpha = z_var / z_mu^2), and
    # E[w] = z_mu * w~ = 2 w~, which tells the posterior mean from the unscaled weights.
    with torch.no_grad():
        pair[0].z_logvar.add_(math.log(4.0))
        pair[0].z_mu.fill_(2.0)
    recorder = viz.WeightEvolutionRecorder(thresholds=[-3.0, -3.0])
    recorder(1, pair, {"loss": 0.0})
    assert recorder.epochs == [1] and recorder.layer_names == ["0", "2"]
    fc1_mask = torch.tensor([[1, 0, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    fc2_mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)  # the classes are never pruned
    assert torch.equal(recorder.masks["0"][0], fc1_mask)
    assert torch.equal(recorder.masks["2"][0], fc2_mask)
    assert torch.equal(recorder.weights["0"][0], 2 * pair[0].weight_mu.detach())
    assert recorder.weights["0"][0].device.type == "cpu" and not recorder.weights["0"][0].requires_grad


def test_recorder_copies_each_epoch(pair):
    recorder = viz.WeightEvolutionRecorder(layers=["0"], thresholds=[-3.0, -3.0])
    recorder(1, pair, {})
    with torch.no_grad():
        pair[0].weight_mu.mul_(2.0)
    recorder(2, pair, {})
    assert list(recorder.weights) == ["0"] and len(recorder) == 2
    assert float(recorder.weights["0"][0][0, 0]) == 1.0 and float(recorder.weights["0"][1][0, 0]) == 2.0


def test_thresholds_decide_the_groups(pair):
    # With threshold 0.5 on fc1, log alpha = 0 < 0.5 keeps input 1 too; fc2 still prunes fc1's output 2.
    recorder = viz.WeightEvolutionRecorder(thresholds={"0": 0.5, "2": -3.0})
    recorder(0, pair, {})
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(recorder.masks["0"][0], expected)


class _RegisteredBackwards(nn.Module):
    """The pair's layers, registered last first: forward runs them in the other order."""

    def __init__(self, pair):
        super().__init__()
        self.fc2, self.fc1 = pair[2], pair[0]

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_recorder_masks_follow_the_layers_not_their_order(pair):
    # A list of thresholds is in registration order (fc2, fc1): fc1 gets 0.5 and keeps its input 1.
    recorder = viz.WeightEvolutionRecorder(thresholds=[-3.0, 0.5])
    recorder(0, _RegisteredBackwards(pair), {})
    assert recorder.layer_names == ["fc2", "fc1"]
    assert torch.equal(recorder.masks["fc1"][0], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]).bool())
    assert torch.equal(recorder.masks["fc2"][0], torch.tensor([[1, 1, 0], [1, 1, 0]]).bool())


def test_recorder_names_a_layer_forward_never_runs(pair):
    model = _RegisteredBackwards(pair)
    model.unused = bclib.LinearGroupNJ(2, 2)  # an auxiliary head, say: it has no mask (a KeyError before)
    with pytest.raises(ValueError, match=r"layers: \['unused'\] never run in the model's forward; record the layers "
                                         r"it runs, layers=\['fc1', 'fc2'\]"):
        viz.WeightEvolutionRecorder(thresholds=-3.0)(0, model, {})
    recorder = viz.WeightEvolutionRecorder(layers=["fc1", "fc2"], thresholds=-3.0)
    recorder(0, model, {})
    assert recorder.layer_names == ["fc1", "fc2"]
    # figsize as a NumPy pair, as it was taken before its check
    assert viz.render_weight_frames(recorder, "fc1", figsize=np.array([4.0, 2.0]), dpi=50)[0].shape == (100, 200, 3)


def test_recorder_refuses_a_layer_named_twice(pair):
    with pytest.raises(ValueError, match=r"layers names a layer twice: \[0, '0'\] are \['0', '0'\]"):
        viz.WeightEvolutionRecorder(layers=[0, "0"])(0, pair, {})


def test_conv_filters_prune_the_flattened_inputs_of_the_next_linear_layer():
    conv = bclib.Conv2dGroupNJ(1, 2, 3)  # 2 filters on 4x4 images -> 2 x 2 x 2 = 8 flattened inputs
    with torch.no_grad():
        conv.z_mu.fill_(1.0)
        conv.z_logvar.copy_(torch.tensor([PRUNE, KEEP]))
    fc = set_group_layer(bclib.LinearGroupNJ(8, 3), torch.ones(3, 8), [KEEP] * 8)
    model = nn.Sequential(conv, nn.Flatten(), fc)
    model.input_shape = (1, 4, 4)  # a conv model says its input size, as bclib.models do
    recorder = viz.WeightEvolutionRecorder(thresholds=-3.0)
    recorder(0, model, {})
    # Filter 0 is pruned: its weights, and fc's inputs 0..3 (filter 0's 2x2 outputs), are gone.
    assert recorder.masks["0"][0][:, 0, 0, 0].tolist() == [False, True]
    assert recorder.masks["2"][0][0].tolist() == [False] * 4 + [True] * 4


# ----------------------------------------------------------------------------- weight GIFs
def test_weight_gif_frames_durations_loop_and_size(pair, tmp_path):
    recorder = viz.WeightEvolutionRecorder(thresholds=[-3.0, -3.0])
    for epoch in range(1, 5):
        recorder(epoch, pair, {})
    paths = viz.write_weight_gifs(recorder, tmp_path / "new" / "folder", duration=150, figsize=SMALL, dpi=100)
    assert sorted(p.name for p in paths.values()) == ["weights_layer1.gif", "weights_layer2.gif"]
    for path in paths.values():
        frames, durations, loop = read_gif(path)
        assert len(frames) == 4  # one per recorded epoch
        assert durations == [150] * 4  # milliseconds
        assert loop == 0  # loop forever
        assert {f.shape for f in frames} == {(200, 320, 3)}
    # Frames in memory only: nothing else was written.
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == ["weights_layer1.gif", "weights_layer2.gif"]


def test_default_frame_size_and_duration(pair, tmp_path):
    recorder = viz.WeightEvolutionRecorder(layers=[-1])
    recorder(3, pair, {})
    recorder(4, pair, {})
    frames, durations, loop = read_gif(viz.write_weight_gifs(recorder, tmp_path)["2"])
    assert [f.shape for f in frames] == [(400, 800, 3)] * 2 and durations == [200, 200] and loop == 0


def test_weight_pixels_red_positive_blue_negative_white_pruned(pair, tmp_path):
    recorder = viz.WeightEvolutionRecorder(thresholds=[-3.0, -3.0])
    recorder(0, pair, {})
    paths = viz.write_weight_gifs(recorder, tmp_path, figsize=SMALL)
    weight = pair[0].weight_mu.detach()
    frame = read_gif(paths["0"])[0][0]
    for i in range(3):
        for j in range(4):
            rgb = weight_cell_pixel(frame, (3, 4), i, j)
            if j == 1 or i == 2 or weight[i, j] == 0:  # pruned input, pruned output, or zero
                assert is_white(rgb), (i, j, rgb)
            elif weight[i, j] > 0:
                assert is_red(rgb), (i, j, rgb)
            else:
                assert is_blue(rgb), (i, j, rgb)
    # The last layer keeps its outputs: only its pruned input column is white.
    frame = read_gif(paths["2"])[0][0]
    assert is_white(weight_cell_pixel(frame, (2, 3), 0, 2)) and is_white(weight_cell_pixel(frame, (2, 3), 1, 2))
    assert is_red(weight_cell_pixel(frame, (2, 3), 0, 0)) and is_blue(weight_cell_pixel(frame, (2, 3), 0, 1))


def test_colour_limits_are_fixed_across_frames(pair, tmp_path):
    recorder = viz.WeightEvolutionRecorder(layers=["2"], thresholds=[-3.0, -3.0])
    recorder(1, pair, {})
    with torch.no_grad():
        pair[2].weight_mu.mul_(0.5)
    recorder(2, pair, {})
    frames, _, _ = read_gif(viz.write_weight_gifs(recorder, tmp_path, figsize=SMALL)["2"])
    # Limits +-1 from the first frame: w = 0.5 is 3/4 up bwr's range, half-way from white to red,
    # i.e. RGB ~ (255, 128, 128); w = -0.5 is (128, 128, 255).
    half_red = weight_cell_pixel(frames[1], (2, 3), 0, 0)
    half_blue = weight_cell_pixel(frames[1], (2, 3), 0, 1)
    assert half_red[0] >= 250 and abs(half_red[1] - 128) <= 8 and abs(half_red[2] - 128) <= 8
    assert half_blue[2] >= 250 and abs(half_blue[0] - 128) <= 8 and abs(half_blue[1] - 128) <= 8
    assert is_red(weight_cell_pixel(frames[0], (2, 3), 0, 0))


def test_frames_have_no_grid_or_ticks(pair):
    recorder = viz.WeightEvolutionRecorder(thresholds=-3.0)
    recorder(0, pair, {})
    frame = viz.render_weight_frames(recorder, "0", figsize=SMALL)[0]
    # Everything left, right and below the matrix is plain white (no ticks, labels or spines).
    left, bottom, width, height = viz.WEIGHT_AXES_RECT
    y_top = int((1 - bottom - height) * frame.shape[0]) + 2
    assert np.all(frame[y_top:, : int(left * frame.shape[1]) - 1] == 255)
    assert np.all(frame[y_top:, int((left + width) * frame.shape[1]) + 1:] == 255)
    assert np.all(frame[int((1 - bottom) * frame.shape[0]) + 1:] == 255)
    # Inside a kept cell the colour is uniform: no grid lines across it.
    cell = frame[y_top + 5: y_top + 20, int(left * frame.shape[1]) + 5: int(left * frame.shape[1]) + 40]
    assert len(np.unique(cell.reshape(-1, 3), axis=0)) == 1


# ----------------------------------------------------------------------------- pixel importance
def test_pixel_importance_of_hand_set_log_alpha():
    alphas = torch.tensor([1e-4, 0.25, 0.5, 0.9, 1.0, 2.0, 10.0, 0.1, 0.75] + [1e-4] * 7)
    layer = set_group_layer(bclib.LinearGroupNJ(16, 3), torch.ones(3, 16), alphas.log())
    recorder = viz.PixelImportanceRecorder(image_shape=(4, 4))
    recorder(7, nn.Sequential(nn.Flatten(), layer, nn.ReLU(), bclib.LinearGroupNJ(3, 2)), {})
    by_hand = np.array([
        [0.9999, 0.75, 0.5, 0.1],
        [0.0, 0.0, 0.0, 0.9],
        [0.25, 0.9999, 0.9999, 0.9999],
        [0.9999, 0.9999, 0.9999, 0.9999],
    ])
    np.testing.assert_allclose(recorder.pixel_importance(), by_hand, atol=1e-6)
    assert recorder.epochs == [7]
    # Through z_mu as well: alpha = z_var / z_mu^2 = 1 / 4 -> importance 0.75.
    with torch.no_grad():
        layer.z_mu.fill_(2.0)
        layer.z_logvar.fill_(0.0)
    np.testing.assert_allclose(viz.pixel_importance(layer.log_alpha(), (4, 4)), np.full((4, 4), 0.75), atol=1e-6)
    assert not hasattr(viz, "keep_probability")  # 1 - min(alpha, 1) is no probability: the old name is gone


def test_pixel_importance_gif(tmp_path):
    # Left half of each 4x4 image kept (importance 1 - 1e-4), right half pruned.
    log_alpha = torch.tensor([[KEEP, KEEP, PRUNE, PRUNE]] * 4).reshape(-1)
    layer = set_group_layer(bclib.LinearGroupNJ(16, 2), torch.ones(2, 16), log_alpha)
    recorder = viz.PixelImportanceRecorder(image_shape=(4, 4))
    for epoch in range(3):
        recorder(epoch, nn.Sequential(layer), {})
    # Inputs in [0, 1] (load_mnist's): ink (1) in the top two rows, blank background (0) below.
    digits = torch.zeros(10, 1, 4, 4)
    digits[:, :, :2] = 1.0
    path = viz.write_pixel_importance_gif(recorder, digits, tmp_path / "pix.gif", num_digits=5, duration=100)
    frames, durations, loop = read_gif(path)
    assert len(frames) == 3 and durations == [100] * 3 and loop == 0
    assert {f.shape for f in frames} == {(200, 960, 3)}  # 6 panels of 1.6 in by 1.25 * 1.6 in at dpi 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pix.gif"]
    frame = frames[-1]

    def panel_pixel(panel, row, col):
        left, bottom, width, height = viz.pixel_panel_rect(panel, 6)
        x = (left + width * (col + 0.5) / 4) * frame.shape[1]
        y = (1 - bottom - height + height * (row + 0.5) / 4) * frame.shape[0]
        return frame[int(y), int(x)].astype(int)

    assert np.all(panel_pixel(0, 1, 0) <= 5)  # map: kept -> black
    assert np.all(panel_pixel(0, 1, 3) >= 250)  # map: pruned -> white
    for panel in range(1, 6):
        assert np.all(panel_pixel(panel, 1, 1) <= 5)  # kept ink -> black
        assert np.all(panel_pixel(panel, 3, 1) >= 250)  # kept background -> white
        # Pruned pixels, ink or background, -> 0 on [-1, 1], the middle of Greys: unlike either.
        for row in (1, 3):
            grey = panel_pixel(panel, row, 2)
            assert np.all(np.abs(grey - grey[0]) <= 2) and 100 <= grey[0] <= 180
    # The same digits on the release's [-1, 1], said so, draw the same frames.
    again = viz.write_pixel_importance_gif(recorder, 2 * digits - 1, tmp_path / "again.gif", num_digits=5,
                                           duration=100, input_range=(-1, 1))
    assert all(np.array_equal(a, b) for a, b in zip(read_gif(again)[0], frames))


def test_choose_digits_is_seeded_and_without_replacement():
    images = torch.arange(50.0).reshape(50, 1, 1, 1).expand(50, 1, 2, 2)
    indices, chosen = viz.choose_digits(images, 5, seed=3)
    again, _ = viz.choose_digits(images, 5, seed=3)
    other, _ = viz.choose_digits(images, 5, seed=4)
    assert indices.tolist() == again.tolist() and len(set(indices.tolist())) == 5
    # NumPy's seeded generator, called here: the seed is the one given, not a fixed one.
    assert indices.tolist() == sorted(np.random.default_rng(3).choice(50, size=5, replace=False).tolist())
    assert other.tolist() == sorted(np.random.default_rng(4).choice(50, size=5, replace=False).tolist())
    assert other.tolist() != indices.tolist()
    assert chosen.shape == (5, 4) and chosen[:, 0].tolist() == indices.astype(float).tolist()


# ----------------------------------------------------------------------------- static figures
def test_log_alpha_histograms_mark_the_thresholds(pair, tmp_path):
    fig = viz.plot_log_alpha_histograms(pair, [-3.0, -4.0], bins=10, path=tmp_path / "hist.png")
    assert isinstance(fig, Figure) and (tmp_path / "hist.png").stat().st_size > 0
    first, second = fig.axes[:2]
    assert sum(p.get_height() for p in first.patches) == 4 and sum(p.get_height() for p in second.patches) == 3
    assert list(first.lines[0].get_xdata()) == [-3.0, -3.0] and list(second.lines[0].get_xdata()) == [-4.0, -4.0]
    assert "3 of 4 kept" in first.get_legend().get_texts()[0].get_text()


def test_saved_log_alpha_histograms_draw_the_counts_and_thresholds(tmp_path):
    saved = {  # as analysis.json stores them: a group layer with its log alphas, a per-weight one without
        "fc1": {"histogram": {"counts": [2, 0, 1], "edges": [-9.0, -5.0, -1.0, 3.0]}, "threshold": -3.0,
                "log_alpha": [-8.0, -7.5, 1.0]},
        "fc2": {"histogram": {"counts": [5, 7], "edges": [0.0, 2.0, 4.0]}, "threshold": 3.0},
    }
    fig = viz.plot_saved_log_alpha_histograms(saved, path=tmp_path / "saved.png")
    assert (tmp_path / "saved.png").stat().st_size > 0
    first, second = fig.axes[:2]
    values, edges = first.patches[0].get_data()[:2]
    assert list(values) == [2, 0, 1] and list(edges) == [-9.0, -5.0, -1.0, 3.0]
    assert list(second.patches[0].get_data()[0]) == [5, 7]
    assert list(first.lines[0].get_xdata()) == [-3.0, -3.0] and list(second.lines[0].get_xdata()) == [3.0, 3.0]
    # Two of the three log alphas (-8, -7.5) lie below -3.
    assert first.get_legend().get_texts()[0].get_text() == "threshold -3: 2 of 3 kept"
    assert second.get_legend().get_texts()[0].get_text() == "threshold 3"


def test_saved_log_alpha_histograms_wrap_onto_rows():
    saved = {name: {"histogram": {"counts": [k + 1], "edges": [0.0, 1.0]}, "threshold": 0.5}
             for k, name in enumerate("abc")}
    fig = viz.plot_saved_log_alpha_histograms(saved, ncols=2)
    # Three layers in two columns: a 2 x 2 grid whose fourth panel is switched off.
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes] == [(2, 2)] * 4
    assert [list(ax.patches[0].get_data()[0]) for ax in fig.axes[:3]] == [[1], [2], [3]]
    assert not fig.axes[3].axison and not fig.axes[3].patches
    assert [ax.get_ylabel() for ax in fig.axes[:3]] == ["count", "", "count"]
    with pytest.raises(ValueError, match="ncols"):
        viz.plot_saved_log_alpha_histograms(saved, ncols=0)


def test_saved_log_alpha_histograms_bad_input():
    with pytest.raises(ValueError, match="non-empty mapping"):
        viz.plot_saved_log_alpha_histograms({})
    with pytest.raises(ValueError, match="n \\+ 1 increasing edges"):
        viz.plot_saved_log_alpha_histograms({"a": {"histogram": {"counts": [1, 2], "edges": [0.0, 1.0]}, "threshold": 0.0}})
    with pytest.raises(ValueError, match="'threshold'"):
        viz.plot_saved_log_alpha_histograms({"a": {"histogram": {"counts": [1], "edges": [0.0, 1.0]}}})


def test_tradeoff_plots_error_against_compression(tmp_path):
    rows = [
        {"threshold": -1.0, "error": 0.05, "compression": 40.0},
        {"threshold": -5.0, "error": 0.016, "compression": 5.0},
        {"threshold": (-2.8, -3.0, -5.0), "error": 0.018, "compression": 12.0},
    ]
    fig = viz.plot_tradeoff(rows, path=tmp_path / "tradeoff.svg")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [5.0, 12.0, 40.0]
    np.testing.assert_allclose(line.get_ydata(), [1.6, 1.8, 5.0])  # in percent
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["-1", "-2.8, -3, -5", "-5"]
    assert fig.axes[0].get_ylabel() == "test error (%)"
    assert (tmp_path / "tradeoff.svg").read_text().startswith("<?xml")


def test_tradeoff_takes_the_rows_of_threshold_sweep():
    rows = [  # the keys bclib.compression.threshold_sweep returns (other keys are ignored)
        {"thresholds": [-2.0, -2.0], "error": 0.03, "compression_pruning": 20.0, "compression_precision": 90.0,
         "architecture": [784, 10]},
        {"thresholds": {"a": -4.0, "b": -5.0}, "error": 0.02, "compression_pruning": 8.0, "compression_precision": 40.0,
         "architecture": [784, 10]},
    ]
    ax = viz.plot_tradeoff(rows).axes[0]
    assert [line.get_label() for line in ax.lines] == ["after pruning", "after precision"]
    assert [t.get_text() for t in ax.figure.legends[0].get_texts()] == ["after pruning", "after precision"]
    assert list(ax.lines[0].get_xdata()) == [8.0, 20.0] and list(ax.lines[1].get_xdata()) == [40.0, 90.0]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [2.0, 3.0])
    assert sorted(t.get_text() for t in ax.texts) == ["-2, -2", "-4, -5"]
    only = viz.plot_tradeoff(rows, compression_keys="compression_precision").axes[0]
    assert len(only.lines) == 1 and list(only.lines[0].get_xdata()) == [40.0, 90.0]


def test_architecture_bars():
    fig = viz.plot_architecture([784, 300, 100, 10], [278, 98, 19, 10], names=["in", "fc1", "fc2", "out"])
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [784, 300, 100, 10, 278, 98, 19, 10]


def test_learning_curves_panels_and_data():
    history = [{"epoch": e, "loss": 1.0 / e, "train_error": 0.1 / e, "test_error": 0.2 / e, "kl": 100.0 - e}
               for e in range(1, 6)]
    fig = viz.plot_learning_curves(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "error", "KL (nats)"]
    assert list(fig.axes[2].lines[0].get_ydata()) == [99.0, 98.0, 97.0, 96.0, 95.0]
    assert [line.get_label() for line in fig.axes[1].lines] == ["train_error", "test_error"]
    # One epoch is drawn as a dot (a line through one point draws nothing).
    single = viz.plot_learning_curves(history[:1])
    assert all(line.get_marker() == "o" for ax in single.axes for line in ax.lines)
    # Without a KL (a deterministic model) the KL panel is left out.
    assert len(viz.plot_learning_curves([{"loss": 1.0, "test_error": 0.5}]).axes) == 2


def test_run_comparison_draws_each_run_and_the_reference():
    first = [{"epoch": e, "test_error": 0.01 * e, "kl": 10.0 ** e} for e in (1, 2, 3)]
    second = [{"epoch": 1, "test_error": 0.05, "kl": 7.0}]
    fig = viz.plot_run_comparison({"a": first, "b": second}, reference_error=0.008, reference_label="start")
    errors, kls = fig.axes
    np.testing.assert_allclose(errors.lines[0].get_ydata(), [1.0, 2.0, 3.0])  # in percent
    assert list(kls.lines[1].get_ydata()) == [7.0] and kls.get_yscale() == "log"
    assert list(errors.lines[2].get_ydata()) == [0.8, 0.8]
    assert [t.get_text() for t in errors.get_legend().get_texts()] == ["a", "b", "start"]
    with pytest.raises(TypeError, match="reference_error must be a finite number, got '0.01'"):
        viz.plot_run_comparison({"a": first}, reference_error="0.01")
    with pytest.raises(ValueError, match="reference_error must be an error as a fraction, from 0 to 1, got 1.8"):
        viz.plot_run_comparison({"a": first}, reference_error=1.8)  # a percentage, not a fraction
    with pytest.raises(ValueError, match="histories must map"):
        viz.plot_run_comparison({})
    with pytest.raises(ValueError, match=r"histories\['b'\] must be"):
        viz.plot_run_comparison({"a": first, "b": [{"epoch": 1, "kl": 1.0}]})


def test_figures_leave_pyplot_alone(pair):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    viz.plot_architecture([3, 2], [2, 2])
    viz.plot_log_alpha_histograms(pair)
    assert plt.get_fignums() == before


# ----------------------------------------------------------------------------- bad input
def test_no_recorded_epochs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no recorded epochs"):
        viz.write_weight_gifs(viz.WeightEvolutionRecorder(), tmp_path)
    with pytest.raises(ValueError, match="no recorded epochs"):
        viz.write_pixel_importance_gif(viz.PixelImportanceRecorder(), torch.zeros(5, 784), tmp_path / "p.gif")
    assert list(tmp_path.iterdir()) == []


def test_thresholds_of_the_wrong_length_or_type(pair):
    recorder = viz.WeightEvolutionRecorder(thresholds=[-2.8, -3.0, -5.0])
    with pytest.raises(ValueError, match="thresholds must have one value per Bayesian layer"):
        recorder(0, pair, {})
    with pytest.raises(ValueError, match="thresholds"):
        viz.WeightEvolutionRecorder(thresholds={"0": -3.0})(0, pair, {})
    with pytest.raises(TypeError, match="thresholds"):
        viz.WeightEvolutionRecorder(thresholds="-3")
    with pytest.raises(TypeError, match="thresholds"):
        viz.WeightEvolutionRecorder(thresholds=[-3.0, math.nan])
    with pytest.raises(ValueError, match="thresholds"):
        viz.plot_log_alpha_histograms(pair, [-3.0])
    with pytest.raises(ValueError, match=r"thresholds must be a number or 1-d, got shape \(2, 1\)"):
        viz.WeightEvolutionRecorder(thresholds=np.full((2, 1), -3.0))


def test_thresholds_as_numpy_and_torch_values_mask_as_floats_do(pair):
    # compress takes np.float32(-3) and arrays; so do the recorders, with the same masks.
    expected = viz.WeightEvolutionRecorder(thresholds=[-3.0, -3.0])
    expected(1, pair, {})
    for thresholds in (np.float32(-3), np.array([-3.0, -3.0]), torch.tensor([-3.0, -3.0]), torch.tensor(-3.0),
                       [np.float64(-3), -3]):
        recorder = viz.WeightEvolutionRecorder(thresholds=thresholds)
        recorder(1, pair, {})
        assert all(torch.equal(recorder.masks[n][0], expected.masks[n][0]) for n in ("0", "2")), thresholds


def test_recorders_check_the_model_at_the_first_epoch_not_the_first_recorded_one(pair):
    # every=7: nothing is recorded at epoch 1, but a mistake there is already an error.
    with pytest.raises(ValueError, match="thresholds must have one value per Bayesian layer"):
        viz.WeightEvolutionRecorder(thresholds=[-3.0, -3.0, -3.0], every=7)(1, pair, {})
    with pytest.raises(ValueError, match="no module 'fc1'"):
        viz.PixelImportanceRecorder(layer="fc1", image_shape=(2, 2), every=7)(1, pair, {})
    recorder = viz.PixelImportanceRecorder(image_shape=(2, 2), every=7)
    recorder(1, pair, {})
    assert recorder.epochs == []
    with pytest.raises(TypeError, match="layer must be None, a module name"):
        viz.PixelImportanceRecorder(layer=1.0)


def test_layers_that_are_not_bayesian(pair):
    with pytest.raises(ValueError, match=r"layers: module '1' \(ReLU\) is not a Bayesian layer"):
        viz.WeightEvolutionRecorder(layers=["1"])(0, pair, {})
    with pytest.raises(ValueError, match="no module 'fc9'"):
        viz.WeightEvolutionRecorder(layers=["fc9"])(0, pair, {})
    with pytest.raises(ValueError, match="no Bayesian layer"):
        viz.WeightEvolutionRecorder()(0, nn.Sequential(nn.Linear(3, 2)), {})
    with pytest.raises(ValueError, match=r"layer: module '1' \(ReLU\) is not a Bayesian layer"):
        viz.PixelImportanceRecorder(layer="1", image_shape=(2, 2))(0, pair, {})
    with pytest.raises(ValueError, match="no log alpha per input unit"):
        viz.PixelImportanceRecorder(image_shape=(2, 2))(0, nn.Sequential(bclib.Conv2dGroupNJ(1, 2, 3)), {})
    with pytest.raises(ValueError, match="has 4 pixels but layer '0' has 16 inputs"):
        viz.PixelImportanceRecorder(image_shape=(2, 2))(0, nn.Sequential(bclib.LinearGroupNJ(16, 2)), {})


def test_other_bad_input(pair, tmp_path):
    recorder = viz.WeightEvolutionRecorder()
    recorder(0, pair, {})
    for duration in (0, 655_360, math.inf):  # a GIF's longest delay is 655,350 ms
        with pytest.raises(ValueError, match=f"duration must be a number of milliseconds from 20 .* got {duration}"):
            viz.write_weight_gifs(recorder, tmp_path, duration=duration)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="layer must be one of"):
        viz.render_weight_frames(recorder, "1")
    with pytest.raises(TypeError, match="epoch"):
        recorder(1.5, pair, {})
    with pytest.raises(ValueError, match=r"figsize must be \(width, height\) in inches, two positive numbers, got \(0, 0\)"):
        viz.render_weight_frames(recorder, "0", figsize=(0, 0))  # it drew empty frames, then failed to write them
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        viz.choose_digits(torch.zeros(5, 4), 2, seed=-1)
    with pytest.raises(TypeError, match=r"image_shape must be a tuple of positive ints, e\.g\. \(28, 28\), got 784"):
        viz.PixelImportanceRecorder(image_shape=784)
    with pytest.raises(ValueError, match=r"image_shape must be a tuple of positive ints, got \(-2, -2\)"):
        viz.pixel_importance(torch.zeros(4), (-2, -2))
    assert viz.PixelImportanceRecorder(image_shape=np.array([2, 2])).image_shape == (2, 2)
    pixels = viz.PixelImportanceRecorder(image_shape=(2, 2))
    pixels(0, nn.Sequential(bclib.LinearGroupNJ(4, 2)), {})
    with pytest.raises(ValueError, match="panel_size must be a positive finite number, got 0"):
        viz.render_pixel_importance_frames(pixels, torch.zeros(3, 4), panel_size=0)
    with pytest.raises(ValueError, match="num_digits=5"):
        viz.write_pixel_importance_gif(pixels, torch.zeros(3, 4), tmp_path / "p.gif")
    with pytest.raises(ValueError, match="input_range must have low < high"):
        viz.write_pixel_importance_gif(pixels, torch.zeros(5, 4), tmp_path / "p.gif", input_range=(1, 0))
    with pytest.raises(ValueError, match=r"log_alpha holds 1 NaN values"):
        viz.pixel_importance(torch.tensor([0.0, math.nan, -1.0, -2.0]), (2, 2))
    for panel in (-1, 6, 1.0):
        with pytest.raises(ValueError, match=r"panel must be an int in \[0, 6\)"):
            viz.pixel_panel_rect(panel, 6)
    with pytest.raises(ValueError, match="after must not exceed before"):
        viz.plot_architecture([10, 5], [10, 6])
    with pytest.raises(ValueError, match=r"rows\[0\] must have a threshold"):
        viz.plot_tradeoff([{"error": 0.1}])
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        viz.plot_tradeoff([{"threshold": 1, "error": 0.1, "compression": 2.0}, {"threshold": 1, "error": 0.1}])
    with pytest.raises(ValueError, match="history"):
        viz.plot_learning_curves([])
    # A failed save leaves nothing behind.
    with pytest.raises(ValueError):
        viz.plot_architecture([3], [2], path=tmp_path / "figure.notaformat")
    assert list(tmp_path.iterdir()) == []


def test_every_records_one_epoch_in_k(pair, tmp_path):
    weights = viz.WeightEvolutionRecorder(every=2)
    pixels = viz.PixelImportanceRecorder(image_shape=(2, 2), every=2)
    for epoch in range(1, 6):
        weights(epoch, pair, {})
        pixels(epoch, nn.Sequential(bclib.LinearGroupNJ(4, 2)), {})
    assert weights.epochs == [2, 4] and pixels.epochs == [2, 4] and len(weights.weights["0"]) == 2
    frames, _, _ = read_gif(viz.write_weight_gifs(weights, tmp_path, figsize=SMALL)["0"])
    assert len(frames) == 2
    with pytest.raises(ValueError, match="every"):
        viz.WeightEvolutionRecorder(every=0)


def _boxes(fig, artists):
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    return [a.get_window_extent(renderer) for a in artists]


def test_tradeoff_clips_the_error_axis_and_marks_the_clipped_points():
    # A sweep like the book's: crowded points at low compression, two far above the limit.
    rows = [{"threshold": f"{t:+g}", "error": e, "compression_pruning": c, "compression_precision": 4 * c}
            for t, e, c in ((3, 0.0165, 3.9), (2, 0.0165, 4.0), (1, 0.0166, 4.4), (0.5, 0.0165, 4.7),
                            (0, 0.0167, 5.4), (-0.5, 0.0184, 6.1), (-1, 0.0211, 6.9), (-2, 0.1815, 13.4),
                            (-3, 0.5562, 46.0))]
    fig = viz.plot_tradeoff(rows, error_limit=5.0)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 5.0)
    pruning = ax.lines[0]
    # Errors in percent, the two above 5 % drawn at 5.
    np.testing.assert_allclose(pruning.get_ydata(), [1.65, 1.65, 1.66, 1.65, 1.67, 1.84, 2.11, 5.0, 5.0])
    clipped = [line for line in ax.lines if line.get_marker() == "^"]
    assert len(clipped) == 2 and list(clipped[0].get_xdata()) == [13.4, 46.0]
    texts = {t.get_text() for t in ax.texts}
    assert {"-2: 18 %", "-3: 56 %", "+0.5", "-0.5", "+3"} <= texts and len(texts) == 9
    assert "above 5 %, drawn at the edge" in [t.get_text() for t in fig.legends[0].get_texts()]
    # No two labels overlap.
    boxes = _boxes(fig, ax.texts)
    assert not any(a.overlaps(b) for k, a in enumerate(boxes) for b in boxes[k + 1:])
    with pytest.raises(ValueError, match="error_limit"):
        viz.plot_tradeoff(rows, error_limit=0.0)


def test_histogram_legends_cover_no_bar():
    saved = {"a": {"histogram": {"counts": [1, 5, 2, 9, 3, 9], "edges": [0, 1, 2, 3, 4, 5, 6]}, "threshold": 2.5,
                   "log_alpha": [0.5] * 9}}
    fig = viz.plot_saved_log_alpha_histograms(saved)
    ax = fig.axes[0]
    legend = _boxes(fig, [ax.get_legend()])[0]
    bars = _boxes(fig, ax.patches)
    assert not any(legend.overlaps(bar) for bar in bars)
    assert ax.get_legend().get_texts()[0].get_fontsize() >= 9


def test_gif_titles_are_large_enough():
    assert viz._GIF_TITLE_FONTSIZE >= 13


def test_retraining_tradeoff_draws_the_three_sources():
    panel = {"title": "net", "offset": -0.5, "release": (0.01, 100.0, 400.0),
             "sweep": [{"compression_precision": p, "error_reduced_precision": e, "weights_kept": k}
                       for p, e, k in ((300.0, 0.014, 5), (200.0, 0.012, 9), (900.0, 0.5, 0))],
             "candidates": [{"offset": o, "compression_precision": p, "test_error": e}
                            for o, p, e in ((0.0, 300.0, 0.009), (-0.5, 350.0, 0.0095), (-1.0, 420.0, 0.04))]}
    ax = viz.plot_retraining_tradeoff([panel], error_limit=3.0).axes[0]
    sweep, tried, kept, release = ax.lines[:2] + [ax.lines[k] for k in (3, 4)]
    assert list(sweep.get_xdata()) == [200.0, 300.0]  # the setting that prunes all is left out
    np.testing.assert_allclose(sweep.get_ydata(), [1.2, 1.4])
    np.testing.assert_allclose(tried.get_ydata(), [0.9, 0.95, 3.0])  # 4 % clipped to the 3 % edge
    with pytest.raises(ValueError, match="error_limit must be positive"):
        viz.plot_retraining_tradeoff([panel], error_limit=-2.0)
    assert list(ax.lines[2].get_xdata()) == [420.0] and ax.lines[2].get_marker() == "^"
    assert list(kept.get_xdata()) == [350.0] and list(release.get_xdata()) == [400.0]
    np.testing.assert_allclose(release.get_ydata(), [1.0])


def test_tradeoff_labels_keep_clear_of_the_legend():
    rows = [{"threshold": f"{t:+g}", "error": e, "compression_pruning": c, "compression_precision": 4 * c}
            for t, e, c in ((0, 0.0167, 5.4), (-1, 0.0211, 6.9), (-2, 0.1815, 13.4), (-3, 0.5562, 46.0))]
    fig = viz.plot_tradeoff(rows, error_limit=5.0)
    ax = fig.axes[0]
    legend, axes, *labels = _boxes(fig, [fig.legends[0], ax, *ax.texts])
    assert not any(legend.overlaps(label) for label in labels) and not legend.overlaps(axes)
