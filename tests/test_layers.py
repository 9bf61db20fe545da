"""Single layers against their formulas and the seed documents' worked examples: RMSNorm, and the MoE
router (softmax top-k, with and without renormalisation; DeepSeek-V2 renormalises or scales, never both)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from seekwen.config import MoEConfig
from seekwen.hf.families import parse_config
from seekwen.model.moe import Gate
from seekwen.model.norm import RMSNorm


def test_rmsnorm_seed_example():
    h = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    out = RMSNorm(4, eps=1e-6)(h)[0]
    # mean of squares (4 + 4 + 1 + 1) / 4 = 2.5, sqrt = 1.5811
    exact = torch.tensor([2.0, -2.0, 1.0, 1.0]) / math.sqrt(2.5 + 1e-6)
    assert torch.allclose(out, exact, atol=1e-6)
    assert torch.allclose(out, torch.tensor([1.27, -1.27, 0.63, 0.63]), atol=6e-3)  # the seed's rounding


def _gate(n: int, k: int, norm: bool, scoring: str = "softmax") -> Gate:
    m = MoEConfig(n_routed_experts=n, top_k=k, intermediate_size=1, scoring=scoring, norm_topk_prob=norm,
                  norm_eps=1e-20)
    g = Gate(n, m)
    with torch.no_grad():
        g.weight.copy_(torch.eye(n))  # router logits = the input itself
    return g


def test_softmax_top2_routing_seed_example():
    r = torch.tensor([[3.4, 1.1, 2.2]])
    e = [math.exp(v) for v in (3.4, 1.1, 2.2)]
    p = [v / sum(e) for v in e]  # [0.7135, 0.0715, 0.2149]; the seed's "[0.70, 0.06, 0.24]" is loosely rounded
    w, idx = _gate(3, 2, norm=False)(r)
    assert idx[0].tolist() == [0, 2]  # experts 1 and 3 (1-based), as the seed says
    assert torch.allclose(w[0], torch.tensor([p[0], p[2]]), atol=1e-6)
    assert abs(w[0, 0].item() - 0.7135) < 1e-4 and abs(w[0, 1].item() - 0.2149) < 1e-4
    # norm_topk_prob renormalises the two kept weights to sum 1
    w, idx = _gate(3, 2, norm=True)(r)
    assert idx[0].tolist() == [0, 2]
    assert torch.allclose(w[0], torch.tensor([p[0], p[2]]) / (p[0] + p[2]), atol=1e-6)
    assert abs(w[0].sum().item() - 1) < 1e-6


def test_deepseek_v2_renormalises_or_scales_never_both():
    """DeepSeek-V2's reference: norm_topk_prob (top_k > 1) renormalises the top-k weights *instead of*
    multiplying by routed_scaling_factor; V3 does both. Published V2 configs (norm false) just scale."""
    raw = json.loads((Path(__file__).parent / "fixtures" / "configs" / "deepseek-v2.json").read_text())
    assert parse_config(raw).moe.routed_scaling_factor == raw["routed_scaling_factor"] != 1.0
    assert not parse_config(raw).moe.norm_topk_prob
    normed = parse_config({**raw, "norm_topk_prob": True}).moe
    assert normed.norm_topk_prob and normed.routed_scaling_factor == 1.0
    v3 = json.loads((Path(__file__).parent / "fixtures" / "configs" / "deepseek-v3.json").read_text())
    m = parse_config(v3).moe
    assert m.norm_topk_prob and m.routed_scaling_factor == v3["routed_scaling_factor"] == 2.5
    gate = Gate(4, normed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(normed.n_routed_experts, 4))
    w, _ = gate(torch.randn(5, 4))
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
