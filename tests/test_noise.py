"""Training under ``torch.compile``: the compiled layers draw the eager layers' noise (same seed, same
numbers) and give the eager outputs and gradients; two draws are never merged into one."""
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
