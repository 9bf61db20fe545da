"""The one normalized model description every family is parsed into.

A family (see `hf/families.py`) reads a Hugging Face `config.json` and fills a `ModelConfig`; the model
modules under `seekwen/model/` only ever look at this class, never at the raw JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


class ConfigError(ValueError):
    """A config.json that seekwen cannot run: the message names the field and the file."""


@dataclass
class RopeConfig:
    theta: float = 10000.0
    dim: int = 128  # rotary dims per head (head_dim * partial_rotary_factor, or qk_rope_head_dim)
    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + dim/2)
    max_position_embeddings: int = 4096  # the model's stated context (HF's max_position_embeddings)
    # scaling: "default" | "linear" | "dynamic" | "yarn" | "llama3" | "longrope" | "qwen_dynamic"
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # longrope
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    # Qwen v1: the training length its LogN and dynamic-NTK rules are relative to
    seq_length: int | None = None


@dataclass
class MoEConfig:
    n_routed_experts: int
    top_k: int
    intermediate_size: int
    n_shared_experts: int = 0  # DeepSeek: shared experts of `intermediate_size` each, fused into one MLP
    shared_intermediate_size: int = 0  # size of the (fused) shared-expert MLP; 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared expert
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False  # DeepSeek-V3: e_score_correction_bias, used only for choice
    # how top-k weights are renormalised: "hf" divides by sum (+1e-20 for DeepSeek), "none" leaves them.
    norm_eps: float = 0.0
    router_dtype_fp32: bool = True  # DeepSeek routes in fp32; Qwen MoE in the activation dtype


@dataclass
class MLAConfig:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    mlp_layers: list[bool] = field(default_factory=list)  # per layer: True = MoE, False = dense MLP
    sliding_window: list[int | None] = field(default_factory=list)  # per layer window (tokens) or None
    rope: RopeConfig = field(default_factory=RopeConfig)
    softmax_scale: float | None = None  # None: 1/sqrt(qk head dim)
    logn_attn: bool = False  # Qwen v1 LogN query scaling past rope.seq_length
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # DeepSeek-V3 multi-token-prediction layers (`num_nextn_predict_layers`), model.mtp (model/mtp.py)
    num_mtp_layers: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json as read

    @property
    def max_position_embeddings(self) -> int:
        return self.rope.max_position_embeddings

    @property
    def is_moe(self) -> bool:
        return self.moe is not None and any(self.mlp_layers)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @property
    def dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.torch_dtype, torch.float32
        )

    def kv_values_per_token_layer(self) -> int:
        """Numbers one layer's KV cache stores per token: MLA the latent c_kv plus the shared rotated key
        (kv_lora_rank + qk_rope_head_dim); MHA/GQA a k and a v per KV head (2 x num_kv_heads x head_dim)."""
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_values_per_token(self) -> int:
        """Numbers the KV cache stores per token, summed over layers."""
        return self.kv_values_per_token_layer() * self.num_layers

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token adds across all layers, `dtype_bytes` per number (2 for bf16). The one
        home of this formula: the memory report, the bench's check of the real cache, and the cache itself
        agree with it. Counts every layer at full length; a sliding-window layer's cache stops growing at
        its window, which only callers that know the context length can apply."""
        return self.kv_values_per_token() * dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
