"""Tests of bclib.compression: masks, bits, rates and FLOPs worked out by hand on hand-built layers,
exports checked against the masked Bayesian model's own forward pass."""
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import bclib
from bclib import models
from bclib.compression import (
    apply_masks, model_error, compress, exponent_bits, propose_threshold, propose_thresholds,
    quantize, threshold_sweep, weight_bits,
)

KEEP, PRUNE = -30.0, 2.0  # z_logvar with z_mu = 1: log alpha is (almost exactly) this value


# ----------------------------------------------------------------------------- bit rules
def test_weight_bits_counts_steps_above_twice_the_variance():
    # 2 Var = 2^-8 is not < 2^-8, so t = 1..7 count: 7. Likewise 2^-4 -> 3, 2^-30 -> all 23, 1 -> 0.
    variances = torch.tensor([2.0**-9, 2.0**-5, 2.0**-31, 1.0])
    assert weight_bits(variances) == math.ceil((7 + 3 + 23 + 0) / 4)  # 8.25 -> 9
    assert weight_bits(torch.tensor([2.0**-9, 2.0**-5])) == 5  # mean exactly 5: no rounding up
    assert weight_bits(torch.empty(0)) == 0


@pytest.mark.parametrize("max_abs, expected", [
    (0.3, 3),    # log2 0.3 = -1.737; log2(2.737) + 1 = 2.45 -> 3
    (0.5, 2),    # the release's formula gives -inf here
    (0.01, 4),   # log2 0.01 = -6.64; log2(7.64) + 1 = 3.93 -> 4
    (1.0, 1),    # log2(0 + 1) + 1 = 1
    (2.0, 2),    # log2(1 + 1) + 1 = 2
    (300.0, 5),  # log2 300 = 8.23; log2(9.23) + 1 = 4.21 -> 5
    (0.0, 1),    # nothing left: the formula's minimum
])
def test_exponent_bits_finite_below_one(max_abs, expected):
    assert exponent_bits(max_abs) == expected


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_exponent_bits_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="max_abs_weight"):
        exponent_bits(bad)


def test_quantize_rounds_to_the_grid():
    q = quantize(torch.tensor([0.30, -0.30, 0.0625, 1.0]), 3)  # step 1/8
    assert q.tolist() == [2, -2, 0, 8]  # 2.4 -> 2, -2.4 -> -2, 0.5 -> 0 (half to even), 8


def test_quantize_gives_only_indices_the_file_can_store():
    # 62-bit two's complement holds -2^61 .. 2^61 - 1: 2^60 fits, 2^61 would need 63 bits at save.
    from bclib.fileformat import MAX_WIDTH, signed_width
    assert signed_width(quantize(torch.tensor([2.0**60, -2.0**60], dtype=torch.float64), 0).numpy()) <= MAX_WIDTH
    with pytest.raises(ValueError, match=r"\|w\| 2\^bits < 2\^61"):
        quantize(torch.tensor([2.0**61], dtype=torch.float64), 0)


# ----------------------------------------------------------------------------- a hand-built conv net
def small_conv_net():
    """conv 1->3 (3x3) on 6x6 -> maxpool 2 -> flatten (3 channels x 4 positions) -> fc 12->4 -> ReLU -> fc 4->2.

    Survival, by hand (thresholds 0):
    * conv keeps channels 0 and 2 (channel 1 pruned by its own log alpha);
    * fc1 keeps input positions 0, 1 (channel 0) and 4-7 (channel 1); none of channel 2:
      so channel 0 is the only alive channel (1 pruned by the conv, 2 by fc1), fc1 inputs alive: 0, 1;
    * fc2 prunes its input 1: fc1 outputs alive 0, 2, 3.
    """
    torch.manual_seed(0)
    conv = bclib.Conv2dGroupNJ(1, 3, 3)
    fc1 = bclib.LinearGroupNJ(12, 4)
    fc2 = bclib.LinearGroupNJ(4, 2)
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), fc1, nn.ReLU(), fc2)
    model.input_shape = (1, 6, 6)
    with torch.no_grad():
        for layer, keep in ((conv, [1, 0, 1]), (fc1, [1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]), (fc2, [1, 0, 1, 1])):
            layer.z_mu.fill_(1.0)
            layer.z_logvar.copy_(torch.tensor([KEEP if k else PRUNE for k in keep]))
        # Variances: conv 1.5 * 2^-10 (2 Var = 1.5 * 2^-9: t = 1..8, 8 bits); fc1 1.5 * 2^-6 (4 bits) but
        # weight (0, 1) 1.5 * 2^-13 (11 bits) and pruned weights 2^-40 (would count 23 if they were used);
        # fc2 1.5 * 2^-3 (2 Var = 0.375: t = 1 only).
        conv.weight_logvar.fill_(math.log(1.5 * 2**-10))
        fc1.weight_logvar.fill_(math.log(2.0**-40))
        fc1.weight_logvar[[0, 2, 3], :2] = math.log(1.5 * 2**-6)
        fc1.weight_logvar[0, 1] = math.log(1.5 * 2**-13)
        fc2.weight_logvar.fill_(math.log(1.5 * 2**-3))
        # Means: surviving weights within 0.2 but one at -0.3, stored as -0.5 on fc2's 1-bit grid
        # (e = ceil(log2(|log2 0.5| + 1) + 1) = 2); a pruned one at 5 must not count.
        for layer in (conv, fc1, fc2):
            layer.weight_mu.uniform_(-0.2, 0.2)
        fc2.weight_mu[1, 3] = -0.3
        fc1.weight_mu[1, 0] = 5.0
    return model


def test_hand_built_conv_net_masks():
    result = compress(small_conv_net(), [0.0, 0.0, 0.0])
    conv_mask, conv_bias = result.masks["0"]
    assert conv_mask[:, 0, 0, 0].tolist() == [1, 0, 0] and conv_bias.tolist() == [1, 0, 0]
    fc1_mask, fc1_bias = result.masks["4"]
    expected = torch.zeros(4, 12)
    expected[[0, 2, 3], :2] = 1  # rows: fc1 outputs alive; columns: positions 0, 1 of channel 0
    assert torch.equal(fc1_mask, expected) and fc1_bias.tolist() == [1, 0, 1, 1]
    fc2_mask, fc2_bias = result.masks["6"]
    assert torch.equal(fc2_mask, torch.tensor([[1.0, 0, 1, 1], [1, 0, 1, 1]])) and fc2_bias.tolist() == [1, 1]


def test_hand_built_conv_net_report():
    report = compress(small_conv_net(), {"0": 0.0, "4": 0.0, "6": 0.0}).report
    rows = [(r.in_kept, r.in_total, r.out_kept, r.out_total, r.weights_kept, r.weights_total, r.bits)
            for r in report.layers]
    assert rows == [(1, 1, 1, 3, 9, 27, 8), (2, 12, 3, 4, 6, 48, math.ceil((4 * 5 + 11) / 6)), (3, 4, 2, 2, 6, 8, 1)]
    assert report.architecture == "1-2-3"
    assert report.exponent_bits == 2
    assert report.compression_pruning == pytest.approx(83 / 21)
    assert report.compression_precision == pytest.approx(32 * 83 / (9 * (1 + 2 + 8) + 6 * (1 + 2 + 6) + 6 * (1 + 2 + 1)))
    assert report.compression_sparse == pytest.approx(83 / 21)
    # MACs per example: conv 27 weights x 4x4 outputs, fc 48 and 8; after: 9 x 16, 2 x 3, 3 x 2.
    assert (report.flops_before, report.flops_after) == (27 * 16 + 48 + 8, 9 * 16 + 6 + 6)
    assert report.flop_reduction == pytest.approx(488 / 156)
    assert report.dense_float32_bytes == 4 * (27 + 3 + 48 + 4 + 8 + 2)
    text = str(report)
    assert "1-2-3" in text and "9/27" in text and "biases excluded" in text
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["layers"][1]["in_kept"] == 2 and data["architecture"] == "1-2-3"


def test_hand_built_conv_net_export_matches_masked_model():
    model = small_conv_net()
    result = compress(model, 0.0)
    conv, fc1, fc2 = (m for m in result.model if isinstance(m, (nn.Conv2d, nn.Linear)))
    # Only channel 0 survives; fc1 keeps that channel's 4 positions (2 and 3 zero) and rows 0, 2, 3.
    assert tuple(conv.weight.shape) == (1, 1, 3, 3) and (fc1.in_features, fc1.out_features) == (4, 3)
    assert (fc2.in_features, fc2.out_features) == (3, 2)
    assert torch.equal(conv.weight, model[0].weight_mu[:1].detach())
    assert torch.equal(fc1.weight[:, 2:], torch.zeros(3, 2))
    assert torch.equal(fc1.weight[:, :2], model[4].weight_mu[[0, 2, 3], :2].detach())
    x = torch.randn(16, 1, 6, 6)
    masked = apply_masks(model, result.masks).eval()
    assert torch.allclose(result.model(x), masked(x), atol=1e-6)
    # The masked model zeroes exactly the pruned weights: fc1 column 4 (alive in fc1, dead channel 1).
    assert float(masked[4].weight_mu[:, 4].detach().abs().sum()) == 0.0


def test_model_training_flags_are_left_alone():
    model = small_conv_net().train()
    compress(model, 0.0)
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------- Sparse VD: per-weight alphas
def svd_net():
    """Linear SVD 3->3 -> ReLU -> 3->2 with log alphas set per weight (threshold 0).

    fc1 keeps (0, 0) and (1, 1); fc2 keeps (0, 0) and (0, 2) -- its column 1 keeps nothing, so
    unit 1 dies, which strands fc1's weight (1, 1) and with it input 1 (found on the second pass);
    unit 2 has no surviving incoming weight, so fc2's (0, 2) goes. Left: fc1 (0, 0), fc2 (0, 0).
    """
    fc1, fc2 = bclib.LinearSVD(3, 3), bclib.LinearSVD(3, 2)
    with torch.no_grad():
        for layer, log_alpha in ((fc1, [[-5, 5, 5], [5, -5, 5], [5, 5, 5]]), (fc2, [[-5, 5, -5], [5, 5, 5]])):
            layer.weight_mu.fill_(0.5)
            layer.weight_logvar.copy_(torch.tensor(log_alpha, dtype=torch.float32) + math.log(0.25))
    return nn.Sequential(fc1, nn.ReLU(), fc2)


