"""Tests of bclib.layer_sequence: networks written as module classes with their own forward are
compressed like nn.Sequential ones. Exports are checked against the masked model's *own* forward
(not the chain read from it) and architectures against counts worked out by hand."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bclib
from bclib.compression import apply_masks, compress, prune_further, prune_to_groups, weight_masks
from bclib.layer_sequence import check_sequence, layer_sequence

KEEP, PRUNE = -30.0, 2.0  # z_logvar with z_mu = 1: log alpha is (almost exactly) this value


class ExampleNet(nn.Module):
    """The shape of PyTorch's own MNIST example (examples/mnist/main.py), smaller and Bayesian."""

    def __init__(self, conv=bclib.Conv2dGroupNJ, linear=bclib.LinearGroupNJ):
        super().__init__()
        self.conv1 = conv(1, 4, 3)
        self.conv2 = conv(4, 6, 3)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = linear(6 * 12 * 12, 16)
        self.fc2 = linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, 0.5, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def _set_groups(layer, pruned):
    with torch.no_grad():
        layer.z_mu.fill_(1.0)
        layer.z_logvar.fill_(KEEP)
        layer.z_logvar[pruned] = PRUNE


def _pruned_example_net():
    torch.manual_seed(0)
    net = ExampleNet()
    _set_groups(net.conv1, [0, 1])        # filters 2, 3 survive
    _set_groups(net.conv2, [5])           # filters 0-4 survive
    fc1_pruned = torch.zeros(6, 12, 12, dtype=torch.bool)
    fc1_pruned[3] = True                  # every position of conv2's channel 3: that channel is stranded
    fc1_pruned[0, :6] = True              # half the positions of channel 0: the channel stays
    _set_groups(net.fc1, fc1_pruned.flatten())
    _set_groups(net.fc2, list(range(10)))  # 6 of fc1's 16 outputs survive
    return net.eval()


def test_custom_forward_compresses_as_worked_out_by_hand(tmp_path):
    net = _pruned_example_net()
    result = compress(net, 0.0, input_shape=(1, 28, 28))
    rows = result.report.layers
    assert [row.name for row in rows] == ["conv1", "conv2", "fc1", "fc2"]
    # conv1 keeps filters 2, 3; conv2 keeps 0, 1, 2, 4 (5 by its group, 3 stranded by fc1);
    # fc1 keeps 4 channels x 144 positions minus the 72 pruned ones of channel 0; fc2 keeps 6 inputs.
    assert result.report.architecture == "2-4-504-6"
    assert [row.weights_kept for row in rows] == [2 * 9, 4 * 2 * 9, 504 * 6, 6 * 10]
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    masked = apply_masks(net, result.masks).eval()
    with torch.no_grad():
        expected = masked(x)  # the model's own forward, functional calls and all
        got = result.model(x)
    assert (got - expected).abs().max() <= 1e-4
    assert torch.allclose(got.exp().sum(1), torch.ones(64), atol=1e-5)  # log_softmax made it through
    assert isinstance(result.model[-1], nn.LogSoftmax) and result.model[-1].dim == 1
    path = tmp_path / "example.bcz"
    result.save(path)
    loaded = bclib.load_compressed(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.reduced_precision_model()(x))


def test_custom_forward_matches_the_same_network_as_sequential():
    net = _pruned_example_net()
    sequential = nn.Sequential(net.conv1, nn.ReLU(), net.conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
                               nn.Flatten(), net.fc1, nn.ReLU(), nn.Dropout(0.5), net.fc2, nn.LogSoftmax(dim=1))
    custom = compress(net, 0.0, input_shape=(1, 28, 28))
    plain = compress(sequential, [0.0] * 4, input_shape=(1, 28, 28))
    assert custom.report.to_dict()["layers"] == [
        {**row, "name": name} for row, name in zip(plain.report.to_dict()["layers"], ["conv1", "conv2", "fc1", "fc2"])]
    masks = weight_masks(net, {"conv1": 0.0, "conv2": 0.0, "fc1": 0.0, "fc2": 0.0}, input_shape=(1, 28, 28))
    assert list(masks) == ["conv1", "conv2", "fc1", "fc2"]
    assert int(masks["fc1"].sum()) == 504 * 6


