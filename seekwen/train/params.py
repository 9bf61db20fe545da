"""Parameter counts: total, and active per token (routed experts count top_k / n_routed_experts)."""

from __future__ import annotations

from ..model.moe import Experts
from ..model.transformer import Transformer


def count_params(model: Transformer) -> tuple[int, int]:
    """(total, active per token); both include the embedding and the LM head."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, Experts):
            m = model.cfg.moe
            routed = sum(p.numel() for p in module.parameters())
            inactive += routed - routed * m.top_k // m.n_routed_experts
    return total, total - inactive
