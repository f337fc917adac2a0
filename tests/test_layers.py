"""The Bayesian layers against independent computations.

Every expected value here is computed in the test from the layer's parameters with plain torch
operations (``F.linear`` / ``F.conv2d`` and the formulas of the method notes), never by calling the
layer's own methods. Sampled moments are compared with 5 standard errors estimated from the samples.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bclib

NUM_SAMPLES = 20_000
MC_SIGMAS = 5.0


# ----------------------------------------------------------------------------- the layers under test
@dataclass
class Spec:
    """A layer configuration and what the test needs to recompute its outputs independently."""

    name: str
    make: Callable[..., nn.Module]
    example_shape: tuple[int, ...]  # one input example
    prior: str  # "nj", "hs" or "svd"
    conv: dict | None = None  # stride / padding / dilation for F.conv2d; None for a linear layer
    weight_shape: tuple[int, ...] = field(default=())

    def __str__(self) -> str:
        return self.name


SPECS = [
    Spec("LinearGroupNJ", lambda **kw: bclib.LinearGroupNJ(5, 3, **kw), (5,), "nj", None, (3, 5)),
    # C_out == kernel width: the release's broadcast bug erred silently in exactly this case.
    Spec("Conv2dGroupNJ", lambda **kw: bclib.Conv2dGroupNJ(2, 3, 3, stride=2, padding=1, **kw), (2, 6, 6), "nj",
         dict(stride=2, padding=1, dilation=1), (3, 2, 3, 3)),
    Spec("LinearGroupHS", lambda **kw: bclib.LinearGroupHS(5, 3, **kw), (5,), "hs", None, (3, 5)),
    Spec("Conv2dGroupHS", lambda **kw: bclib.Conv2dGroupHS(2, 3, (3, 2), padding=2, dilation=2, **kw), (2, 4, 4),
         "hs", dict(stride=1, padding=2, dilation=2), (3, 2, 3, 2)),
    Spec("LinearSVD", lambda **kw: bclib.LinearSVD(5, 3, **kw), (5,), "svd", None, (3, 5)),
    Spec("Conv2dSVD", lambda **kw: bclib.Conv2dSVD(2, 3, 3, stride=(1, 2), **kw), (2, 6, 6), "svd",
         dict(stride=(1, 2), padding=0, dilation=1), (3, 2, 3, 3)),
]
GROUP_SPECS = [s for s in SPECS if s.prior != "svd"]
HS_SPECS = [s for s in SPECS if s.prior == "hs"]


def params(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float64 copies of every parameter, by name."""
    return {name: p.detach().double() for name, p in layer.named_parameters()}


def inputs(spec: Spec, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *spec.example_shape)


@torch.no_grad()
def set_log_variances_(layer: nn.Module, weight: float = -4.0, bias: float = -3.0, scale: float = -2.0) -> None:
    """Noise large enough to measure: every term of the output variance then matters."""
    for name, p in layer.named_parameters():
        if name.endswith("weight_logvar"):
            p.fill_(weight)
        elif name.endswith("bias_logvar"):
            p.fill_(bias)
        elif name.endswith("logvar"):
            p.fill_(scale)


@torch.no_grad()
def perturb_(layer: nn.Module) -> None:
    """Move every parameter away from its initial value (log-variances to U(-5, -1))."""
    for name, p in layer.named_parameters():
        if name.endswith("logvar"):
            p.uniform_(-5.0, -1.0)
        else:
            p.add_(0.1 * torch.randn_like(p))


# ----------------------------------------------------------------------------- independent reference
def reference_op(spec: Spec, x, weight, bias=None):
    if spec.conv is None:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, **spec.conv)


def reference_group_scale_moments(layer: nn.Module, prior: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[z], E[z^2])`` per group from the parameters.

    NJ: z ~ N(z_mu, exp(z_logvar)). HS: log z ~ N(m, v) with m = (m_sa + m_sb + m_a + m_b) / 2,
    v = (v_sa + v_sb + v_a + v_b) / 4, so E[z] = exp(m + v/2), E[z^2] = exp(2m + 2v).
    """
    p = params(layer)
    if prior == "nj":
        return p["z_mu"], p["z_mu"] ** 2 + p["z_logvar"].exp()
    m = 0.5 * (p["global_scale.sa_mu"] + p["global_scale.sb_mu"] + p["za_mu"] + p["zb_mu"])
    v = 0.25 * (p["global_scale.sa_logvar"].exp() + p["global_scale.sb_logvar"].exp()
                + p["za_logvar"].exp() + p["zb_logvar"].exp())
    return torch.exp(m + v / 2), torch.exp(2 * m + 2 * v)


def reference_svd_log_alpha(layer: nn.Module) -> torch.Tensor:
    p = params(layer)
    return torch.clamp(p["weight_logvar"] - torch.log(p["weight_mu"] ** 2), -8.0, 8.0)


def reference_log_alpha(layer: nn.Module, prior: str) -> torch.Tensor:
    p = params(layer)
    if prior == "nj":
        return p["z_logvar"] - torch.log(p["z_mu"] ** 2)
    if prior == "hs":
        # alpha = Var[z~] / E[z~]^2 = exp(v) - 1 for the local scale, v = (v_a + v_b) / 4.
        return torch.log(torch.exp(0.25 * (p["za_logvar"].exp() + p["zb_logvar"].exp())) - 1.0)
    return reference_svd_log_alpha(layer)


def to_weight_shape(spec: Spec, per_group: torch.Tensor) -> torch.Tensor:
    """Groups are input units (linear: weight columns) or output channels (conv: first axis)."""
    return per_group.view(1, -1) if spec.conv is None else per_group.view(-1, 1, 1, 1)


def reference_posterior_weight(spec: Spec, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """E[w] and Var[w] of w = z w~ (independent): E[z] mu and E[z^2] (sigma^2 + mu^2) - E[z]^2 mu^2."""
    p = params(layer)
    mu, var = p["weight_mu"], p["weight_logvar"].exp()
    if spec.prior == "svd":  # q(w) = N(theta, sigma^2); the log-alpha clip is for the KL only
        return mu, var
    z_mean, z_sq = (to_weight_shape(spec, t) for t in reference_group_scale_moments(layer, spec.prior))
    return z_mean * mu, z_sq * (var + mu**2) - z_mean**2 * mu**2


def reference_output_moments(spec: Spec, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (flattened) of the train-mode output for ONE example ``x``.

    Linear group layer, z drawn per input unit:
        mean_j = sum_i x_i E[z_i] mu_ji + b_j,
        Cov_jk = sum_i x_i^2 Var[z_i] mu_ji mu_ki + delta_jk (sum_i x_i^2 E[z_i^2] sigma^2_ji + sigma_b^2_j).
    Conv group layer, one z per output channel c multiplying m = conv(x, mu):
        mean = E[z_c] m + b_c,
        Cov = delta_cd Var[z_c] m_p m_q + delta_cd delta_pq (E[z_c^2] conv(x^2, sigma^2)_p + sigma_b^2_c).
    Sparse VD: mean = op(x, theta) + b, Cov = diag(op(x^2, sigma^2)).
    """
    p = params(layer)
    x = x.double().unsqueeze(0)
    mu, weight_var = p["weight_mu"], p["weight_logvar"].exp()
    bias = p.get("bias_mu")
    if spec.prior == "svd":
        mean = reference_op(spec, x, mu, bias).flatten()
        var = reference_op(spec, x * x, weight_var).flatten()
        return mean, torch.diag(var)
    bias_var = p["bias_logvar"].exp() if bias is not None else None
    z_mean, z_sq = reference_group_scale_moments(layer, spec.prior)
    z_var = z_sq - z_mean**2
    if spec.conv is None:
        x = x[0]
        mean = mu @ (x * z_mean)
        cov = (mu * (x * x * z_var)) @ mu.T + torch.diag(weight_var @ (x * x * z_sq))
        if bias is not None:
            mean = mean + bias
            cov = cov + torch.diag(bias_var)
        return mean, cov
    m = reference_op(spec, x, mu)[0].flatten(1)  # (C, P)
    s = reference_op(spec, x * x, weight_var)[0].flatten(1)
    channels, positions = m.shape
    mean = z_mean[:, None] * m
    noise = z_sq[:, None] * s
    if bias is not None:
        mean = mean + bias[:, None]
        noise = noise + bias_var[:, None]
    cov = torch.zeros(channels * positions, channels * positions, dtype=torch.float64)
    for c in range(channels):
        block = slice(c * positions, (c + 1) * positions)
        cov[block, block] = z_var[c] * torch.outer(m[c], m[c]) + torch.diag(noise[c])
    return mean.flatten(), cov


