"""GGUF metadata -> the equivalent Hugging Face config.json dict -> the family parser's `ModelConfig`.

Going through the HF parsers (`hf.families.parse_config`) keeps one set of rules for every field
(defaults, validation, YaRN's softmax scale). What GGUF does not store is recovered the way llama.cpp
itself reads the file:

- tied embeddings: no `output.weight`; q/k/v or attention biases: `blk.0.attn_q.bias` is there;
- which layers are MoE: the ones with `ffn_gate_inp` (Qwen2/3-MoE), `leading_dense_block_count` (DeepSeek);
- DeepSeek-V2 or V3 (both are llama.cpp's `deepseek2`): sigmoid gating or an `exp_probs_b` bias is V3;
  V2 with expert groups routes group-limited greedy (its Hub configs), else greedy;
- MLA head sizes: `key_length_mla` / `value_length_mla` (newer converters; `key_length` is then the
  latent's) or `key_length` / `value_length` (older ones);
- YaRN: `rope.scaling.yarn_log_multiplier` is 0.1 * mscale_all_dim for deepseek2, and llama.cpp takes
  mscale = mscale_all_dim (true of every DeepSeek config on the Hub), so seekwen does too;
- Qwen2-MoE never renormalises its top-k weights and Qwen3-MoE always does (llama.cpp hard-codes both);
- DeepSeek-MoE v1 (`deepseek`) routes softmax top-k without renormalising (its Hub configs, llama.cpp).
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, ModelConfig
from ..hf.families import parse_config
from .reader import GGUFError, GGUFFile

# llama.cpp architecture -> HF model_type (deepseek2 -> V2 or V3, decided from the file)
ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                 "deepseek2": "deepseek_v2", "deepseek": "deepseek"}
FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}  # general.file_type: ALL_F32, MOSTLY_F16, MOSTLY_BF16
GATING = {1: "softmax", 2: "sigmoid"}  # {arch}.expert_gating_func


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """The HF config.json dict equivalent to this file's metadata (and tensor list)."""
    if f.arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: unsupported GGUF architecture '{f.arch}' "
                        f"(seekwen reads: {', '.join(sorted(ARCHITECTURES))})")
    n_layers = int(f.require("block_count"))
    heads = int(f.require("attention.head_count"))
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{f.path}: missing tensor 'token_embd.weight'")
    raw: dict[str, Any] = {
        "model_type": ARCHITECTURES[f.arch],
        "vocab_size": embd.shape[0],
        "hidden_size": int(f.require("embedding_length")),
        "intermediate_size": int(f.get("feed_forward_length") or f.get("expert_feed_forward_length") or 0),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get("attention.head_count_kv") or heads),
        "max_position_embeddings": int(f.get("context_length") or 4096),
        "rms_norm_eps": float(f.get("attention.layer_norm_rms_epsilon") or 1e-6),
        "rope_theta": float(f.get("rope.freq_base") or 10000.0),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "hidden_act": "silu",
        "torch_dtype": FILE_DTYPES.get(f.get("general.file_type"), "float32"),
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in f.tensors or "blk.0.attn_q_a.bias" in f.tensors,
    }
    rope = _rope_scaling(f)
    if rope:
        raw["rope_scaling"] = rope
    if f.arch in ("qwen3", "qwen3moe", "qwen2", "qwen2moe") and f.get("attention.key_length"):
        raw["head_dim"] = int(f.get("attention.key_length"))
    if f.arch in ("qwen2moe", "qwen3moe"):
        raw.update(_qwen_moe(f, n_layers))
    if f.arch == "deepseek2":
        raw.update(_deepseek2(f, n_layers))
    if f.arch == "deepseek":
        raw.update(_deepseek_moe(f))
    return raw


