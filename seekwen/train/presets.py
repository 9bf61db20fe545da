"""Model configs by name, in Hugging Face config.json form (vocab_size is set from the tokenizer)."""

from __future__ import annotations

import copy

# The bundled model: DeepSeek-V3 layout at small scale. MLA with a real latent bottleneck
# (kv_lora_rank 64 < 8 heads x 64), first layer dense, then MoE layers with 8 routed experts, top-2,
# one shared expert, sigmoid routing with e_score_correction_bias (noaux_tc).
KJV_V3 = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": None,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rope_interleave": True,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "float32",
    "use_cache": True,
}

# A very small model of the same layout, for tests and smoke runs.
TINY_V3 = {
    **KJV_V3,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "max_position_embeddings": 64,
}

PRESETS = {"kjv-v3": KJV_V3, "tiny-v3": TINY_V3}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    return copy.deepcopy(PRESETS[name])