def reference_kl(spec: Spec, layer: nn.Module, reference, include_global: bool = True) -> torch.Tensor:
    """Sum of the per-parameter KL terms of the method notes, from the parameters."""
    p = params(layer)
    if spec.prior == "svd":
        return reference.nj_kl(reference_svd_log_alpha(layer)).sum()
    kl = reference.gaussian_kl(p["weight_mu"], p["weight_logvar"].exp()).sum()
    if "bias_mu" in p:
        kl = kl + reference.gaussian_kl(p["bias_mu"], p["bias_logvar"].exp()).sum()
    if spec.prior == "nj":
        return kl + reference.nj_kl(reference_log_alpha(layer, "nj")).sum()
    kl = kl + reference.lognormal_gamma_kl(p["za_mu"], p["za_logvar"].exp(), 0.5, 1.0).sum()
    kl = kl + reference.lognormal_inverse_gamma_kl(p["zb_mu"], p["zb_logvar"].exp(), 0.5, 1.0).sum()
    if include_global:
        kl = kl + reference_global_scale_kl(layer.global_scale, reference)
    return kl


def reference_global_scale_kl(scale: nn.Module, reference) -> torch.Tensor:
    """s_a ~ Gamma(1/2, scale tau0^2) and s_b ~ InvGamma(1/2, 1)."""
    p = params(scale)
    return (reference.lognormal_gamma_kl(p["sa_mu"], p["sa_logvar"].exp(), 0.5, scale.tau0**2)
            + reference.lognormal_inverse_gamma_kl(p["sb_mu"], p["sb_logvar"].exp(), 0.5, 1.0))


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_kl_divergence_is_the_sum_of_the_parameter_terms(spec, bias, reference):
    layer = spec.make(bias=bias)
    perturb_(layer)
    kl = layer.kl_divergence()
    assert kl.shape == ()
    torch.testing.assert_close(kl.double(), reference_kl(spec, layer, reference), rtol=1e-5, atol=1e-4)
    # bclib.kl_divergence of a model holding the layer gives the same number.
    torch.testing.assert_close(bclib.kl_divergence(nn.Sequential(nn.Identity(), layer)), kl)


def test_shared_global_scale_is_counted_once(reference):
    shared = bclib.HorseshoeGlobalScale(tau0=1e-3)
    first = bclib.LinearGroupHS(4, 3, global_scale=shared)
    second = bclib.LinearGroupHS(3, 2, global_scale=shared)
    own = bclib.LinearGroupHS(2, 2, tau0=0.1)
    model = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), own, bclib.LinearGroupNJ(2, 2))
    perturb_(model)
    spec_hs, spec_nj = SPECS[2], SPECS[0]
    expected = (
        reference_kl(spec_hs, first, reference, include_global=False)
        + reference_kl(spec_hs, second, reference, include_global=False)
        + reference_global_scale_kl(shared, reference)  # once
        + reference_kl(spec_hs, own, reference)  # with its own scale, tau0 = 0.1
        + reference_kl(spec_nj, model[5], reference)
    )
    torch.testing.assert_close(bclib.kl_divergence(model).double(), expected, rtol=1e-5, atol=1e-4)
    assert own.tau0 == 0.1 and first.tau0 == second.tau0 == 1e-3
    # The shared parameters appear once in the model (one optimiser entry each).
    assert sum(p is shared.sa_mu for p in model.parameters()) == 1


def test_mask_refuses_masks_of_another_shape_naming_them():
    layer = bclib.LinearGroupNJ(4, 3)
    with pytest.raises(ValueError, match=r"weight_mask must have the shape \(3, 4\), got \(4,\)"):
        layer.mask_(torch.ones(4))  # broadcast silently over the rows before
    with pytest.raises(ValueError, match=r"bias_mask must have the shape \(3,\), got \(1,\)"):
        layer.mask_(torch.ones(3, 4), torch.zeros(1))
    layer.mask_(torch.zeros(3, 4), torch.zeros(3))
    assert not layer.weight_mu.any() and not layer.bias_mu.any()


def test_sizes_may_be_numpy_integers_as_for_nn_linear_and_nn_conv2d():
    import numpy as np

    conv = bclib.Conv2dGroupNJ(np.int64(1), np.int64(2), np.int64(3), stride=(np.int32(1), 1))
    linear = bclib.LinearGroupHS(np.int64(8), np.int32(3))
    assert (conv.out_channels, conv.kernel_size, conv.stride) == (2, (3, 3), (1, 1))
    assert type(conv.out_channels) is int and type(linear.in_features) is int
    net = nn.Sequential(nn.Conv2d(1, np.int64(2), np.int64(3)), nn.Flatten(), nn.Linear(np.int64(8), 3))
    converted = bclib.to_bayesian(net, "nj").eval()  # refused numpy sizes before
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(converted(x), net(x), atol=1e-6)
    with pytest.raises(TypeError, match="in_features must be a positive int, got float"):
        bclib.LinearGroupNJ(4.0, 3)


