"""RoPE and its long-context rules, computed independently here: the seed's worked table, relative
position, the default/linear/HF-dynamic/YaRN inverse frequencies, Qwen v1's LogN and dynamic NTK, and
HF-style dynamic NTK with a cache of already-rotated keys (against transformers)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import decode_logits, rotate_half

import seekwen
from seekwen.config import RopeConfig
from seekwen.model.rope import RotaryEmbedding, apply_rope, compute_inv_freq, logn_scale, qwen_ntk_alpha


def _seed_rope_table(inv_freq: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    freqs = torch.outer(t, inv_freq)  # [seq_len, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [seq_len, dim]
    return emb.cos(), emb.sin()


def test_rope_table_seed_example():
    # the seed's 4-dim example: inv_freq = [1, 0.01], angles at positions 0, 1 = [[0, 0], [1, 0.01]]
    inv = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
    assert torch.allclose(inv, torch.tensor([1.0, 0.01]))
    assert torch.allclose(torch.outer(torch.tensor([0.0, 1.0]), inv), torch.tensor([[0.0, 0.0], [1.0, 0.01]]))
    # seekwen's tables equal the torch.outer/cat construction, and rotating with them equals the
    # HF formula x * cos + rotate_half(x) * sin on the concatenated tables
    dim, L = 16, 40
    rope = RotaryEmbedding(RopeConfig(theta=10000.0, dim=dim, max_position_embeddings=32))
    cos_ref, sin_ref = _seed_rope_table(rope.inv_freq, L)
    pos = torch.arange(L)[None]
    cos, sin = rope(pos)
    assert torch.allclose(cos[0], cos_ref[:, : dim // 2], atol=1e-6)
    assert torch.allclose(sin[0], sin_ref[:, : dim // 2], atol=1e-6)
    x = torch.randn(1, L, 3, dim)
    ref = x * cos_ref[None, :, None] + rotate_half(x) * sin_ref[None, :, None]
    assert torch.allclose(apply_rope(x, cos, sin), ref, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_relative_position(interleaved):
    torch.manual_seed(0)
    dim = 32
    rope = RotaryEmbedding(RopeConfig(theta=10000.0, dim=dim, interleaved=interleaved, max_position_embeddings=64))
    q, k = torch.randn(dim), torch.randn(dim)

    def dot(m: int, n: int) -> float:
        cos, sin = rope(torch.tensor([[m, n]]))
        qm = apply_rope(q.view(1, 1, 1, dim).expand(1, 2, 1, dim), cos, sin, interleaved)[0, 0, 0]
        kn = apply_rope(k.view(1, 1, 1, dim).expand(1, 2, 1, dim), cos, sin, interleaved)[0, 1, 0]
        return float(qm.double() @ kn.double())

    for offset in (0, 3, 17):
        vals = [dot(n + offset, n) for n in (0, 5, 40, 100)]
        assert max(vals) - min(vals) < 1e-3, (offset, vals)
    assert abs(dot(10, 7) - dot(10, 2)) > 1e-2  # and it does depend on m - n


# ----------------------------------------------------------------------------------------------------
# RoPE scalings, from their formulas


def _inv(theta: float, dim: int) -> torch.Tensor:
    return torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def test_default_and_linear_inv_freq():
    inv, attn = compute_inv_freq(RopeConfig(theta=10000.0, dim=8))
    assert torch.allclose(inv.double(), torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64), rtol=1e-6)
    assert attn == 1.0
    inv, _ = compute_inv_freq(RopeConfig(theta=10000.0, dim=8, type="linear", factor=4.0))
    assert torch.allclose(inv.double(), torch.tensor([0.25, 0.025, 0.0025, 0.00025], dtype=torch.float64), rtol=1e-6)


def test_hf_dynamic_ntk_base():
    r = RopeConfig(theta=10000.0, dim=8, type="dynamic", factor=2.0, max_position_embeddings=32)
    for L in (1, 16, 32):  # at or below the context: plain RoPE
        inv, _ = compute_inv_freq(r, L)
        assert torch.allclose(inv.double(), _inv(10000.0, 8), rtol=1e-5)
    for L, base in ((64, 10000.0 * 3 ** (8 / 6)), (48, 10000.0 * 2 ** (8 / 6))):  # 2*64/32-1 = 3, 2*48/32-1 = 2
        inv, _ = compute_inv_freq(r, L)
        assert torch.allclose(inv.double(), _inv(base, 8), rtol=1e-5), L


def test_yarn_ramp_and_attention_factor():
    dim, theta, orig, factor = 64, 10000.0, 4096, 40.0
    r = RopeConfig(theta=theta, dim=dim, type="yarn", factor=factor, original_max_position_embeddings=orig,
                   max_position_embeddings=orig * 40, beta_fast=32.0, beta_slow=1.0)

    # pair i turns orig * theta^(-2i/d) / 2pi times in the original context; ramp from beta_fast to beta_slow turns
    def pair(turns: float) -> float:
        return dim * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(pair(32)), math.ceil(pair(1))
    assert (low, high) == (10, 23)
    inv, attn = compute_inv_freq(r)
    base = _inv(theta, dim)
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want = base[i] * (1 - ramp) + base[i] / factor * ramp
        assert abs(inv[i].item() - want.item()) <= 1e-6 * want.item(), i
    assert inv[0].item() == pytest.approx(1.0) and inv[-1].item() == pytest.approx(base[-1].item() / factor)
    assert attn == pytest.approx(0.1 * math.log(factor) + 1)  # 1.3689
    # DeepSeek: mscale / mscale_all_dim -> cos/sin factor is their ratio
    r2 = RopeConfig(**{**r.__dict__, "mscale": 1.0, "mscale_all_dim": 0.707})
    _, attn2 = compute_inv_freq(r2)
    assert attn2 == pytest.approx((0.1 * math.log(40) + 1) / (0.0707 * math.log(40) + 1))


# ----------------------------------------------------------------------------------------------------
# Qwen v1: LogN and dynamic NTK


def test_qwen_logn_values():
    S = 8
    pos = torch.arange(0, 40)[None]  # 0-based; Qwen's 1-based index is i = pos + 1
    got = logn_scale(pos, S)[0]
    for p in range(40):
        i = p + 1
        want = 1.0 if i <= S else math.log(i) / math.log(S)
        assert got[p].item() == pytest.approx(want, rel=1e-6), p
    assert got[S - 1].item() == 1.0 and got[S].item() > 1.0  # i = 8 -> 1; i = 9 -> log_8 9
    assert got[31].item() == pytest.approx(math.log(32, 8))  # i = 32: log_8 32 = 5/3


@pytest.mark.parametrize("L,alpha", [(1, 1), (8, 1), (9, 3), (12, 3), (16, 3), (17, 7), (32, 7), (33, 15)])
def test_qwen_ntk_alpha(L, alpha):
    assert qwen_ntk_alpha(L, 8) == alpha


def test_qwen_ntk_base():
    d = 16
    rope = RotaryEmbedding(RopeConfig(theta=10000.0, dim=d, type="qwen_dynamic", seq_length=8))
    pos = torch.arange(20)[None]
    for alpha in (1.0, 3.0, 7.0):
        cos, sin = rope(pos, alpha=torch.tensor([alpha]))
        base = 10000.0 * alpha ** (d / (d - 2))
        ang = torch.outer(torch.arange(20, dtype=torch.float64), _inv(base, d))
        assert torch.allclose(cos[0].double(), ang.cos(), atol=1e-5)
        assert torch.allclose(sin[0].double(), ang.sin(), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# HF dynamic NTK with a cache of already-rotated keys


def test_hf_dynamic_ntk_cached_generate_matches_transformers(tmp_path):
    """Trade-off: HF's "dynamic" rope recomputes the base for each forward call from that call's
    largest position, but keys already in the cache keep the rotation (the base) they were written
    with; so cached decoding past max_position_embeddings is not the same as re-running the full
    sequence (which would re-rotate every key with the new base). seekwen chooses to match
    transformers' cached behaviour token for token, rather than re-rotating the cache each step."""
    transformers = pytest.importorskip("transformers")
    from hf_models import PINNED_TRANSFORMERS, Spec, hf_greedy, make_checkpoint

    if transformers.__version__ != PINNED_TRANSFORMERS:
        pytest.skip(f"pinned to transformers=={PINNED_TRANSFORMERS}")
    spec = Spec("qwen2_dynamic", "qwen2", dict(num_key_value_heads=2), rope={"type": "dynamic", "factor": 2.0})
    hf, folder = make_checkpoint(spec, tmp_path)
    ours = seekwen.load(folder, dtype=torch.float32)
    assert ours.cfg.rope.type == "dynamic" and ours.cfg.rope.factor == 2.0
    ids = torch.randint(3, 160, (1, spec.max_pos - 4), generator=torch.Generator().manual_seed(0))
    n = 16  # grows from 28 to 44 tokens, past max_position_embeddings = 32
    ref = hf_greedy(hf, ids, None, n)
    got = ours.generate(ids, max_new_tokens=n, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, ref)
    # the trade-off is real: at 44 tokens the full forward (every key re-rotated with the new base)
    # differs from the cached decode's last logits
    seq = torch.cat((ids, got), 1)
    with torch.no_grad():
        full_last = ours(seq[:, :-1])[:, -1]
        dec_last = decode_logits(ours, ids, n - 1)[-1]
    assert (full_last - dec_last).abs().max().item() > 1e-3