def test_a_compiled_network_compresses_as_the_network_it_compiled():
    # The hand-worked example (above) through torch.compile's wrapper: the same rows and export, each
    # layer named as the wrapper's named_modules() names it; the functional calls keep their names.
    net = _pruned_example_net()
    compiled = torch.compile(net)
    names = [name for name, _ in layer_sequence(compiled)]
    assert names[:2] == ["_orig_mod.conv1", "forward:relu"]
    assert set(names) - {name for name, _ in compiled.named_modules()} == {n for n in names if n.startswith("forward:")}
    thresholds = {name: 0.0 for name, _ in bclib.bayesian_layers(compiled)}
    result = compress(compiled, thresholds, input_shape=(1, 28, 28))
    plain = compress(net, 0.0, input_shape=(1, 28, 28))
    assert result.report.to_dict()["layers"] == [
        {**row, "name": f"_orig_mod.{row['name']}"} for row in plain.report.to_dict()["layers"]]
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(result.model(x), plain.model(x))
    # the plain network's names for the compiled one, and the other way: the error says why they differ
    hint = "a torch.compile'd network's layer names start with '_orig_mod.'"
    with pytest.raises(ValueError, match=hint):
        compress(compiled, {name: 0.0 for name in ("conv1", "conv2", "fc1", "fc2")}, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=hint):
        compress(net, thresholds, input_shape=(1, 28, 28))


def test_prune_to_groups_takes_a_compiled_network_beside_its_plain_twin():
    # compress on the compiled wrapper names its layers "_orig_mod.*"; the plain network as the
    # architecture names them without: the cut is the same either way round.
    net = bclib.models.lenet_300_100("nj").eval()
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(net):
            layer.z_logvar.copy_(torch.linspace(-9, 2, layer.z_logvar.numel()))
    compiled = torch.compile(net)
    log_alpha = [layer.log_alpha().detach() for _, layer in bclib.bayesian_layers(net)]
    expected = prune_to_groups(compress(net, -1.0), net, log_alpha, [300, 50, 20]).report.architecture
    assert expected == "300-50-20"
    for base, architecture in ((compiled, net), (net, compiled)):
        assert prune_to_groups(compress(base, -1.0), architecture, log_alpha, [300, 50, 20]).report.architecture == expected


def test_prune_further_on_a_custom_forward():
    net = _pruned_example_net()
    with torch.no_grad():
        net.fc1.z_logvar[:144] = -1.0  # conv2's channel 0 now sits between the thresholds below
    base = compress(net, 0.0, input_shape=(1, 28, 28))
    log_alpha = [layer.log_alpha().detach() for _, layer in bclib.bayesian_layers(net)]
    deeper = prune_further(base, net, log_alpha, [0.0, 0.0, -5.0, 0.0])
    assert deeper.report.architecture == "2-3-432-6"  # channel 0 gone: 3 channels x 144 positions
    direct = compress(net, [0.0, 0.0, -5.0, 0.0], input_shape=(1, 28, 28)).with_bits(
        [row.bits for row in base.report.layers])
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(deeper.model(x), direct.model(x), atol=1e-5)


def test_to_bayesian_on_a_module_class_then_compress():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 5)
            self.fc = nn.Linear(3 * 12 * 12, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    plain = Plain().eval()
    model = bclib.to_bayesian(plain, "hs").eval()
    # Untrained, the log alphas sit near their start: each layer's median cuts about half its groups.
    medians = {name: float(layer.log_alpha().detach().median()) for name, layer in bclib.bayesian_layers(model)}
    result = compress(model, medians, input_shape=(1, 28, 28))
    assert [row.out_kept < row.out_total for row in result.report.layers] == [True, False]
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(apply_masks(model, result.masks)(x), result.model(x), atol=1e-4)
    assert [type(m) for m in result.model] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.Flatten, nn.Linear]


