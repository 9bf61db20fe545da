"""The inference fast path: fused, re-laid-out and quantized siblings of the reference modules, and the
C++ kernels they call. `prepare(model)` swaps them in; the reference modules in `seekwen.model` stay the
definition of the math."""

from .prepare import QUANTIZE, GroupedExperts, prepare

__all__ = ["QUANTIZE", "GroupedExperts", "prepare"]
