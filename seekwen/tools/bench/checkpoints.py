"""Synthetic Hub-format checkpoints for `seekwen bench`: random weights in the shapes of real models, so
the bench measures realistic layer sizes without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BENCH_MODELS = {
    # Qwen2.5-0.5B's shape (494M parameters, tied embeddings)
    "dense": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 24,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "float32",
    },
    # DeepSeek-V2-Lite's layer shapes, 6 layers and 1024 hidden (989M total, 257M active)
    "moe": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 1024, "intermediate_size": 5632, "moe_intermediate_size": 704, "num_hidden_layers": 6,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "routed_scaling_factor": 1.0, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 100000,
        "eos_token_id": 100001, "torch_dtype": "float32", "attention_bias": False,
    },
}



def build_checkpoint(name: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """A Hub-format checkpoint (config.json + model.safetensors, one tensor per expert) with random
    weights of one of BENCH_MODELS' shapes; written once, reused."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(cache_dir).expanduser() / name
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BENCH_MODELS[name], indent=2))
    hf_cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(hf_cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key == "lm_head.weight" and BENCH_MODELS[name]["tie_word_embeddings"]:
            continue
        if "norm" in key:
            state[key] = torch.ones(shape)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    save_file(_per_expert(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]) -> Hub layout."""
    out = {}
    for key, t in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate.clone(), up.clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[key] = t
    return out

