"""Tests of :mod:`bclib.models`: the paper's architectures (parameter counts worked out by hand),
every prior builds and runs, the eval forward is the architecture written out here with
torch.nn.functional, bad names are rejected, and a Bayesian copy started from a pretrained
deterministic network computes the same function in eval mode.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
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


# The architectures as the paper states them (method.md, section 4), written out here layer by layer.
def _lenet_300_100_by_hand(x, layers):
    """784-300-100-10 with ReLU."""
    (w1, b1), (w2, b2), (w3, b3) = layers
    assert [tuple(w.shape) for w in (w1, w2, w3)] == [(300, 784), (100, 300), (10, 100)]
    h = F.relu(F.linear(x.flatten(1), w1, b1))
    h = F.relu(F.linear(h, w2, b2))
    return F.linear(h, w3, b3)


def _lenet5_caffe_by_hand(x, layers):
    """conv 20@5x5 - maxpool 2 - conv 50@5x5 - maxpool 2 - fc 800->500 - fc 500->10, ReLU after each
    hidden layer."""
    (c1, d1), (c2, d2), (w1, b1), (w2, b2) = layers
    assert [tuple(w.shape) for w in (c1, c2, w1, w2)] == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    h = F.max_pool2d(F.relu(F.conv2d(x, c1, d1)), 2)  # 28 -> 24 -> 12
    h = F.max_pool2d(F.relu(F.conv2d(h, c2, d2)), 2)  # 12 -> 8 -> 4: 50 * 4 * 4 = 800 features
    h = F.relu(F.linear(h.flatten(1), w1, b1))
    return F.linear(h, w2, b2)


# VGG-16's 13 convolutions at width 1/8 (64 -> 8 channels ... 512 -> 64), "M" a 2x2 max pooling.
SMALL_VGG = (8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M")


def _batch_norm_by_hand(h, norm):
    """Eval-mode BatchNorm: (h - running mean) / sqrt(running var + 1e-5) * gamma + beta, per channel."""
    mean, var, gamma, beta = (t.view(1, -1, *[1] * (h.dim() - 2)) for t in norm)
    return (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta


def _small_vgg_by_hand(x, layers, norms):
    """Each conv 3x3 (padding 1) followed by BatchNorm and ReLU; then fc 64 - BatchNorm - ReLU - fc 10."""
    layers, norms = iter(layers), iter(norms)
    h, channels = x, 3
    for item in SMALL_VGG:
        if item == "M":
            h = F.max_pool2d(h, 2)
            continue
        weight, bias = next(layers)
        assert tuple(weight.shape) == (item, channels, 3, 3)
        h = F.relu(_batch_norm_by_hand(F.conv2d(h, weight, bias, padding=1), next(norms)))
        channels = item
    h = h.flatten(1)  # 32 / 2**5 = 1 pixel left: 64 features
    (w1, b1), (w2, b2) = layers
    assert [tuple(w.shape) for w in (w1, w2)] == [(64, 64), (10, 64)]
    h = F.relu(_batch_norm_by_hand(F.linear(h, w1, b1), next(norms)))
    return F.linear(h, w2, b2)


def _mean_weight_and_bias(layer):
    """A deterministic layer's weight and bias; for group normal-Jeffreys the posterior mean
    E[w] = z_mu * mu, with z one per input unit of a linear layer and per output channel of a conv."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer.weight, layer.bias
    if isinstance(layer, bclib.LinearGroupNJ):
        return layer.weight_mu * layer.z_mu[None, :], layer.bias_mu
    return layer.weight_mu * layer.z_mu[:, None, None, None], layer.bias_mu