def test_a_layers_own_scale_handed_to_another_layer_is_counted_once(reference):
    # Sharing by passing the first layer's own scale to the second: the first layer kept counting
    # it in its KL while bclib.kl_divergence added it again through the second.
    first = bclib.LinearGroupHS(4, 3)
    second = bclib.LinearGroupHS(3, 2, global_scale=first.global_scale)
    model = nn.Sequential(first, nn.ReLU(), second)
    perturb_(model)
    spec_hs = SPECS[2]
    expected = (reference_kl(spec_hs, first, reference, include_global=False)
                + reference_kl(spec_hs, second, reference, include_global=False)
                + reference_global_scale_kl(first.global_scale, reference))
    torch.testing.assert_close(bclib.kl_divergence(model).double(), expected, rtol=1e-5, atol=1e-4)
    assert first.shared_scale is second.shared_scale is first.global_scale
    before = [p.clone() for p in first.global_scale.parameters()]
    first.reset_parameters()  # a layer does not reset a scale it shares
    assert all(torch.equal(a, b) for a, b in zip(before, first.global_scale.parameters()))


def test_kl_divergence_of_a_model_without_bayesian_layers_is_zero():
    model = nn.Sequential(nn.Linear(3, 2))
    assert bclib.kl_divergence(model).item() == 0.0
    assert list(bclib.bayesian_layers(model)) == []


def test_bayesian_layers_in_registration_order():
    model = nn.Sequential(bclib.Conv2dGroupNJ(1, 2, 3), nn.Flatten(), bclib.LinearGroupHS(8, 4), bclib.LinearSVD(4, 2))
    assert [(name, type(layer).__name__) for name, layer in bclib.bayesian_layers(model)] == [
        ("0", "Conv2dGroupNJ"), ("2", "LinearGroupHS"), ("3", "LinearSVD")]


# ----------------------------------------------------------------------------- posterior and pruning signal
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_log_alpha_and_posterior_weight(spec):
    layer = spec.make()
    perturb_(layer)
    log_alpha = layer.log_alpha()
    expected_shape = spec.weight_shape if spec.prior == "svd" else (layer.num_groups,)
    assert tuple(log_alpha.shape) == expected_shape
    assert layer.num_groups == (spec.weight_shape[1] if spec.conv is None else spec.weight_shape[0])
    assert layer.groups_on_input == (spec.conv is None)
    assert tuple(layer.weight_shape) == spec.weight_shape
    # The layers add 1e-8 to mu^2 inside the logarithm: 1e-4 relative for the smallest weights here.
    torch.testing.assert_close(log_alpha.double(), reference_log_alpha(layer, spec.prior), rtol=1e-3, atol=1e-3)
    mean, var = layer.posterior_weight()
    expected_mean, expected_var = reference_posterior_weight(spec, layer)
    assert mean.shape == var.shape == spec.weight_shape
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(layer.posterior_bias(), layer.bias_mu)


@pytest.mark.parametrize("spec", HS_SPECS, ids=str)
def test_horseshoe_posterior_variance_overflows_only_where_it_is_infinite(spec):
    """log z ~ N(m, v) with v = 100 and m = -60: E[z^2] = exp(2m + 2v) = e^80 fits float32 (max ~e^88),
    though exp(v) alone does not; the variance of a pruned weight (mu = 0) is then finite too."""
    layer = spec.make()
    perturb_(layer)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("sa_logvar", "sb_logvar", "za_logvar", "zb_logvar")):
                p.fill_(math.log(100.0))  # v = (4 * 100) / 4
            elif name.endswith(("sa_mu", "sb_mu", "za_mu", "zb_mu")):
                p.fill_(-30.0)  # m = (4 * -30) / 2
        layer.mask_(torch.ones(spec.weight_shape).index_fill_(1 if spec.conv is None else 0, torch.tensor([0]), 0.0))
    mean, var = layer.posterior_weight()
    _, expected_var = reference_posterior_weight(spec, layer)
    assert expected_var.max() < torch.finfo(torch.float32).max
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-3, atol=0.0)
    # m = 43.5, v = 1: Var[z] = (e - 1) e^88 ~ 2.8e38 fits float32 (max ~3.4e38), e^(2m + 2v) = e^89 does not.
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("sa_logvar", "sb_logvar", "za_logvar", "zb_logvar")):
                p.fill_(0.0)
            elif name.endswith(("sa_mu", "sb_mu", "za_mu", "zb_mu")):
                p.fill_(21.75)
    z_mean, z_square = reference_group_scale_moments(layer, "hs")
    torch.testing.assert_close(layer.group_scale_moments()[1].double(), z_square - z_mean**2, rtol=1e-4, atol=0.0)


# ----------------------------------------------------------------------------- forward passes
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variance_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16-variance"])
def test_train_mode_moments_match_local_reparameterisation(spec, bias, variance_dtype):
    layer = bclib.set_variance_dtype(spec.make(bias=bias), variance_dtype)
    set_log_variances_(layer)
    x = torch.randn(spec.example_shape)
    expected_mean, expected_cov = reference_output_moments(spec, layer, x)

    layer.eval()
    with torch.no_grad():
        eval_out = layer(x.unsqueeze(0)).double().flatten()
    # One layer: the pre-activation mean IS the posterior-mean forward.
    torch.testing.assert_close(eval_out, expected_mean, rtol=1e-5, atol=1e-6)

    layer.train()
    with torch.no_grad():
        y = layer(x.unsqueeze(0).expand(NUM_SAMPLES, *spec.example_shape)).double().flatten(1)
    mean = y.mean(0)
    centred = y - mean
    # Sample covariance and the standard error of each entry, the std of c_j c_k over sqrt(N).
    cov = centred.T @ centred / NUM_SAMPLES
    second_moment_of_products = (centred**2).T @ (centred**2) / NUM_SAMPLES
    cov_stderr = ((second_moment_of_products - cov**2).clamp(min=0) / NUM_SAMPLES).sqrt()
    mean_stderr = (cov.diagonal() / NUM_SAMPLES).sqrt()
    assert ((mean - expected_mean).abs() <= MC_SIGMAS * mean_stderr).all(), (mean - expected_mean) / mean_stderr
    assert ((cov - expected_cov).abs() <= MC_SIGMAS * cov_stderr + 1e-9).all(), (cov - expected_cov) / cov_stderr
    # The noise is really there: every output variance is many standard errors above zero.
    assert (expected_cov.diagonal() > 10 * cov_stderr.diagonal()).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bfloat16_variance_path_is_close_to_float32(spec):
    """Same seed, same noise: outputs and gradients with the variance path in bfloat16 stay within
    a few per cent of full precision (bfloat16 keeps 8 bits of mantissa)."""
    x = inputs(spec)
    results = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        layer = spec.make()
        set_log_variances_(layer)
        bclib.set_variance_dtype(layer, dtype).train()
        torch.manual_seed(1)
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in layer.named_parameters()}))
    (out32, grads32), (out16, grads16) = results
    torch.testing.assert_close(out16, out32, rtol=0.02, atol=1e-3)
    for name, grad in grads32.items():
        scale = grad.abs().max().item()
        assert (grads16[name] - grad).abs().max().item() <= 0.03 * scale + 1e-7, name


