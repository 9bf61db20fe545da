"""The registry of families: per `model_type` a config.json parser and a weight-rule list.

Every family runs on the same modules (`seekwen/model/`); what differs is how its config.json spells
things and what its tensors are called. A parser turns a config.json dict into a `ModelConfig` (with
errors that name the field); a family's rules are composed from the shared groups in `names.py`, and
`name_map(cfg)` gives the two-way name map for one parsed config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from ..model.rope import yarn_get_mscale
from .names import (
    DEEPSEEK_SHARED_EXPERTS,
    DENSE_MLP,
    GQA_ATTENTION,
    LLAMA_SKELETON,
    MLA,
    QK_NORM,
    QWEN_SHARED_EXPERT,
    QWEN_V1,
    ROUTED_EXPERTS,
    ROUTER,
    ROUTER_CORRECTION_BIAS,
    NameMap,
    Rule,
)

# ----------------------------------------------------------------------------------------------------
# config helpers


def _req(raw: dict, key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    return raw[key]


def _int(raw: dict, key: str, where: str, default: int | None = None, positive: bool = True) -> int:
    v = raw.get(key, default)
    if v is None:
        raise ConfigError(f"{where}: required field '{key}' is missing")
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {v!r}")
    if positive and v <= 0:
        raise ConfigError(f"{where}: field '{key}' must be positive, got {v!r}")
    return int(v)


def _dtype_name(raw: dict) -> str:
    name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    name = str(name).replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


SUPPORTED_ROPE = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def parse_hf_rope(raw: dict, rope_dim: int, where: str, interleaved: bool = False) -> RopeConfig:
    """Read RoPE settings in both spellings: top-level `rope_theta` + `rope_scaling`, or `rope_parameters`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'rope_scaling'/'rope_parameters' must be an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{where}: per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE:
        raise ConfigError(f"{where}: unsupported rope type '{rtype}' (supported: {', '.join(SUPPORTED_ROPE)})")
    max_pos = _int(raw, "max_position_embeddings", where, default=4096)
    factor = params.get("factor")
    if rtype in ("linear", "dynamic", "llama3") and factor is None:
        raise ConfigError(f"{where}: rope type '{rtype}' needs 'factor'")
    orig = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if rtype in ("yarn", "llama3", "longrope") and orig is None:
        orig = max_pos
    if factor is None and orig:
        factor = max_pos / orig
    rope = RopeConfig(
        theta=theta,
        dim=rope_dim,
        interleaved=interleaved,
        max_position_embeddings=max_pos,
        type=rtype,
        factor=float(factor if factor is not None else 1.0),
        original_max_position_embeddings=int(orig) if orig else None,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        short_factor=params.get("short_factor"),
        long_factor=params.get("long_factor"),
    )
    if rtype == "longrope" and (not rope.short_factor or not rope.long_factor):
        raise ConfigError(f"{where}: rope type 'longrope' needs 'short_factor' and 'long_factor'")
    return rope


