"""DeepSeek-MoE v1 (model_type "deepseek"; not in transformers): a tiny checkpoint in the real format,
its config and routing, and a reference forward written from its formulas (token by token MoE)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from reference import greedy_full_forward, rms, rotate_half
from safetensors.torch import save_file

import seekwen

TOL = 1e-4


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
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = ((h @ w[p + f"self_attn.{n}_proj.weight"].T).reshape(T, H, hd) for n in "qkv")
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = (torch.einsum("shd,thd->hst", q, k) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hst,thd->shd", att, v).reshape(T, D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
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
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


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
    assert torch.equal(got, greedy_full_forward(model, ids, 6))