@pytest.mark.parametrize("first", [lambda: bclib.LinearGroupNJ(100, 80), lambda: bclib.LinearGroupHS(100, 80),
                                   lambda: bclib.LinearSVD(100, 80)], ids=["nj", "hs", "svd"])
def test_layers_train_beside_plain_layers_under_autocast(first):
    """Mixed precision as users write it: a Bayesian layer feeding nn.Linear under torch.autocast, in
    train and eval mode; parameter gradients come back float32 (the 2017 layers had no such path)."""
    torch.manual_seed(0)
    model = nn.Sequential(first(), nn.ReLU(), nn.Linear(80, 10))
    x, y = torch.randn(32, 100), torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.train()(x)
    loss = F.cross_entropy(logits.float(), y) + bclib.kl_divergence(model) / 1000
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eval_logits = model.eval()(x)
    expected = model(x)
    assert (eval_logits.float() - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("dtype", ["bf16", torch.float16, torch.float8_e4m3fn, torch.int32])
def test_set_variance_dtype_checks_its_argument(dtype):
    """float16 is refused (x^2 overflows it from |x| > 256), and so is float8; the layers keep their setting."""
    model = torch.nn.Sequential(bclib.LinearGroupNJ(3, 2))
    bclib.set_variance_dtype(model, torch.bfloat16)
    allowed = r"None or one of torch\.bfloat16, torch\.float32, torch\.float64"
    with pytest.raises(TypeError, match=rf"dtype must be {allowed}, got {re.escape(repr(dtype))}"):
        bclib.set_variance_dtype(model, dtype)
    assert model[0].variance_dtype is torch.bfloat16
    for allowed_dtype in (torch.float32, torch.float64):
        assert bclib.set_variance_dtype(model, allowed_dtype)[0].variance_dtype is allowed_dtype
    assert "variance_dtype=torch.bfloat16" in repr(bclib.set_variance_dtype(model, torch.bfloat16))
    assert "variance_dtype" not in repr(bclib.set_variance_dtype(model, None))


# At least MIN_AUTOCAST_TERMS (64) terms per output, so that autocast applies to the products.
AUTOCAST_SPECS = [
    Spec("LinearSVD", lambda **kw: bclib.LinearSVD(64, 32, **kw), (64,), "svd", None, (32, 64)),
    Spec("Conv2dSVD", lambda **kw: bclib.Conv2dSVD(8, 4, 3, **kw), (8, 6, 6), "svd",
         dict(stride=1, padding=0, dilation=1), (4, 8, 3, 3)),
]


@pytest.mark.parametrize("spec", AUTOCAST_SPECS, ids=str)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16], ids=["float32-input", "float16-input"])
def test_float16_autocast_keeps_the_variance_path_finite(spec, input_dtype):
    """Inputs of +-1000 under a float16 autocast: x^2 = 1e6 overflows float16 (max 65504), so the
    variance path must not run in it. The output, standardised with the mean and variance computed
    here in float64, is N(0, 1) (a float16 input comes from a layer run under the same autocast)."""
    torch.manual_seed(0)
    layer = spec.make().train()
    set_log_variances_(layer, weight=-2.0)
    x = 1000.0 * torch.randn(256, *spec.example_shape).sign()  # exact in float16
    leaf = x.to(input_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(leaf)
    p, x = params(layer), x.double()
    mean = reference_op(spec, x, p["weight_mu"], p["bias_mu"])
    var = reference_op(spec, x * x, p["weight_logvar"].exp())
    standard = ((out.double() - mean) / var.sqrt()).flatten()
    assert standard.isfinite().all()
    n = standard.numel()
    assert abs(standard.mean().item()) < MC_SIGMAS / math.sqrt(n)
    assert abs(standard.var().item() - 1.0) < MC_SIGMAS * math.sqrt(2.0 / n)
    # Scaled as a loss of mean 1e-3 per output would be: the mean path's float16 weight gradient, a sum
    # of +-1000 over the batch, would overflow otherwise, as nn.Conv2d's does under this autocast.
    (1e-3 * out).sum().backward()
    assert leaf.grad.isfinite().all()
    assert all(parameter.grad.isfinite().all() for parameter in layer.parameters())
    # backward() called inside the autocast too: on the CPU it runs on this thread, under the autocast.
    layer.zero_grad()
    leaf.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        (1e-3 * layer(leaf)).sum().backward()
    assert leaf.grad.isfinite().all()
    assert all(parameter.grad.isfinite().all() for parameter in layer.parameters())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_eval_is_deterministic_and_train_is_not(spec):
    layer = spec.make()
    x = inputs(spec)
    layer.eval()
    first = layer(x)
    torch.manual_seed(123)
    assert torch.equal(first, layer(x))
    expected_mean, _ = reference_posterior_weight(spec, layer)
    p = params(layer)
    torch.testing.assert_close(first.double(), reference_op(spec, x.double(), expected_mean, p["bias_mu"]),
                               rtol=1e-5, atol=1e-6)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gradients_reach_every_parameter(spec):
    layer = spec.make()
    set_log_variances_(layer)
    names = [name for name, _ in layer.named_parameters()]
    if spec.prior == "hs":
        assert {"global_scale.sa_mu", "global_scale.sa_logvar", "global_scale.sb_mu", "global_scale.sb_logvar"} <= set(names)
    # The data term alone (train-mode forward) and the KL alone each reach every parameter they
    # depend on: all of them, but Sparse VD biases carry no KL.
    without_kl = {"bias_mu"} if spec.prior == "svd" else set()
    for loss, skipped in ((lambda: layer(inputs(spec)).pow(2).sum(), set()), (layer.kl_divergence, without_kl)):
        layer.zero_grad(set_to_none=True)
        loss().backward()
        for name, p in layer.named_parameters():
            if name in skipped:
                assert p.grad is None or (p.grad == 0).all(), name
                continue
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_gradients_reach_a_shared_global_scale():
    shared = bclib.HorseshoeGlobalScale(tau0=1e-3)
    model = nn.Sequential(bclib.LinearGroupHS(4, 3, global_scale=shared), bclib.LinearGroupHS(3, 2, global_scale=shared))
    (model(torch.randn(8, 4)).pow(2).sum() + bclib.kl_divergence(model)).backward()
    for p in shared.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs() > 0


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_in_place_ops_after_a_layer_train_as_their_out_of_place_forms(spec):
    """ReLU(inplace=True) (torchvision's default) after a layer: same output and gradients as ReLU()."""
    layer = spec.make()
    set_log_variances_(layer)
    x = inputs(spec, batch=3)
    grads = []
    for inplace in (False, True):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = nn.ReLU(inplace=inplace)(layer(x))
        out.pow(2).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    (out_plain, grads_plain), (out_inplace, grads_inplace) = grads
    assert torch.equal(out_plain, out_inplace)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_inplace))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_kept_graph_can_be_differentiated_twice(spec):
    """backward(retain_graph=True) twice accumulates the same gradient twice: the saved tensors stay intact."""
    layer = spec.make()
    set_log_variances_(layer)
    loss = layer(inputs(spec)).pow(2).sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in layer.parameters()]
    loss.backward()
    for first, twice in zip(once, (p.grad for p in layer.parameters())):
        assert torch.allclose(twice, 2 * first, rtol=1e-6, atol=0)


