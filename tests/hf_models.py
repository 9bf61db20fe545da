"""Tiny random checkpoints built with transformers' own classes, saved the way real Hub checkpoints are.

`make_checkpoint(spec, folder)` builds a tiny model of one family with transformers (pinned to the
version in pyproject's `test` extra), randomises norm weights, biases and DeepSeek-V3's
`e_score_correction_bias`, saves it with `save_pretrained`, then rewrites it in the form the real
Hub checkpoints of that family use:

- config.json: top-level `rope_theta` and `rope_scaling` (never transformers 5's `rope_parameters`),
  a `torch_dtype`, no `layer_types` (real Qwen/DeepSeek configs lack it), DeepSeek configs without
  the derived `head_dim`/`qk_head_dim`, and the DeepSeek router fields real configs carry;
- weights: MoE experts one tensor per expert, `mlp.experts.<e>.{gate,up,down}_proj.weight`
  (converted if transformers wrote fused 3D `gate_up_proj`/`down_proj` tensors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

PINNED_TRANSFORMERS = "5.23.0"

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, initializer_range=0.08, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass
class Spec:
    name: str  # test id
    model_type: str
    kwargs: dict = field(default_factory=dict)
    rope: dict | None = None  # rope_scaling as a Hub config.json writes it (None: plain RoPE)
    theta: float = 10000.0
    extra_json: dict = field(default_factory=dict)  # fields real configs carry that transformers drops

    @property
    def max_pos(self) -> int:
        return self.kwargs.get("max_position_embeddings", TINY["max_position_embeddings"])


_DS_MOE = dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
               first_k_dense_replace=1)
_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1}

SPECS = {
    s.name: s
    for s in [
        Spec("qwen2", "qwen2", dict(num_key_value_heads=2), theta=1000.0,
             extra_json=dict(use_sliding_window=False, sliding_window=32, max_window_layers=2)),
        # layers 1 and 2 slide (i >= max_window_layers); window 6 is far shorter than the inputs
        Spec("qwen2_sliding", "qwen2",
             dict(num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
                  max_window_layers=1)),
        Spec("qwen2_moe", "qwen2_moe",
             dict(num_hidden_layers=3, num_key_value_heads=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1])),
        # transformers' Qwen2-MoE rule: layer i slides if (i + 1) is odd and i < max_window_layers (here: 0, 2)
        Spec("qwen2_moe_sliding", "qwen2_moe",
             dict(num_hidden_layers=4, num_key_value_heads=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  use_sliding_window=True, sliding_window=6, max_window_layers=3)),
        Spec("qwen3", "qwen3", dict(num_key_value_heads=2, head_dim=24)),
        Spec("qwen3_moe", "qwen3_moe",
             dict(num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
        Spec("deepseek_v2", "deepseek_v2",
             dict(_DS_MOE, num_hidden_layers=3, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                  topk_group=2, routed_scaling_factor=2.0, norm_topk_prob=False),
             rope=dict(_YARN, mscale=0.707, mscale_all_dim=0.707),
             extra_json=dict(scoring_func="softmax", moe_layer_freq=1)),
        Spec("deepseek_v2_no_q_lora", "deepseek_v2",
             dict(_DS_MOE, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5, norm_topk_prob=False),
             extra_json=dict(scoring_func="softmax", moe_layer_freq=1, n_group=1, topk_group=1)),
        Spec("deepseek_v3", "deepseek_v3",
             dict(_DS_MOE, num_hidden_layers=3, q_lora_rank=24, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, norm_topk_prob=True, num_mtp_layers=0),
             rope=dict(_YARN, mscale=1.0, mscale_all_dim=0.707),
             extra_json=dict(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
                             num_nextn_predict_layers=0)),
    ]
}


def _hf_rope_parameters(spec: Spec) -> dict:
    params = {"rope_type": "default", "rope_theta": spec.theta}
    if spec.rope:
        params.update({k: v for k, v in spec.rope.items() if k != "type"}, rope_type=spec.rope["type"])
    return params


def hf_config(spec: Spec):
    cls = transformers.AutoConfig.for_model(spec.model_type).__class__
    kw = {**TINY, **spec.kwargs, "rope_parameters": _hf_rope_parameters(spec)}
    return cls(**kw)


def build_hf_model(spec: Spec, seed: int = 0):
    """A tiny random model of transformers' own class; norms, biases and router biases randomised."""
    torch.manual_seed(seed)
    cfg = hf_config(spec)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def per_expert_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub layout: fused [E, 2*inter, dim] gate_up_proj / [E, dim, inter] down_proj -> one tensor per expert."""
    out = {}
    for name, t in state.items():
        m = _FUSED.match(name)
        if not m:
            out[name] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
    return out


def hub_config(saved: dict, spec: Spec) -> dict:
    """transformers-5 config.json -> the form real Hub checkpoints of this family are written in."""
    raw = dict(saved)
    params = dict(raw.pop("rope_parameters", None) or {})
    raw["rope_theta"] = params.pop("rope_theta", spec.theta)
    rtype = params.pop("rope_type", "default")
    raw["rope_scaling"] = None if rtype == "default" else {"type": rtype, **params}
    raw.pop("dtype", None)
    raw["torch_dtype"] = "bfloat16"
    raw["transformers_version"] = "4.46.3"
    raw.pop("layer_types", None)
    if spec.model_type.startswith("deepseek"):
        raw.pop("head_dim", None)
        raw.pop("qk_head_dim", None)
        raw.pop("num_mtp_layers", None)
    if "num_local_experts" in raw:  # transformers 5's name; Qwen MoE Hub configs say num_experts
        raw["num_experts"] = raw.pop("num_local_experts")
    if spec.model_type in ("qwen2", "qwen2_moe"):
        raw.pop("head_dim", None)  # Qwen2/2.5 configs derive it
    raw.update(spec.extra_json)
    return raw


def save_hub_checkpoint(model, spec: Spec, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg_path.write_text(json.dumps(hub_config(json.loads(cfg_path.read_text()), spec), indent=2))
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    state = load_file(str(files[0]))
    state = per_expert_weights(state)
    for f in files:
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def make_checkpoint(spec: Spec, folder: Path, seed: int = 0):
    """(transformers model, checkpoint folder)."""
    model = build_hf_model(spec, seed)
    return model, save_hub_checkpoint(model, spec, folder)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """transformers' greedy generate, new tokens only, never stopping early at EOS."""
    out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                         eos_token_id=None, use_cache=True)
    return out[:, ids.shape[1]:]
