"""The README's code runs as printed."""
import math
import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_layer_snippet_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"### Use the layers in your own network\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README lost its 'Use the layers in your own network' snippet"
    monkeypatch.chdir(tmp_path)  # the snippet writes lenet300.bcz into the working folder
    torch.manual_seed(0)
    namespace = {"x": torch.rand(16, 1, 28, 28), "y": torch.randint(0, 10, (16,)),
                 "x_train": torch.rand(64, 1, 28, 28), "y_train": torch.randint(0, 10, (64,)),
                 "x_test": torch.rand(32, 1, 28, 28), "y_test": torch.randint(0, 10, (32,))}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    assert math.isfinite(namespace["loss"].item())
    small = namespace["small"]
    assert isinstance(small, nn.Sequential) and (tmp_path / "lenet300.bcz").is_file()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(small(x), namespace["result"].reduced_precision_model()(x))
    assert "compression" in capsys.readouterr().out
    # The retraining lines: same rates, ten epochs, a file that loads to the retrained network.
    tuned = namespace["tuned"]
    rates = [{k: v for k, v in r.report.to_dict().items() if k != "file"} for r in (tuned, namespace["result"])]
    assert rates[0] == rates[1] and len(namespace["history"]) == 10
    retrained = namespace["bclib"].load_compressed(tmp_path / "lenet300_retrained.bcz")
    assert torch.equal(retrained(x), tuned.reduced_precision_model()(x))
    # The deeper pruning: what compress gives at the lower thresholds, with the file's bits.
    direct = namespace["bclib"].compress(namespace["model"], [-4, -4, -4])
    direct = direct.with_bits([row.bits for row in namespace["result"].report.layers])
    assert namespace["deeper"].report.to_dict() == direct.report.to_dict()
    # The untrained layers' log alphas are all near -9: at their medians the same call does cut.
    log_alpha, prune_further = namespace["log_alpha"], namespace["prune_further"]
    medians = {name: float(a.median()) for name, a in log_alpha.items()}
    cut = prune_further(namespace["read"], namespace["model"], log_alpha, medians)
    direct = namespace["bclib"].compress(namespace["model"], medians)
    assert cut.report.architecture == direct.report.architecture != namespace["result"].report.architecture
    assert [r.weights_kept for r in cut.report.layers] == [r.weights_kept for r in direct.report.layers]


def test_readme_conversion_snippet_runs():
    block = re.search(r"### Convert a network you already have\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README lost its 'Convert a network you already have' snippet"
    torch.manual_seed(0)
    namespace = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    bclib, trained, model = namespace["bclib"], namespace["trained"], namespace["model"]
    assert [type(m) for m in model if not isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.Flatten))] == [
        bclib.Conv2dGroupHS, bclib.LinearGroupHS, bclib.LinearGroupHS]
    x = torch.rand(8, 1, 28, 28)
    assert torch.allclose(model(x), trained(x), atol=1e-5) and type(trained[0]) is nn.Conv2d
    shared = namespace["shared"].eval()  # one global scale for the network, the same starting predictions
    scales = {id(layer.global_scale) for _, layer in bclib.bayesian_layers(shared)}
    assert len(scales) == 1 and torch.allclose(shared(x), trained(x), atol=1e-5)


def test_readme_module_class_snippet_runs():
    block = re.search(r"`bclib.compress` takes an `nn.Sequential` or a module class.*?```python\n(.*?)```",
                      README.read_text(), re.S)
    assert block is not None, "README lost its module-class compress snippet"
    torch.manual_seed(0)
    namespace = {}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    model, exported = namespace["model"], namespace["result"].model
    assert [type(m).__name__ for m in exported] == [
        "Conv2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Flatten", "Linear", "ReLU", "Dropout", "Linear",
        "LogSoftmax"]
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():  # untrained: every log alpha is near -9, nothing is pruned at -3
        assert torch.allclose(exported(x), model(x), atol=1e-4)


def test_readme_results_table_is_what_the_command_prints_from_the_committed_runs():
    from bclib.tables import results_table

    block = re.search(r"## Results\n.*?```text\n(.*?)\n```", README.read_text(), re.S)
    assert block is not None, "README lost its results table"
    expected = results_table(README.parent / "book" / "results")
    assert block.group(1) == expected, (
        "README's results table differs from `python -m bclib results`; paste its output into the README")


def test_readme_results_table_rows_line_up():
    """Every row of the committed table keeps its numbers in their columns: a row label longer than
    its 32 characters would push them right (prior 10 + 1 + label 32 + 1 + numbers 34 = 78)."""
    from bclib.tables import ZERO_SURVIVOR_MARK, results_table

    lines = results_table(README.parent / "book" / "results").splitlines()
    rows = [line.removesuffix(ZERO_SURVIVOR_MARK) for line in lines if line.endswith("x")]
    assert rows and all(len(line) <= 80 for line in lines)
    assert [line for line in rows if len(line) != 78] == []


def test_readme_command_lines_parse_with_the_command_line_parser():
    # The README's commands drift when an option is renamed; parsing them (not running them) catches it.
    import shlex

    from bclib.__main__ import _parser
    from bclib.experiments import EXPERIMENTS

    lines = [line.split("  #")[0] for line in README.read_text().splitlines() if line.startswith("python -m bclib ")]
    assert len(lines) >= 10
    for line in lines:
        words = shlex.split(line)[3:]
        if words == ["--help"]:
            continue
        args = _parser().parse_args(words)
        assert set(getattr(args, "only", None) or ()) <= set(EXPERIMENTS), line
