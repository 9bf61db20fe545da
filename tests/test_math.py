"""Tests from the math: the seed documents' worked examples (where they are right), RoPE and its
scalings computed independently here, Qwen v1 (LogN, dynamic NTK) and DeepSeek-MoE v1 (not in
transformers) against reference forwards written from their formulas, MLA absorbed vs naive, and
HF-style dynamic NTK with a cache of already-rotated keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import seekwen
from seekwen.config import MoEConfig, RopeConfig
from seekwen.hf.families import parse_config
from seekwen.model.moe import Gate
from seekwen.model.norm import RMSNorm
from seekwen.model.rope import RotaryEmbedding, apply_rope, compute_inv_freq, logn_scale, qwen_ntk_alpha
from seekwen.runtime.decoder import Decoder

TOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# the seeds' worked examples


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


def _seed_rope_table(inv_freq: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    freqs = torch.outer(t, inv_freq)  # [seq_len, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [seq_len, dim]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
    ref = x * cos_ref[None, :, None] + _rotate_half(x) * sin_ref[None, :, None]
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


def test_deepseek_softmax_scale_uses_mscale_all_dim_squared():
    raw = _deepseek_v3_raw()
    cfg = parse_config(raw)
    m = 0.1 * 0.707 * math.log(4.0) + 1
    assert cfg.softmax_scale == pytest.approx((16 + 8) ** -0.5 * m * m)
    assert cfg.rope.interleaved and cfg.rope.dim == 8 and cfg.head_dim == 24  # no head_dim in config.json
    raw["rope_scaling"] = None
    assert parse_config(raw).softmax_scale == pytest.approx(24**-0.5)
    raw["num_key_value_heads"] = 128  # what transformers 5 saves for any MLA head count: ignored by MLA
    assert parse_config(raw).num_kv_heads == 2


def _deepseek_v3_raw() -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 64,
        "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "n_shared_experts": 1, "n_routed_experts": 4,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 8, "q_lora_rank": 12, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "qk_nope_head_dim": 16, "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1,
        "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 32, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                              "mscale_all_dim": 0.707},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
    }


# ----------------------------------------------------------------------------------------------------
# Qwen v1: LogN, dynamic NTK, a real-format checkpoint and a reference forward


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


QWEN_V1 = dict(
    D=32, H=4, V=96, L=2, I=2 * 40, S=8,
)


def write_qwen_v1(folder: Path, seed: int = 0, rotary_pct: float = 1.0, dynamic: bool = True, logn: bool = True,
                  tie: bool = False) -> dict[str, torch.Tensor]:
    """A tiny Qwen (v1) checkpoint: config.json as Qwen-7B writes it, weights with its tensor names."""
    D, H, V, L, I, S = (QWEN_V1[k] for k in ("D", "H", "V", "L", "I", "S"))
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0, "bf16": True, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
        "hidden_size": D, "initializer_range": 0.02, "intermediate_size": I, "kv_channels": D // H,
        "layer_norm_epsilon": 1e-6, "max_position_embeddings": 4 * S, "model_type": "qwen", "no_bias": True,
        "num_attention_heads": H, "num_hidden_layers": L, "onnx_safe": None, "rotary_emb_base": 10000,
        "rotary_pct": rotary_pct, "scale_attn_weights": True, "seq_length": S, "softmax_in_fp32": False,
        "tie_word_embeddings": tie, "tokenizer_class": "QWenTokenizer", "transformers_version": "4.32.0",
        "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False, "use_dynamic_ntk": dynamic,
        "use_flash_attn": "auto", "use_logn_attn": logn, "vocab_size": V,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.15, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"transformer.wte.weight": rnd(V, D, std=0.5), "transformer.ln_f.weight": rnd(D, std=0.2, mean=1.0)}
    if not tie:
        w["lm_head.weight"] = rnd(V, D)
    for i in range(L):
        p = f"transformer.h.{i}."
        w[p + "ln_1.weight"] = rnd(D, std=0.2, mean=1.0)
        w[p + "attn.c_attn.weight"] = rnd(3 * D, D)
        w[p + "attn.c_attn.bias"] = rnd(3 * D, std=0.1)
        w[p + "attn.c_proj.weight"] = rnd(D, D)
        w[p + "ln_2.weight"] = rnd(D, std=0.2, mean=1.0)
        w[p + "mlp.w1.weight"] = rnd(I // 2, D)
        w[p + "mlp.w2.weight"] = rnd(I // 2, D)
        w[p + "mlp.c_proj.weight"] = rnd(D, I // 2)
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return w


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def qwen_v1_reference(w: dict, ids: torch.Tensor, rotary_pct=1.0, alpha=1.0, logn=True) -> torch.Tensor:
    """Qwen (v1) forward for one unpadded sequence [S], from its formulas; alpha = the NTK alpha to use."""
    D, H, L, S_train = QWEN_V1["D"], QWEN_V1["H"], QWEN_V1["L"], QWEN_V1["S"]
    hd = D // H
    rd = int(hd * rotary_pct)
    T = ids.shape[0]
    base = 10000.0 * alpha ** (rd / (rd - 2))
    inv = 1.0 / base ** (torch.arange(0, rd, 2).float() / rd)
    ang = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [T, 1, rd]

    def rope(x):  # [T, H, hd]: rotate-half on the first rd dims, the rest passes through
        r, rest = x[..., :rd], x[..., rd:]
        return torch.cat((r * cos + _rotate_half(r) * sin, rest), -1)

    x = w["transformer.wte.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"transformer.h.{i}."
        h = _rms(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(T, H, hd) for t in qkv.split(D, -1))
        q, k = rope(q), rope(k)
        if logn and T > S_train:
            pos1 = torch.arange(1, T + 1).double()
            q = q * torch.where(pos1 > S_train, pos1.log() / math.log(S_train), 1.0).float()[:, None, None]
        att = torch.einsum("shd,thd->hst", q, k) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("hst,thd->shd", att, v).reshape(T, D)
        x = x + o @ w[p + "attn.c_proj.weight"].T
        h = _rms(x, w[p + "ln_2.weight"])
        a1 = h @ w[p + "mlp.w1.weight"].T
        a2 = h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    x = _rms(x, w["transformer.ln_f.weight"])
    head = w.get("lm_head.weight", w["transformer.wte.weight"])
    return x @ head.T


@pytest.mark.parametrize("rotary_pct", [1.0, 0.5])
def test_qwen_v1_checkpoint_matches_reference(tmp_path, rotary_pct):
    w = write_qwen_v1(tmp_path, rotary_pct=rotary_pct)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    cfg = model.cfg
    assert (cfg.model_type, cfg.head_dim, cfg.intermediate_size, cfg.rope.seq_length) == ("qwen", 8, 40, 8)
    assert cfg.rope.dim == int(8 * rotary_pct) and cfg.torch_dtype == "bfloat16" and cfg.logn_attn
    S = QWEN_V1["S"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for T, alpha in ((6, 1.0), (S, 1.0), (S + 3, 3.0), (3 * S, 7.0)):  # full forward: alpha from the length
            ids = torch.randint(0, QWEN_V1["V"], (T,), generator=g)
            ref = qwen_v1_reference(w, ids, rotary_pct, alpha=alpha)
            got = model(ids[None])[0]
            err = (got - ref).abs().max().item()
            assert err <= TOL, (T, err)


def test_qwen_v1_tied_embeddings_and_no_ntk(tmp_path):
    w = write_qwen_v1(tmp_path, tie=True, dynamic=False, logn=False, seed=3)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, QWEN_V1["V"], (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(ids[None])[0] - qwen_v1_reference(w, ids, alpha=1.0, logn=False)).abs().max().item()
    assert err <= TOL


def _greedy_full_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    seq = ids.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = model(seq)[:, -1].argmax(-1)
            out.append(tok)
            seq = torch.cat((seq, tok[:, None]), 1)
    return torch.stack(out, 1)


def test_qwen_v1_generate_without_dynamic_ntk_equals_full_forward(tmp_path):
    write_qwen_v1(tmp_path, dynamic=False, logn=True, seed=5)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, QWEN_V1["V"], (2, 6), generator=torch.Generator().manual_seed(2))
    got = model.generate(ids, max_new_tokens=10, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, _greedy_full_forward(model, ids, 10))


def test_qwen_v1_generate_fixes_ntk_alpha_at_prefill(tmp_path):
    """Qwen's own code picks the NTK alpha from the prompt at prefill and keeps it while decoding, so
    a prompt of <= seq_length tokens decodes with alpha = 1 even after the sequence grows past
    seq_length. Re-running the full forward each step would switch to alpha = 3 there instead: that
    is the one, deliberate, way cached generate differs from full-forward-per-step."""
    w = write_qwen_v1(tmp_path, dynamic=True, logn=True, seed=7)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    fixed = seekwen.load(tmp_path, dtype=torch.float32, config_overrides={"use_dynamic_ntk": False})
    S = QWEN_V1["S"]
    ids = torch.randint(0, QWEN_V1["V"], (1, S - 2), generator=torch.Generator().manual_seed(4))
    n = 10  # the sequence grows to S + 8
    got = model.generate(ids, max_new_tokens=n, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, _greedy_full_forward(fixed, ids, n))  # hand-driven loop with alpha kept at 1
    # and the difference is real: past seq_length the full forward uses alpha = 3
    seq = torch.cat((ids, got), 1)[0]
    with torch.no_grad():
        full = model(seq[None])[0]
        assert (full - qwen_v1_reference(w, seq, alpha=3.0)).abs().max().item() <= TOL
        assert (full - fixed(seq[None])[0]).abs().max().item() > 1e-2


def test_qwen_v1_engine_keeps_each_rows_ntk_alpha(tmp_path):
    """The batched engine prefills into views of its slot pool; each row's NTK alpha (fixed at its own
    prefill) must survive into the decode steps, which run on a different view of the pool: the engine
    gives every request exactly what per-sequence generate gives."""
    from seekwen.runtime.engine import Engine, SamplingParams

    write_qwen_v1(tmp_path, dynamic=True, logn=True, seed=9)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    S = QWEN_V1["S"]
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, QWEN_V1["V"], (n,), generator=g).tolist() for n in (S - 2, S + 5, 3, 2 * S + 1)]
    ref = [model.generate(torch.tensor([p]), max_new_tokens=9, eos_token_id=[], stop_at_eos=False)[0].tolist()
           for p in prompts]
    engine = Engine(model, max_batch=2, max_len=4 * S)  # 4 requests through 2 rows: joins, leaves, row moves
    assert engine.generate(prompts, [SamplingParams(max_tokens=9, ignore_eos=True)] * 4) == ref


# ----------------------------------------------------------------------------------------------------
# DeepSeek-MoE v1 (model_type "deepseek")

DS1 = dict(D=32, H=4, V=80, L=3, I=48, MI=16, E=6, K=2, NS=2, MAXPOS=32)


def write_deepseek_v1(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny DeepSeek-MoE checkpoint: config.json as deepseek-moe-16b-base writes it, real tensor names."""
    D, H, V, L, I, MI, E, K, NS = (DS1[k] for k in ("D", "H", "V", "L", "I", "MI", "E", "K", "NS"))
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModel": "modeling_deepseek.DeepseekModel",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": D, "initializer_range": 0.02, "intermediate_size": I,
        "max_position_embeddings": DS1["MAXPOS"], "model_type": "deepseek", "moe_intermediate_size": MI,
        "moe_layer_freq": 1, "n_routed_experts": E, "n_shared_experts": NS, "norm_topk_prob": False,
        "num_attention_heads": H, "num_experts_per_tok": K, "num_hidden_layers": L, "num_key_value_heads": H,
        "pretraining_tp": 1, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 10000,
        "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0", "use_cache": True, "vocab_size": V,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.15, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"model.embed_tokens.weight": rnd(V, D, std=0.5), "model.norm.weight": rnd(D, std=0.2, mean=1.0),
         "lm_head.weight": rnd(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rnd(D, std=0.2, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = rnd(D, std=0.2, mean=1.0)
        for n in "qkvo":
            w[p + f"self_attn.{n}_proj.weight"] = rnd(D, D)
        mlps = {"mlp.": I} if i < 1 else {f"mlp.experts.{e}.": MI for e in range(E)} | {"mlp.shared_experts.": MI * NS}
        for m, inter in mlps.items():
            w[p + m + "gate_proj.weight"] = rnd(inter, D)
            w[p + m + "up_proj.weight"] = rnd(inter, D)
            w[p + m + "down_proj.weight"] = rnd(D, inter)
        if i >= 1:
            w[p + "mlp.gate.weight"] = rnd(E, D, std=0.5)
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return w


def _swiglu(x, w, p):
    return (F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T


def deepseek_v1_reference(w: dict, ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-MoE forward for one unpadded sequence, from its formulas (token by token MoE)."""
    D, H, L, K = DS1["D"], DS1["H"], DS1["L"], DS1["K"]
    hd, T = D // H, ids.shape[0]
    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q, k, v = ((h @ w[p + f"self_attn.{n}_proj.weight"].T).reshape(T, H, hd) for n in "qkv")
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = (torch.einsum("shd,thd->hst", q, k) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hst,thd->shd", att, v).reshape(T, D) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        if i < 1:  # first_k_dense_replace = 1
            x = x + _swiglu(h, w, p + "mlp.")
            continue
        scores = (h @ w[p + "mlp.gate.weight"].T).softmax(-1)
        y = _swiglu(h, w, p + "mlp.shared_experts.")
        for t in range(T):
            top = scores[t].topk(K).indices
            for e in top.tolist():  # norm_topk_prob false: the softmax weights as they are
                y[t] = y[t] + scores[t, e] * _swiglu(h[t], w, p + f"mlp.experts.{e}.")
        x = x + y
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_deepseek_v1_config_and_routing(tmp_path):
    write_deepseek_v1(tmp_path)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    cfg = model.cfg
    assert cfg.mlp_layers == [False, True, True]
    m = cfg.moe
    assert (m.scoring, m.topk_method, m.norm_topk_prob, m.routed_scaling_factor) == ("softmax", "greedy", False, 1.0)
    assert m.shared_intermediate_size == DS1["MI"] * DS1["NS"] and cfg.mla is None and not cfg.rope.interleaved
    # routing on fixed logits: softmax over all 6 experts, top-2 kept as they are (no renormalisation)
    gate = model.layers[1].ffn.gate
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.5, 0.0, 0.3], [3.0, 0.0, 0.0, 0.0, 2.9, 0.0]])
    with torch.no_grad():
        saved = gate.weight.clone()
        gate.weight.zero_()
        gate.weight[:, :6] = torch.eye(6)
        x = torch.zeros(2, DS1["D"])
        x[:, :6] = logits
        weights, idx = gate(x)
        gate.weight.copy_(saved)
    e = logits.exp()
    p = e / e.sum(-1, keepdim=True)
    assert idx.tolist() == [[1, 3], [0, 4]]
    assert torch.allclose(weights, torch.stack([p[0, [1, 3]], p[1, [0, 4]]]), atol=1e-6)
    assert abs(weights[0].sum().item() - (math.exp(2) + math.exp(1.5)) / e[0].sum().item()) < 1e-6


def test_deepseek_v1_matches_reference(tmp_path):
    w = write_deepseek_v1(tmp_path, seed=1)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for T in (5, 3 * DS1["MAXPOS"]):
            ids = torch.randint(0, DS1["V"], (T,), generator=g)
            err = (model(ids[None])[0] - deepseek_v1_reference(w, ids)).abs().max().item()
            assert err <= TOL, (T, err)
    ids = torch.randint(0, DS1["V"], (2, 7), generator=g)
    got = model.generate(ids, max_new_tokens=6, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, _greedy_full_forward(model, ids, 6))


# ----------------------------------------------------------------------------------------------------
# MLA: absorbed vs naive, and a cache of latents only


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_models import SPECS, make_checkpoint

    _, folder = make_checkpoint(SPECS["deepseek_v3"], tmp_path_factory.mktemp("mla"))
    return seekwen.load(folder, dtype=torch.float32)


def _set_mode(model, mode: str) -> None:
    for layer in model.layers:
        layer.attn.mode = mode


def _decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill then greedy decode through the cache; logits of every step [steps + 1, B, V]."""
    B, S = ids.shape
    dec = Decoder(model, B, S + steps)
    out = []
    with torch.no_grad():
        logits = dec.prefill(ids)
        out.append(logits)
        for _ in range(steps):
            logits = dec.step(logits.argmax(-1))
            out.append(logits)
    return torch.stack(out)


def test_mla_absorbed_equals_naive(mla_model):
    model = mla_model
    ids = torch.randint(3, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            _set_mode(model, "naive")
            full_naive = model(ids)
            dec_naive = _decode_logits(model, ids, 6)
            gen_naive = model.generate(ids, max_new_tokens=6, eos_token_id=[], stop_at_eos=False)
            _set_mode(model, "absorb")
            full_abs = model(ids)
            dec_abs = _decode_logits(model, ids, 6)
            gen_abs = model.generate(ids, max_new_tokens=6, eos_token_id=[], stop_at_eos=False)
    finally:
        _set_mode(model, "auto")
    assert (full_abs - full_naive).abs().max().item() <= TOL
    assert (dec_abs - dec_naive).abs().max().item() <= TOL
    assert (dec_naive[0] - full_naive[:, -1]).abs().max().item() <= TOL  # the cache changes nothing
    assert torch.equal(gen_abs, gen_naive)
    assert torch.equal(gen_abs, dec_abs[:-1].argmax(-1).T)


def test_mla_cache_holds_only_the_latent(mla_model):
    cfg = mla_model.cfg
    r, dr = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
    cache = Decoder(mla_model, 3, 20).cache
    for layer in cache.layers:
        assert set(layer) == {"kv", "pe"}
        assert tuple(layer["kv"].shape) == (3, 20, r) and tuple(layer["pe"].shape) == (3, 20, dr)
    assert cache.bytes_per_token() == (r + dr) * cfg.num_layers * 4
    assert cfg.kv_values_per_token() == (r + dr) * cfg.num_layers
    # far less than decompressed keys and values would take: H * (nope + rope + v) per layer
    assert r + dr < cfg.num_heads * (cfg.mla.qk_nope_head_dim + dr + cfg.mla.v_head_dim)
    # and what the cache holds after prefill is the normalised latent and the rotated shared key
    ids = torch.randint(3, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    dec = Decoder(mla_model, 1, 8)
    cache = dec.cache
    with torch.no_grad():
        dec.prefill(ids)
        attn = mla_model.layers[0].attn
        h = mla_model.layers[0].attn_norm(mla_model.embed(ids))
        kv, pe = attn.wkv_a(h).split([r, dr], -1)
        cos, sin = mla_model.rope(torch.arange(5)[None])
    assert torch.allclose(cache.layers[0]["kv"][:, :5], attn.kv_norm(kv), atol=1e-6)
    assert torch.allclose(cache.layers[0]["pe"][:, :5], apply_rope(pe[:, :, None], cos, sin, True)[:, :, 0], atol=1e-6)
    assert cache.layers[0]["kv"][:, 5:].abs().sum() == 0


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
        dec_last = _decode_logits(ours, ids, n - 1)[-1]
    assert (full_last - dec_last).abs().max().item() > 1e-3


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
