"""``torch.compile``'s module wrapper (``OptimizedModule``) and the module it runs.

The wrapper holds the module as ``_orig_mod``, so its ``named_modules()`` and ``state_dict()`` put
``"_orig_mod."`` before every name. What must not depend on whether a network was compiled (its
checkpoints, its compression) reads the module itself.
"""
from __future__ import annotations

import sys

from torch import nn

# What the wrapper puts before the names of the modules it runs.
COMPILED_PREFIX = "_orig_mod."


def original_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs; any other module itself."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled in this process (importing it takes a second)
        return model
    from torch._dynamo.eval_frame import OptimizedModule
    return model._orig_mod if isinstance(model, OptimizedModule) else model
