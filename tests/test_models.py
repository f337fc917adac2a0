"""Tests of :mod:`bclib.models`: the paper's architectures (parameter counts worked out by hand),
every prior builds and runs, bad names are rejected, and a Bayesian copy started from a pretrained
deterministic network computes the same function in eval mode.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bclib
from bclib.models import bayesian_from_pretrained, build_model, lenet5_caffe, lenet_300_100, vgg_cifar

PRIORS = ["nj", "hs", "svd", None]
LAYER_TYPES = {
    "nj": (bclib.LinearGroupNJ, bclib.Conv2dGroupNJ),
    "hs": (bclib.LinearGroupHS, bclib.Conv2dGroupHS),
    "svd": (bclib.LinearSVD, bclib.Conv2dSVD),
    None: (nn.Linear, nn.Conv2d),
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet_300_100_parameter_count_by_hand():
    # 784*300 + 300 + 300*100 + 100 + 100*10 + 10
    assert _count(lenet_300_100(None)) == 235_200 + 300 + 30_000 + 100 + 1_000 + 10 == 266_610


def test_lenet5_caffe_parameter_count_by_hand():
    # conv1 20*1*5*5 + 20, conv2 50*20*5*5 + 50, fc1 800*500 + 500, fc2 500*10 + 10
    assert _count(lenet5_caffe(None)) == 520 + 25_050 + 400_500 + 5_010 == 431_080


def test_lenet_layer_geometry():
    """Weight shapes of the paper's architectures, in order (the flatten of LeNet-5 gives 50*4*4 = 800)."""
    shapes300 = [tuple(m.weight.shape) for m in lenet_300_100(None).modules() if isinstance(m, nn.Linear)]
    assert shapes300 == [(300, 784), (100, 300), (10, 100)]
    shapes5 = [tuple(m.weight.shape) for m in lenet5_caffe(None).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert shapes5 == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    assert [tuple(layer.weight_shape) for _, layer in bclib.bayesian_layers(lenet5_caffe("nj"))] == shapes5


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("builder", [lenet_300_100, lenet5_caffe])
def test_lenet_builds_and_runs_for_every_prior(builder, prior):
    model = builder(prior)
    assert model.input_shape == (1, 28, 28)
    linear_type, conv_type = LAYER_TYPES[prior]
    weighted = [m for m in model.modules() if isinstance(m, (linear_type, conv_type))]
    assert len(weighted) == (3 if builder is lenet_300_100 else 4)
    if prior is not None:
        assert len(list(bclib.bayesian_layers(model))) == len(weighted)
    x = torch.randn(3, *model.input_shape)
    for mode in (True, False):
        out = model.train(mode)(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("prior", PRIORS)
def test_vgg_small_copy_builds_and_runs_for_every_prior(prior):
    model = vgg_cifar(prior, width=0.125)
    assert model.input_shape == (3, 32, 32)
    convs = [m for m in model.modules() if isinstance(m, LAYER_TYPES[prior][1])]
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert (len(convs), len(norms), len(pools)) == (13, 14, 5)
    # width 0.125: 64 -> 8 channels in the first block, 512 -> 64 at the end and in the hidden fc layer.
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        out = model.train(mode)(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_vgg_width_scales_the_channels():
    model = vgg_cifar(None, width=0.125, num_classes=7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 64), (7, 64)]


def test_first_layer_of_lenet300_clips_its_variance_at_the_release_value():
    layers = [layer for _, layer in bclib.bayesian_layers(lenet_300_100("nj"))]
    assert [layer.clip_var for layer in layers] == [0.04, None, None]


@pytest.mark.parametrize("builder", [lenet_300_100, lenet5_caffe, vgg_cifar])
@pytest.mark.parametrize("prior", ["gaussian", "NJ", "", 1])
def test_invalid_prior_is_rejected(builder, prior):
    with pytest.raises(ValueError, match="prior"):
        builder(prior)


def test_build_model_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="model"):
        build_model("resnet", "nj")
    assert isinstance(build_model("lenet300", None), nn.Sequential)


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-default running statistics and affine parameters, so copying them is visible in the output."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=generator))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=generator))


@pytest.mark.parametrize("prior", ["nj", "hs", "svd"])
@pytest.mark.parametrize("name, kwargs", [("lenet300", {}), ("lenet5", {}), ("vgg", {"width": 0.125})])
def test_bayesian_from_pretrained_computes_the_same_function(name, kwargs, prior):
    deterministic = build_model(name, None, **kwargs)
    _randomise_batchnorm(deterministic)
    deterministic.eval()
    bayesian = bayesian_from_pretrained(name, prior, deterministic, **kwargs).eval()
    x = torch.randn(5, *deterministic.input_shape)
    with torch.no_grad():
        expected = deterministic(x)
        got = bayesian(x)
        # Independent of the start point: a freshly built Bayesian model computes something else.
        other = build_model(name, prior, **kwargs).eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (other - expected).abs().max() > 1e-2
    # The posterior mean of each layer is the pretrained weight.
    plain = [m for m in deterministic.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for source, (_, layer) in zip(plain, bclib.bayesian_layers(bayesian)):
        torch.testing.assert_close(layer.posterior_weight()[0], source.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.posterior_bias(), source.bias)


def test_bayesian_from_pretrained_rejects_another_architecture():
    with pytest.raises(ValueError, match="pretrained"):
        bayesian_from_pretrained("lenet5", "nj", lenet_300_100(None))