@pytest.mark.parametrize("prior", [None, "nj"])
@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg"])
def test_eval_forward_is_the_architecture_written_out_by_hand(name, prior):
    torch.manual_seed(0)
    model = build_model(name, prior, **({"width": 0.125} if name == "vgg" else {}))
    _randomise_batchnorm(model)
    weighted_types = (nn.Linear, nn.Conv2d, bclib.LinearGroupNJ, bclib.Conv2dGroupNJ)
    weighted = [m for m in model.modules() if isinstance(m, weighted_types)]
    with torch.no_grad():
        for layer in weighted:
            if prior == "nj":  # scales far from their start at 1, so that E[w] depends on them
                layer.z_mu.uniform_(0.5, 1.5)
        layers = [_mean_weight_and_bias(layer) for layer in weighted]
        x = torch.randn(4, *model.input_shape)
        if name == "lenet300":
            expected = _lenet_300_100_by_hand(x, layers)
        elif name == "lenet5":
            expected = _lenet5_caffe_by_hand(x, layers)
        else:
            norms = [(m.running_mean, m.running_var, m.weight, m.bias) for m in model.modules()
                     if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
            expected = _small_vgg_by_hand(x, layers, norms)
        got = model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


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
    with pytest.raises(ValueError, match="pretrained has 3 linear/conv layers, model 'lenet5' has 4"):
        bayesian_from_pretrained("lenet5", "nj", lenet_300_100(None))
    # The same linear and conv layers without BatchNorm: the statistics would be left at their start.
    plain = nn.Sequential(*(m for m in vgg_cifar(None, width=0.25) if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))))
    with pytest.raises(ValueError, match=r"pretrained has 0 BatchNorm layers, model 'vgg' has \d+"):
        bayesian_from_pretrained("vgg", "nj", plain, width=0.25)
    with pytest.raises(ValueError, match="prior must be 'nj', 'hs' or 'svd' .*, got None"):
        bayesian_from_pretrained("lenet300", None, lenet_300_100(None))
    with pytest.raises(TypeError, match="pretrained must be the deterministic network .*, got OrderedDict"):
        bayesian_from_pretrained("lenet300", "nj", lenet_300_100(None).state_dict())


