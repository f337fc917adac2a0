"""Tests of :mod:`bclib.train`: the objective by hand, the loop on a small slice of real MNIST
(learning, seeds, checkpoints, the variance clip, KL warm-up, callbacks), configuration errors,
and a few hundred steps of the VGG-like network with BatchNorm staying finite.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bclib
from bclib.data import TensorSplit
from bclib.models import lenet_300_100, vgg_cifar
from bclib.train import TrainConfig, elbo_loss, evaluate, fit

METRIC_KEYS = {"epoch", "loss", "ce", "kl", "beta", "lr", "train_error", "test_error", "test_ce", "seconds"}


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _lenet300_nj(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lenet_300_100("nj")


@pytest.fixture(scope="module")
def small_mnist(mnist):
    train, test = mnist
    return train.subset(2000), test.subset(1000)


# ----------------------------------------------------------------------------- the objective
def test_elbo_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    # -log softmax(logits)[target] = log(sum exp(logits)) - logits[target]
    ce0 = math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)) - 2.0
    ce1 = math.log(2 * math.exp(0.5) + math.exp(0.0)) - 0.0
    kl, n, beta = torch.tensor(1234.5), 60000, 0.25
    expected = (ce0 + ce1) / 2 + beta * 1234.5 / n
    assert elbo_loss(logits, target, kl, n, beta).item() == pytest.approx(expected, rel=1e-6)
    assert elbo_loss(logits, target, kl, n).item() == pytest.approx((ce0 + ce1) / 2 + 1234.5 / n, rel=1e-6)


def test_evaluate_by_hand():
    model = nn.Linear(2, 2, bias=False)
    model.weight.data = torch.eye(2)  # logits = inputs
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    result = evaluate(model.train(), TensorSplit(x, y), batch_size=3)
    # Wrong: example 2 (argmax 0, label 1). Example 3 ties at 0, argmax picks class 0 = label.
    assert result["error"] == pytest.approx(1 / 4)
    ce = [math.log(math.e + 1) - 1, math.log(1 + math.e**2) - 2, math.log(math.e**3 + 1), math.log(2)]
    assert result["ce"] == pytest.approx(sum(ce) / 4, rel=1e-6)
    assert model.training  # evaluate restores the mode


# ----------------------------------------------------------------------------- learning on real MNIST
@pytest.fixture(scope="module")
def fitted(small_mnist):
    train, test = small_mnist
    model = _lenet300_nj()
    config = TrainConfig(epochs=2, batch_size=100, lr=3e-3, lr_final=1e-3, device="cpu")
    return model, fit(model, train, test, config, progress=False)


def test_fit_learns_a_small_slice_of_mnist(fitted):
    model, history = fitted
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert set(row) == METRIC_KEYS
        assert all(math.isfinite(v) for v in row.values())
        assert 0 <= row["train_error"] <= 1 and 0 <= row["test_error"] <= 1
    assert history[-1]["test_error"] < 0.3  # chance is 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training  # fit leaves the model in eval mode
    # The learning rate decays geometrically from lr (epoch 1) to lr_final (last epoch).
    assert [row["lr"] for row in history] == pytest.approx([3e-3, 1e-3])


def test_fit_reports_the_error_and_cross_entropy_of_the_network_it_trains(small_mnist):
    """Adam's steps of ~1e-12 are below the float32 spacing of all but the tiniest weights (~4e-9 at
    0.03), so the epoch's training metrics are those of the starting network, counted here in one
    pass: the share of examples whose argmax is not the label, and the mean cross-entropy per
    example. 500 examples in batches of 128 leave a last batch of 116, so a mean of the batch
    means is off by ~2e-5 (relative), well outside rel=1e-6."""
    train, test = small_mnist
    train, test = train.subset(500), test.subset(300)
    torch.manual_seed(0)
    model = lenet_300_100(None)  # deterministic: training and evaluation forwards are the same
    with torch.no_grad():
        train_logits, test_logits = model(train.x), model(test.x)
    train_wrong = int((train_logits.argmax(1) != train.y).sum())
    test_wrong = int((test_logits.argmax(1) != test.y).sum())
    assert 300 < train_wrong < 500  # near chance (0.9): an accuracy reported as the error could not pass
    history = fit(model, train, test, TrainConfig(epochs=1, batch_size=128, lr=1e-12, lr_final=1e-12, device="cpu"),
                  progress=False)
    row = history[0]
    assert row["train_error"] == pytest.approx(train_wrong / 500, abs=1e-12)
    assert row["test_error"] == pytest.approx(test_wrong / 300, abs=1e-12)
    assert row["ce"] == pytest.approx(F.cross_entropy(train_logits, train.y).item(), rel=1e-6)
    assert row["test_ce"] == pytest.approx(F.cross_entropy(test_logits, test.y).item(), rel=1e-6)
    assert row["kl"] == 0.0 and row["loss"] == pytest.approx(row["ce"], rel=1e-6)  # no Bayesian layer


def test_the_step_decays_geometrically_and_gradients_are_clipped(small_mnist, monkeypatch):
    """Three epochs from 1e-2 to 1e-4: the middle epoch runs at 1e-3 (geometric; linear would give
    5.05e-3), in every parameter group (log-variances at variance_lr_scale times it). With grad_clip
    the global gradient norm the optimiser sees never exceeds it, without it it does."""
    train, test = (split.subset(200) for split in small_mnist)
    seen = {"lr": [], "norm": []}
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen["norm"].append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        seen["lr"].append([group["lr"] for group in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    config = TrainConfig(epochs=3, batch_size=100, lr=1e-2, lr_final=1e-4, variance_lr_scale=3.0, device="cpu")
    history = fit(_lenet300_nj(), train, test, config, progress=False)
    assert [row["lr"] for row in history] == pytest.approx([1e-2, 1e-3, 1e-4])
    assert seen["lr"][2] == pytest.approx([1e-3, 3e-3])  # epoch 2's first step (two steps per epoch)
    assert max(seen["norm"]) > 0.5
    seen["norm"].clear()
    fit(_lenet300_nj(), train, test, replace(config, grad_clip=0.5), progress=False)
    assert max(seen["norm"]) <= 0.5 * (1 + 1e-3)  # float32 rounding of the rescaled gradients


def test_reported_test_error_is_the_eval_mode_error(fitted, small_mnist):
    model, history = fitted
    _, test = small_mnist
    with torch.no_grad():
        predictions = model.eval()(test.x).argmax(1)
    assert history[-1]["test_error"] == pytest.approx((predictions != test.y).float().mean().item())


def test_same_seed_gives_identical_metrics(small_mnist):
    train, test = small_mnist
    train = train.subset(500)
    config = TrainConfig(epochs=1, batch_size=100, seed=5, device="cpu")
    first = fit(_lenet300_nj(), train, test, config, progress=False)
    second = fit(_lenet300_nj(), train, test, config, progress=False)
    assert _without_time(first) == _without_time(second)
    other_seed = TrainConfig.from_dict({**config.to_dict(), "seed": 6})
    third = fit(_lenet300_nj(), train, test, other_seed, progress=False)
    assert third[0]["loss"] != first[0]["loss"]


def test_checkpoint_resume_equals_training_straight(small_mnist, tmp_path):
    train, test = small_mnist
    train, test = train.subset(500), test.subset(200)
    values = dict(batch_size=100, lr=2e-3, lr_final=5e-4, kl_warmup_epochs=2, variance_lr_scale=10.0, device="cpu")
    straight_model = _lenet300_nj()
    straight = fit(straight_model, train, test, TrainConfig(epochs=2, **values),
                   checkpoint=tmp_path / "straight.pt", progress=False)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(epoch, model, metrics):  # called before the epoch's checkpoint is written
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(_lenet300_nj(), train, test, TrainConfig(epochs=2, **values), checkpoint=tmp_path / "resumed.pt",
            callbacks=[stop_in_epoch_2], progress=False)
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["epoch"] == 1
    resumed_model = _lenet300_nj(seed=123)  # its own start is overwritten by the checkpoint
    resumed = fit(resumed_model, train, test, TrainConfig(epochs=2, **values),
                  checkpoint=tmp_path / "resumed.pt", progress=False)

    assert _without_time(resumed) == _without_time(straight)
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name

    state = torch.load(tmp_path / "resumed.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name

    # A finished checkpoint is not trained further.
    again = fit(resumed_model, train, test, TrainConfig(epochs=2, **values),
                checkpoint=tmp_path / "resumed.pt", progress=False)
    assert _without_time(again) == _without_time(straight)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


@pytest.mark.filterwarnings("ignore::UserWarning")  # Inductor's notes on a CPU-only machine
def test_a_compiled_run_resumes_uncompiled_and_the_other_way(small_mnist, tmp_path):
    # A checkpoint holds the network's own names, not those of torch.compile's wrapper (_orig_mod.*),
    # which were refused as "another network" by the other form.
    train, test = small_mnist[0].subset(200), small_mnist[1].subset(100)
    config = TrainConfig(epochs=2, batch_size=100, device="cpu")

    class Stop(Exception):
        pass

    def stop_in_epoch_2(epoch, model, metrics):
        if epoch == 2:
            raise Stop

    def plain(model):
        return model

    for first, second in ((torch.compile, plain), (plain, torch.compile)):
        path = tmp_path / f"{first.__name__}.pt"
        with pytest.raises(Stop):
            fit(first(_lenet300_nj()), train, test, config, checkpoint=path, callbacks=[stop_in_epoch_2],
                progress=False)
        state = torch.load(path, weights_only=True)
        assert list(state["model"]) == list(_lenet300_nj().state_dict())
        model = _lenet300_nj(seed=123)
        history = fit(second(model), train, test, config, checkpoint=path, progress=False)
        assert [row["epoch"] for row in history] == [1, 2]
        assert history[0] == json.loads(state["history_json"])[0]
        assert not torch.equal(model.state_dict()["1.weight_mu"], state["model"]["1.weight_mu"])  # trained on


def test_a_checkpoint_of_another_recipe_is_refused_and_an_old_one_trains_at_this_rate(small_mnist, tmp_path,
                                                                                       monkeypatch):
    from bclib import train as train_module

    train, test = (split.subset(200) for split in small_mnist)
    config = TrainConfig(epochs=2, batch_size=100, lr=1e-2, lr_final=1e-3, device="cpu")
    fit(_lenet300_nj(), train, test, config, checkpoint=tmp_path / "run.pt", progress=False)
    # The layout too: the layers draw their noise in memory order, so it changes what a run computes.
    for changes, named in (({"epochs": 3}, "epochs=2 there, 3 here"), ({"seed": 7}, "seed=0 there, 7 here"),
                           ({"lr": 1e-4, "lr_final": 1e-4}, "lr=0.01 there, 0.0001 here"),
                           ({"memory_format": "channels_last"}, "memory_format=None there, 'channels_last' here")):
        with pytest.raises(ValueError, match=f"written by another recipe .*{re.escape(named)}"):
            fit(_lenet300_nj(), train, test, replace(config, **changes), checkpoint=tmp_path / "run.pt",
                progress=False)
        with pytest.raises(ValueError, match=f"written by another recipe .*{re.escape(named)}"):
            train_module.check_checkpoint_recipe(tmp_path / "run.pt", replace(config, **changes))
    # Another network (another prior here) is named as such, not a RuntimeError of load_state_dict,
    # and run_experiment's check before it writes anything says the same, leaving the file as it was.
    written = (tmp_path / "run.pt").read_bytes()
    with pytest.raises(ValueError, match="run.pt holds another network than the one to resume"):
        fit(lenet_300_100("hs"), train, test, config, checkpoint=tmp_path / "run.pt", progress=False)
    with pytest.raises(ValueError, match=r"holds another network than the one to resume \(tensors 1.global_scale"):
        train_module.check_checkpoint_recipe(tmp_path / "run.pt", config, lenet_300_100("hs"))
    train_module.check_checkpoint_recipe(tmp_path / "run.pt", config, _lenet300_nj())  # the same network passes
    assert (tmp_path / "run.pt").read_bytes() == written
    # How fast it runs may change.
    assert len(fit(_lenet300_nj(), train, test, replace(config, keep_freed_memory=False),
                   checkpoint=tmp_path / "run.pt", progress=False)) == 2
    # A checkpoint written without its config (before configs were saved) is resumed unchecked, at
    # this config's rates: the optimiser's saved base rates (0.01) must not survive the resume.
    model = _lenet300_nj()
    optimizer = torch.optim.Adam(train_module._param_groups(model, config))
    train_module.save_checkpoint(tmp_path / "old.pt", model, optimizer, 1, [{"epoch": 1}])
    rates = []
    set_lr = train_module._set_lr
    monkeypatch.setattr(train_module, "_set_lr", lambda optimizer, config, epoch: rates.append(
        set_lr(optimizer, config, epoch)) or rates.append([g["lr"] for g in optimizer.param_groups]) or rates[-2])
    fit(model, train, test, replace(config, lr=1e-4, lr_final=1e-4, variance_lr_scale=3.0),
        checkpoint=tmp_path / "old.pt", progress=False)
    assert rates == [1e-4, [pytest.approx(1e-4), pytest.approx(3e-4)]]


def test_variances_are_clipped_after_every_step(small_mnist):
    train, test = small_mnist
    train, test = train.subset(250), test.subset(100)
    model = _lenet300_nj()
    layers = [layer for _, layer in bclib.bayesian_layers(model)]
    with torch.no_grad():
        for layer in layers[:2]:
            layer.weight_logvar.fill_(0.0)  # variance 1, far above fc1's clip_var = 0.04
    calls = []
    clip = layers[0].clip_variances
    layers[0].clip_variances = lambda: (calls.append(1), clip())
    fit(model, train, test, TrainConfig(epochs=2, batch_size=50, lr=1e-6, device="cpu"), progress=False)
    assert len(calls) == 2 * 5  # epochs * steps
    assert layers[0].weight_logvar.max().item() == pytest.approx(math.log(0.04), abs=1e-6)
    # fc2 has no clip: its log-variance stays near 0 (lr 1e-6 barely moves it).
    assert layers[1].weight_logvar.min().item() > -0.01


def test_kl_warmup_rises_linearly(small_mnist):
    """beta = min(1, (epoch + step / steps) / warm-up epochs), per step.

    With a tiny learning rate the KL barely changes, so (loss - ce) * N / KL is the epoch's mean beta:
    (e + (S - 1) / (2 S)) / W over S equal steps; the reported beta is the last step's, (e + (S - 1) / S) / W.
    """
    train, test = small_mnist
    train, test = train.subset(256), test.subset(100)
    n, steps, warmup = 256, 4, 4
    history = fit(_lenet300_nj(), train, test,
                  TrainConfig(epochs=3, batch_size=64, lr=1e-9, lr_final=1e-9, kl_warmup_epochs=warmup, device="cpu"),
                  progress=False)
    for e, row in enumerate(history):
        assert row["beta"] == pytest.approx((e + (steps - 1) / steps) / warmup)
        mean_beta = (row["loss"] - row["ce"]) * n / row["kl"]
        assert mean_beta == pytest.approx((e + (steps - 1) / (2 * steps)) / warmup, rel=1e-3)

    without = fit(_lenet300_nj(), train, test, TrainConfig(epochs=1, batch_size=64, lr=1e-9, device="cpu"),
                  progress=False)
    assert without[0]["beta"] == 1.0
    assert (without[0]["loss"] - without[0]["ce"]) * n / without[0]["kl"] == pytest.approx(1.0, rel=1e-3)


def test_callbacks_get_epoch_model_and_metrics_in_eval_mode(small_mnist):
    train, test = small_mnist
    train, test = train.subset(200), test.subset(100)
    model = _lenet300_nj()
    calls = []

    def callback(epoch, seen_model, metrics):
        calls.append((epoch, seen_model is model, seen_model.training, dict(metrics)))

    history = fit(model, train, test, TrainConfig(epochs=3, batch_size=100, device="cpu"),
                  callbacks=[callback, lambda *args: calls.append("second")], progress=False)
    first = [c for c in calls if c != "second"]
    assert [c[0] for c in first] == [1, 2, 3]
    assert all(same and not training for _, same, training, _ in first)
    assert [c[3] for c in first] == history
    assert calls.count("second") == 3 and calls[1] == "second"  # each epoch calls every callback in order


def test_variance_dtype_reaches_every_bayesian_layer(small_mnist):
    train, test = small_mnist
    model = _lenet300_nj()
    history = fit(model, train.subset(200), test.subset(100),
                  TrainConfig(epochs=1, batch_size=100, device="cpu", variance_dtype="bfloat16"), progress=False)
    assert all(layer.variance_dtype is torch.bfloat16 for _, layer in bclib.bayesian_layers(model))
    assert math.isfinite(history[0]["loss"])
    # variance_dtype=None leaves what the layers were set to.
    fit(model, train.subset(200), test.subset(100), TrainConfig(epochs=1, batch_size=100, device="cpu"),
        progress=False)
    assert all(layer.variance_dtype is torch.bfloat16 for _, layer in bclib.bayesian_layers(model))


def test_channels_last_trains_every_convolution_in_that_layout(small_mnist):
    from bclib.models import lenet5_caffe

    train, test = small_mnist
    torch.manual_seed(0)
    model = lenet5_caffe("nj")
    layouts = []  # (training, input channels-last, output channels-last) at each convolution call
    for layer in (model[0], model[3]):
        layer.register_forward_hook(lambda module, inputs, output: layouts.append(
            (module.training, inputs[0].is_contiguous(memory_format=torch.channels_last),
             output.is_contiguous(memory_format=torch.channels_last))))
    history = fit(model, train.subset(200), test.subset(100),
                  TrainConfig(epochs=1, batch_size=100, device="cpu", memory_format="channels_last"),
                  progress=False)
    assert all(math.isfinite(value) for value in history[0].values())
    assert layouts and all(inside and out for _, inside, out in layouts)
    assert {training for training, _, _ in layouts} == {True, False}
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    # The layout changes how the posterior-mean network computes, not what: same predictions.
    plain = lenet5_caffe("nj")
    plain.load_state_dict(model.state_dict())
    assert all(p.is_contiguous() for p in plain.parameters())
    torch.testing.assert_close(model.eval()(test.x[:50]), plain.eval()(test.x[:50]), rtol=1e-4, atol=1e-5)


def test_a_resume_in_another_layout_is_refused_and_one_unchecked_lays_the_optimiser_state_out_like_the_weights(
        small_mnist, tmp_path):
    """The layout changes the noise drawn, so a run's checkpoint resumes only in its own. One written
    without a config is resumed unchecked, in any layout: fused Adam pairs a weight with its moments
    in memory order, and moments loaded in the layout of the checkpoint beside channels-last weights
    would update the wrong weights, with no error."""
    from bclib.models import lenet5_caffe

    class Stop(Exception):
        pass

    def stop_at(epoch_to_stop):  # before that epoch's checkpoint is written, as an interruption would
        def callback(epoch, model, metrics):
            if epoch == epoch_to_stop:
                raise Stop
        return callback

    train, test = (split.subset(200) for split in small_mnist)
    config = TrainConfig(epochs=3, batch_size=100, device="cpu")
    torch.manual_seed(0)
    with pytest.raises(Stop):
        fit(lenet5_caffe("nj"), train, test, config, checkpoint=tmp_path / "run.pt", callbacks=[stop_at(2)],
            progress=False)
    # The layout of PyTorch's fused Adam is what makes this matter: shown here on one tensor.
    weight = torch.nn.Parameter(torch.randn(4, 3, 5, 5))
    twin = torch.nn.Parameter(weight.detach().clone())
    optimizers = [torch.optim.Adam([p], lr=0.1, fused=True) for p in (weight, twin)]
    for step in range(2):
        for p, optimizer in zip((weight, twin), optimizers):
            p.grad = torch.full_like(p, 1.0) + torch.arange(p.numel()).view(p.shape) * (step + 1)
            optimizer.step()
            if step == 0 and p is twin:
                state = optimizer.state[p]
                state["exp_avg"] = state["exp_avg"].contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(weight, twin)
    written = (tmp_path / "run.pt").read_bytes()
    with pytest.raises(ValueError, match=r"run.pt was written by another recipe \(memory_format=None there, "
                                         r"'channels_last' here\)"):
        fit(lenet5_caffe("nj"), train, test, replace(config, memory_format="channels_last"),
            checkpoint=tmp_path / "run.pt", progress=False)
    assert (tmp_path / "run.pt").read_bytes() == written
    for memory_format, stop in (("channels_last", [stop_at(3)]), (None, [])):
        state = torch.load(tmp_path / "run.pt", weights_only=True)
        del state["config_json"]  # as a checkpoint written before configs were saved
        torch.save(state, tmp_path / "run.pt")
        try:
            fit(lenet5_caffe("nj"), train, test, replace(config, memory_format=memory_format),
                checkpoint=tmp_path / "run.pt", callbacks=stop, progress=False)
        except Stop:
            pass
        state = torch.load(tmp_path / "run.pt", weights_only=True)
        weights = state["model"]
        layers = {name: tensor for name, tensor in weights.items() if tensor.dim() == 4}
        # The optimiser numbers its parameters group by group (bclib.train._param_groups: log-variances last).
        names = [name for name, _ in lenet5_caffe("nj").named_parameters()]
        in_groups = [n for n in names if not n.endswith("logvar")] + [n for n in names if n.endswith("logvar")]
        moments = {in_groups[index]: value for index, value in state["optimizer"]["state"].items()}
        for name, tensor in layers.items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert moments[name][key].stride() == tensor.stride(), (memory_format, name, key)
        wanted = torch.channels_last if memory_format else torch.contiguous_format
        assert all(tensor.is_contiguous(memory_format=wanted) for name, tensor in layers.items()
                   if tensor.shape[1] > 1)


def test_channels_last_converts_batches_of_several_channels():
    torch.manual_seed(0)
    model = vgg_cifar("nj", width=0.125)
    first = []
    model[0].register_forward_hook(lambda module, inputs, output: first.append(
        inputs[0].is_contiguous(memory_format=torch.channels_last)
        and not inputs[0].is_contiguous()))  # three channels: one layout or the other, not both
    data = TensorSplit(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    history = fit(model, data, data, TrainConfig(epochs=1, batch_size=8, device="cpu",
                                                 memory_format="channels_last"), progress=False)
    assert all(math.isfinite(value) for value in history[0].values())
    assert first[:2] == [True, True]


def test_autocast_trains_under_autocast_and_evaluates_in_full_precision(small_mnist):
    train, test = small_mnist
    model = _lenet300_nj()
    seen = []  # (training, autocast dtype or None) at each call of the first layer
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(
        (module.training, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
    history = fit(model, train.subset(200), test.subset(100),
                  TrainConfig(epochs=1, batch_size=100, device="cpu", autocast="bfloat16"), progress=False)
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {None}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(value) for value in history[0].values())


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", -1), ("batch_size", 0),
    ("lr", 0.0), ("lr", -1e-3), ("lr_final", 0.0), ("variance_lr_scale", -1.0),
    ("kl_warmup_epochs", -1), ("variance_dtype", "bf16"), ("variance_dtype", "int8"),
    ("variance_dtype", "float16"),  # x^2 overflows float16 from |x| > 256
    ("autocast", "float16"), ("autocast", True), ("memory_format", "nhwc"), ("memory_format", True),
    ("seed", -1), ("seed", 2**32),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("lr", "1e-3"), ("lr_final", None), ("variance_lr_scale", float("nan")), ("grad_clip", "1"),
    ("kl_warmup_epochs", "2"), ("lr", True), ("seed", 1.0), ("seed", None),
    ("epochs", 1.5), ("epochs", True), ("batch_size", 2.0), ("keep_freed_memory", 1), ("keep_freed_memory", "yes"),
])
def test_config_type_errors_name_the_field(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be"):
        TrainConfig(**{field: value})


def test_config_rejects_a_device_torch_does_not_know():
    with pytest.raises(ValueError, match="device must be None or a torch device name .*got 'gpu'"):
        TrainConfig(device="gpu")
    assert TrainConfig(device="cuda:1").device == "cuda:1"  # checked by name, not by presence


def test_evaluate_checks_first_and_leaves_the_mode_as_it_found_it():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).train()
    split = TensorSplit(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        evaluate(model, split, batch_size=0)
    assert model.training
    # Zero weights, bias favouring class 1: two of three right, cross-entropy -log(e / (1 + e)).
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0]))
    result = evaluate(model, split)
    assert result["error"] == pytest.approx(1 / 3)
    assert result["ce"] == pytest.approx((2 * math.log(1 + math.e) - 2 + math.log(1 + math.e)) / 3)
    assert model.training
    # A model without parameters runs where its input is.
    identity = evaluate(nn.Flatten(), TensorSplit(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([1, 0])))
    assert identity["error"] == 0.0


def test_fit_names_arguments_of_the_wrong_type():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    split = TensorSplit(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"train must be a bclib.data.TensorSplit .*got tuple"):
        fit(model, (split.x, split.y), split, TrainConfig(epochs=1), progress=False)
    with pytest.raises(TypeError, match=r"test must be a bclib.data.TensorSplit .*got list"):
        fit(model, split, [split], TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="train must hold at least one example"):
        fit(model, split.subset(0), split, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="test must hold at least one example"):
        fit(model, split, split.subset(0), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="x and y must hold the same number of examples, got 4 and 3"):
        TensorSplit(split.x, split.y[:3])
    with pytest.raises(TypeError, match=r"config must be a bclib.train.TrainConfig, got dict"):
        fit(model, split, split, {"epochs": 1}, progress=False)


def test_config_from_dict_rejects_unknown_keys_and_round_trips():
    config = TrainConfig(epochs=3, lr=2e-3, kl_warmup_epochs=1)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"epochs": 3, "learning_rate": 1e-3})


# ----------------------------------------------------------------------------- stability with BatchNorm
def _synthetic_cifar(n: int, seed: int) -> TensorSplit:
    """Ten classes, each a fixed random 3x32x32 pattern plus noise, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(99)) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=generator)
    x = (0.6 * patterns[y] + 0.6 * torch.randn(n, 3, 32, 32, generator=generator)).clamp(-1, 1)
    return TensorSplit(x, y)