def _rope_scaling(f: GGUFFile) -> dict | None:
    kind = f.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = f.get("rope.scaling.factor")
    if kind == "linear":
        return {"type": "linear", "factor": float(factor)}
    if kind != "yarn":
        raise GGUFError(f"{f.path}: rope scaling '{kind}' in a GGUF file is not supported (none, linear or yarn)")
    out: dict[str, Any] = {"type": "yarn", "factor": float(factor)}
    orig = f.get("rope.scaling.original_context_length")
    if orig:
        out["original_max_position_embeddings"] = int(orig)
    for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                    ("yarn_attn_factor", "attention_factor")):
        if f.get(f"rope.scaling.{key}") is not None:
            out[hf] = float(f.get(f"rope.scaling.{key}"))
    log_mul = f.get("rope.scaling.yarn_log_multiplier")
    if log_mul and f.arch == "deepseek2":
        out["mscale_all_dim"] = out["mscale"] = float(log_mul) / 0.1
    return out


def _qwen_moe(f: GGUFFile, n_layers: int) -> dict[str, Any]:
    out = {
        "num_experts": int(f.require("expert_count")),
        "num_experts_per_tok": int(f.require("expert_used_count")),
        "moe_intermediate_size": int(f.require("expert_feed_forward_length")),
        "norm_topk_prob": f.arch == "qwen3moe",
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in f.tensors],
    }
    if f.arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = int(f.get("expert_shared_feed_forward_length") or 0)
    return out


def _deepseek2(f: GGUFFile, n_layers: int) -> dict[str, Any]:
    rope_dim = int(f.require("rope.dimension_count"))
    if f.get("attention.key_length_mla") is not None:  # newer converters: key_length is the latent's
        nope = int(f.get("attention.key_length_mla")) - rope_dim
        v_dim = int(f.require("attention.value_length_mla"))
    else:
        nope = int(f.require("attention.key_length")) - rope_dim
        v_dim = int(f.require("attention.value_length"))
    q_lora = f.get("attention.q_lora_rank")
    out: dict[str, Any] = {
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(f.require("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": nope,
        "v_head_dim": v_dim,
        "num_key_value_heads": int(f.require("attention.head_count")),  # MLA: the GGUF's 1 is llama.cpp's MQA view
        "num_nextn_predict_layers": 0,  # the converter leaves DeepSeek's MTP layers out
    }
    n_exp = f.get("expert_count")
    gating = GATING.get(f.get("expert_gating_func"), "softmax")
    v3 = gating == "sigmoid" or any(n.endswith(".exp_probs_b.bias") for n in f.tensors)
    out["model_type"] = "deepseek_v3" if v3 else "deepseek_v2"
    if n_exp:
        n_group = int(f.get("expert_group_count") or 1)
        out.update({
            "n_routed_experts": int(n_exp),
            "num_experts_per_tok": int(f.require("expert_used_count")),
            "moe_intermediate_size": int(f.require("expert_feed_forward_length")),
            "n_shared_experts": int(f.get("expert_shared_count") or 0),
            "routed_scaling_factor": float(f.get("expert_weights_scale") or 1.0),
            "norm_topk_prob": bool(f.get("expert_weights_norm") or False),
            "scoring_func": gating,
            "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
            "n_group": n_group,
            "topk_group": int(f.get("expert_group_used_count") or n_group),
            "first_k_dense_replace": int(f.get("leading_dense_block_count") or 0),
            "moe_layer_freq": 1,
        })
    return out


def _deepseek_moe(f: GGUFFile) -> dict[str, Any]:
    """DeepSeek-MoE v1 (llama.cpp `deepseek`): softmax top-k, greedy, never renormalised, no scaling."""
    return {
        "n_routed_experts": int(f.require("expert_count")),
        "num_experts_per_tok": int(f.require("expert_used_count")),
        "moe_intermediate_size": int(f.require("expert_feed_forward_length")),
        "n_shared_experts": int(f.get("expert_shared_count") or 0),
        "first_k_dense_replace": int(f.get("leading_dense_block_count") or 0),
        "moe_layer_freq": 1, "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
    }


def model_config(f: GGUFFile) -> tuple[dict, ModelConfig]:
    """(the HF config dict, the parsed ModelConfig) of a GGUF file; errors name the file."""
    raw = hf_config(f)
    try:
        return raw, parse_config(raw, f"{f.path} (GGUF metadata)")
    except ConfigError as e:
        raise GGUFError(str(e)) from e