# ----------------------------------------------------------------------------- any network -> Bayesian
class _Block(nn.Module):
    """A custom module with a skip connection and a layer held in a ModuleDict: not a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, bias=False)
        self.branch = nn.ModuleDict({"wide": nn.Conv2d(4, 4, 3, padding="same", dilation=2)})
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return h + self.branch["wide"](h)


def _custom_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), nn.Flatten(), nn.Linear(4 * 5 * 5, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so copying them matters
        net[0].norm.running_mean.uniform_(-1, 1)
        net[0].norm.running_var.uniform_(0.5, 2)
    return net.eval()


@pytest.mark.parametrize("prior", ["nj", "hs", "svd"])
def test_to_bayesian_converts_every_layer_and_keeps_the_function(prior):
    net = _custom_net()
    bayes = bclib.to_bayesian(net, prior)
    linear, conv = LAYER_TYPES[prior]
    converted = {name: type(m) for name, m in bayes.named_modules()}
    assert converted["0.conv"] is conv and converted["0.branch.wide"] is conv
    assert converted["2"] is linear and converted["4"] is linear
    assert converted["0.norm"] is nn.BatchNorm2d and not bayes.training
    assert bayes[0].conv.posterior_bias() is None and bayes[0].branch["wide"].posterior_bias() is not None
    assert bayes[0].branch["wide"].padding == (2, 2) and bayes[0].conv.stride == (2, 2)
    # The original is untouched, and in eval mode the copy computes what it computes.
    assert type(net[2]) is nn.Linear and type(net[0].conv) is nn.Conv2d
    x = torch.randn(8, 3, 10, 10)
    assert torch.allclose(bayes(x), net(x), atol=1e-5)
    # It trains: a stochastic forward, a KL, and gradients on the variational parameters.
    bayes.train()
    loss = bayes(x).pow(2).mean() + bclib.kl_divergence(bayes) / 1000
    loss.backward()
    assert bclib.kl_divergence(bayes) > 0
    assert all(p.grad is not None for _, layer in bclib.bayesian_layers(bayes) for p in layer.parameters())


def test_to_bayesian_keeps_excluded_layers_and_can_be_compressed():
    net = lenet_300_100(None).eval()
    bayes = bclib.to_bayesian(net, "nj", exclude=["5"], clip_var=0.04).eval()
    assert type(bayes[5]) is nn.Linear and [m.clip_var for _, m in bclib.bayesian_layers(bayes)] == [0.04, 0.04]
    x = torch.rand(16, 1, 28, 28)
    assert torch.allclose(bayes(x), net(x), atol=1e-5)
    full = bclib.to_bayesian(net, "nj").eval()
    result = bclib.compress(full, [10.0, 10.0, 10.0])  # keeps everything: the export is the network again
    assert result.report.architecture == "784-300-100"
    assert torch.allclose(result.model(x), net(x), atol=1e-5)


def test_to_bayesian_shares_one_horseshoe_scale_when_asked():
    bayes = bclib.to_bayesian(_custom_net(), "hs", shared_scale=True, tau0=1e-3)
    scales = {id(layer.global_scale) for _, layer in bclib.bayesian_layers(bayes)}
    assert len(scales) == 1 and bayes[2].tau0 == 1e-3
    alone = bclib.to_bayesian(_custom_net(), "hs")
    assert len({id(layer.global_scale) for _, layer in bclib.bayesian_layers(alone)}) == 4


def test_to_bayesian_keeps_the_dtype_and_the_training_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().train()
    bayes = bclib.to_bayesian(net, "nj")
    assert bayes.training and all(layer.training for _, layer in bclib.bayesian_layers(bayes))
    assert {p.dtype for p in bayes.parameters()} == {torch.float64}
    x = torch.randn(5, 3, dtype=torch.float64)
    # float64 throughout: the posterior mean starts at the float64 weights, not a float32 rounding of them
    assert torch.allclose(bayes.eval()(x), net.eval()(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("prior", ["nj", "hs", "svd"])
def test_to_bayesian_keeps_a_tied_layer_tied(prior):
    shared, head = nn.Linear(6, 6), nn.Linear(6, 2)
    net = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), head).eval()
    bayes = bclib.to_bayesian(net, prior)
    assert isinstance(bayes[0], LAYER_TYPES[prior][0]) and bayes[0] is bayes[2] and bayes[4] is not bayes[0]
    assert len(list(bclib.bayesian_layers(bayes))) == 2  # the KL counts the tied layer once
    x = torch.randn(4, 6)
    assert torch.allclose(bayes(x), net(x), atol=1e-6)
    kept = bclib.to_bayesian(net, prior, exclude=["2"])  # excluded under one of its names: kept everywhere
    assert type(kept[0]) is nn.Linear and kept[0] is kept[2] and isinstance(kept[4], LAYER_TYPES[prior][0])


def test_to_bayesian_converts_a_single_layer():
    layer = nn.Linear(5, 2)
    bayes = bclib.to_bayesian(layer, "svd").eval()
    assert isinstance(bayes, bclib.LinearSVD)
    x = torch.randn(3, 5)
    assert torch.allclose(bayes(x), layer(x), atol=1e-6)


def test_to_bayesian_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match=r"prior must be one of \('nj', 'hs', 'svd'\), got None"):
        bclib.to_bayesian(nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="module must be an nn.Module, got str"):
        bclib.to_bayesian("lenet", "nj")
    with pytest.raises(ValueError, match=r"exclude names layers that module does not have: \['head'\]"):
        bclib.to_bayesian(_custom_net(), "nj", exclude=["head"])
    with pytest.raises(ValueError, match="layer '1': .*groups=2"):
        bclib.to_bayesian(nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2)), "nj")
    with pytest.raises(ValueError, match="layer '0': .*padding_mode='reflect'"):
        bclib.to_bayesian(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "hs")
    with pytest.raises(ValueError, match="layer '0': padding='same' with kernel \\(2, 2\\)"):
        bclib.to_bayesian(nn.Sequential(nn.Conv2d(1, 2, 2, padding="same")), "nj")
    # A string would be read as its letters ("10" as layers "1" and "0"): refused.
    with pytest.raises(TypeError, match=r"exclude must be a collection of layer names, e\.g\. \['10'\]"):
        bclib.to_bayesian(nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)]), "nj", exclude="10")
    with pytest.raises(ValueError, match="tau0 and shared_scale set the horseshoe's global scale.*prior 'nj'"):
        bclib.to_bayesian(nn.Linear(2, 2), "nj", tau0=1e-3)
    # Excluded, an inexpressible convolution is simply kept.
    kept = bclib.to_bayesian(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()), "nj", exclude=["0"])
    assert type(kept[0]) is nn.Conv2d


def test_to_bayesian_checks_every_argument_before_converting():
    """A list as prior (unhashable), exclude=None (none excluded), and clip_var / tau0 in a network
    without a layer to convert, where no layer constructor would see them."""
    with pytest.raises(ValueError, match=r"prior must be one of \('nj', 'hs', 'svd'\), got \['nj'\]"):
        bclib.to_bayesian(nn.Linear(2, 2), ["nj"])
    assert isinstance(bclib.to_bayesian(nn.Sequential(nn.Linear(2, 2)), "nj", exclude=None)[0], bclib.LinearGroupNJ)
    with pytest.raises(TypeError, match="exclude must be None or a collection of layer names, got 3"):
        bclib.to_bayesian(nn.Linear(2, 2), "nj", exclude=3)
    with pytest.raises(TypeError, match=r"exclude must hold layer names \(strings\), got \[0\]"):
        bclib.to_bayesian(nn.Sequential(nn.Linear(2, 2)), "nj", exclude=[0])
    no_layers = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="clip_var must be a positive finite number, got -1"):
        bclib.to_bayesian(no_layers, "nj", clip_var=-1)
    with pytest.raises(TypeError, match="tau0 must be a positive number or None, got 'big'"):
        bclib.to_bayesian(no_layers, "hs", tau0="big")


def test_to_bayesian_warns_about_convolutions_it_leaves_deterministic():
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))
    with pytest.warns(UserWarning, match=r"leaves these layers deterministic .*: 0 \(Conv1d\)"):
        bayes = bclib.to_bayesian(net, "nj")
    assert type(bayes[0]) is nn.Conv1d and isinstance(bayes[2], bclib.LinearGroupNJ)

    class MyLinear(nn.Linear):  # a subclass is not converted (its own forward may differ): said, not silent
        pass

    custom = nn.Sequential(nn.Flatten(), MyLinear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"deterministic .*: 1 \(MyLinear\)$"):
        bayes = bclib.to_bayesian(custom, "nj")
    assert type(bayes[1]) is MyLinear and isinstance(bayes[3], bclib.LinearGroupNJ)
    attention = nn.MultiheadAttention(4, 2)  # its output projection is a Linear subclass attention reads itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bclib.to_bayesian(nn.Sequential(attention), "nj")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bclib.to_bayesian(net, "nj", exclude=["0"])  # excluded on purpose: no warning


def test_to_bayesian_excludes_every_layer_of_an_excluded_container():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    bayes = bclib.to_bayesian(net, "nj", exclude=["1"])  # the name was accepted and did nothing
    assert isinstance(bayes[0], bclib.LinearGroupNJ)
    assert [type(m) for m in bayes[1]] == [nn.Linear, nn.ReLU, nn.Linear]


def test_to_bayesian_refuses_a_weight_tied_across_modules():
    # Two modules holding one Parameter (a head tied to an embedding): a Bayesian copy would untie
    # them silently (the parameters went from 3 to 12 here).
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match=r"layer '0' shares its weight with '2'.*pass '0' and the layers sharing"):
        bclib.to_bayesian(nn.Sequential(first, nn.Tanh(), second), "nj")
    kept = bclib.to_bayesian(nn.Sequential(first, nn.Tanh(), second), "nj", exclude=["0", "2"])
    assert kept[0].weight is kept[2].weight
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    with pytest.raises(ValueError, match=r"layer '1' shares its weight with '0'"):
        bclib.to_bayesian(nn.Sequential(embedding, head), "nj")


def test_to_bayesian_leaves_the_feed_forward_of_torch_transformer_layers_with_a_warning():
    # Their eval-mode fast path reads linear1.weight / linear2.weight: converted, eval failed.
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.warns(UserWarning, match=r"transformer layers read their weights directly .*: linear1, linear2"):
        bayes = bclib.to_bayesian(layer, "nj").eval()
    assert type(bayes.linear1) is nn.Linear and type(bayes.linear2) is nn.Linear
    x = torch.randn(2, 3, 8)
    assert torch.allclose(bayes(x), layer.eval()(x), atol=1e-6)
    decoder = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)  # no such fast path: converted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bayes = bclib.to_bayesian(decoder, "nj").eval()
    assert isinstance(bayes.linear1, bclib.LinearGroupNJ) and isinstance(bayes.linear2, bclib.LinearGroupNJ)
    memory = torch.randn(2, 4, 8)
    assert torch.allclose(bayes(x, memory), decoder.eval()(x, memory), atol=1e-5)
    # A weight a parametrisation computes (spectral norm) belongs to no module: converted, not a KeyError.
    normed = nn.utils.spectral_norm(nn.Linear(4, 3))
    assert isinstance(bclib.to_bayesian(nn.Sequential(normed), "nj")[0], bclib.LinearGroupNJ)


@pytest.mark.parametrize("builder", [lenet_300_100, lenet5_caffe, vgg_cifar])
def test_horseshoe_settings_are_refused_where_they_would_be_ignored(builder):
    # Given for a prior without a global scale, or a tau0 of zero, they must not pass silently.
    for prior in ("nj", "svd", None):
        with pytest.raises(ValueError, match="tau0 and shared_scale set the horseshoe's global scale"):
            builder(prior, tau0=1e-3)
        with pytest.raises(ValueError, match="tau0 and shared_scale set the horseshoe's global scale"):
            builder(prior, shared_scale=True)
    for shared in (False, True):
        with pytest.raises(ValueError, match="tau0 must be a positive finite number, got 0"):
            builder("hs", tau0=0, shared_scale=shared)
    with pytest.raises(TypeError, match="shared_scale must be True or False, got 1"):
        builder("hs", shared_scale=1)


def test_horseshoe_tau0_reaches_every_layer_whether_shared_or_not():
    per_layer = [layer.tau0 for _, layer in bclib.bayesian_layers(lenet5_caffe("hs", tau0=1e-3))]
    shared = {id(layer.global_scale) for _, layer in bclib.bayesian_layers(lenet5_caffe("hs", tau0=1e-3,
                                                                                         shared_scale=True))}
    assert per_layer == [1e-3] * 4
    assert len(shared) == 1
    assert lenet5_caffe("hs", tau0=1e-3, shared_scale=True)[0].global_scale.tau0 == 1e-3


def test_a_state_dict_of_per_layer_scales_does_not_load_into_a_shared_scale():
    torch.manual_seed(0)
    per_layer, shared = lenet5_caffe("hs"), lenet5_caffe("hs", shared_scale=True)
    with pytest.raises(RuntimeError, match="other values under '.*' than under '.*': this state_dict holds one "
                                           r"scale per layer \(shared_scale=False\), the network one shared scale"):
        shared.load_state_dict(per_layer.state_dict())
    # One shared scale's copies agree: it loads into a shared-scale network, and into one scale per layer
    # (each layer then starts from the shared values), repeatedly.
    source = lenet5_caffe("hs", shared_scale=True)
    for target in (shared, shared, per_layer):
        target.load_state_dict(source.state_dict())
        for _, layer in bclib.bayesian_layers(target):
            assert torch.equal(layer.global_scale.sb_mu, source[0].global_scale.sb_mu)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"width": 0}, ValueError, "width must be a positive number, got 0"),
    ({"width": -1.0}, ValueError, "width must be a positive number, got -1.0"),
    ({"width": "a"}, ValueError, "width must be a positive number, got 'a'"),
    ({"num_classes": 0}, ValueError, "num_classes must be a positive int, got 0"),
    ({"num_classes": 2.0}, TypeError, "num_classes must be a positive int, got float"),
])
def test_vgg_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        vgg_cifar("nj", **kwargs)
