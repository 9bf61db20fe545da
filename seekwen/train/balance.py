"""DeepSeek-V3 expert load balancing for training (DeepSeek-V3 technical report, section 2.1.2).

- Auxiliary-loss-free: after each step, every routed expert's bias b_e (e_score_correction_bias, used
  only to choose experts) moves by `u * sign(mean_load - load_e)`: overloaded experts get less
  attractive, underloaded ones more.
- Sequence-wise balance loss (optional, small alpha): for each sequence of T tokens,
  L = alpha * sum_i f_i P_i, f_i = E / (K T) * #tokens routed to i, P_i = mean_t s'_{i,t} with
  s'_{i,t} = s_{i,t} / sum_j s_{j,t} the normalised affinities; averaged over the batch.
- Load statistics per MoE layer: max load / mean load ("MaxVio" + 1) and coefficient of variation.
"""

from __future__ import annotations

import torch

from ..model.moe import Gate
from ..model.transformer import Transformer


def gates(model: Transformer) -> list[tuple[int, Gate]]:
    # the MTP layers' blocks count as layers L, L+1, ... (their Hub index)
    found = [(i, getattr(block.ffn, "gate", None)) for i, block in enumerate(model.blocks())]
    return [(i, g) for i, g in found if isinstance(g, Gate)]


def set_recording(model: Transformer, indices: bool, scores: bool) -> None:
    for _, g in gates(model):
        g.record, g.keep_scores = indices, scores
        g.last_indices = g.last_scores = None


def expert_counts(model: Transformer) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert in the last forward, per MoE layer: {layer: [E] float64}."""
    out = {}
    for i, g in gates(model):
        if g.last_indices is not None:
            out[i] = torch.bincount(g.last_indices.reshape(-1), minlength=g.m.n_routed_experts).double().cpu()
    return out


@torch.no_grad()
def update_bias(model: Transformer, counts: dict[int, torch.Tensor], rate: float) -> None:
    """Auxiliary-loss-free balancing: b_e += rate * sign(mean load - load_e)."""
    for i, g in gates(model):
        if g.bias is None or i not in counts:
            continue
        load = counts[i].to(g.bias.device)
        g.bias.add_(rate * torch.sign(load.mean() - load).to(g.bias.dtype))


def sequence_balance_loss(model: Transformer, batch_size: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, summed over MoE layers (needs scores and indices kept)."""
    total = None
    for _, g in gates(model):
        if g.last_scores is None or g.last_indices is None:
            continue
        E, K = g.m.n_routed_experts, g.m.top_k
        s = g.last_scores.float().view(batch_size, -1, E)  # [B, T, E]
        T = s.shape[1]
        chosen = torch.zeros_like(s).scatter_(2, g.last_indices.view(batch_size, T, K), 1.0)
        f = chosen.sum(1) * (E / (K * T))  # [B, E], no gradient (counts)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
        loss = (f * p).sum(-1).mean()
        total = loss if total is None else total + loss
    if total is None:
        return torch.zeros((), device=model.device)
    return total


def load_stats(counts: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
    """Per layer: max/mean load ratio, min/mean ratio and coefficient of variation of expert loads."""
    out = {}
    for i, c in counts.items():
        mean = float(c.mean())
        if mean <= 0:
            continue
        out[i] = {"max_ratio": float(c.max()) / mean, "min_ratio": float(c.min()) / mean,
                  "cv": float(c.std(unbiased=False)) / mean}
    return out


def format_stats(stats: dict[int, dict[str, float]]) -> str:
    return " ".join(f"L{i}:max/mean={s['max_ratio']:.2f},cv={s['cv']:.2f}" for i, s in sorted(stats.items()))