def test_functional_forms_become_their_modules():
    class Everything(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = bclib.Conv2dGroupHS(2, 4, 3, padding=1)
            self.fc = bclib.LinearSVD(4 * 3 * 3, 5)

        def forward(self, x):
            x = F.leaky_relu(self.conv(x), 0.2)
            x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
            x = F.avg_pool2d(x, kernel_size=2, stride=1, count_include_pad=False)
            x = F.adaptive_avg_pool2d(x, (3, 3)).tanh()
            x = torch.sigmoid(x.relu())
            x = x.reshape(x.shape[0], -1).view(-1, 36).flatten(1)
            return F.softmax(self.fc(torch.flatten(x, 1)), dim=-1)

    class TorchForms(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = bclib.Conv2dGroupNJ(2, 4, 3)
            self.fc = bclib.LinearGroupNJ(4 * 3 * 3, 5)

        def forward(self, images, logits_only=False):
            x = torch.max_pool2d(torch.relu(self.conv(images)), 2).contiguous()
            x = self.fc(x.view(images.size(0), -1))  # the batch size taken from the input
            return x if logits_only else torch.log_softmax(x, dim=1)

    modules = [module for _, module in layer_sequence(TorchForms())]
    assert [type(m) for m in modules] == [bclib.Conv2dGroupNJ, nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Flatten,
                                          bclib.LinearGroupNJ, nn.LogSoftmax]
    assert (modules[2].kernel_size, modules[2].stride) == (2, 2)  # torch.max_pool2d's stride [] is the kernel

    model = Everything().eval()
    leaves = layer_sequence(model)
    modules = [module for _, module in leaves]
    assert [type(m) for m in modules] == [
        bclib.Conv2dGroupHS, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Tanh, nn.ReLU,
        nn.Sigmoid, nn.Flatten, nn.Flatten, nn.Flatten, nn.Flatten, bclib.LinearSVD, nn.Softmax]
    assert modules[0] is model.conv and modules[12] is model.fc and leaves[0][0] == "conv"
    assert modules[1].negative_slope == 0.2
    pool = modules[2]
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 1, True)
    assert (modules[3].kernel_size, modules[3].stride, modules[3].count_include_pad) == (2, 1, False)
    assert modules[4].output_size == (3, 3) and modules[13].dim == -1
    check_sequence(model, leaves, (2, 8, 8))  # raises if the chain computed anything else
    result = compress(model, 0.0, input_shape=(2, 8, 8))
    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(apply_masks(model, result.masks)(x), result.model(x), atol=1e-5)


def test_functions_given_the_chain_by_keyword():
    model = _Forward(lambda m, x: F.log_softmax(input=m.fc2(torch.tanh(input=F.leaky_relu(input=m.fc1(x),
                                                                                      negative_slope=0.3))), dim=1))
    modules = [module for _, module in layer_sequence(model)]
    assert [type(m) for m in modules] == [bclib.LinearGroupNJ, nn.LeakyReLU, nn.Tanh, bclib.LinearGroupNJ, nn.LogSoftmax]
    assert modules[1].negative_slope == 0.3 and modules[4].dim == 1


class _Forward(nn.Module):
    """Two Bayesian layers and a forward given as a function of (self, x)."""

    def __init__(self, forward):
        super().__init__()
        self.fc1 = bclib.LinearGroupNJ(4, 4)
        self.fc2 = bclib.LinearGroupNJ(4, 2)
        self.weight = nn.Parameter(torch.ones(4, 4))
        self._function = forward

    def forward(self, x):
        return self._function(self, x)


@pytest.mark.parametrize("forward, error, match", [
    (lambda m, x: m.fc2(x + m.fc1(x)), TypeError, r"uses the input twice \(in layer 'fc1' and add"),
    (lambda m, x: m.fc2(F.dropout(m.fc1(x), 0.5)), TypeError, r"draw random numbers \(F.dropout without training"),
    (lambda m, x: m.fc2(torch.cat([m.fc1(x), x], 1)[:, :4]), TypeError, "cat"),
    (lambda m, x: m.fc2(m.fc1(x) if x.sum() > 0 else x), TypeError, "with torch.fx, which failed"),
    (lambda m, x: m.fc2(F.linear(m.fc1(x), m.weight)), TypeError, "uses the tensor 'weight' outside a layer call"),
    (lambda m, x: m.fc2(m.fc1(x) * m.fc1.log_alpha()), TypeError, "uses the tensor 'fc1.z_logvar' outside a layer"),
    (lambda m, x: m.fc2(m.fc1(x) * 2), TypeError, r"calls mul\(\), which compress cannot export"),
    (lambda m, x: m.fc2(F.gelu(m.fc1(x))), TypeError, r"calls gelu\(\), which compress cannot export"),
    (lambda m, x: m.fc2(F.softmax(m.fc1(x), dim=1)), TypeError, "allows a softmax only after the last layer"),
    (lambda m, x: (m.fc2(m.fc1(x)),), TypeError, r"does not return the output of its last layer \(it returns a tuple"),
    (lambda m, x: (m.fc2(m.fc1(x)), x), TypeError, r"uses the input twice \(in layer 'fc1' and the return value"),
    (lambda m, x: m.fc2(m.fc1(m.fc1(x))), ValueError, r"runs Bayesian layer 'fc1' twice \(tied weights\)"),
    (lambda m, x: m.fc2(F.log_softmax(m.fc1(x))), TypeError, "LogSoftmax needs an explicit dim"),
])
def test_forwards_that_are_not_a_chain_are_refused(forward, error, match):
    with pytest.raises(error, match=match):
        compress(_Forward(forward), 0.0)


def test_a_reshape_that_is_not_a_flatten_is_caught():
    flatten = _Forward(lambda m, x: m.fc2(m.fc1(x.view(-1, 4))))
    result = compress(flatten, 0.0, input_shape=(2, 2))  # (N, 2, 2) -> (N, 4): a flatten, accepted
    assert isinstance(result.model[0], nn.Flatten)
    # (N, 2) -> (2N, 1) is read as a flatten too; running both side by side shows it is not.
    halves = _Forward(lambda m, x: m.fc2(m.fc1(x)).view(-1, 1))
    with pytest.raises(TypeError, match=r"give outputs of shape \(3, 2\), the forward \(6, 1\): a view"):
        compress(halves, 0.0)
    # (N, 4, 4) -> (4N, 4) runs in the forward, but read as a flatten gives fc1 16 features: the chain
    # is blamed, not input_shape, which the forward itself accepts.
    with pytest.raises(TypeError, match=r"fail at layer 'fc1', where the forward runs .*not a flatten"):
        compress(flatten, 0.0, input_shape=(4, 4))
    with pytest.raises(ValueError, match=r"an input of input_shape \(5,\) does not pass _Forward.forward"):
        compress(flatten, 0.0, input_shape=(5,))


def test_other_bad_networks():
    with pytest.raises(TypeError, match=r"single LinearGroupNJ: .*nn.Sequential\(layer\)"):
        compress(bclib.LinearGroupNJ(3, 2), 0.0)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bclib.LinearGroupNJ(3, 2)

        def forward(self, x, y):
            return self.fc(x)

    with pytest.raises(TypeError, match="more than one input"):
        compress(TwoInputs(), 0.0)

    class Deterministic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 3), bclib.LinearGroupNJ(3, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    with pytest.raises(TypeError, match=r"layer 'fc1' is a Linear: .*bclib.to_bayesian converts"):
        compress(Deterministic(), 0.0)


def test_a_sequential_that_changes_its_input_in_place():
    # The model and the chain each run on their own copy of the inputs.
    model = nn.Sequential(nn.LeakyReLU(0.2, inplace=True), bclib.LinearGroupNJ(4, 4), nn.ReLU(),
                          bclib.LinearGroupNJ(4, 2)).eval()
    result = compress(model, 0.0)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(result.model(x.clone()), model(x.clone()), atol=1e-5)


class _TrainAware(nn.Module):
    """Dropout tied to self.training and a softmax only at evaluation: read on its eval side."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = bclib.LinearGroupNJ(6, 5), bclib.LinearGroupNJ(5, 3)

    def forward(self, x):
        x = F.dropout(F.relu(self.fc1(x)), 0.5, training=self.training)
        x = self.fc2(x)
        return x if self.training else F.log_softmax(x, dim=1)


def test_a_model_in_training_mode_is_read_in_eval_mode_and_left_as_it_was():
    torch.manual_seed(0)
    model = _TrainAware().train()
    _set_groups(model.fc1, [0, 3])
    _set_groups(model.fc2, [4])
    model.fc2.eval()  # a mixed state, to see every flag restored
    result = compress(model, 0.0)
    assert [type(m) for m in result.model] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.LogSoftmax]
    assert result.report.architecture == "4-4"
    assert model.training and model.fc1.training and not model.fc2.training
    state = torch.get_rng_state()
    weight_masks(model, 0.0)  # called every epoch by the weight recorder: must not draw random numbers
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.randn(7, 6)
    with torch.no_grad():
        assert torch.allclose(apply_masks(model, result.masks).eval()(x), result.model(x), atol=1e-5)


def test_nested_blocks_with_batchnorm_are_pruned_through():
    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = bclib.Conv2dGroupHS(cin, cout, 3, padding=1)
            self.norm = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.max_pool2d(F.relu(self.norm(self.conv(x)), inplace=True), 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(Block(1, 4), Block(4, 6))
            self.head = bclib.LinearGroupHS(6 * 2 * 2, 3)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    net.eval()
    log_alpha = {name: layer.log_alpha().detach() for name, layer in bclib.bayesian_layers(net)}
    names = ["features.0.conv", "features.1.conv", "head"]
    assert list(log_alpha) == names
    # Cut between the first and second highest log alpha of the first conv, and in the head keep
    # only positions of the channels the second conv keeps: every layer loses something.
    thresholds = {name: float(values.sort().values[-2:].mean()) for name, values in log_alpha.items()}
    result = compress(net, thresholds, input_shape=(1, 8, 8))
    assert [row.name for row in result.report.layers] == names
    assert all(row.weights_kept < row.weights_total for row in result.report.layers)
    assert any(isinstance(m, nn.BatchNorm2d) and m.num_features < 6 for m in result.model)
    x = torch.randn(9, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(apply_masks(net, result.masks)(x), result.model(x), atol=1e-4)