@pytest.mark.parametrize("prior", ["nj", "hs"])
def test_vgg_with_batchnorm_stays_finite_for_200_steps(prior):
    torch.manual_seed(0)
    # width 1/16 (4 to 32 channels) keeps 200 steps within seconds on a shared 2-core CPU; the
    # structure that misbehaved in the release (13 Bayesian convs, each followed by BatchNorm) is intact.
    model = vgg_cifar(prior, width=0.0625)
    train, test = _synthetic_cifar(1600, seed=1), _synthetic_cifar(64, seed=2)
    # Harsher than the experiments' recipe (3x): 10x larger steps for log-variances; decaying lr.
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, lr_final=1e-4, variance_lr_scale=10.0, device="cpu")
    history = fit(model, train, test, config, progress=False)  # raises on non-finite metrics
    assert len(history) == 2
    assert all(math.isfinite(v) for row in history for v in row.values())
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    for _, layer in bclib.bayesian_layers(model):
        assert torch.isfinite(layer.log_alpha()).all()
    assert torch.isfinite(bclib.kl_divergence(model))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(test.x)).all()
        assert torch.isfinite(model.train()(test.x)).all()
    assert history[-1]["loss"] < history[0]["loss"]  # it optimises, not just survives


def test_a_damaged_checkpoint_is_a_value_error_that_names_it_and_a_missing_one_is_not(tmp_path):
    from bclib.train import check_checkpoint_recipe, load_checkpoint, save_checkpoint

    net = nn.Sequential(bclib.LinearGroupNJ(6, 4))
    config = TrainConfig(device="cpu")
    good = tmp_path / "good.pt"
    save_checkpoint(good, net, torch.optim.Adam(net.parameters()), 1, [], config)
    data = good.read_bytes()
    # Cut in half or missing its last bytes (a full disk): torch raises a bare OSError (errno 22) there.
    for damaged in (data[: len(data) // 2], data[:-10], b"", b"not a checkpoint" * 8):
        path = tmp_path / "damaged.pt"
        path.write_bytes(damaged)
        for read in (lambda: load_checkpoint(path, net), lambda: check_checkpoint_recipe(path, config, net)):
            with pytest.raises(ValueError, match="damaged.pt.*cannot be read back as a bclib checkpoint"):
                read()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", net)


def test_a_readable_file_that_is_no_checkpoint_is_refused_before_anything_is_restored(tmp_path):
    """A file torch reads but that holds something else (a bare state_dict, a tensor, an edited
    checkpoint) is the damaged file's ValueError, naming what is wrong, raised before the model, the
    optimiser or the random state is changed."""
    from bclib.train import _param_groups, check_checkpoint_recipe, load_checkpoint, save_checkpoint

    config = TrainConfig(device="cpu")
    torch.manual_seed(1)
    source = nn.Sequential(bclib.LinearGroupNJ(6, 4))
    source_optimizer = torch.optim.Adam(_param_groups(source, config))  # as fit builds it
    source(torch.randn(3, 6)).sum().backward()
    source_optimizer.step()
    save_checkpoint(tmp_path / "good.pt", source, source_optimizer, 1, [{"epoch": 1}], config)
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    without = lambda key: {k: v for k, v in good.items() if k != key}  # noqa: E731
    cases = [
        (source.state_dict(), "no 'model', 'optimizer', 'epoch', 'history_json', 'rng_cpu' in it: a bare state_dict"),
        (torch.zeros(3), "it holds a Tensor, not the dict"),
        (without("rng_cpu"), "no 'rng_cpu' in it"),
        (without("optimizer"), "no 'optimizer' in it"),
        ({**good, "model": {"0.weight_mu": [1.0]}}, "its 'model' is not a dict of named tensors"),
        ({**good, "epoch": -1}, "its 'epoch' is not an int >= 0 but int -1"),
        ({**good, "epoch": "1"}, "its 'epoch' is not an int >= 0 but str '1'"),
        ({**good, "history_json": "{"}, "its 'history_json' is not JSON of a list"),
        ({**good, "history_json": '{"epoch": 1}'}, "its 'history_json' is not JSON of a list"),
        ({**good, "config_json": "[]"}, "its 'config_json' is not JSON of a dict"),
        ({**good, "rng_cpu": torch.zeros(5)}, "its 'rng_cpu' is not a uint8 tensor but torch.float32"),
        ({**good, "rng_cpu": torch.zeros(5056, dtype=torch.uint8)},  # the right size, not a valid state
         "its 'rng_cpu' is not the state of a CPU generator"),
        ({**good, "rng_cuda": [torch.zeros(3)]}, "its 'rng_cuda' is not a list of uint8 tensors"),
        ({**good, "optimizer": [1]}, "its 'optimizer' is not an optimiser's state_dict"),
    ]
    torch.manual_seed(0)
    net = nn.Sequential(bclib.LinearGroupNJ(6, 4))
    optimizer = torch.optim.Adam(_param_groups(net, config))
    weights, moments = {k: v.clone() for k, v in net.state_dict().items()}, optimizer.state_dict()
    rng = torch.get_rng_state()
    path = tmp_path / "other.pt"
    for content, problem in cases:
        torch.save(content, path)
        for read in (lambda: load_checkpoint(path, net, optimizer, config),
                     lambda: load_checkpoint(path, net, optimizer), lambda: check_checkpoint_recipe(path, config, net)):
            with pytest.raises(ValueError, match="other.pt.*cannot be read back as a bclib checkpoint "
                                                 + re.escape(f"({problem}")):
                read()
            assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items()), problem
            assert optimizer.state_dict() == moments and torch.equal(torch.get_rng_state(), rng), problem
    # An optimiser's state that the one to resume cannot take is refused before the weights are loaded.
    torch.save({**good, "optimizer": {"state": {}, "param_groups": [{"params": list(range(6))}]}}, path)
    for read in (lambda: load_checkpoint(path, net, optimizer, config),
                 lambda: check_checkpoint_recipe(path, config, net)):
        with pytest.raises(ValueError, match=re.escape("other.pt holds the state of an optimiser whose parameter "
                                                       "groups hold [6] parameters, not [3, 3] as the one to resume")):
            read()
        assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
        assert optimizer.state_dict() == moments
    # Only what is restored is needed: a network without its optimiser loads from a file without one.
    torch.save(without("optimizer"), path)
    assert load_checkpoint(path, net) == (1, [{"epoch": 1}])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.state_dict().items())


def test_fit_that_raises_leaves_the_model_in_the_mode_it_came_in(small_mnist):
    train, test = small_mnist
    x = train.x[:20].clone()
    x[3] = float("nan")  # the epoch's metrics are not finite
    for mode in (False, True):
        net = lenet_300_100("nj").train(mode)
        with pytest.raises(FloatingPointError):
            fit(net, TensorSplit(x, train.y[:20]), test, TrainConfig(epochs=1, batch_size=10, device="cpu"),
                progress=False)
        assert net.training is mode
    net = lenet_300_100("nj").train()  # the one above holds NaN weights now
    history = fit(net, TensorSplit(train.x[:20], train.y[:20]), test, TrainConfig(epochs=1, device="cpu"),
                  progress=False)
    assert len(history) == 1 and net.training is False  # a run that ends leaves it in eval mode


def test_evaluate_builds_no_autograd_graph(small_mnist):
    _, test = small_mnist
    net = lenet_300_100("nj")
    seen = []
    net.register_forward_hook(lambda module, inputs, output: seen.append(output.requires_grad))
    result = evaluate(net, test.subset(50))
    assert seen == [False] and 0.0 <= result["error"] <= 1.0
