"""Qwen (v1, model_type "qwen"; not in transformers): a tiny checkpoint in the real format against a
reference forward written from its formulas (LogN, dynamic NTK, partial rotary), and how cached generate
and the batched engine fix the NTK alpha at prefill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import greedy_full_forward, rms, rotate_half
from safetensors.torch import save_file

import seekwen

TOL = 1e-4


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
        return torch.cat((r * cos + rotate_half(r) * sin, rest), -1)

    x = w["transformer.wte.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"transformer.h.{i}."
        h = rms(x, w[p + "ln_1.weight"])
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
        h = rms(x, w[p + "ln_2.weight"])
        a1 = h @ w[p + "mlp.w1.weight"].T
        a2 = h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    x = rms(x, w["transformer.ln_f.weight"])
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


def test_qwen_v1_generate_without_dynamic_ntk_equals_full_forward(tmp_path):
    write_qwen_v1(tmp_path, dynamic=False, logn=True, seed=5)
    model = seekwen.load(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, QWEN_V1["V"], (2, 6), generator=torch.Generator().manual_seed(2))
    got = model.generate(ids, max_new_tokens=10, eos_token_id=[], stop_at_eos=False)
    assert torch.equal(got, greedy_full_forward(model, ids, 10))


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
    assert torch.equal(got, greedy_full_forward(fixed, ids, n))  # hand-driven loop with alpha kept at 1
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