def test_a_3d_input_to_a_linear_layer_samples_each_row():
    """(batch, tokens, features): the output keeps the leading shape and equals the 2-d computation row by row."""
    layer = bclib.LinearGroupNJ(4, 3)
    x = torch.randn(2, 5, 4)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    flat = layer(x.reshape(10, 4))
    assert out.shape == (2, 5, 3) and torch.equal(out.reshape(10, 3), flat)
    nn.ReLU(inplace=True)(out).sum().backward()  # in place on the reshaped output works too
    assert layer.weight_mu.grad is not None


# ----------------------------------------------------------------------------- construction options
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_init_weight_and_bias_are_used(spec):
    weight = torch.randn(spec.weight_shape)
    bias = torch.randn(spec.weight_shape[0])
    layer = spec.make(init_weight=weight, init_bias=bias)
    expected_mean, _ = reference_posterior_weight(spec, layer)
    torch.testing.assert_close(expected_mean, weight.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.posterior_weight()[0], weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias_mu.detach(), bias)
    x = inputs(spec)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_op(spec, x, weight, bias), rtol=1e-5, atol=1e-5)
    # The caller's tensors are copied, not shared.
    weight.zero_()
    assert layer.weight_mu.abs().sum() > 0


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_state_dict_round_trip(spec):
    source = spec.make()
    perturb_(source)
    torch.manual_seed(1)
    target = spec.make()
    target.load_state_dict(source.state_dict())
    x = inputs(spec)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))
    assert torch.equal(source.kl_divergence(), target.kl_divergence())
    source.train(), target.train()
    torch.manual_seed(2)
    sample = source(x)
    torch.manual_seed(2)
    assert torch.equal(sample, target(x))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bias_false_is_honoured(spec, reference):
    layer = spec.make(bias=False)
    assert layer.bias_mu is None and layer.posterior_bias() is None
    assert not [name for name, _ in layer.named_parameters() if "bias" in name]
    x = inputs(spec)
    layer.eval()
    expected_mean, _ = reference_posterior_weight(spec, layer)
    torch.testing.assert_close(layer(x).double(), reference_op(spec, x.double(), expected_mean), rtol=1e-5, atol=1e-6)
    # Zero input and no bias: a zero mean output in eval mode.
    assert layer(torch.zeros_like(x)).abs().max() == 0
    with pytest.raises(ValueError, match="init_bias"):
        spec.make(bias=False, init_bias=torch.zeros(spec.weight_shape[0]))
    # load_pretrained is the constructor's init_weight / init_bias, refusals included.
    with pytest.raises(ValueError, match="bias was given but the layer has bias=False"):
        layer.load_pretrained(torch.zeros(spec.weight_shape), torch.zeros(spec.weight_shape[0]))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_to_float64(spec, reference):
    layer = spec.make().to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = inputs(spec).double()
    assert layer(x).dtype == torch.float64
    layer.eval()
    assert layer(x).dtype == torch.float64
    assert layer.kl_divergence().dtype == torch.float64
    torch.testing.assert_close(layer.kl_divergence(), reference_kl(spec, layer, reference), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_repr_names_the_configuration(spec):
    text = repr(spec.make(clip_var=0.04))
    assert text.startswith(spec.name + "(")
    assert "clip_var=0.04" in text and "bias=True" in text
    if spec.conv is None:
        assert "in_features=5" in text and "out_features=3" in text
    else:
        assert f"kernel_size={tuple(spec.weight_shape[2:])}" in text
        stride = spec.conv["stride"]
        assert f"stride={stride if isinstance(stride, tuple) else (stride, stride)}" in text
    if spec.prior == "hs":  # in the layer's own line, not only in its global scale's
        assert text.splitlines()[1].strip().endswith(", tau0=1e-05")
        shared = spec.make(global_scale=bclib.HorseshoeGlobalScale(1e-3)).extra_repr()
        assert shared.endswith(", tau0=0.001, shared global scale")
    assert spec.name in str(nn.Sequential(spec.make()))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_clip_variances(spec):
    layer = spec.make(clip_var=0.04)
    with torch.no_grad():
        layer.weight_logvar.copy_(torch.linspace(-10.0, 2.0, layer.weight_logvar.numel()).view_as(layer.weight_logvar))
    before = layer.weight_logvar.detach().clone()
    layer.clip_variances()
    limit = math.log(0.04)
    after = layer.weight_logvar.detach()
    assert torch.equal(after[before <= limit], before[before <= limit])
    assert torch.allclose(after[before > limit], torch.full_like(after[before > limit], limit))
    assert (before > limit).any() and (before <= limit).any()
    # Without clip_var nothing changes.
    free = spec.make()
    with torch.no_grad():
        free.weight_logvar.fill_(2.0)
    free.clip_variances()
    assert (free.weight_logvar == 2.0).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_mask_and_plain_module(spec):
    layer = spec.make()
    weight_mask = (torch.rand(spec.weight_shape) > 0.5).float()
    bias_mask = torch.tensor([1.0, 0.0, 1.0])
    expected_mean, _ = reference_posterior_weight(spec, layer)
    bias = layer.bias_mu.detach().clone()
    layer.mask_(weight_mask, bias_mask)
    x = inputs(spec)
    layer.eval()
    expected = reference_op(spec, x, (expected_mean * weight_mask).float(), bias * bias_mask)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # The plain torch module has the same geometry (stride, padding, dilation).
    plain = layer.plain_module(*(t.detach() for t in (layer.posterior_weight()[0], layer.posterior_bias())))
    assert type(plain) is (nn.Linear if spec.conv is None else nn.Conv2d)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_refused_load_pretrained_changes_nothing(spec):
    """A good weight with a bias of the wrong shape: refused, and neither the parameters nor the start
    that reset_parameters() returns to have changed (the new weight was kept for it before)."""
    start = torch.linspace(-0.5, 0.5, math.prod(spec.weight_shape)).reshape(spec.weight_shape)
    layer = spec.make(init_weight=start)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\), got \(4,\)"):
        layer.load_pretrained(torch.ones(spec.weight_shape), torch.zeros(4))
    assert all(torch.equal(t, before[name]) for name, t in layer.state_dict().items())
    layer.reset_parameters()
    torch.testing.assert_close(layer.posterior_weight()[0].double(), start.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_plain_module_has_the_layers_dtype_and_device(spec, device):
    layer = spec.make(dtype=torch.float64, device=device)
    weight, bias = (t.detach() for t in (layer.posterior_weight()[0], layer.posterior_bias()))
    plain = layer.plain_module(weight, bias)
    assert {(p.dtype, p.device.type) for p in plain.parameters()} == {(torch.float64, device)}
    if device == "cpu":  # the weights kept to float64 precision, not rounded to float32
        x = inputs(spec).double()
        torch.testing.assert_close(plain(x), reference_op(spec, x, weight, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", HS_SPECS, ids=str)
def test_a_pruned_group_whose_scale_overflowed_gives_zero_weights_not_nan(spec):
    """Group 0 with E[z] = inf (its log z has mean 100) is masked out, and one of its weights had
    diverged to inf before: the masked layer's posterior mean is exactly 0 there, and its eval forward
    is the plain operation with the other groups' weights."""
    layer = spec.make()
    axis = 1 if spec.conv is None else 0
    group = torch.tensor([0])
    with torch.no_grad():
        layer.za_mu.index_fill_(0, group, 200.0)  # log z = log s + (m_a + m_b) / 2 ~ 100: E[z] = inf in float32
        layer.weight_mu.index_fill_(axis, group, float("inf"))
    assert torch.isinf(layer.group_scale_moments()[0][0])
    expected_mean, _ = reference_posterior_weight(spec, layer)
    expected_mean.index_fill_(axis, group, 0.0)
    layer.mask_(torch.ones(spec.weight_shape).index_fill_(axis, group, 0.0))
    mean, _ = layer.posterior_weight()
    assert torch.equal(mean.index_select(axis, group), torch.zeros_like(mean.index_select(axis, group)))
    x = inputs(spec).double()
    expected = reference_op(spec, x, expected_mean, params(layer)["bias_mu"])
    torch.testing.assert_close(layer.eval()(x.float()).double(), expected, rtol=1e-5, atol=1e-6)
    # A weight that is 0 in a group of finite scale still has the gradient E[z] of its mean.
    other = torch.tensor([1])
    with torch.no_grad():
        layer.weight_mu.index_fill_(axis, other, 0.0)
    layer.zero_grad()
    layer.posterior_weight()[0].sum().backward()
    z_mean = layer.group_scale_moments()[0][1].item()
    gradient = layer.weight_mu.grad.index_select(axis, other)
    torch.testing.assert_close(gradient, torch.full_like(gradient, z_mean))


# ----------------------------------------------------------------------------- numerical safety
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("log_variance", [-20.0, 5.0])
@pytest.mark.parametrize("zero_input", [False, True])
def test_extreme_log_variances_stay_finite(spec, log_variance, zero_input):
    layer = spec.make()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("logvar"):
                p.fill_(log_variance)
    # A large batch for the horseshoe: with log-variances of 5, log z has sd ~12 and a draw beyond
    # ~44 (3.7 sd) overflowed z^2 in float32; some 50000 draws of z make that near certain.
    x = torch.zeros(4, *spec.example_shape) if zero_input else inputs(spec, batch=16384 if spec.prior == "hs" and log_variance > 0 else 256)
    for train in (True, False):
        layer.zero_grad()
        layer.train(train)
        out = layer(x)
        kl = layer.kl_divergence()
        assert torch.isfinite(out).all() and torch.isfinite(kl).all()
        (out.sum() + kl).backward()
        for name, p in layer.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        assert torch.isfinite(layer.log_alpha()).all()
        mean, var = layer.posterior_weight()
        # Var[w] of a horseshoe layer with log-variances of 5 is exp(~300): inf in float32, but never NaN.
        assert torch.isfinite(mean).all() and not torch.isnan(var).any() and (var >= 0).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, error, message", [
    (lambda: bclib.LinearGroupNJ(0, 3), ValueError, r"in_features must be a positive int, got 0"),
    (lambda: bclib.LinearGroupHS(4, -1), ValueError, r"out_features must be a positive int, got -1"),
    (lambda: bclib.LinearSVD(4.0, 3), TypeError, r"in_features must be a positive int, got float 4\.0"),
    (lambda: bclib.LinearGroupNJ(True, 3), TypeError, r"in_features must be a positive int, got bool"),
    (lambda: bclib.Conv2dGroupNJ(0, 3, 3), ValueError, r"in_channels must be a positive int, got 0"),
    (lambda: bclib.Conv2dGroupHS(1, 0, 3), ValueError, r"out_channels must be a positive int, got 0"),
    (lambda: bclib.Conv2dSVD(1, "3", 3), TypeError, r"out_channels must be a positive int, got str"),
    (lambda: bclib.Conv2dGroupNJ(1, 3, 0), ValueError, r"kernel_size must be >= 1, got 0"),
    (lambda: bclib.Conv2dGroupNJ(1, 3, 2.5), TypeError, r"kernel_size must be an int or a pair of ints, got 2\.5"),
    (lambda: bclib.Conv2dGroupNJ(1, 3, 3, stride=0), ValueError, r"stride must be >= 1, got 0"),
    (lambda: bclib.Conv2dGroupNJ(1, 3, 3, padding=-1), ValueError, r"padding must be >= 0, got -1"),
    (lambda: bclib.LinearGroupNJ(4, 3, clip_var=0), ValueError, r"clip_var must be a positive finite number, got 0"),
    (lambda: bclib.Conv2dSVD(1, 3, 3, clip_var=-0.1), ValueError, r"clip_var must be a positive finite number, got -0\.1"),
    (lambda: bclib.LinearGroupHS(4, 3, clip_var="big"), TypeError, r"clip_var must be a positive number or None, got 'big'"),
    (lambda: bclib.LinearGroupHS(4, 3, tau0=0), ValueError, r"tau0 must be a positive finite number, got 0"),
    (lambda: bclib.Conv2dGroupHS(1, 3, 3, tau0=-1e-5), ValueError, r"tau0 must be a positive finite number, got -1e-05"),
    (lambda: bclib.HorseshoeGlobalScale(tau0=0.0), ValueError, r"tau0 must be a positive finite number, got 0\.0"),
    (lambda: bclib.LinearGroupHS(4, 3, tau0=0.1, global_scale=bclib.HorseshoeGlobalScale(1e-5)), ValueError, r"tau0=0\.1 differs"),
    (lambda: bclib.LinearGroupHS(4, 3, global_scale=1e-5), TypeError, r"global_scale must be None or a HorseshoeGlobalScale, got float"),
    (lambda: bclib.LinearGroupNJ(4, 3, init_weight=torch.zeros(4, 3)), ValueError,
     r"init_weight must have shape \(3, 4\), got \(4, 3\)"),
    (lambda: bclib.Conv2dGroupHS(2, 3, 5, init_weight=torch.zeros(3, 2, 3, 3)), ValueError,
     r"init_weight must have shape \(3, 2, 5, 5\), got \(3, 2, 3, 3\)"),
    (lambda: bclib.LinearSVD(4, 3, init_bias=torch.zeros(4)), ValueError, r"init_bias must have shape \(3,\), got \(4,\)"),
    (lambda: bclib.Conv2dGroupNJ(1, 3, 3, init_bias=torch.zeros(3, 1)), ValueError, r"init_bias must have shape \(3,\), got \(3, 1\)"),
    (lambda: bclib.LinearGroupNJ(4, 3, init_weight=[[0.0] * 4] * 3), TypeError, r"init_weight must be a torch\.Tensor of shape \(3, 4\), got list"),
    # nn.Conv2d's positional groups lands on bias here: refused, not read as bias=True.
    (lambda: bclib.Conv2dGroupNJ(2, 4, 3, 1, 0, 1, 2), TypeError, r"bias must be True or False, got 2 .*pass groups= by keyword"),
    (lambda: bclib.Conv2dGroupHS(2, 4, 3, groups=2), ValueError, r"groups must be 1 \(bclib's convolutions are not grouped\), got 2"),
    (lambda: bclib.Conv2dSVD(2, 4, 3, padding_mode="reflect"), ValueError, r"padding_mode must be 'zeros'"),
    (lambda: bclib.LinearSVD(2, 4, dtype=torch.int64), TypeError, r"dtype must be a floating torch\.dtype"),
], ids=lambda value: "" if not isinstance(value, str) else value[:40])
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_device_and_dtype_as_nn_linear_takes_them(spec):
    """dtype=torch.float64 makes every parameter float64 (the shared scale of a horseshoe layer too),
    an init_weight of float32 still sets the posterior mean, and the layer runs on float64 inputs;
    a convolution takes nn.Conv2d's groups and padding_mode at their defaults."""
    weight = torch.linspace(-0.5, 0.5, math.prod(spec.weight_shape)).reshape(spec.weight_shape)
    extra = {"groups": 1, "padding_mode": "zeros"} if spec.conv is not None else {}
    layer = spec.make(init_weight=weight, device="cpu", dtype=torch.float64, **extra)
    assert {(p.dtype, p.device.type) for p in layer.parameters()} == {(torch.float64, "cpu")}
    mean, _ = layer.posterior_weight()
    torch.testing.assert_close(mean, weight.double(), rtol=1e-12, atol=1e-12)
    x = torch.randn(2, *spec.example_shape, dtype=torch.float64)
    assert layer.eval()(x).dtype == layer.train()(x).dtype == torch.float64


@pytest.mark.parametrize("layer, x, message", [
    (lambda: bclib.LinearGroupNJ(4, 3), torch.zeros(2, 5),
     r"LinearGroupNJ: expected input with 4 features in the last dimension, got input of shape \(2, 5\)"),
    (lambda: bclib.LinearGroupHS(4, 3), torch.zeros(2, 4, 3),
     r"LinearGroupHS: expected input with 4 features .*, got input of shape \(2, 4, 3\)"),
    (lambda: bclib.LinearSVD(4, 3), torch.zeros(2, 3),
     r"LinearSVD: expected input with 4 features .*, got input of shape \(2, 3\)"),
    (lambda: bclib.Conv2dGroupNJ(3, 2, 3), torch.zeros(2, 4, 8, 8),
     r"Conv2dGroupNJ: expected input of shape \(N, 3, H, W\) or \(3, H, W\), got \(2, 4, 8, 8\)"),
    (lambda: bclib.Conv2dGroupHS(3, 2, 3), torch.zeros(8, 8),
     r"Conv2dGroupHS: expected input of shape \(N, 3, H, W\) or \(3, H, W\), got \(8, 8\)"),
    (lambda: bclib.Conv2dGroupHS(3, 2, 3), torch.zeros(4, 8, 8),
     r"Conv2dGroupHS: expected input of shape \(N, 3, H, W\) or \(3, H, W\), got \(4, 8, 8\)"),
    (lambda: bclib.Conv2dSVD(1, 2, 3), torch.zeros(2, 2, 8, 8),
     r"Conv2dSVD: expected input of shape \(N, 1, H, W\) or \(1, H, W\), got \(2, 2, 8, 8\)"),
])
@pytest.mark.parametrize("train", [True, False])
def test_bad_input_tensor(layer, x, message, train):
    module = layer().train(train)
    with pytest.raises(ValueError, match=message):
        module(x)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("train", [True, False])
def test_input_of_another_dtype_is_rejected_in_both_modes(spec, train):
    layer = spec.make().double().train(train)
    name = type(layer).__name__
    with pytest.raises(TypeError, match=rf"{name}: expected input of dtype torch.float64 .*, got torch.float32"):
        layer(inputs(spec))
    assert layer(inputs(spec).double()).dtype == torch.float64


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_input_that_is_not_a_tensor_is_named(spec):
    layer = spec.make()
    with pytest.raises(TypeError, match=rf"{type(layer).__name__}: expected the input as a torch.Tensor, got ndarray"):
        layer(inputs(spec).numpy())


def test_bayesian_layers_and_the_kl_need_a_module():
    layers = [bclib.LinearGroupNJ(2, 2)]
    with pytest.raises(TypeError, match="module must be an nn.Module .*got list"):
        list(bclib.bayesian_layers(layers))
    with pytest.raises(TypeError, match="module must be an nn.Module .*got list"):
        bclib.kl_divergence(layers)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_second_derivatives_work_in_eval_mode_and_are_refused_in_training(spec):
    """As documented: the sampling functions write first derivatives only."""
    layer = spec.make()
    x = inputs(spec).requires_grad_()
    (grad,) = torch.autograd.grad(layer.eval()(x).pow(2).sum(), x, create_graph=True)
    grad.sum().backward()  # eval mode: plain F.linear / F.conv2d, twice differentiable
    (grad,) = torch.autograd.grad(layer.train()(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.parametrize("make", [bclib.Conv2dGroupNJ, bclib.Conv2dGroupHS, bclib.Conv2dSVD])
def test_conv_padding_strings_and_one_example_as_nn_conv2d(make):
    """padding='same' / 'valid' and an unbatched (C, H, W) input behave as in nn.Conv2d (eval: the posterior mean)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 9)
    for padding, kernel, dilation in (("same", 3, 1), ("same", (3, 5), 2), ("valid", 3, 1)):
        layer = make(2, 4, kernel, padding=padding, dilation=dilation).eval()
        mean, _ = layer.posterior_weight()
        expected = F.conv2d(x.unsqueeze(0), mean, layer.posterior_bias(), 1, padding, dilation).squeeze(0)
        out = layer(x)
        assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6)
        assert layer.train()(x).shape == expected.shape  # a sample, same shape
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1, as in nn.Conv2d; got stride \(2, 2\)"):
        make(2, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"padding='same' with kernel \(2, 2\) .* pads unevenly"):
        make(2, 4, 2, padding="same")
    with pytest.raises(ValueError, match=r"padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"):
        make(2, 4, 3, padding="full")


# ----------------------------------------------------------------------------- the 2017 release's README
def test_release_readme_snippet_runs_with_only_the_import_changed():
    import bclib as BayesianLayer  # the release's README: `import BayesianLayer`

    # Verbatim from the release's README (Usage).
    class Net(nn.Module):
        def __init__(self):
            super(Net, self).__init__()
            # activation
            self.relu = nn.ReLU()
            # layers
            self.fc1 = BayesianLayer.LinearGroupVD(28 * 28, 300, clip_var=0.04)
            self.fc2 = BayesianLayer.LinearGroupVD(300, 100)
            self.fc3 = BayesianLayer.LinearGroupVD(100, 10)
            # layers including kl_divergence
            self.kl_list = [self.fc1, self.fc2, self.fc3]

        def forward(self, x):
            x = x.view(-1, 28 * 28)
            x = self.relu(self.fc1(x))
            x = self.relu(self.fc2(x))
            return self.fc3(x)

        def kl_divergence(self):
            KLD = 0
            for layer in self.kl_list:
                KLD += layer.kl_divergence()
            return KLD

    N = 60000.
    discrimination_loss = nn.functional.cross_entropy

    def objective(output, target, kl_divergence):
        discrimination_error = discrimination_loss(output, target)
        return discrimination_error + kl_divergence / N

    assert BayesianLayer.LinearGroupVD is bclib.LinearGroupNJ and BayesianLayer.Conv2dGroupVD is bclib.Conv2dGroupNJ
    net = Net()
    output = net(torch.randn(6, 1, 28, 28))
    assert output.shape == (6, 10)
    kl = net.kl_divergence()
    torch.testing.assert_close(kl, bclib.kl_divergence(net))
    loss = objective(output, torch.randint(0, 10, (6,)), kl)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
    assert net.fc1.clip_var == 0.04

    # "Retraining a regular neural network" section.
    pretrained = nn.Linear(28 * 28, 300)
    pretrained_weight, pretrained_bias = pretrained.weight.data, pretrained.bias.data
    layer = BayesianLayer.LinearGroupVD(28*28, 300, init_weight=pretrained_weight, init_bias=pretrained_bias)
    x = torch.randn(3, 28 * 28)
    torch.testing.assert_close(layer.eval()(x), pretrained(x), rtol=1e-5, atol=1e-5)


def test_hs_group_without_data_settles_where_the_prior_puts_it():
    # Worked by hand: with no data, each local factor minimises its own KL. For a ~ LN(m, v) against
    # Gamma(1/2, scale 1), dKL/dm = -1/2 + e^(m+v/2) and dKL/dv = -1/(2v) + e^(m+v/2)/2 vanish at v = 2,
    # m = -1 - log 2; against InvGamma(1/2, 1), at v = 2, m = 1 + log 2. So an unused group ends at
    # E[log z~] = (m_a + m_b)/2 = 0 (the scale does NOT shrink) and log alpha = log(e^((2+2)/4) - 1)
    # = log(e - 1): the reason the horseshoe layers prune on log alpha, not on the size of E[log z].
    torch.manual_seed(0)
    layer = bclib.LinearGroupHS(5, 3).double()
    local = [layer.za_mu, layer.za_logvar, layer.zb_mu, layer.zb_logvar]
    optimizer = torch.optim.LBFGS(local, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = layer.kl_divergence()
        loss.backward()
        return loss

    optimizer.step(closure)
    expected = torch.full((5,), 1.0, dtype=torch.float64)
    torch.testing.assert_close(layer.za_logvar.exp(), 2 * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.zb_logvar.exp(), 2 * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.za_mu, -(1 + math.log(2)) * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.zb_mu, (1 + math.log(2)) * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.log_alpha(), math.log(math.e - 1) * expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- initial posterior
@pytest.mark.parametrize("make", [lambda: bclib.LinearGroupNJ(2000, 3), lambda: bclib.Conv2dGroupNJ(80, 300, 5),
                                  lambda: bclib.LinearGroupHS(2000, 3), lambda: bclib.Conv2dGroupHS(80, 300, 5),
                                  lambda: bclib.LinearSVD(2000, 3)], ids=["nj", "nj-conv", "hs", "hs-conv", "svd"])
def test_the_initial_posterior_is_the_documented_one(make):
    """The release's start, in numbers set by hand: group log alphas at -9 (z ~ 1, nearly noiseless),
    weight log-variances at -9 (Sparse VD: -10), and E[w] ~ U(-b, b) with b = 1/sqrt(fan_in), as
    nn.Linear and nn.Conv2d draw it (variance b^2 / 3)."""
    torch.manual_seed(0)
    layer = make()
    fan_in = layer.weight_mu[0].numel()
    bound = 1 / math.sqrt(fan_in)
    mean, _ = layer.posterior_weight()
    assert mean.abs().max() <= bound * (1 + 1e-6)
    assert mean.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
    assert mean.mean().item() == pytest.approx(0.0, abs=0.05 * bound)
    if isinstance(layer, bclib.LinearSVD):
        assert torch.all(layer.weight_logvar == -10.0)
        # log alpha = -10 - log(theta^2), clipped to [-8, 8] (where theta^2 dwarfs the code's 1e-8 guard)
        theta = layer.weight_mu.detach()
        expected = torch.clamp(-10.0 - torch.log(theta**2), -8.0, 8.0)
        clear = theta.abs() > 1e-2
        assert torch.allclose(layer.log_alpha()[clear], expected[clear], atol=1e-3)
        return
    assert layer.weight_logvar.mean().item() == pytest.approx(-9.0, abs=2e-3)
    assert layer.weight_logvar.std().item() == pytest.approx(0.01, rel=0.1)
    log_alpha = layer.log_alpha().detach()
    if isinstance(layer, (bclib.LinearGroupHS, bclib.Conv2dGroupHS)):
        # log(e^{(v_a + v_b)/4} - 1) with v_a = v_b = 2 e^-9: log(e^{e^-9} - 1), a hair above -9.
        assert torch.allclose(log_alpha, torch.full_like(log_alpha, math.log(math.expm1(math.exp(-9.0)))))
        # Per-layer global scale: E[s] = exp(m + v/2) of log s ~ N(m, v), m, v from s_a, s_b by hand.
        scale = layer.global_scale
        m = 0.5 * (scale.sa_mu + scale.sb_mu)
        v = 0.25 * (scale.sa_logvar.exp() + scale.sb_logvar.exp())
        assert torch.exp(m + v / 2).item() == pytest.approx(bound, rel=1e-3)
        assert scale.tau0 == 1e-5
    else:
        assert layer.z_mu.mean().item() == pytest.approx(1.0, abs=2e-3)
        assert layer.z_mu.std().item() == pytest.approx(0.01, rel=0.15)
        # log z_var - log z_mu^2 with both N(., 0.01^2): about N(-9, 0.01^2 + 4 * 0.01^2)
        assert log_alpha.mean().item() == pytest.approx(-9.0, abs=5e-3)
        assert log_alpha.std().item() == pytest.approx(math.sqrt(5) * 0.01, rel=0.15)
