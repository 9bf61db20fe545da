"""MLA (DeepSeek-V2/V3 attention): the softmax scale from the config (YaRN mscale_all_dim), absorbed vs
naive attention, and a cache of latents only."""

from __future__ import annotations

import math

import pytest
import torch
from reference import decode_logits

import seekwen
from seekwen.hf.families import parse_config
from seekwen.model.rope import apply_rope
from seekwen.runtime.decoder import Decoder

TOL = 1e-4


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


@pytest.fixture(scope="module")
def mla_model(hub_checkpoint):
    _, folder = hub_checkpoint("deepseek_v3")
    return seekwen.load(folder, dtype=torch.float32, fast=False)


def _set_mode(model, mode: str) -> None:
    for layer in model.layers:
        layer.attn.mode = mode


def test_mla_absorbed_equals_naive(mla_model):
    model = mla_model
    ids = torch.randint(3, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            _set_mode(model, "naive")
            full_naive = model(ids)
            dec_naive = decode_logits(model, ids, 6)
            gen_naive = model.generate(ids, max_new_tokens=6, eos_token_id=[], stop_at_eos=False)
            _set_mode(model, "absorb")
            full_abs = model(ids)
            dec_abs = decode_logits(model, ids, 6)
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