def test_sparse_vd_masks_settle_by_iteration():
    model = svd_net()
    result = compress(model, [0.0, 0.0])
    expected1, expected2 = torch.zeros(3, 3), torch.zeros(2, 3)
    expected1[0, 0] = expected2[0, 0] = 1
    assert torch.equal(result.masks["0"][0], expected1) and result.masks["0"][1].tolist() == [1, 0, 0]
    assert torch.equal(result.masks["2"][0], expected2) and result.masks["2"][1].tolist() == [1, 1]
    r1, r2 = result.report.layers
    assert (r1.in_kept, r1.out_kept, r1.weights_kept, r1.weights_nonzero) == (1, 1, 1, 1)
    assert (r2.in_kept, r2.out_kept, r2.weights_kept, r2.weights_nonzero) == (1, 2, 2, 1)
    assert result.report.compression_pruning == pytest.approx(15 / 3)
    # Precision by hand: each surviving weight has 2 Var = 2 * 0.25 e^-5 = 0.00337 < 2^-8 (not 2^-9):
    # 8 bits in both layers; max |E[w]| = 0.5 gives ceil(log2(|log2 0.5| + 1) + 1) = 2 exponent bits;
    # 15 weights of 32 bits over 1 + 2 + 8 bits for each weight of the dense blocks (1 + 2) or for each
    # nonzero one (1 + 1): the Sparse VD "after precision" rate the release's table compares with.
    assert [row.bits for row in result.report.layers] == [8, 8] and result.report.exponent_bits == 2
    assert result.report.compression_precision == pytest.approx(32 * 15 / (3 * 11))
    assert result.report.compression_sparse_precision == pytest.approx(32 * 15 / (2 * 11))
    assert result.report.compression_sparse == pytest.approx(15 / 2)
    x = torch.randn(8, 3)
    assert torch.allclose(result.model(x), apply_masks(model, result.masks).eval()(x), atol=1e-6)


def test_sparse_vd_dense_block_and_nonzero_counts_differ():
    fc = bclib.LinearSVD(2, 2)
    with torch.no_grad():
        fc.weight_mu.fill_(1.0)
        fc.weight_logvar.copy_(torch.tensor([[-5.0, 5.0], [5.0, -5.0]]))  # the diagonal survives
    report = compress(nn.Sequential(fc), 0.0).report
    assert (report.layers[0].weights_kept, report.layers[0].weights_nonzero) == (4, 2)
    assert report.compression_pruning == 1.0 and report.compression_sparse == 2.0


# ----------------------------------------------------------------------------- structure
def test_last_layer_outputs_are_never_pruned():
    conv1, conv2 = bclib.Conv2dGroupNJ(1, 2, 3), bclib.Conv2dGroupNJ(2, 3, 1)
    with torch.no_grad():
        for layer in (conv1, conv2):
            layer.z_mu.fill_(1.0)
            layer.z_logvar.fill_(KEEP)
        conv2.z_logvar[1] = PRUNE  # an output class of the last layer
    model = nn.Sequential(conv1, nn.ReLU(), conv2)
    result = compress(model, 0.0, input_shape=(1, 5, 5))
    assert (result.report.layers[1].out_kept, result.report.layers[1].out_total) == (3, 3)
    x = torch.randn(4, 1, 5, 5)
    out = result.model(x)
    assert out.shape == (4, 3, 3, 3)
    # The pruned filter's weights are zero: that output is its bias everywhere.
    assert torch.allclose(out[:, 1], conv2.bias_mu[1].detach().expand(4, 3, 3))
    assert torch.allclose(out, apply_masks(model, result.masks).eval()(x), atol=1e-6)


def test_nested_sequential_and_dict_thresholds():
    model = models.lenet5_caffe("nj")
    nested = nn.Sequential(nn.Sequential(*list(model)[:7]), nn.Sequential(*list(model)[7:]))
    nested.input_shape = model.input_shape
    names = [name for name, _ in bclib.bayesian_layers(nested)]
    assert names == ["0.0", "0.3", "1.0", "1.2"]
    flat = compress(model, [0.0] * 4).report
    assert compress(nested, dict.fromkeys(names, 0.0)).report.architecture == flat.architecture


def test_everything_pruned_gives_a_working_constant_model():
    model = models.lenet5_caffe("nj")
    result = compress(model, -100.0)
    assert result.report.compression_pruning == math.inf
    data = json.loads(json.dumps(result.report.to_dict(), allow_nan=False))
    assert data["compression_pruning"] is None and data["flop_reduction"] is None
    x = torch.randn(3, 1, 28, 28)
    out = result.model(x)
    assert torch.allclose(out, model[9].bias_mu.detach().expand(3, 10))  # only the last biases are left


def test_a_pruned_group_whose_posterior_mean_is_infinite_exports_zeros():
    """fc1's input group 1 has za_logvar = 7: v = Var[log z] ~ e^7 / 4 = 274, so E[z] = exp(m + v/2)
    overflows float32 (e^88.7) and log alpha = log(expm1(274)) is +inf: pruned at threshold 0. The
    first layer keeps every network input, so that column is exported: as zeros, not inf * 0 = NaN.
    Likewise a bias: with every group of fc2 pruned, fc1 is exported as one placeholder unit of zero
    weights and bias, whatever fc1's bias of that unit (inf here)."""
    torch.manual_seed(0)
    fc1, fc2 = bclib.LinearGroupHS(3, 2), bclib.LinearGroupHS(2, 2)
    with torch.no_grad():
        fc1.za_logvar[1] = 7.0
        fc1.bias_mu[0] = math.inf
    model = nn.Sequential(fc1, nn.ReLU(), fc2).eval()
    z_mean = fc1.group_scale_moments()[0].detach()
    assert z_mean[1] == math.inf and fc1.log_alpha()[1] == math.inf  # the premise
    exported = compress(model, 0.0).model[0].weight.detach()
    assert torch.equal(exported[:, 1], torch.zeros(2))
    assert torch.equal(exported[:, [0, 2]], z_mean[[0, 2]] * fc1.weight_mu.detach()[:, [0, 2]])
    nothing_left = compress(model, [0.0, -100.0]).model[0]
    assert torch.equal(nothing_left.weight.detach(), torch.zeros(1, 3))
    assert torch.equal(nothing_left.bias.detach(), torch.zeros(1))