def _common(raw: dict, where: str, head_dim: int | None = None) -> dict:
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    kv_heads = _int(raw, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    hd = head_dim or raw.get("head_dim") or hidden // heads
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: unsupported hidden_act '{act}' (only silu/SwiGLU models are supported)")
    eos = raw.get("eos_token_id")
    return dict(
        vocab_size=_int(raw, "vocab_size", where),
        hidden_size=hidden,
        num_layers=_int(raw, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(hd),
        intermediate_size=_int(raw, "intermediate_size", where),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=_dtype_name(raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
        raw=raw,
    )


def _layer_types_windows(raw: dict, n: int, default_sliding: Callable[[int], bool], where: str) -> list:
    """Per-layer sliding window from `layer_types` when the config has it, else the family's rule."""
    window = raw.get("sliding_window")
    if not raw.get("use_sliding_window", False) or window is None:
        return [None] * n
    window = _int(raw, "sliding_window", where)
    types = raw.get("layer_types")
    if types is not None:
        if len(types) != n:
            raise ConfigError(f"{where}: layer_types has {len(types)} entries for {n} layers")
        return [window if t == "sliding_attention" else None for t in types]
    return [window if default_sliding(i) else None for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# families: config parsers


def parse_qwen2(raw: dict, where: str) -> ModelConfig:
    c = _common(raw, where)
    n = c["num_layers"]
    mwl = raw.get("max_window_layers", n)
    moe_type = raw["model_type"]
    if moe_type == "qwen2_moe":
        def rule(i: int) -> bool:  # transformers' Qwen2-MoE rule
            return bool((i + 1) % 2) and i < mwl
    elif moe_type == "qwen3_moe":
        def rule(i: int) -> bool:
            return True
    else:
        def rule(i: int) -> bool:
            return i >= mwl
    moe = None
    mlp_layers = [False] * n
    if moe_type in ("qwen2_moe", "qwen3_moe"):
        # Hub configs say num_experts; transformers 5 saves the same value as num_local_experts
        n_key = "num_local_experts" if raw.get("num_experts") is None and "num_local_experts" in raw else "num_experts"
        n_exp = _int(raw, n_key, where)
        moe = MoEConfig(
            n_routed_experts=n_exp,
            top_k=_int(raw, "num_experts_per_tok", where),
            intermediate_size=_int(raw, "moe_intermediate_size", where),
            shared_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
            if moe_type == "qwen2_moe" else 0,
            shared_expert_gate=moe_type == "qwen2_moe",
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            router_dtype_fp32=False,
        )
        only = set(raw.get("mlp_only_layers") or [])
        step = _int(raw, "decoder_sparse_step", where, default=1)
        mlp_layers = [(i not in only) and (i + 1) % step == 0 for i in range(n)]
    qwen3 = moe_type in ("qwen3", "qwen3_moe")
    return ModelConfig(
        model_type=moe_type,
        **c,
        qkv_bias=bool(raw.get("attention_bias", False)) if qwen3 else True,
        o_bias=bool(raw.get("attention_bias", False)) if qwen3 else False,
        qk_norm=qwen3,
        moe=moe,
        mlp_layers=mlp_layers,
        sliding_window=_layer_types_windows(raw, n, rule, where),
        rope=parse_hf_rope(raw, c["head_dim"], where),
    )


def _routed_scale(raw: dict, mt: str) -> float:
    """DeepSeek-MoE v1 has no routed scaling. DeepSeek-V2's own code either renormalises the top-k
    weights (norm_topk_prob, top_k > 1) or scales them, never both (transformers' port ignores
    norm_topk_prob; every published V2 config has it false, where the two agree). V3 does both."""
    if mt == "deepseek":
        return 1.0
    if mt == "deepseek_v2" and raw.get("norm_topk_prob") and int(raw.get("num_experts_per_tok") or 1) > 1:
        return 1.0
    return float(raw.get("routed_scaling_factor", 1.0))


def parse_deepseek(raw: dict, where: str) -> ModelConfig:
    """DeepSeek-MoE v1 (`deepseek`), DeepSeek-V2 (`deepseek_v2`) and V3/R1 (`deepseek_v3`)."""
    mt = raw["model_type"]
    mla = None
    head_dim = None
    if mt in ("deepseek_v2", "deepseek_v3"):
        q_lora = raw.get("q_lora_rank")
        mla = MLAConfig(
            q_lora_rank=None if q_lora is None else _int(raw, "q_lora_rank", where),
            kv_lora_rank=_int(raw, "kv_lora_rank", where),
            qk_nope_head_dim=_int(raw, "qk_nope_head_dim", where),
            qk_rope_head_dim=_int(raw, "qk_rope_head_dim", where),
            v_head_dim=_int(raw, "v_head_dim", where),
        )
        head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    if mla is not None:
        # MLA has no KV heads (every head reads the one latent); transformers 5 even saves its class
        # default (128) whatever the head count, so the field must not be validated against it
        c = _common({**raw, "num_key_value_heads": raw.get("num_attention_heads")}, where, head_dim=head_dim)
        c["raw"] = raw
    else:
        c = _common(raw, where, head_dim=head_dim)
    n = c["num_layers"]
    moe = None
    mlp_layers = [False] * n
    n_exp = raw.get("n_routed_experts")
    if n_exp:
        scoring = raw.get("scoring_func", "sigmoid" if mt == "deepseek_v3" else "softmax")
        method = raw.get("topk_method", "noaux_tc" if mt == "deepseek_v3" else "greedy")
        if scoring not in ("softmax", "sigmoid"):
            raise ConfigError(f"{where}: unsupported scoring_func '{scoring}'")
        if mt == "deepseek_v3":
            method = "noaux_tc"  # transformers' DeepSeek-V3 always selects with the corrected scores
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ConfigError(f"{where}: unsupported topk_method '{method}'")
        n_group = int(raw.get("n_group") or 1)
        topk_group = int(raw.get("topk_group") or n_group)
        if n_exp % n_group:
            raise ConfigError(f"{where}: n_routed_experts={n_exp} is not divisible by n_group={n_group}")
        moe_inter = _int(raw, "moe_intermediate_size", where)
        n_shared = int(raw.get("n_shared_experts") or 0)
        moe = MoEConfig(
            n_routed_experts=_int(raw, "n_routed_experts", where),
            top_k=_int(raw, "num_experts_per_tok", where),
            intermediate_size=moe_inter,
            n_shared_experts=n_shared,
            shared_intermediate_size=moe_inter * n_shared,
            scoring=scoring,
            topk_method=method,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            routed_scaling_factor=_routed_scale(raw, mt),
            score_correction_bias=mt == "deepseek_v3",
            norm_eps=1e-20,
        )
        first_dense = int(raw.get("first_k_dense_replace") or 0)
        freq = int(raw.get("moe_layer_freq") or 1)
        mlp_layers = [i >= first_dense and i % freq == 0 for i in range(n)]
    # DeepSeek-V3/R1 ship num_nextn_predict_layers multi-token-prediction layers after the decoder
    mtp = _int(raw, "num_nextn_predict_layers", where, default=0, positive=False) if mt == "deepseek_v3" else 0
    if mla is not None:
        # transformers' DeepSeek-V2 port always uses interleaved pairs; V3 follows `rope_interleave`
        interleaved = True if mt == "deepseek_v2" else bool(raw.get("rope_interleave", True))
        rope = parse_hf_rope(raw, mla.qk_rope_head_dim, where, interleaved=interleaved)
    else:
        rope = parse_hf_rope(raw, c["head_dim"], where)
    scale = None
    if mla is not None:
        scale = head_dim ** -0.5
        if rope.type != "default" and rope.mscale_all_dim:
            scale *= yarn_get_mscale(rope.factor, rope.mscale_all_dim) ** 2
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        model_type=mt,
        **c,
        qkv_bias=bias,
        o_bias=bias,
        mla=mla,
        moe=moe,
        mlp_layers=mlp_layers,
        # no DeepSeek checkpoint slides; a Qwen2-style override (use_sliding_window, sliding_window,
        # max_window_layers: layers from that index on slide, default all) switches it on
        sliding_window=_layer_types_windows(raw, n, lambda i: i >= int(raw.get("max_window_layers") or 0), where),
        rope=rope,
        softmax_scale=scale,
        num_mtp_layers=max(mtp, 0),
    )


def parse_qwen_v1(raw: dict, where: str) -> ModelConfig:
    """Qwen (v1): `QWenLMHeadModel`, with its own field names, LogN attention and dynamic NTK."""
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    head_dim = _int(raw, "kv_channels", where, default=hidden // heads)
    pct = float(raw.get("rotary_pct", 1.0))
    seq_length = _int(raw, "seq_length", where, default=2048)
    inter = _int(raw, "intermediate_size", where)
    if inter % 2:
        raise ConfigError(f"{where}: Qwen v1 intermediate_size must be even (it is 2x the MLP width)")
    n = _int(raw, "num_hidden_layers", where)
    rope = RopeConfig(
        theta=float(raw.get("rotary_emb_base", 10000.0)),
        dim=int(head_dim * pct),
        max_position_embeddings=_int(raw, "max_position_embeddings", where, default=seq_length),
        type="qwen_dynamic" if raw.get("use_dynamic_ntk", False) else "default",
        seq_length=seq_length,
    )
    return ModelConfig(
        model_type="qwen",
        vocab_size=_int(raw, "vocab_size", where),
        hidden_size=hidden,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=inter // 2,
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True,
        o_bias=not raw.get("no_bias", True),
        mlp_layers=[False] * n,
        sliding_window=[None] * n,
        rope=rope,
        logn_attn=bool(raw.get("use_logn_attn", False)),
        torch_dtype="bfloat16" if raw.get("bf16") else ("float16" if raw.get("fp16") else _dtype_name(raw)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id", 151643),
        pad_token_id=raw.get("pad_token_id"),
        raw=raw,
    )


@dataclass(frozen=True)
class Family:
    """One `model_type`: the architecture name(s) it is saved under, its config parser, and its weight rules,
    composed from the shared groups in `names.py`."""

    name: str
    architectures: tuple[str, ...]
    parse: Callable[[dict, str], ModelConfig]
    rules: tuple[Rule, ...]

    def names(self, cfg: ModelConfig) -> NameMap:
        """The two-way name map of this family's checkpoints for `cfg`."""
        return NameMap(self.name, self.rules, cfg)


_QWEN2 = (*LLAMA_SKELETON, *GQA_ATTENTION, *DENSE_MLP)
_QWEN3 = (*LLAMA_SKELETON, *GQA_ATTENTION, *QK_NORM, *DENSE_MLP)
_DEEPSEEK_MOE = (*ROUTER, *ROUTED_EXPERTS, *DEEPSEEK_SHARED_EXPERTS)
_DEEPSEEK_V2 = (*LLAMA_SKELETON, *MLA, *DENSE_MLP, *_DEEPSEEK_MOE)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("qwen", ("QWenLMHeadModel",), parse_qwen_v1, QWEN_V1),
        Family("qwen2", ("Qwen2ForCausalLM",), parse_qwen2, _QWEN2),
        Family("qwen2_moe", ("Qwen2MoeForCausalLM",), parse_qwen2, (*_QWEN2, *ROUTER, *ROUTED_EXPERTS,
                                                                      *QWEN_SHARED_EXPERT)),
        Family("qwen3", ("Qwen3ForCausalLM",), parse_qwen2, _QWEN3),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), parse_qwen2, (*_QWEN3, *ROUTER, *ROUTED_EXPERTS)),
        Family("deepseek", ("DeepseekForCausalLM",), parse_deepseek,
               (*LLAMA_SKELETON, *GQA_ATTENTION, *DENSE_MLP, *_DEEPSEEK_MOE)),
        Family("deepseek_v2", ("DeepseekV2ForCausalLM",), parse_deepseek, _DEEPSEEK_V2),
        Family("deepseek_v3", ("DeepseekV3ForCausalLM",), parse_deepseek, (*_DEEPSEEK_V2, *ROUTER_CORRECTION_BIAS)),
    ]
}


def family_for(raw: dict, where: str = "config.json") -> Family:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    mt = raw.get("model_type")
    if mt is None:
        raise ConfigError(f"{where}: no 'model_type' field")
    if mt not in FAMILIES:
        raise ConfigError(
            f"{where}: unsupported model_type '{mt}' (seekwen runs: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[mt]


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    """config.json dict -> ModelConfig, with errors that name the field."""
    fam = family_for(raw, where)
    try:
        cfg = fam.parse(raw, where)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{where}: malformed value ({e})") from e
    if cfg.moe is not None and cfg.moe.top_k > cfg.moe.n_routed_experts:
        raise ConfigError(f"{where}: num_experts_per_tok={cfg.moe.top_k} > number of experts")
    if raw.get("use_logn_attn") and not cfg.logn_attn:
        # Qwen v1's LogN query scaling, switched on for any family by override; relative to `seq_length`
        # (default: the training length)
        trained = cfg.rope.original_max_position_embeddings or cfg.max_position_embeddings
        cfg.rope.seq_length = _int(raw, "seq_length", where, default=trained)
        cfg.logn_attn = True
    return cfg


def name_map(cfg: ModelConfig) -> NameMap:
    """The two-way name map for a parsed config: our parameter names <-> its family's checkpoint names."""
    return FAMILIES[cfg.model_type].names(cfg)
