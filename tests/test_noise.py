"""Training under ``torch.compile``: the compiled layers draw the eager layers' noise (same seed, same
numbers, in the same order) and give the eager outputs and gradients; two draws are never merged into
one; the caller's autocast holds in every compiled layer; new image sizes compile."""
import pytest
import torch
from torch import nn

from bclib import (Conv2dGroupHS, Conv2dGroupNJ, Conv2dSVD, LinearGroupHS, LinearGroupNJ, LinearSVD,
                   kl_divergence)
from bclib.layers.noise import standard_normal

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Inductor's notes on a CPU-only machine


def _every_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Conv2dGroupNJ(1, 3, 3), nn.ReLU(), Conv2dGroupHS(3, 4, 3, padding=1), nn.ReLU(), Conv2dSVD(4, 4, 3),
        nn.Flatten(), LinearGroupNJ(4 * 4 * 4, 12), nn.ReLU(), LinearGroupHS(12, 8), nn.ReLU(), LinearSVD(8, 5),
    ).double()


def _step(model, forward, x, seed):
    """Output and every parameter's gradient of ``sum(out * weights) + KL`` after seeding."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = forward(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * weights).sum() + kl_divergence(model)).backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_compiled_training_draws_the_eager_noise_and_gives_the_eager_gradients(memory_format):
    # Each convolution sums fewer than 64 terms per output: in NCHW their weight gradients take the
    # windowed route (conv_gradient), two of them beside input gradients.
    model = _every_layer().train().to(memory_format=memory_format)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64).to(memory_format=memory_format)
    compiled = torch.compile(model, dynamic=False)
    for seed in (1, 2):  # the second call reuses the compiled graph
        eager_out, eager_grads = _step(model, model, x, seed)
        compiled_out, compiled_grads = _step(model, compiled, x, seed)
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-9, atol=1e-12)
        assert eager_grads.keys() == compiled_grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # and the draws are random: another seed, another output
    assert not torch.equal(_step(model, compiled, x, 3)[0], eager_out)
    model.eval()  # the posterior-mean forward, compiled anew
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", [LinearGroupNJ(5, 4), LinearGroupHS(5, 4), LinearSVD(5, 4)],
                         ids=["nj", "hs", "svd"])
def test_compiled_forward_draws_fresh_noise_each_call(layer):
    # A compiler that took two draws of one shape for the same expression would merge them: the
    # difference of two samples would be exactly 0.
    layer.train()
    difference = torch.compile(lambda x: layer(x) - layer(x), dynamic=False)(torch.ones(3, 5))
    assert (difference != 0).all()


def test_standard_normal_is_torch_randn_in_eager_mode_and_compiled():
    torch.manual_seed(5)
    expected = torch.randn(4, 3)
    torch.manual_seed(5)
    eager = standard_normal((4, 3), dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(5)
    compiled = torch.compile(lambda: standard_normal((4, 3), dtype=torch.float32, device="cpu"))()
    torch.testing.assert_close(eager, expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0)


def test_compiled_draws_come_in_the_eager_order():
    # The compiler may move a draw that depends on nothing: here it drew the last layer's 40 numbers
    # before the first layer's 46,080, and every output differed from eager's.
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSVD(1, 20, 5), nn.Flatten(), LinearSVD(20 * 24 * 24, 10)).double().train()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    eager_out, eager_grads = _step(model, model, x, 1)
    compiled_out, compiled_grads = _step(model, torch.compile(model, dynamic=False), x, 1)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-9, atol=1e-12)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_compiled_network_keeps_the_callers_autocast():
    # After a Bayesian convolution's backward was traced, the later layers ran in float32 under a
    # bfloat16 autocast (Dynamo lost the autocast state while retracing a layout test).
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dGroupNJ(1, 8, 3), nn.ReLU(), Conv2dGroupHS(8, 8, 3), nn.ReLU(), Conv2dSVD(8, 8, 3), nn.Flatten(),
        LinearGroupNJ(8 * 6 * 6, 70), nn.ReLU(), LinearSVD(70, 5)).train()  # all but the first: >= 64 terms
    x = torch.randn(4, 1, 12, 12)
    compiled = torch.compile(model, dynamic=False)

    def sample(forward, autocast):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return forward(x)

    eager_float32, eager_autocast = sample(model, False), sample(model, True)
    assert (eager_autocast - eager_float32).abs().max() > 1e-5  # bfloat16 products show
    torch.testing.assert_close(sample(compiled, True), eager_autocast, rtol=1e-5, atol=1e-7)


def test_compiled_convolutions_take_a_new_image_size():
    # A second image size recompiles with symbolic sizes; the windowed weight gradients' batch
    # slices failed to compile there (a first convolution of fewer than 64 terms per output).
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSVD(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).double().train()
    compiled = torch.compile(model)
    for size in (12, 16, 20):
        x = torch.randn(2, 1, size, size, dtype=torch.float64)
        eager_out, eager_grads = _step(model, model, x, size)
        compiled_out, compiled_grads = _step(model, compiled, x, size)
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-9, atol=1e-12)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_dynamic_shapes_compile_with_floats_specialised():
    # What the README says to do for torch.compile(dynamic=True) with torch 2.14.
    torch.manual_seed(0)
    model = nn.Sequential(LinearGroupNJ(6, 5), nn.ReLU(), LinearGroupHS(5, 4), nn.ReLU(), LinearSVD(4, 3)).double()
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(model, dynamic=True)
        for batch in (3, 7):
            x = torch.randn(batch, 6, dtype=torch.float64)
            eager_out, eager_grads = _step(model, model, x, batch)
            compiled_out, compiled_grads = _step(model, compiled, x, batch)
            torch.testing.assert_close(compiled_out, eager_out, rtol=1e-9, atol=1e-12)
            for name, grad in eager_grads.items():
                torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
