"""The docstrings are part of the API: their examples run, and every public name documents itself."""
import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import bclib

MODULES = sorted(info.name for info in pkgutil.walk_packages(bclib.__path__, "bclib."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, globs={"torch": torch, "nn": nn, **vars(module)}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_the_docstring_examples_are_found():
    # Guards the test above against passing vacuously (a finder that found nothing).
    finder = doctest.DocTestFinder(exclude_empty=True)
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples >= 30


@pytest.mark.parametrize("name", sorted(bclib.__all__))
def test_public_names_document_args_and_an_example(name):
    obj = getattr(bclib, name)
    if not callable(obj):
        pytest.fail(f"bclib.{name} is not callable; extend this test for it")
    doc = inspect.getdoc(obj) or ""
    # Classes that bclib builds for the user (results) list Attributes instead of constructor Args.
    arguments = "Args" in doc or "Attributes:" in doc
    missing = ([] if arguments else ["Args"]) + ([] if "Example:" in doc else ["Example"])
    has_forward = isinstance(obj, type) and issubclass(obj, nn.Module) and obj.forward is not nn.Module.forward
    if has_forward and "Shape" not in doc:
        missing.append("Shape")
    assert not missing, f"the docstring of bclib.{name} lacks {missing}"
