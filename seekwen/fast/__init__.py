"""The inference fast path: sibling modules built from the reference ones (`layers`), fast and quantized
linear layers (`linear`) and the C++ kernels they call (`kernels`). `prepare(model)` swaps them in, and
`plan(model)` says which implementation runs where. The reference modules in `seekwen.model` stay the
definition of the math."""

from .layers import GroupedExperts
from .prepare import QUANTIZE, format_plan, plan, prepare

__all__ = ["QUANTIZE", "GroupedExperts", "format_plan", "plan", "prepare"]
