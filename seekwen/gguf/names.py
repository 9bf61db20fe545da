"""llama.cpp's tensor names -> our parameter names, and what its converter did to each tensor.

`convert_hf_to_gguf.py` renames every Hugging Face tensor (`model.layers.3.self_attn.q_proj.weight` ->
`blk.3.attn_q.weight`) and, for the families seekwen runs, changes a few:

- routed experts are stacked into one tensor per projection (`ffn_gate_exps` [E, inter, dim]): the
  layout our `ffn.experts.w1` already has; an optional flag fuses gate and up (`ffn_gate_up_exps`);
- MLA's `kv_b_proj` [H * (nope + v), r] is split per head into `attn_k_b` [H, r, nope] (transposed, for
  llama.cpp's absorbed attention) and `attn_v_b` [H, v, r]; older converters kept `attn_kv_b`;
- an optional flag fuses q, k and v into `attn_qkv` (rows q, then k, then v);
- DeepSeek-V3's `e_score_correction_bias` becomes `exp_probs_b.bias`.
- DeepSeek-MoE v1 (`deepseek`) alone gets the LLaMA converter's q/k permutation: each head's rows
  reordered from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1) for ggml's rope;
  `unpermute_qk` puts them back.
Qwen2/Qwen3/DeepSeek-V2/V3 get no q/k permutation and no other numerical change. GGUF's reversed
dimension order is undone by the reader (`reader.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig

# GGUF name (after "blk.{i}.") -> our name (after "layers.{i}."); {w} is weight or bias
_BLOCK = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.{w}": "attn.wq.{w}",
    "attn_k.{w}": "attn.wk.{w}",
    "attn_v.{w}": "attn.wv.{w}",
    "attn_output.{w}": "attn.wo.{w}",
    "attn_q_norm.weight": "attn.q_norm.weight",  # Qwen3 (per-head RMSNorm)
    "attn_k_norm.weight": "attn.k_norm.weight",
    # MLA
    "attn_q_a.{w}": "attn.wq_a.{w}",
    "attn_q_a_norm.weight": "attn.q_norm.weight",
    "attn_q_b.weight": "attn.wq_b.weight",
    "attn_kv_a_mqa.{w}": "attn.wkv_a.{w}",
    "attn_kv_a_norm.weight": "attn.kv_norm.weight",
    "attn_kv_b.weight": "attn.wkv_b.weight",
    # dense MLP
    "ffn_gate.weight": "ffn.w1.weight",
    "ffn_up.weight": "ffn.w3.weight",
    "ffn_down.weight": "ffn.w2.weight",
    # MoE: router, its DeepSeek-V3 correction bias, stacked experts, shared experts, Qwen2-MoE's shared gate
    "ffn_gate_inp.weight": "ffn.gate.weight",
    "exp_probs_b.bias": "ffn.gate.bias",
    "ffn_gate_exps.weight": "ffn.experts.w1",
    "ffn_up_exps.weight": "ffn.experts.w3",
    "ffn_down_exps.weight": "ffn.experts.w2",
    "ffn_gate_shexp.weight": "ffn.shared.w1.weight",
    "ffn_up_shexp.weight": "ffn.shared.w3.weight",
    "ffn_down_shexp.weight": "ffn.shared.w2.weight",
    "ffn_gate_inp_shexp.weight": "ffn.shared_gate.weight",
}
_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "head.weight"}
# tensors llama.cpp writes that carry nothing seekwen needs (rotary tables it can recompute)
IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _block_rules() -> dict[str, str]:
    out = {}
    for g, o in _BLOCK.items():
        for w in ("weight", "bias") if "{w}" in g else ("",):
            out[g.replace("{w}", w)] = o.replace("{w}", w)
    return out


_BLOCK_RULES = _block_rules()
_REVERSE = {o: g for g, o in _BLOCK_RULES.items()}


def our_name(name: str) -> str | None:
    """The parameter a GGUF tensor fills as it is (no transform), or None when it is not a plain one."""
    if name in _TOP:
        return _TOP[name]
    m = _BLK.match(name)
    if m and m.group(2) in _BLOCK_RULES:
        return f"layers.{m.group(1)}.{_BLOCK_RULES[m.group(2)]}"
    return None


def gguf_name(param: str) -> str:
    """Our parameter name -> the GGUF tensor that holds it (for error messages)."""
    for g, o in _TOP.items():
        if o == param:
            return g
    m = re.match(r"^layers\.(\d+)\.(.+)$", param)
    if m and m.group(2) in _REVERSE:
        return f"blk.{m.group(1)}.{_REVERSE[m.group(2)]}"
    if m and m.group(2) == "attn.wkv_b.weight":
        return f"blk.{m.group(1)}.attn_k_b.weight + attn_v_b.weight"
    return param


@dataclass(frozen=True)
class Composite:
    """Parameters built from several GGUF tensors, or several parameters from one: `sources` (GGUF names),
    `params` (ours), `build(tensors) -> tensors` (one per param, in order)."""

    sources: tuple[str, ...]
    params: tuple[str, ...]
    build: object


def composites(cfg: ModelConfig, names: set[str]) -> list[Composite]:
    """The converter's split / fused tensors present in this file, with how to undo each."""
    out = []
    for i in range(cfg.num_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        if f"{b}attn_k_b.weight" in names or f"{b}attn_v_b.weight" in names:
            out.append(Composite((f"{b}attn_k_b.weight", f"{b}attn_v_b.weight"), (f"{p}attn.wkv_b.weight",),
                                 _join_kv_b))
        for w in ("weight", "bias"):
            if f"{b}attn_qkv.{w}" in names:
                sizes = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
                out.append(Composite((f"{b}attn_qkv.{w}",), tuple(f"{p}attn.w{x}.{w}" for x in "qkv"),
                                     lambda ts, sizes=sizes: list(ts[0].split(sizes, dim=0))))
        if f"{b}ffn_gate_up_exps.weight" in names:
            out.append(Composite((f"{b}ffn_gate_up_exps.weight",), (f"{p}ffn.experts.w1", f"{p}ffn.experts.w3"),
                                 lambda ts: list(ts[0].chunk(2, dim=1))))
    return out


def _join_kv_b(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """attn_k_b [H, r, nope] (W_UK transposed per head) and attn_v_b [H, v, r] -> kv_b [H * (nope + v), r]."""
    k_b, v_b = ts
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise ValueError(f"attn_k_b {tuple(k_b.shape)} and attn_v_b {tuple(v_b.shape)} do not fit together")
    r = k_b.shape[1]
    return [torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, r).contiguous()]  # [H * (nope + v), r]


PERMUTED_QK = {"deepseek"}  # llama.cpp architectures whose converter permutes attn_q / attn_k rows


def qk_heads(cfg: ModelConfig, name: str) -> int | None:
    """How many heads `name`'s rows were permuted over (attn_q: query heads, attn_k: KV heads), else None."""
    if re.match(r"^blk\.\d+\.attn_q\.(weight|bias)$", name):
        return cfg.num_heads
    if re.match(r"^blk\.\d+\.attn_k\.(weight|bias)$", name):
        return cfg.num_kv_heads
    return None


def unpermute_qk(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo `convert_hf_to_gguf`'s `permute` on the rows (dim 0) of a q/k weight, bias or block scales:
    rows [H, d/2, 2] (as the file has them) -> [H, 2, d/2] (as the checkpoint had them)."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