def _randomise_batchnorm(model: nn.Module) -> None:
    """Statistics and affine parameters away from their defaults, so a wrong channel shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)


def test_batchnorm_model_export_matches_masked_model():
    torch.manual_seed(1)
    model = models.vgg_cifar("nj", width=0.0625)
    _randomise_batchnorm(model)
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            layer.z_logvar[torch.rand(layer.num_groups) < 0.3] = PRUNE
    result = compress(model, 0.0)
    x = torch.randn(4, 3, 32, 32)
    masked = apply_masks(model, result.masks).eval()
    assert torch.allclose(result.model(x), masked(x), atol=1e-4)
    assert result.report.flops_after < result.report.flops_before


@pytest.mark.parametrize("build", [models.lenet_300_100, models.lenet5_caffe])
@pytest.mark.parametrize("prior", ["nj", "hs", "svd"])
def test_lenet_exports_match_masked_model(build, prior):
    torch.manual_seed(2)
    model = build(prior)
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            if prior == "nj":
                layer.z_logvar[torch.rand(layer.num_groups) < 0.5] = PRUNE
            elif prior == "hs":
                layer.za_logvar[torch.rand(layer.num_groups) < 0.5] = 3.0
            else:
                layer.weight_logvar[torch.rand(layer.weight_shape) < 0.8] = 5.0
    result = compress(model, 0.0)
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    masked = apply_masks(model, result.masks).eval()
    assert (result.model(x) - masked(x)).abs().max() <= 1e-4
    assert result.report.compression_pruning > 1.0
    # The reduced-precision model moves every weight by at most half a grid step.
    reduced = result.reduced_precision_model()
    bits = [r.bits for r in result.report.layers]
    plain = [m for m in result.model if isinstance(m, (nn.Linear, nn.Conv2d))]
    for t, exact, rounded in zip(bits, plain, (m for m in reduced if isinstance(m, (nn.Linear, nn.Conv2d)))):
        assert (exact.weight - rounded.weight).abs().max() <= 2.0 ** -t / 2 + 1e-7


@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_lenet300_pruning_counted_by_hand(prior):
    """Input groups only: a layer keeps the inputs whose group it keeps, and its outputs are the next
    layer's kept inputs (the last layer's ten classes stay). Counted from the groups the test drops."""
    torch.manual_seed(2)
    model = models.lenet_300_100(prior)
    kept = []
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            drop = torch.rand(layer.num_groups) < 0.5
            # log alpha: NJ 2 (z_mu = 1); HS log(exp((e^3 + 2e^-9) / 4) - 1) = 5.0; the rest about -9
            (layer.z_logvar if prior == "nj" else layer.za_logvar)[drop] = PRUNE if prior == "nj" else 3.0
            kept.append(int((~drop).sum()))
    report = compress(model, 0.0).report
    assert report.architecture == "-".join(map(str, kept))
    weights = kept[0] * kept[1] + kept[1] * kept[2] + kept[2] * 10
    assert sum(row.weights_kept for row in report.layers) == weights
    assert report.compression_pruning == pytest.approx((784 * 300 + 300 * 100 + 100 * 10) / weights)


# ----------------------------------------------------------------------------- bad input
def test_bad_thresholds():
    model = small_conv_net()
    with pytest.raises(ValueError, match="one value per Bayesian layer"):
        compress(model, [0.0, 0.0])
    with pytest.raises(ValueError, match="unknown names \\['nope'\\]"):
        compress(model, {"0": 0.0, "4": 0.0, "6": 0.0, "nope": 1.0})
    with pytest.raises(ValueError, match="missing \\['6'\\]"):
        compress(model, {"0": 0.0, "4": 0.0})
    with pytest.raises(ValueError, match="NaN"):
        compress(model, [0.0, float("nan"), 0.0])
    # A report writes infinite thresholds as null, read back as +inf (keep all): -inf would come back
    # as its opposite.
    with pytest.raises(ValueError, match="threshold for '4' must not be -inf"):
        compress(model, [0.0, -math.inf, 0.0])
    kept = compress(model, [0.0, math.inf, 0.0]).report
    assert type(kept).from_dict(json.loads(json.dumps(kept.to_dict()))).layers[1].threshold == math.inf
    with pytest.raises(TypeError, match="must be a number"):
        compress(model, [0.0, "1", 0.0])
    # 0-d tensors and NumPy scalars are numbers in a list or dict as they are alone (thresholds 0: 1-2-3).
    zero_d = [torch.tensor(0.0), np.float32(0.0), np.array(0.0)]
    assert compress(model, zero_d).report.architecture == "1-2-3"
    assert compress(model, dict(zip(["0", "4", "6"], zero_d))).report.architecture == "1-2-3"
    with pytest.raises(ValueError, match="threshold for '4' must not be NaN"):
        compress(model, [0.0, torch.tensor(math.nan), 0.0])
    for bad in (torch.tensor([0.0]), torch.tensor(True)):  # one value in a 1-d tensor; a bool
        with pytest.raises(TypeError, match="threshold for '4' must be a number"):
            compress(model, [0.0, bad, 0.0])
    with pytest.raises(TypeError, match="thresholds must be"):
        compress(model, "0")
    with pytest.raises(TypeError, match="thresholds must be"):
        compress(model, True)


def test_bad_arguments_of_the_helpers_name_themselves(tmp_path):
    from bclib.compression import FixedPointGrid

    for bits in (-1, 24, 2.0, True):
        with pytest.raises(ValueError, match=f"bits must be an int in 0..23, got {bits!r}"):
            quantize(torch.tensor([0.3]), bits)
        with pytest.raises(ValueError, match=f"bits must be an int in 0..23, got {bits!r}"):
            FixedPointGrid(bits, torch.ones(1))
    # NumPy integers are ints: step 1/8, 0.3 -> 2.4 -> 2.
    assert quantize(torch.tensor([0.3]), np.int64(3)).tolist() == [2]
    assert FixedPointGrid(np.int64(3), torch.ones(1))(torch.tensor([0.3])).tolist() == [0.25]
    model = small_conv_net()
    with pytest.raises(ValueError, match=r"masks names layers that are not Bayesian layers of model: \['9'\]"):
        apply_masks(model, {"9": (torch.ones(1), None)})
    with pytest.raises(TypeError, match="thresholds_grid must be a collection of thresholds entries"):
        threshold_sweep(model, -3.0, torch.zeros(2, 1, 12, 12), torch.zeros(2, dtype=torch.long))
    linear = nn.Sequential(bclib.LinearGroupNJ(3, 2)).eval()
    with pytest.raises(IsADirectoryError, match="is a folder; give the path of a file"):
        compress(linear, 0.0).save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written beside it either


def test_bad_models():
    with pytest.raises(TypeError, match="nn.Sequential"):
        compress(bclib.LinearGroupNJ(3, 2), 0.0)
    with pytest.raises(TypeError, match=r"layer '0' is a Linear: .*Bayesian layers \(bclib.to_bayesian converts"):
        compress(nn.Sequential(nn.Linear(3, 3), bclib.LinearGroupNJ(3, 2)), 0.0)
    with pytest.raises(TypeError, match="GELU"):
        compress(nn.Sequential(bclib.LinearGroupNJ(3, 3), nn.GELU(), bclib.LinearGroupNJ(3, 2)), 0.0)
    with pytest.raises(ValueError, match="no Bayesian layers"):
        compress(nn.Sequential(nn.ReLU()), [])
    conv_net = nn.Sequential(bclib.Conv2dGroupNJ(1, 2, 3), nn.Flatten(), bclib.LinearGroupNJ(8, 2))
    with pytest.raises(ValueError, match="input_shape"):
        compress(conv_net, 0.0)
    with pytest.raises(ValueError, match="input_shape"):
        compress(conv_net, 0.0, input_shape=(1, 9, 9))  # 7x7 outputs do not fit fc 8
    with pytest.raises(ValueError, match="input_shape"):
        compress(conv_net, 0.0, input_shape=(1, -4, 4))
    with pytest.raises(TypeError, match=r"input_shape must be a tuple of positive ints .*got int 3"):
        compress(nn.Sequential(bclib.LinearGroupNJ(3, 2)), 0.0, input_shape=3)
    tied = bclib.LinearGroupNJ(3, 3)
    with pytest.raises(ValueError, match=r"model runs Bayesian layer '0' twice \(tied weights\)"):
        compress(nn.Sequential(tied, nn.ReLU(), tied), 0.0)

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    with pytest.raises(TypeError, match=r"uses the output of layer '0' twice \(in layer '1.0' and add\(\)\): compress follows a chain"):
        compress(nn.Sequential(bclib.LinearGroupNJ(3, 3), Residual(bclib.LinearGroupNJ(3, 3))), 0.0)
    # A layer between two Bayesian layers that mixes units cannot be mapped.
    mixing = nn.Sequential(bclib.Conv2dGroupNJ(1, 4, 1), nn.PixelShuffle(2), bclib.Conv2dGroupNJ(1, 2, 1))
    with pytest.raises(TypeError, match="changes the number of units"):
        compress(mixing, 0.0, input_shape=(1, 3, 3))


def test_linear_only_model_needs_no_input_shape():
    result = compress(nn.Sequential(bclib.LinearGroupNJ(5, 3), nn.Tanh(), bclib.LinearGroupNJ(3, 2)), 0.0)
    assert result.input_shape == (5,)


# ----------------------------------------------------------------------------- errors and thresholds
def test_model_error_by_hand():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 0, 1])
    assert model_error(model, x, y, batch_size=3) == 0.25
    with pytest.raises(ValueError, match="same number"):
        model_error(model, x, y[:3])
    with pytest.raises(ValueError, match="batch_size"):
        model_error(model, x, y, batch_size=0)
    with pytest.raises(TypeError):
        model_error(model, x.numpy(), y)


def test_propose_threshold_on_a_bimodal_sample():
    rng = np.random.default_rng(0)
    kept, pruned = rng.normal(-6.0, 0.5, 300), rng.normal(4.0, 1.0, 700)
    threshold = propose_threshold(torch.tensor(np.concatenate([kept, pruned])))
    # Between the modes, and it separates the two generating components without error.
    assert kept.max() < threshold < pruned.min()
    # Unbalanced the other way round (most groups kept) works too.
    assert -6.0 < propose_threshold(np.concatenate([kept[:30], rng.normal(4, 1, 970)])) < 4.0


def test_propose_threshold_refuses_a_single_mode():
    sample = np.random.default_rng(1).normal(0.0, 1.0, 2000)
    with pytest.raises(ValueError, match="two separated modes"):
        propose_threshold(sample)
    assert propose_threshold(sample, fallback=3.0) == 3.0
    with pytest.raises(ValueError, match="two distinct"):
        propose_threshold([1.0, 1.0, float("nan")])
    with pytest.raises(ValueError, match="bins"):
        propose_threshold([1.0, 2.0], bins=2)


def test_propose_thresholds_per_layer():
    model = small_conv_net()
    with torch.no_grad():
        model[0].z_logvar.copy_(torch.tensor([-8.0, 3.0, -7.5]))
    proposed = propose_thresholds(model)
    assert list(proposed) == ["0", "4", "6"]
    # By hand: layer '0' has log alphas -8, -7.5 and 3 in 64 bins of width 11 / 64 from -8 (bins 0, 2
    # and 63); the longest run of empty bins between the modes is bins 3-62, whose centre is
    # -8 + 33 * 11 / 64 (a run of one empty bin, bin 1, is shorter).
    assert proposed["0"] == pytest.approx(-8 + 33 * 11 / 64)
    with torch.no_grad():
        model[4].z_logvar.fill_(-9.0)  # one value: no two modes
    with pytest.raises(ValueError, match="layer '4': propose_threshold: needs at least two distinct"):
        propose_thresholds(model)
    assert propose_thresholds(model, fallback=-2.5)["4"] == -2.5


class _WithUnusedLayer(nn.Module):
    """A Bayesian layer that forward never runs (an auxiliary head, say) beside a chain of two."""

    def __init__(self):
        super().__init__()
        self.first, self.unused, self.last = (bclib.LinearGroupNJ(6, 4), bclib.LinearGroupNJ(4, 3),
                                              bclib.LinearGroupNJ(4, 3))

    def forward(self, x):
        return self.last(torch.relu(self.first(x)))


def test_thresholds_of_a_layer_forward_never_runs_are_ignored():
    torch.manual_seed(0)
    model = _WithUnusedLayer().eval()
    with torch.no_grad():
        model.first.z_logvar.copy_(torch.tensor([-8.0, -8.0, 3.0, 3.0, -8.0, 3.0]))
    proposed = propose_thresholds(model, fallback=-2.5)
    assert sorted(proposed) == ["first", "last", "unused"]
    assert compress(model, proposed).report.architecture.startswith("3-")
    report = compress(model, {**proposed, "last": 0.0}).report  # every group of 'last' sits near -9: all kept
    # Inputs 0, 1, 4 of the first layer survive; the unused layer is not exported.
    assert report.architecture == "3-4" and [row.name for row in report.layers] == ["first", "last"]
    with pytest.raises(ValueError, match=r"unknown names \['nope'\]"):
        compress(model, {**proposed, "nope": 0.0})


def test_prune_further_and_prune_to_groups_ignore_layers_forward_never_runs():
    """Dicts by name of every Bayesian layer the model holds ('unused' too, as bayesian_layers and
    propose_thresholds give them) work as compress's do. With z_mu = 1 log alpha is z_logvar: at
    thresholds 0 'first' keeps inputs 0, 1, 4 and 'last' all 4 (3-4); at -8 'last' drops input 1
    (-7): 3-3. prune_to_groups to at most 3 groups of 'last' cuts midway between -9 and -7, at -8."""
    from bclib.compression import prune_further, prune_to_groups

    torch.manual_seed(0)
    model = _WithUnusedLayer().eval()
    with torch.no_grad():
        for layer, z_logvar in ((model.first, [-8.0, -8.0, 3.0, 3.0, -8.0, 3.0]),
                                (model.last, [-9.0, -7.0, -9.0, -9.0])):
            layer.z_mu.fill_(1.0)
            layer.z_logvar.copy_(torch.tensor(z_logvar))
    log_alpha = {name: layer.log_alpha().detach() for name, layer in bclib.bayesian_layers(model)}
    assert "unused" in log_alpha
    base = compress(model, {"first": 0.0, "last": 0.0, "unused": 0.0})
    assert base.report.architecture == "3-4"
    deeper = prune_further(base, model, log_alpha, {"first": 0.0, "last": -8.0, "unused": 5.0})
    assert deeper.report.architecture == "3-3"
    cut = prune_to_groups(base, model, log_alpha, [3, 3])
    assert cut.report.architecture == "3-3" and [row.threshold for row in cut.report.layers] == [0.0, -8.0]
    with pytest.raises(ValueError, match=r"unknown names \['nope'\]"):
        prune_further(base, model, {**log_alpha, "nope": torch.zeros(4)}, -8.0)


def test_propose_threshold_splits_a_small_single_cluster_as_its_docstring_warns():
    """20 draws of one normal in 64 bins: the empty bins inside the cluster pass for a valley, and the
    proposal cuts the cluster (the limitation the docstring states); 2,000 draws are refused."""
    sample = np.random.default_rng(3).normal(-9.0, 0.5, 20)
    threshold = propose_threshold(sample)
    assert sample.min() < threshold < sample.max()
    assert 0 < (sample < threshold).sum() < 20
    with pytest.raises(ValueError, match="no two separated modes"):
        propose_threshold(np.random.default_rng(3).normal(-9.0, 0.5, 2000))


def test_threshold_sweep_rows():
    model = small_conv_net()
    torch.manual_seed(3)
    x = torch.randn(40, 1, 6, 6)
    eval_model = apply_masks(model, {}).eval()
    y = eval_model(x).argmax(1)
    y[:10] = 1 - y[:10]  # a known 25% error for the unpruned model
    rows = threshold_sweep(model, [math.inf, 0.0, -100.0], x, y)
    assert [row["thresholds"] for row in rows] == [math.inf, 0.0, -100.0]
    assert rows[0]["error"] == 0.25 and rows[0]["compression_pruning"] == 1.0
    assert rows[1]["architecture"] == "1-2-3" and rows[1]["weights_kept"] == 21
    assert rows[2]["compression_pruning"] == math.inf and rows[2]["weights_kept"] == 0


def test_select_thresholds_prunes_exactly_the_groups_the_data_does_not_need():
    """Inputs 0 and 1 decide the class, inputs 2 and 3 carry tiny weights: the lowest threshold that keeps
    the error is the cut just above inputs 0 and 1 (log alpha -5, -4), i.e. the next value, 1."""
    from bclib.compression import select_thresholds

    torch.manual_seed(0)
    layer = bclib.LinearGroupNJ(4, 2)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([[3.0, 2.0, 1e-4, -1e-4], [-3.0, -2.0, -1e-4, 1e-4]]))
        layer.bias_mu.zero_()
        layer.z_mu.fill_(1.0)
        layer.z_logvar.copy_(torch.tensor([-5.0, -4.0, 1.0, 2.0]))  # log alpha = z_logvar when z_mu = 1
    model = nn.Sequential(layer).eval()
    x = torch.randn(400, 4)
    y = (3 * x[:, 0] + 2 * x[:, 1] < 0).long()  # class 1 where the first output is smaller
    thresholds = select_thresholds(model, x, y, tolerance=0.0)
    assert thresholds == [pytest.approx(1.0)]
    # Allowing any error, everything may go: the lowest candidate, -5, keeps nothing.
    assert select_thresholds(model, x, y, tolerance=0.99) == [pytest.approx(-5.0)]
    with pytest.raises(ValueError, match="tolerance"):
        select_thresholds(model, x, y, tolerance=1.5)
    # A fixed layer keeps its given threshold (Sparse VD's 3); the others are still searched.
    two = nn.Sequential(layer, bclib.LinearGroupNJ(2, 2)).eval()
    with torch.no_grad():
        two[1].weight_mu.copy_(torch.eye(2))
        two[1].bias_mu.zero_()
        two[1].z_mu.fill_(1.0)
        two[1].z_logvar.copy_(torch.tensor([-6.0, -5.0]))
    assert select_thresholds(two, x, y, tolerance=0.0, fixed={1: 3.0}) == [pytest.approx(1.0), 3.0]
    # A key that is no layer's index would be ignored: refused, as is a tolerance that is no number.
    with pytest.raises(ValueError, match=r"fixed must map Bayesian layer indices 0 \.\.\. 1 .*got keys \[7\]"):
        select_thresholds(two, x, y, fixed={7: 3.0})
    with pytest.raises(ValueError, match="tolerance must be a number in \\[0, 1\\), got '0.1'"):
        select_thresholds(two, x, y, tolerance="0.1")


def _horseshoe_layer_with_an_infinite_log_alpha(decisive: list[int]) -> nn.Module:
    """LinearGroupHS 4 -> 2 with log alphas log(expm1((e^za_logvar + 2 e^-9) / 4)), e^-9 the other
    factor's variance: about -8.83, -8.15, +inf, -7.29 for za_logvar -8, -7, 6, -6 (expm1(100.9)
    overflows float32). Group 2's E[z] = exp(m + v/2) stays finite, about 1: za_mu = -99.5 offsets
    v/2 ~ 50.4. Output 0 is 3 times, output 1 -3 times the sum of the ``decisive`` inputs."""
    torch.manual_seed(0)
    layer = bclib.LinearGroupHS(4, 2)
    with torch.no_grad():
        layer.za_logvar.copy_(torch.tensor([-8.0, -7.0, 6.0, -6.0]))
        layer.za_mu[2] = -99.5
        layer.weight_mu.fill_(1e-4)
        layer.weight_mu[:, decisive] = torch.tensor([[3.0], [-3.0]]) / layer.group_scale_moments()[0][decisive]
        layer.bias_mu.zero_()
    assert layer.log_alpha()[2] == math.inf and 0.5 < layer.group_scale_moments()[0][2] < 2  # the premise
    return nn.Sequential(layer).eval()


def test_an_infinite_threshold_keeps_a_group_whose_log_alpha_is_infinite():
    """+inf keeps every group, group 2 of log alpha +inf too; select_thresholds' "keep all" is such a
    threshold, and its quantiles of candidates (4 distinct log alphas > max_candidates 2) skip the
    infinite one (a linear quantile next to it is NaN). Group 2 alone decides the class here, so the
    only threshold within tolerance 0 keeps it."""
    from bclib.compression import select_thresholds

    model = _horseshoe_layer_with_an_infinite_log_alpha(decisive=[2])
    x = torch.randn(200, 4)
    y = (x[:, 2] < 0).long()  # class 1 where output 0 is smaller
    kept = compress(model, math.inf)
    assert kept.report.architecture == "4" and model_error(kept.model, x, y) == 0.0
    for max_candidates in (64, 2):
        assert select_thresholds(model, x, y, tolerance=0.0, max_candidates=max_candidates) == [math.inf]


def test_a_cut_below_an_infinite_log_alpha_is_the_largest_float32():
    """Groups of log alphas -8.83, -8.15, +inf, -7.29: prune_to_groups keeping 3 cuts between -7.29 and
    +inf, and select_thresholds' cut point below the +inf value prunes group 2 alone (the only cut
    within tolerance 0 when groups 0, 1 and 3 decide the class): as thresholds, +inf would keep every
    group, so both give the largest float32 instead."""
    from bclib.compression import prune_to_groups, select_thresholds

    largest = float(np.finfo(np.float32).max)
    model = _horseshoe_layer_with_an_infinite_log_alpha(decisive=[0, 1, 3])
    log_alpha = [model[0].log_alpha().detach()]
    cut = prune_to_groups(compress(model, math.inf), model, log_alpha, [3])
    assert cut.report.architecture == "3" and cut.report.layers[0].threshold == largest
    assert torch.equal(cut.surviving_groups("0"), torch.tensor([True, True, False, True]))
    x = torch.randn(200, 4)
    y = (x[:, [0, 1, 3]].sum(1) < 0).long()
    assert select_thresholds(model, x, y, tolerance=0.0) == [largest]


def test_a_log_alpha_of_minus_infinity_is_cut_above_with_the_lowest_float32():
    """Group 0 of a horseshoe layer whose two log-normal variances underflow has log alpha
    log(expm1(0)) = -inf: prune_to_groups keeping 1 group cuts midway to it (-inf, no threshold) at
    minus the largest float32, which keeps it alone; select_thresholds takes such a cut and a "keep
    all" when every log alpha is -inf."""
    from bclib.compression import prune_to_groups, select_thresholds

    largest = float(np.finfo(np.float32).max)
    torch.manual_seed(0)
    layer = bclib.LinearGroupHS(4, 2)
    with torch.no_grad():
        layer.za_logvar[0] = layer.zb_logvar[0] = -200.0
    model = nn.Sequential(layer).eval()
    log_alpha = layer.log_alpha().detach()
    assert log_alpha[0] == -math.inf and log_alpha[1:].isfinite().all()  # the premise
    cut = prune_to_groups(compress(model, math.inf), model, [log_alpha], [1])
    assert cut.report.architecture == "1" and cut.report.layers[0].threshold == -largest
    assert torch.equal(cut.surviving_groups("0"), torch.tensor([True, False, False, False]))
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    for max_candidates in (64, 2):
        assert all(math.isfinite(t) for t in select_thresholds(model, x, y, tolerance=0.9,
                                                                max_candidates=max_candidates))
    with torch.no_grad():
        layer.za_logvar.fill_(-200.0), layer.zb_logvar.fill_(-200.0)
    assert select_thresholds(model, x, y, tolerance=0.9) == [-largest]


