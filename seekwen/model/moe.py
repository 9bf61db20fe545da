"""Mixture of experts: a router (gate) picks top-k routed experts per token; shared experts see
every token. All router variants of the DeepSeek and Qwen families:

- softmax top-k, optionally renormalised (`norm_topk_prob`): DeepSeek-MoE, DeepSeek-V2, Qwen-MoE;
- group-limited greedy (DeepSeek-V2): keep the `topk_group` groups with the best single expert score;
- noaux_tc (DeepSeek-V3/R1): sigmoid scores, choice on scores + e_score_correction_bias (the bias is
  only for choosing, and is what auxiliary-loss-free balancing adjusts), groups ranked by the sum
  of their top-2 scores, weights from the uncorrected scores;
- `routed_scaling_factor` multiplies routed weights; Qwen2-MoE gates its shared expert by a sigmoid.

Experts are stored stacked (w1, w3: [E, inter, dim]; w2: [E, dim, inter]) so tokens can be grouped
by expert and each active expert runs one matmul over its tokens, with no per-token loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .mlp import MLP


class Gate(nn.Module):
    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        self.m = m
        self.weight = nn.Parameter(torch.empty(m.n_routed_experts, dim))
        # DeepSeek-V3's e_score_correction_bias (kept in fp32, like the reference)
        self.bias = None
        if m.score_correction_bias:
            self.bias = nn.Parameter(torch.zeros(m.n_routed_experts), requires_grad=False)
        self.last_indices: torch.Tensor | None = None  # set when `record` is on (for `seekwen routes`)
        self.record = False
        self.last_scores: torch.Tensor | None = None  # [N, E] router scores, with grad (training's balance loss)
        self.keep_scores = False

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.m.router_dtype_fp32:
            return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (weights [N, k] fp32, expert indices [N, k])."""
        m = self.m
        logits = self.logits(x)
        N, E = logits.shape
        if m.scoring == "sigmoid":
            scores = logits.float().sigmoid()
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        choice = scores if self.bias is None else scores + self.bias.float()
        if m.topk_method in ("group_limited_greedy", "noaux_tc") and m.n_group > 1:
            grouped = choice.view(N, m.n_group, E // m.n_group)
            if m.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.max(dim=-1).values
            top_groups = group_scores.topk(m.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            fill = float("-inf") if m.topk_method == "noaux_tc" else 0.0
            choice = grouped.masked_fill(~keep[..., None], fill).view(N, E)
        indices = choice.topk(m.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if m.norm_topk_prob and m.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + m.norm_eps)
        weights = weights * m.routed_scaling_factor
        if not m.router_dtype_fp32:
            weights = weights.to(logits.dtype)
        if self.record:
            self.last_indices = indices.detach()
        if self.keep_scores:
            self.last_scores = scores
        return weights, indices


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights. Expert ownership can later be split by rank."""

    def __init__(self, n_experts: int, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter, dim))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, inter, dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter))  # down

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(h, self.w1[e])) * F.linear(h, self.w3[e]), self.w2[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights/indices [N, k] -> sum_k weights * expert_k(x) [N, dim]."""
        if x.is_cuda and grouped_mm_works(x.device.type, x.dtype):
            return dispatch_grouped(x, weights, indices, self.w1, self.w3, self.w2)
        return dispatch(x, weights, indices, self.w1.shape[0], self.expert)


GROUPED_MM = hasattr(torch, "_grouped_mm")  # torch >= 2.8: one kernel for many per-expert products


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (which dtypes it takes varies with the
    torch version and GPU); tried once on a tiny problem, then a dict lookup (which torch.compile
    traces without a graph break)."""
    key = (device_type, dtype)
    if key not in _GROUPED_OK:
        _GROUPED_OK[key] = _try_grouped_mm(device_type, dtype)
    return _GROUPED_OK[key]


def _try_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not GROUPED_MM:
        return False
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device_type)
        b = torch.ones(2, 16, 16, dtype=dtype, device=device_type).transpose(1, 2)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=device_type)
        return bool((torch._grouped_mm(a, b, offs=offs) == 16).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def dispatch_grouped(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """`dispatch` for stacked experts (w1, w3 [E, inter, dim], w2 [E, dim, inter]) with fixed shapes and no
    host sync: the (token, expert) pairs sorted by expert, and each of the three products one grouped
    matmul over all experts at once (`torch._grouped_mm`: group e is rows offs[e-1]..offs[e] times
    expert e's weight). Every shape depends only on N and k, so it can be captured in a CUDA graph."""
    N, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(w1.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    token = order // k
    xs = x[token]  # [N*k, dim], grouped by expert
    # weights [E, out, in] -> [E, in, out] views (column-major per expert: the layout the kernel wants)
    def grouped(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)

    y = grouped(F.silu(grouped(xs, w1)) * grouped(xs, w3), w2)  # [N*k, dim]
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def dispatch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    n_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[:, k] * expert(indices[:, k], x) for x [N, dim], weights/indices [N, k]: every expert
    that received tokens runs once over its contiguous slice of the sorted rows (see `dispatch_sorted`)."""

    def run(xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n:
                ys.append(expert(e, xs[start : start + n]))
                start += n
        return torch.cat(ys)

    return dispatch_sorted(x, weights, indices, n_experts, run)


def dispatch_sorted(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    n_experts: int,
    run: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> torch.Tensor:
    """The grouping every host-side dispatch shares. The N*k (token, expert) pairs are sorted by expert
    with one argsort and the tokens gathered once in that order; `run(xs, counts)` computes every pair's
    unweighted expert output for those sorted rows (counts[e] rows for expert e, in order); the results
    are weighted and scattered back with one multiply and one index_add (per-expert small ops are what
    few-token decode pays for)."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()  # one host sync per layer
    token = order // k
    y = run(x[token], counts) * weights.reshape(-1)[order, None]  # x[token]: [N*k, dim], grouped by expert
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        self.gate = Gate(dim, m)
        self.experts = Experts(m.n_routed_experts, dim, m.intermediate_size)
        self.shared = MLP(dim, m.shared_intermediate_size) if m.shared_intermediate_size else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if m.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        y = self.experts(x, weights, indices)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            y = y + s
        return y.view(shape)
