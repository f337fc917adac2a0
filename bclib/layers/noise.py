"""The standard normal noise of every sampled forward pass, drawn so that ``torch.compile`` stays fast.

Eager PyTorch draws ``torch.randn`` with the device's vectorised generator. Under ``torch.compile``
TorchInductor replaces ``randn`` by its own counter-based generator written into the generated
kernels; on the CPU those are scalar loops, and the noise of one LeNet-300-100 training step (about
200,000 numbers) then takes longer than the whole rest of the step. :func:`standard_normal` hands the
draw to a custom operator that the compiler calls as it is (``torch.randn`` inside), so compiled and
eager training draw the same numbers from the same generator. On GPUs Inductor's own generator is
fast, and it is left alone.

The operator is tagged ``nondeterministic_seeded``, as ``aten::randn`` is: the compiler neither
merges two draws of the same shape into one nor recomputes a draw in the backward pass (either
would silently change the gradients). It also takes the tensor the draw must follow (``after``):
a draw that depends on nothing may be moved, and a network's draws then came in another order
than eager's (other numbers for the same seed).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["standard_normal"]


@torch.library.custom_op("bclib::standard_normal", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _standard_normal_op(after: Tensor, size: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.randn(size, dtype=dtype, device=device)  # after only orders the draw


@_standard_normal_op.register_fake
def _(after, size, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


def standard_normal(size, *, dtype: torch.dtype, device: torch.device, after: Tensor | None = None) -> Tensor:
    """``torch.randn(size, dtype=dtype, device=device)``; under ``torch.compile`` on the CPU through
    an operator the compiler does not rewrite, drawn after ``after`` is computed (see the module
    docstring; the layers pass their input or the output the noise is for)."""
    if torch.compiler.is_compiling() and torch.device(device).type == "cpu":
        after = torch.empty(0, dtype=dtype, device=device) if after is None else after.detach()
        return _standard_normal_op(after, list(size), dtype, torch.device(device))
    return torch.randn(size, dtype=dtype, device=device)