def test_prune_to_groups_finds_the_midpoint_in_double_precision():
    """Log alphas -1, 2e38, 3e38 given for a 3-input layer: keeping 2 cuts at (2e38 + 3e38) / 2 = 2.5e38,
    whose float32 sum 5e38 overflowed to +inf (then the largest float32, which keeps all 3)."""
    from bclib.compression import prune_to_groups

    model = nn.Sequential(bclib.LinearGroupNJ(3, 2)).eval()
    cut = prune_to_groups(compress(model, math.inf), model, [torch.tensor([2e38, 3e38, -1.0])], [2])
    assert cut.report.architecture == "2" and cut.report.layers[0].threshold == pytest.approx(2.5e38)
    assert torch.equal(cut.surviving_groups("0"), torch.tensor([True, False, True]))


def test_select_thresholds_follows_the_forward_order_not_the_registration_order():
    """fc2 is registered before fc1 but runs after it: the first threshold is fc1's (the cut above its
    two decisive inputs, as in the test above), the order in which compress reads the list."""
    from bclib.compression import select_thresholds

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc2, self.fc1 = bclib.LinearGroupNJ(2, 2), bclib.LinearGroupNJ(4, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight_mu.copy_(torch.tensor([[3.0, 2.0, 1e-4, -1e-4], [-3.0, -2.0, -1e-4, 1e-4]]))
        net.fc2.weight_mu.copy_(torch.eye(2))
        for layer, log_alpha in ((net.fc1, [-5.0, -4.0, 1.0, 2.0]), (net.fc2, [-6.0, -6.0])):
            layer.bias_mu.zero_()
            layer.z_mu.fill_(1.0)
            layer.z_logvar.copy_(torch.tensor(log_alpha))
    net.eval()
    x = torch.randn(400, 4)
    y = (3 * x[:, 0] + 2 * x[:, 1] < 0).long()
    thresholds = select_thresholds(net, x, y, tolerance=0.0)
    assert thresholds[0] == pytest.approx(1.0)
    assert model_error(compress(net, thresholds).model, x, y) == 0.0


def test_weight_masks_are_the_masks_compress_applies():
    from bclib.compression import weight_masks

    torch.manual_seed(1)
    model = models.lenet5_caffe("nj")
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            layer.z_mu[torch.rand(layer.num_groups) < 0.4] = 1e-4  # log alpha ~ +9: pruned at -3
    masks = weight_masks(model, -3.0)
    compressed = compress(model, -3.0)
    assert list(masks) == list(compressed.masks)
    for name, mask in masks.items():
        assert torch.equal(mask.float(), compressed.masks[name][0])
        assert 0 < mask.sum() < mask.numel()


# ----------------------------------------------------------------------------- fine-tuning on the grids
def test_fixed_point_grid_rounds_and_passes_gradients_straight_through():
    from bclib.compression import FixedPointGrid

    grid = FixedPointGrid(3, torch.tensor([1.0, 1.0, 0.0, 1.0]))  # step 1/8
    weight = torch.tensor([0.30, -0.30, 0.70, 0.0625], requires_grad=True)
    on_grid = grid(weight)
    # 2.4 -> 2, -2.4 -> -2, pruned -> 0, 0.5 -> 0 (half to even): as quantize() rounds.
    assert on_grid.tolist() == [0.25, -0.25, 0.0, 0.0]
    (on_grid * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert weight.grad.tolist() == [1.0, 2.0, 0.0, 4.0]  # identity through the rounding, none where pruned


def _separable_task(n: int, seed: int):
    from bclib.data import TensorSplit

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorSplit(x, (3 * x[:, 0] + 2 * x[:, 1] < 0).long())  # class 1 where output 0 is smaller


def test_fine_tune_repairs_a_pruned_network_and_keeps_its_rates(tmp_path):
    """Inputs 0 and 1 survive with weights of the wrong sign (every example misclassified); inputs 2
    and 3 are pruned. Retraining on the 4-bit grid must fix the sign without touching the rates."""
    from bclib.compression import fine_tune
    from bclib.train import TrainConfig

    layer = bclib.LinearGroupNJ(4, 2)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([[-3.0, -2.0, 1.0, 1.0], [3.0, 2.0, 1.0, 1.0]]))
        layer.bias_mu.zero_()
        layer.z_mu.fill_(1.0)
        layer.z_logvar.copy_(torch.tensor([KEEP, KEEP, PRUNE, PRUNE]))
        layer.weight_logvar.fill_(math.log(1.5 * 2**-6))  # 2 Var = 1.5 * 2^-5: t = 1..4, 4 bits
    compressed = compress(nn.Sequential(layer).eval(), [0.0])
    train, test = _separable_task(2000, seed=1), _separable_task(1000, seed=2)
    before = compressed.reduced_precision_model()[0].weight.detach().clone()
    assert compressed.report.layers[0].bits == 4 and model_error(compressed.reduced_precision_model(), test.x, test.y) == 1.0

    tuned, history = fine_tune(compressed, train, test, TrainConfig(epochs=20, batch_size=50, lr=0.05, lr_final=0.05))
    reduced = tuned.reduced_precision_model()
    error = model_error(reduced, test.x, test.y)
    assert error < 0.05
    assert history[-1]["test_error"] == error  # what training saw is the grid model
    weight = reduced[0].weight.detach()
    assert torch.equal(weight * 16, torch.round(weight * 16))  # on the grid of step 2^-4
    assert torch.equal(weight[:, 2:], torch.zeros(2, 2))  # pruned inputs stay pruned
    assert reduced[0].bias.detach().half().float().tolist() == reduced[0].bias.detach().tolist()
    assert tuned.report.to_dict() == compressed.report.to_dict()  # same architecture, bits, rates
    assert torch.equal(compressed.reduced_precision_model()[0].weight.detach(), before)  # input untouched
    tuned.save(tmp_path / "tuned.bcz")
    loaded = bclib.load_compressed(tmp_path / "tuned.bcz")
    assert torch.equal(loaded(test.x), reduced(test.x))


def _hand_built_linear_net():
    """fc1 4 -> 3 (input 3 pruned: 3x3 kept of 12, 4 bits), fc2 3 -> 2 (all kept, 6 bits); max|w| = 0.75."""
    fc1, fc2 = bclib.LinearGroupNJ(4, 3), bclib.LinearGroupNJ(3, 2)
    with torch.no_grad():
        for layer, variance in ((fc1, 1.5 * 2**-6), (fc2, 1.5 * 2**-8)):  # t = 1..4 and 1..6
            layer.z_mu.fill_(1.0)
            layer.z_logvar.fill_(KEEP)
            layer.weight_logvar.fill_(math.log(variance))
        fc1.z_logvar[3] = PRUNE
        fc1.weight_mu.copy_(torch.tensor([[0.3, -0.7, 0.11, 0.5], [0.75, 0.2, -0.33, 0.1], [-0.05, 0.6, 0.4, 0.2]]))
        fc2.weight_mu.copy_(torch.tensor([[0.23, -0.41, 0.07], [-0.6, 0.5, 0.19]]))
    return nn.Sequential(fc1, nn.ReLU(), fc2).eval()


def test_with_bits_rounds_to_the_new_grids_and_recomputes_the_precision_rate(tmp_path):
    compressed = compress(_hand_built_linear_net(), [0.0, 0.0])
    assert [row.bits for row in compressed.report.layers] == [4, 6] and compressed.report.exponent_bits == 2
    coarse = compressed.with_bits([2, 3])
    # By hand: 18 weights in all, kept 9 (fc1) + 6 (fc2); e = ceil(log2(|log2 0.75| + 1) + 1) = 2.
    assert coarse.report.compression_precision == pytest.approx(32 * 18 / (9 * (1 + 2 + 2) + 6 * (1 + 2 + 3)))
    assert compressed.report.compression_precision == pytest.approx(32 * 18 / (9 * (1 + 2 + 4) + 6 * (1 + 2 + 6)))
    assert coarse.report.compression_pruning == compressed.report.compression_pruning == 18 / 15
    assert coarse.report.architecture == compressed.report.architecture
    fc1 = torch.tensor([[0.3, -0.7, 0.11], [0.75, 0.2, -0.33], [-0.05, 0.6, 0.4]])
    reduced = coarse.reduced_precision_model()
    assert torch.equal(reduced[0].weight.detach()[:, :3], torch.round(fc1 * 4) / 4)
    assert torch.equal(reduced[2].weight.detach(), torch.round(torch.tensor([[0.23, -0.41, 0.07],
                                                                             [-0.6, 0.5, 0.19]]) * 8) / 8)
    assert [row.bits for row in compressed.report.layers] == [4, 6]  # the original is unchanged
    assert compressed.with_bits([np.int64(2), 3]).report.to_dict() == coarse.report.to_dict()  # numpy ints too
    from bclib.compression import quantize
    for huge in (1e13, math.inf, math.nan):  # 1e13 * 2^23 > 2^62: int64 would wrap around
        with pytest.raises(ValueError, match="weights must be finite with"):
            quantize(torch.tensor([0.5, huge]), 23)
    assert quantize(torch.tensor([1e13], dtype=torch.float64), 10).item() == round(1e13 * 1024)
    by_name = compressed.with_bits({"2": 3})
    assert [row.bits for row in by_name.report.layers] == [4, 3]
    coarse.save(tmp_path / "coarse.bcz")
    x = torch.randn(16, 4)
    assert torch.equal(bclib.load_compressed(tmp_path / "coarse.bcz")(x), reduced(x))
    # The report alone takes bits as the network does (a dict, NumPy ints) and refuses the same bad ones.
    assert compressed.report.with_bits({"2": np.int64(3)}).layers[1].bits == 3
    assert type(compressed.report.with_bits([np.int64(2), 3]).layers[0].bits) is int  # for the JSON report
    for bad, error, message in (([2], ValueError, r"one value per Bayesian layer \(2"),
                                ({"fc9": 2}, ValueError, r"bits names layers \['fc9'\]"),
                                ([2, -1], ValueError, r"bits for layer '2' must be an int in 0..23, got -1"),
                                ([2, 2.0], ValueError, "must be an int"), (3, TypeError, "bits must be a list")):
        for owner in (compressed, compressed.report):
            with pytest.raises(error, match=message):
                owner.with_bits(bad)


def test_from_file_gives_back_the_saved_network(tmp_path):
    from bclib.compression import CompressedModel, CompressionReport

    compressed = compress(_hand_built_linear_net(), [0.0, 0.0]).with_bits([3, 5])
    compressed.save(tmp_path / "net.bcz")
    read = CompressedModel.from_file(tmp_path / "net.bcz", compressed.report.to_dict())
    x = torch.randn(16, 4)
    assert torch.equal(read.reduced_precision_model()(x), compressed.reduced_precision_model()(x))
    assert read.report.to_dict() == {**compressed.report.to_dict(), "file": None}
    assert read.file_bytes() == compressed.file_bytes() and read.masks == {}
    assert CompressionReport.from_dict(compressed.report.to_dict()).layers == compressed.report.layers
    with pytest.raises(ValueError, match=r"report gives layer '0' 4 bits, but .* stores 3"):
        CompressedModel.from_file(tmp_path / "net.bcz", compress(_hand_built_linear_net(), [0.0, 0.0]).report)
    with pytest.raises(ValueError, match="data lacks the report fields"):
        CompressedModel.from_file(tmp_path / "net.bcz", {"layers": []})
    with pytest.raises(TypeError, match=r"report must be a CompressionReport or its dict .*, got str"):
        CompressedModel.from_file(tmp_path / "net.bcz", "report.json")
    damaged = compressed.report.to_dict()
    damaged["layers"][1]["in_kept_"] = damaged["layers"][1].pop("in_kept")  # a misspelt key
    with pytest.raises(ValueError, match=r"data\['layers'\]\[1\] lacks the keys \['in_kept'\] and has unknown "
                                         r"keys \['in_kept_'\]"):
        CompressedModel.from_file(tmp_path / "net.bcz", damaged)
    damaged["layers"][1] = list(damaged["layers"][1].values())
    with pytest.raises(ValueError, match=r"data\['layers'\]\[1\] must be a dict \(a layer's row\), got list"):
        CompressedModel.from_file(tmp_path / "net.bcz", damaged)
    # The report of the same network with fc1 pruned away (threshold -100), same bits.
    other = compress(_hand_built_linear_net(), [-100.0, 0.0]).with_bits([3, 5]).report
    with pytest.raises(ValueError, match=r"report gives layer '0' 0 inputs and 0 outputs kept, but .* stores 3 and 3"):
        CompressedModel.from_file(tmp_path / "net.bcz", other)
    # That network itself: the export keeps one unit of zero weights where none survives; its file
    # is read back with its own report.
    emptied = compress(_hand_built_linear_net(), [-100.0, 0.0]).with_bits([3, 5])
    emptied.save(tmp_path / "emptied.bcz")
    read = CompressedModel.from_file(tmp_path / "emptied.bcz", emptied.report.to_dict())
    assert read.report.architecture == emptied.report.architecture
    assert torch.equal(read.reduced_precision_model()(x), bclib.load_compressed(tmp_path / "emptied.bcz")(x))


def test_fine_tune_trains_survivors_that_a_file_stores_as_zero(tmp_path):
    """On 1-bit grids (step 1/2) fc1's surviving weights 0.11, -0.05 and 0.2 round to 0 in the file;
    read back, they are survivors and must train (fc1's pruned input 3 stays 0)."""
    from bclib.compression import CompressedModel, fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    compressed = compress(_hand_built_linear_net(), [0.0, 0.0]).with_bits([1, 1])
    compressed.save(tmp_path / "net.bcz")
    read = CompressedModel.from_file(tmp_path / "net.bcz", compressed.report.to_dict())
    before = read.reduced_precision_model()[0].weight.detach()
    stored_zero = before[:, :3] == 0
    assert int(stored_zero.sum()) >= 3
    data = TensorSplit(torch.randn(256, 4, generator=torch.Generator().manual_seed(0)), torch.randint(0, 2, (256,)))
    tuned, _ = fine_tune(read, data, data, TrainConfig(epochs=3, batch_size=32, lr=0.5, lr_final=0.5))
    latent = tuned.model[0].weight.detach()  # the weights the grid rounds
    assert not torch.equal(latent[:, :3][stored_zero], torch.zeros(int(stored_zero.sum())))
    assert torch.equal(latent[:, 3], torch.zeros(3))
    # Architecture, bits and the rate after pruning stay; the exponent bits follow the largest trained
    # grid value (e = ceil(log2(|log2 max|w|| + 1) + 1), the release's rule), and the rate after
    # precision follows them: 32 |W| / sum_l |W_l kept| (1 + e + t_l), counted here.
    largest = max(float(m.weight.detach().abs().max()) for m in tuned.reduced_precision_model()
                  if isinstance(m, nn.Linear))
    exponent = math.ceil(math.log2(abs(math.log2(largest)) + 1) + 1)
    rows = read.report.layers
    assert tuned.report.exponent_bits == exponent
    assert tuned.report.compression_precision == pytest.approx(
        32 * sum(r.weights_total for r in rows) / sum(r.weights_kept * (1 + exponent + r.bits) for r in rows))
    changing = {"exponent_bits", "compression_precision", "compression_sparse_precision"}
    assert ({k: v for k, v in tuned.report.to_dict().items() if k not in changing}
            == {k: v for k, v in read.report.to_dict().items() if k not in changing})


def test_exponent_bits_follow_the_largest_weight_a_network_holds():
    """A network given new weights (with_tensors, as after a retraining) takes e from their grid values:
    weights four times as large, 2 bits each, e counted here from the grid values it stores."""
    compressed = compress(_hand_built_linear_net(), [0.0, 0.0]).with_bits([2, 2])
    quadrupled = [{**values, "weight": 4 * values["weight"]} if "weight" in values else values
                  for values in compressed.tensors]
    bigger = compressed.with_tensors(quadrupled)
    largest = max(float(m.weight.detach().abs().max()) for m in bigger.reduced_precision_model()
                  if isinstance(m, nn.Linear))
    exponent = math.ceil(math.log2(abs(math.log2(largest)) + 1) + 1)
    assert exponent != compressed.report.exponent_bits  # the case the test is about
    assert bigger.report.exponent_bits == exponent
    rows = bigger.report.layers
    assert bigger.report.compression_precision == pytest.approx(
        32 * sum(r.weights_total for r in rows) / sum(r.weights_kept * (1 + exponent + r.bits) for r in rows))


def test_fine_tune_keeps_the_structure_of_a_conv_net():
    """The hand-built conv net (conv 8 bits, fc1 6 bits, fc2 1 bit): after one epoch on random data
    every weight sits on its layer's grid and fc1's two columns of the dead positions stay zero."""
    from bclib.compression import fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    compressed = compress(small_conv_net(), 0.0)
    data = TensorSplit(torch.randn(64, 1, 6, 6), torch.randint(0, 2, (64,)))
    tuned, _ = fine_tune(compressed, data, data, TrainConfig(epochs=1, batch_size=16, lr=0.05))
    weighted = [m for m in tuned.reduced_precision_model() if isinstance(m, (nn.Conv2d, nn.Linear))]
    original = [m for m in compressed.reduced_precision_model() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for module, before, bits in zip(weighted, original, (8, math.ceil((4 * 5 + 11) / 6), 1)):
        scaled = module.weight.detach() * 2.0**bits
        assert module.weight.shape == before.weight.shape
        assert torch.equal(scaled, torch.round(scaled))
    assert not torch.equal(weighted[0].weight, original[0].weight)  # it did train
    assert torch.equal(weighted[1].weight[:, 2:].detach(), torch.zeros(3, 2))


def test_with_tensors_gives_back_a_retrained_network_saved_as_tensors(tmp_path):
    """A retrained network's tensors through torch.save and a weights-only load: the same float model
    (its latent weights, off the grid) and the same reduced-precision model; the report's rates stay."""
    from bclib.compression import fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    compressed = compress(small_conv_net(), 0.0)
    data = TensorSplit(torch.randn(64, 1, 6, 6), torch.randint(0, 2, (64,)))
    tuned, _ = fine_tune(compressed, data, data, TrainConfig(epochs=1, batch_size=16, lr=0.05))
    torch.save(tuned.tensors, tmp_path / "tensors.pt")
    read = compressed.with_tensors(torch.load(tmp_path / "tensors.pt", weights_only=True))
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(read.model(x), tuned.model(x))
        assert torch.equal(read.reduced_precision_model()(x), tuned.reduced_precision_model()(x))
        assert not torch.equal(read.model(x), read.reduced_precision_model()(x))  # latent weights kept
    assert read.report.to_dict() == {**tuned.report.to_dict(), "file": None}
    assert read.file_bytes() == tuned.file_bytes()
    # Bad tensors: another count of layers, missing names, another shape.
    tensors = tuned.tensors
    with pytest.raises(ValueError, match=f"tensors must be a list of {len(tensors)} dicts"):
        compressed.with_tensors(tensors[:-1])
    weighted = next(i for i, values in enumerate(tensors) if "weight" in values)
    with pytest.raises(ValueError, match=rf"tensors\[{weighted}\] must hold \[.*'weight'"):
        compressed.with_tensors([{k: v for k, v in values.items() if k != "weight"} if i == weighted else values
                                 for i, values in enumerate(tensors)])
    shape = tuple(tensors[weighted]["weight"].shape)
    for wrong, got in ((torch.zeros(1), "a torch.float32 tensor of shape (1,)"),
                       (torch.zeros(shape, dtype=torch.float64), f"a torch.float64 tensor of shape {shape}")):
        with pytest.raises(ValueError, match=rf"tensors\[{weighted}\]\['weight'\] must be a torch.float32 tensor "
                                             + re.escape(f"of shape {shape}, got {got}")):
            compressed.with_tensors([{**values, "weight": wrong} if i == weighted else values
                                     for i, values in enumerate(tensors)])


def test_fine_tune_trains_batchnorm_statistics():
    from bclib.compression import fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    torch.manual_seed(0)
    compressed = compress(models.vgg_cifar("nj", width=0.0625).eval(), 0.0)
    data = TensorSplit(torch.randn(32, 3, 32, 32) + 2.0, torch.randint(0, 10, (32,)))  # mean 2: stats move
    tuned, history = fine_tune(compressed, data, data, TrainConfig(epochs=1, batch_size=16))
    norms = [(m, n) for m, n in zip(compressed.model, tuned.model) if isinstance(m, nn.BatchNorm2d)]
    assert norms and not torch.equal(norms[0][0].running_mean, norms[0][1].running_mean)
    assert all(math.isfinite(v) for v in history[-1].values())


def test_fine_tune_rejects_what_is_not_a_compressed_model():
    from bclib.compression import fine_tune
    from bclib.train import TrainConfig

    with pytest.raises(TypeError, match="compressed must be a CompressedModel"):
        fine_tune(nn.Linear(2, 2), None, None, TrainConfig(epochs=1))
    compressed = compress(_hand_built_linear_net(), [0.0, 0.0])
    with pytest.raises(TypeError, match="reinitialize must be a bool, got str 'yes'"):
        fine_tune(compressed, None, None, TrainConfig(epochs=1), reinitialize="yes")


def test_fine_tune_reinitialized_starts_from_weights_drawn_as_nn_linear_draws_them():
    """fc 400 -> 60 with every weight and bias 1.0 and 100 inputs pruned, retrained from fresh weights
    at a learning rate too small to move them: the stored weights are draws of the law nn.Linear
    draws from for the 300 surviving inputs, U(-b, b) with b = 1/sqrt(300) (variance b^2 / 3; half of
    them within b/2, where a normal of that variance would put 61 %), the pruned columns stay 0, the
    bias is drawn from the same law; one seed gives one draw."""
    from bclib.compression import fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    layer = bclib.LinearGroupNJ(400, 60)
    with torch.no_grad():
        layer.weight_mu.fill_(1.0)
        layer.bias_mu.fill_(1.0)
        layer.z_mu.fill_(1.0)
        layer.z_logvar.fill_(KEEP)
        layer.z_logvar[:100] = PRUNE
    compressed = compress(nn.Sequential(layer).eval(), [0.0]).with_bits([16])
    generator = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.randn(10, 400, generator=generator), torch.randint(0, 60, (10,), generator=generator))

    def fresh(seed):
        config = TrainConfig(epochs=1, batch_size=10, lr=1e-12, lr_final=1e-12, seed=seed)
        return fine_tune(compressed, split, split, config, reinitialize=True)[0].reduced_precision_model()[0]

    fc = fresh(0)
    weight, bias = fc.weight.detach(), fc.bias.detach()
    assert torch.equal(weight[:, :100], torch.zeros(60, 100))
    kept = weight[:, 100:].flatten().double()
    bound, half_step = 1 / math.sqrt(300), 2.0**-17
    assert kept.abs().max() <= bound + half_step and bias.abs().max() <= bound + 1e-4  # float16 bias
    assert abs(kept.mean()) < 4 * bound / math.sqrt(3 * kept.numel())
    assert kept.var().item() == pytest.approx(bound**2 / 3, rel=0.04)  # standard error about 0.7 %
    assert (kept.abs() < bound / 2).double().mean().item() == pytest.approx(0.5, abs=0.015)
    assert bias.abs().max() > bound / 2  # 60 draws, not all within half the bound
    assert torch.equal(fresh(0).weight, fc.weight) and not torch.equal(fresh(1).weight, fc.weight)
    tuned = fine_tune(compressed, split, split, TrainConfig(epochs=1, batch_size=10, lr=1e-12, lr_final=1e-12))[0]
    assert torch.equal(tuned.reduced_precision_model()[0].weight[:, 100:], torch.ones(60, 300))  # the default keeps them


def test_fine_tune_reinitialized_keeps_per_weight_pruning():
    """Sparse VD prunes single weights: after a redraw the pruned ones (every other weight here) stay 0,
    the kept ones are fresh draws for their fan-in (half of 40 inputs: bound 1/sqrt(20))."""
    from bclib.compression import fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    layer = bclib.LinearSVD(40, 30)
    pruned = (torch.arange(40 * 30).reshape(30, 40) % 2).bool()
    with torch.no_grad():
        layer.weight_mu.fill_(1.0)
        layer.weight_logvar.copy_(torch.where(pruned, 10.0, -40.0))  # log alpha = log sigma^2 - log mu^2
    compressed = compress(nn.Sequential(layer).eval(), [0.0]).with_bits([16])
    split = TensorSplit(torch.randn(10, 40), torch.randint(0, 30, (10,)))
    config = TrainConfig(epochs=1, batch_size=10, lr=1e-12, lr_final=1e-12)
    weight = fine_tune(compressed, split, split, config, reinitialize=True)[0].reduced_precision_model()[0].weight
    assert torch.equal(weight[pruned], torch.zeros(600))
    assert (weight[~pruned] != 0).all() and weight[~pruned].abs().max() <= 1 / math.sqrt(20) + 2.0**-17


def test_a_module_placed_twice_runs_twice_in_the_export():
    """One ReLU object used after both hidden layers: nn.Sequential runs it twice, so must the export."""
    torch.manual_seed(0)
    act = nn.ReLU()
    model = nn.Sequential(bclib.LinearGroupNJ(8, 16), act, bclib.LinearGroupNJ(16, 16), act,
                          bclib.LinearGroupNJ(16, 4)).eval()
    result = compress(model, 100.0)  # nothing pruned
    assert [type(m).__name__ for m in result.model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)


def test_a_float64_model_compresses_like_its_float32_copy():
    torch.manual_seed(0)
    model = nn.Sequential(bclib.Conv2dGroupNJ(1, 4, 3), nn.ReLU(), nn.Flatten(), bclib.LinearGroupNJ(4 * 4 * 4, 3))
    with torch.no_grad():
        model[0].weight_logvar.fill_(-6.0)
    single = compress(model.eval(), -2.0, input_shape=(1, 6, 6))
    double = compress(model.double().eval(), -2.0, input_shape=(1, 6, 6))
    assert double.report.to_dict() == single.report.to_dict()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(double.model(x.float()).double(), model(x), atol=1e-5)


# ----------------------------------------------------------------------------- pruning a compressed network further
# Log alphas of small_conv_net's layers for the tests of pruning further: at thresholds 0 the net is 1-2-3.
SMALL_CONV_LOG_ALPHA = [torch.tensor([-30.0, 2, -30]),
                        torch.tensor([-30.0, -29, 2, 2, -30, -30, -30, -30, 2, 2, 2, 2]),
                        torch.tensor([-30.0, 2, -25, -30])]


def _base_and_its_file(base, tmp_path):
    """``base`` and the same network read back from its file (which has no masks)."""
    from bclib.compression import CompressedModel

    base.save(tmp_path / "base.bcz")
    return base, CompressedModel.from_file(tmp_path / "base.bcz", base.report.to_dict())


def test_prune_further_by_hand_on_the_small_conv_net(tmp_path):
    """At thresholds 0 the net is 1-2-3 (above). With fc1's threshold at -29.5 only position 0 of
    channel 0 has a log alpha below it (position 1 has -29); with fc2's at -27 its input 2 (-25)
    goes: fc1 outputs 0 and 3 are left. Bits stay 8, 6, 1."""
    from bclib.compression import prune_further

    model, log_alpha = small_conv_net(), SMALL_CONV_LOG_ALPHA
    base = compress(model, 0.0)
    for start in _base_and_its_file(base, tmp_path):
        deeper = prune_further(start, model, log_alpha, [0.0, -29.5, -27.0])
        report = deeper.report
        assert report.architecture == "1-1-2"
        assert [(r.weights_kept, r.weights_nonzero, r.bits) for r in report.layers] == [(9, 9, 8), (2, 2, 6), (4, 4, 1)]
        assert report.compression_pruning == pytest.approx(83 / 15)
        # e = 2 for the -0.3 of fc2, stored as -0.5 on its 1-bit grid, whether cut or read back from the file.
        e = 2
        assert report.exponent_bits == e
        assert report.compression_precision == pytest.approx(32 * 83 / (9 * (9 + e) + 2 * (7 + e) + 4 * (2 + e)))
        conv, fc1, fc2 = (m for m in deeper.model if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert tuple(fc1.weight.shape) == (2, 4) and tuple(fc2.weight.shape) == (2, 2)
        expected_fc1 = torch.zeros(2, 4)
        expected_fc1[:, 0] = model[4].weight_mu.detach()[[0, 3], 0]
        expected_fc2 = model[6].weight_mu.detach()[:, [0, 3]]
        if start is not base:  # read back from the file: the weights are on the grids
            expected_fc1 = quantize(expected_fc1, 6) * 2.0**-6
            expected_fc2 = quantize(expected_fc2, 1) * 2.0**-1
        assert torch.equal(fc1.weight, expected_fc1) and torch.equal(fc2.weight, expected_fc2)
        assert torch.equal(fc1.bias, model[4].bias_mu.detach()[[0, 3]] if start is base
                           else model[4].bias_mu.detach()[[0, 3]].half().float())
    assert base.report.architecture == "1-2-3"  # left unchanged


def test_prune_to_groups_by_hand_on_the_small_conv_net(tmp_path):
    """The log alphas of the test above, at thresholds 0 the net is 1-2-3. To keep at most 1, 1, 2 groups:
    the conv keeps its one channel (threshold 0 stays); fc1 keeps the lower of positions 0 (-30) and
    1 (-29), its threshold midway, -29.5; fc2 keeps the two lowest of its surviving inputs 0 (-30),
    2 (-25), 3 (-30): 0 and 3, threshold -27.5. Asking for more groups than survive changes nothing."""
    from bclib.compression import prune_to_groups

    model, log_alpha = small_conv_net(), SMALL_CONV_LOG_ALPHA
    base = compress(model, 0.0)
    for start in _base_and_its_file(base, tmp_path):
        cut = prune_to_groups(start, model, log_alpha, [1, 1, 2])
        assert cut.report.architecture == "1-1-2"
        assert [row.threshold for row in cut.report.layers] == [0.0, -29.5, -27.5]
        assert torch.equal(cut.surviving_groups("6"), torch.tensor([True, False, False, True]))
        same = prune_to_groups(start, model, log_alpha, [3, 12, 4])
        assert same.report.architecture == "1-2-3" and [row.threshold for row in same.report.layers] == [0.0] * 3
    assert base.report.architecture == "1-2-3"  # left unchanged


@pytest.mark.parametrize("groups, error", [([1, 1], ValueError), ([1, 0, 2], ValueError), ([1, 1.0, 2], TypeError),
                                           ([1, True, 2], TypeError), ("112", ValueError), (3, ValueError)])
def test_prune_to_groups_names_the_argument_and_what_it_expects(groups, error):
    from bclib.compression import prune_to_groups

    model = small_conv_net()
    log_alpha = [torch.zeros(3), torch.zeros(12), torch.zeros(4)]
    with pytest.raises(error, match=r"groups must hold one positive int per Bayesian layer \(3: "):
        prune_to_groups(compress(model, 1.0), model, log_alpha, groups)


def test_prune_to_groups_takes_numpy_integers():
    """As in the test by hand above: at most 1, 1, 2 groups give 1-1-2."""
    from bclib.compression import prune_to_groups

    model = small_conv_net()
    groups = np.array([1, 1, 2])  # its entries are np.int64
    cut = prune_to_groups(compress(model, 0.0), model, SMALL_CONV_LOG_ALPHA, list(groups))
    assert cut.report.architecture == "1-1-2"


def test_prune_to_groups_refuses_per_weight_log_alphas_naming_the_layer():
    from bclib.compression import prune_to_groups

    model = nn.Sequential(bclib.LinearSVD(6, 10), nn.ReLU(), bclib.LinearSVD(10, 4)).eval()
    log_alpha = [layer.log_alpha().detach() for _, layer in bclib.bayesian_layers(model)]  # 60 and 40 values
    with pytest.raises(ValueError, match=r"log_alpha for '0' must hold one value per group \(6: .* got 60"):
        prune_to_groups(compress(model, 3.0), model, log_alpha, [3, 5])


@pytest.mark.parametrize("build", [models.lenet_300_100, models.lenet5_caffe])
@pytest.mark.parametrize("prior", ["nj", "hs", "svd"])
def test_prune_further_gives_what_compress_gives_at_the_lower_thresholds(build, prior, tmp_path):
    """Two routes to the same network: compress the Bayesian model at the lower thresholds directly,
    or compress it at the higher ones, save, read back and prune further. Architecture, masks, every
    report field and (on the grids) every prediction agree; only the bits are the first file's."""
    from bclib.compression import CompressedModel, prune_further

    torch.manual_seed(3)
    model = build(prior)
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            if prior == "nj":
                layer.z_logvar.uniform_(-10.0, 2.0)
            elif prior == "hs":
                layer.za_logvar.uniform_(-6.0, 3.0)
            else:
                layer.weight_logvar.uniform_(-14.0, 4.0)
    layers = [layer for _, layer in bclib.bayesian_layers(model)]
    log_alpha = [layer.log_alpha().detach() for layer in layers]
    high = [float(la.quantile(0.8)) for la in log_alpha]
    low = [float(la.quantile(0.5)) for la in log_alpha]
    base = compress(model, high)
    base.save(tmp_path / "base.bcz")
    read = CompressedModel.from_file(tmp_path / "base.bcz", base.report.to_dict())
    bits = [row.bits for row in base.report.layers]
    direct = compress(model, low).with_bits(bits)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    for start in (base, read):
        deeper = prune_further(start, model, log_alpha, low)
        assert deeper.report.compression_sparse > base.report.compression_sparse
        got, expected = deeper.report.to_dict(), direct.report.to_dict()
        if start is read:
            # On the file's grids the largest surviving weight, hence the exponent, may differ.
            largest = max(float(m.weight.detach().abs().max()) for m in deeper.reduced_precision_model()
                          if isinstance(m, (nn.Linear, nn.Conv2d)))
            assert got["exponent_bits"] == exponent_bits(largest)
            for report in (got, expected):
                for key in ("exponent_bits", "compression_precision", "compression_sparse_precision"):
                    del report[key]
        assert got == expected
        assert deeper.masks.keys() == direct.masks.keys()
        assert all(torch.equal(deeper.masks[k][0], direct.masks[k][0]) for k in direct.masks)
        assert torch.equal(deeper.reduced_precision_model()(x), direct.reduced_precision_model()(x))
        assert deeper.file_bytes() == direct.file_bytes()
    assert torch.equal(prune_further(base, model, log_alpha, low).model(x), direct.model(x))


def test_prune_further_carries_batchnorm_statistics():
    from bclib.compression import prune_further

    torch.manual_seed(4)
    model = models.vgg_cifar("nj", width=0.0625)
    _randomise_batchnorm(model)
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            layer.z_logvar.uniform_(-10.0, 2.0)
    log_alpha = [layer.log_alpha().detach() for _, layer in bclib.bayesian_layers(model)]
    low = [float(la.quantile(0.6)) for la in log_alpha]
    base = compress(model, [float(la.max()) + 1 for la in log_alpha])
    deeper = prune_further(base, model, log_alpha, low)
    direct = compress(model, low).with_bits([row.bits for row in base.report.layers])
    x = torch.randn(4, 3, 32, 32)
    assert deeper.report.to_dict() == direct.report.to_dict()
    assert torch.equal(deeper.model(x), direct.model(x))


def test_prune_further_rejects_what_it_cannot_do():
    from bclib.compression import prune_further

    model = small_conv_net()
    log_alpha = [layer.log_alpha().detach() for _, layer in bclib.bayesian_layers(model)]
    base = compress(model, -1.0)
    with pytest.raises(TypeError, match="compressed must be a CompressedModel"):
        prune_further(base.model, model, log_alpha, -2.0)
    with pytest.raises(ValueError, match=r"threshold for '4' is 0.0, above -1.0"):
        prune_further(base, model, log_alpha, [-1.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="one tensor per Bayesian layer"):
        prune_further(base, model, log_alpha[:2], -2.0)
    with pytest.raises(ValueError, match=r"unknown names \['9'\], missing \['6'\]"):
        prune_further(base, model, {"0": log_alpha[0], "4": log_alpha[1], "9": log_alpha[2]}, -2.0)
    with pytest.raises(ValueError, match=r"log_alpha for '4' must have the shape of its log_alpha\(\), \(12,\)"):
        prune_further(base, model, [log_alpha[0], log_alpha[1][:5], log_alpha[2]], -2.0)
    with pytest.raises(ValueError, match="log_alpha or architecture is not the one compressed was pruned by"):
        prune_further(base, model, [torch.full((3,), -100.0), log_alpha[1], log_alpha[2]], -2.0)
    # Same counts, other groups: fc1's kept positions 0, 1 swapped with the dead 2, 3.
    swapped = log_alpha[1].clone()
    swapped[[0, 1, 2, 3]] = log_alpha[1][[2, 3, 0, 1]]
    with pytest.raises(ValueError, match="compressed keeps weights that log_alpha at compressed's thresholds prunes"):
        prune_further(base, model, [log_alpha[0], swapped, log_alpha[2]], -2.0)
    # A threshold equal to the file's in float32 is not "above" it.
    assert prune_further(base, model, log_alpha, np.float32(-1.0)).report.architecture == base.report.architecture
    with pytest.raises(ValueError, match="not the network it was compressed from"):
        prune_further(base, nn.Sequential(bclib.LinearGroupNJ(36, 2)), [torch.zeros(36)], -2.0)


def test_surviving_groups_by_hand_on_the_small_conv_net(tmp_path):
    """Thresholds 0 (above): conv filter 0 only; fc1 inputs 0 and 1 (channel 0's first positions);
    fc2 inputs 0, 2 and 3."""
    from bclib.compression import CompressedModel

    result = compress(small_conv_net(), 0.0)
    assert result.surviving_groups("0").tolist() == [True, False, False]
    assert result.surviving_groups("4").tolist() == [True, True] + [False] * 10
    assert result.surviving_groups("6").tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match=r"name must be a layer of masks \['0', '4', '6'\], got '5'"):
        result.surviving_groups("5")
    result.save(tmp_path / "net.bcz")
    with pytest.raises(ValueError, match="a network read from a file has no masks"):
        CompressedModel.from_file(tmp_path / "net.bcz", result.report.to_dict()).surviving_groups("0")


def test_a_float64_network_is_swept_and_selected_on_float64_data():
    # compress exports float32 whatever the network's dtype; the sweep scores those exports on the
    # float64 inputs it was given (a dtype mismatch in the products before).
    torch.manual_seed(0)
    net = nn.Sequential(bclib.LinearGroupNJ(6, 10), nn.ReLU(), bclib.LinearGroupNJ(10, 3)).double().eval()
    with torch.no_grad():
        net[0].z_logvar[:3] = PRUNE
    x, y = torch.randn(200, 6, dtype=torch.float64), torch.randint(0, 3, (200,))
    grid = [-1.0, 100.0]
    for row, thresholds in zip(threshold_sweep(net, grid, x, y), grid):
        exported = compress(net, thresholds).model  # scored here on a float32 copy of the inputs
        assert row["error"] == int((exported(x.float()).argmax(1) != y).sum()) / len(y)
    assert len(bclib.compression.select_thresholds(net, x, y)) == 2


def test_a_linear_layer_applied_per_position_before_a_flatten_is_refused():
    # Its units are the last dimension of (4, 4): a flatten lays them out interleaved, not in the
    # blocks per unit the masks assume. With 4 positions and 4 units the shapes agreed, and the export
    # silently computed another function.
    model = nn.Sequential(bclib.LinearGroupNJ(6, 4), nn.ReLU(), nn.Flatten(), bclib.LinearGroupNJ(16, 3)).eval()
    with pytest.raises(TypeError, match=r"layer '0' is a linear layer applied along the last dimension of \(4, 6\)"):
        compress(model, -1.0, input_shape=(4, 6))


def test_fine_tune_on_float64_data_trains_as_on_its_float32_copy():
    # The export of any network is float32; float64 splits are cast to it (a dtype mismatch before).
    from bclib.compression import fine_tune
    from bclib.data import TensorSplit
    from bclib.train import TrainConfig

    torch.manual_seed(0)
    net = nn.Sequential(bclib.LinearGroupNJ(6, 10), nn.ReLU(), bclib.LinearGroupNJ(10, 3)).double().eval()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    config = TrainConfig(epochs=2, batch_size=16, device="cpu")
    histories = []
    for inputs in (x, x.float()):
        split = TensorSplit(inputs, y)
        _, history = fine_tune(compress(net, 0.0), split, split, config, progress=False)
        histories.append([{k: v for k, v in row.items() if k != "seconds"} for row in history])
    assert histories[0] == histories[1]
