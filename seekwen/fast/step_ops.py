"""Fused CPU ops for the per-step host work of decode (C++ in `csrc/step.h`, part of the kernels
extension, `kernels.get()`):

- `rms_norm(x, w, eps)`: RMSNorm over the last dimension in one pass per row (fp32); `F.rms_norm` costs
  ~10 us per call on CPU in torch 2.13 for a few hundred numbers, and a decode step has 2-3 per layer.

`get()` returns the module, or None where it cannot be built (no compiler, SEEKWEN_NO_KERNELS set, not
x86): callers then use `F.rms_norm` (the same math up to summation order).
"""

from __future__ import annotations

import torch


def get():
    """The compiled ops (part of the kernels extension), or None (see the module docstring)."""
    from . import kernels

    return kernels.get()


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the ops serve x [..., n] with weight w [n]: fp32 on CPU, and not under autograd (they have
    no backward)."""
    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))
