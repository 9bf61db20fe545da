"""The compiled decode step: a whole decode step of the CPU fast path in one C++ call.

A decode step run layer by layer from Python costs the bundled 7.5M-parameter model ~2 ms, three
quarters of it host work (~390 ATen ops, ~55 module calls, ~1,200 Python calls) around ~0.5 ms of
kernels. `build(model, cache)` hands the prepared model's layers to `kernels.DecodeStep` (csrc/step.h)
once; each step is then `run(tokens, lens)`: embedding, every layer, final norm and LM head in C++,
calling the same kernels the Python layers call, with the glue (norms, rotary, residuals, the router,
SwiGLU, cache writes) as plain loops.

Nothing is decided twice. Every choice is read off the prepared modules here, the way their own forward
makes it for decode rows (fp32 from GEMM_ROWS rows on the prefill GEMM, as FastLinear does): which kernel
a linear layer runs (`linear_spec`: fp32 `f32_mm` / `f32_gemm`, 16-bit `mm` or `bf16_mm`, GGUF blocks
`qmm` on int8 activations or `mm` exact, int8 / int4), the fused projections, MLA's absorbed per-head
products (fp32 or the file's k_b / v_b blocks), the experts' kernel (`moe_experts` or `qmm_experts`)
and the router's rules (model/moe.py's `Gate`).

What it serves (`build` says why not otherwise, and the Decoder then steps in Python as before): the
fast path on CPU in fp32 activations, one new token for 1..64 rows of the Decoder's row cache or the
paged engine's block pools (its one-token-row calls: decode rows, small prefill chunks), GQA / MHA
(QKV bias, Qwen3's q/k norms) and MLA (with or without q_lora) over full-length layers, dense MLPs and
MoE (every router variant, shared experts, Qwen2-MoE's shared gate), static rotary rules (default,
linear, YaRN, llama3). Not: ring-buffer window layers, LogN / Qwen v1's dynamic NTK, partial rotary,
length-dependent rotary, tensor-parallel models, more than 64 rows (the paged engine's flat-step bound;
compute-bound there, where the Python step's overhead no longer dominates). A step is skipped (the
Python one runs) while a router records its choices (`seekwen routes`); a change of the block-activation
mode rebuilds it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..model.moe import MoE
from ..model.norm import RMSNorm
from ..model.transformer import Transformer
from . import kernels, linear
from .layers import FastAttention, FastMLA, FastMLP, GroupedExperts, TiedEmbedding
from .linear import GEMM_ROWS, FastLinear, Half16Linear, Int4Linear, Int8Linear, _BlockLinear, kernel_operands

MAX_ROWS = 64  # rows per compiled step (the paged engine's FLAT_MAX_TOKENS)
F32, MM, BF16, QMM, I8, I4 = range(6)  # StepLinear kinds (csrc/step.h)


class Unserved(Exception):
    """Why the compiled step cannot run this model (the message says what)."""


def enabled() -> bool:
    """SEEKWEN_COMPILED_STEP=0 turns the compiled step off (the Python step runs)."""
    return os.environ.get("SEEKWEN_COMPILED_STEP", "1").lower() not in ("0", "false", "no", "off")


def linear_spec(k, layer: nn.Module):
    """The kernel `layer` runs for decode rows, as a `kernels.StepLinear`."""
    bias = getattr(layer, "bias", None)
    if isinstance(layer, FastLinear) and layer.weight.dtype == torch.float32:
        return k.StepLinear(F32, layer.weight, None, None, bias, layer.out_features, 0, GEMM_ROWS)
    if isinstance(layer, Half16Linear):
        kind = BF16 if layer.bf16_activations(k) else MM
        return k.StepLinear(kind, layer.weight, None, None, bias, layer.out_features, 0, GEMM_ROWS)
    if isinstance(layer, _BlockLinear):
        if linear.ACTIVATIONS == "q8":
            return k.StepLinear(QMM, layer.packed(k), None, None, bias, layer.out_features, 0, GEMM_ROWS)
        return k.StepLinear(MM, layer.stored_codes(keep=True), layer.d, None, bias, layer.out_features, 0, GEMM_ROWS)
    if isinstance(layer, Int8Linear):
        return k.StepLinear(I8, layer.q, layer.scale, None, bias, layer.out_features, 0, GEMM_ROWS)
    if isinstance(layer, Int4Linear) and layer.group_size % 8 == 0:
        return k.StepLinear(I4, layer.packed, layer.scales, layer.zeros, bias, layer.out_features, layer.group_size,
                            GEMM_ROWS)
    raise Unserved(f"no step kernel for {type(layer).__name__}")


def _norm(m: nn.Module) -> tuple[torch.Tensor, float]:
    if not isinstance(m, RMSNorm) or m.weight.dtype != torch.float32:
        raise Unserved(f"norm {type(m).__name__} is not an fp32 RMSNorm")
    return m.weight.detach(), float(m.eps)


class CompiledStep:
    """`run(tokens [n], lens [n]) -> logits [n, vocab]` for rows [0, n) of the cache it was built over."""

    def __init__(self, step, gates: list[nn.Module]):
        self.step, self.gates, self.mode = step, gates, linear.ACTIVATIONS

    def serves(self, n: int) -> bool:
        return 0 < n <= MAX_ROWS and not any(g.record or g.keep_scores for g in self.gates)

    def run(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The row cache: rows [0, n), lens[b] tokens held before this one."""
        return self.step.run(tokens if tokens.dtype == torch.long else tokens.long(), lens)

    def run_paged(self, tokens: torch.Tensor, positions: torch.Tensor, tables: list[torch.Tensor],
                  keep: torch.Tensor) -> torch.Tensor:
        """The paged cache: one token per row at positions [n], tables[g] [n, nb] int32 per cache group,
        logits [m, vocab] of the rows `keep` [m]."""
        return self.step.run_paged(tokens, positions, tables, keep)


def build(model: nn.Module, cache, max_len: int | None = None) -> CompiledStep:
    """The compiled step of `model` over `cache`, which it writes in place: the Decoder's row cache
    (runtime.cache.KVCache; `run`) or the paged engine's block pools (runtime.paged.PagedKVCache;
    `run_paged`, positions below max_len); or `Unserved` saying why not."""
    if not enabled():
        raise Unserved("off (SEEKWEN_COMPILED_STEP=0)")
    if type(model) is not Transformer or not getattr(model, "prepared", None):
        raise Unserved("not a prepared single-process model (fast path off, or tensor-parallel)")
    cfg = model.cfg
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise Unserved(f"{model.dtype} on {model.device} (fp32 on CPU only)")
    k = kernels.get()  # (after the device check: a GPU model never compiles the CPU kernels for this)
    if k is None:
        raise Unserved(f"no kernels ({kernels.describe()})")
    paged = hasattr(cache, "block_size")
    if not paged and cache.windows:
        raise Unserved("ring-buffer window layers")
    block_size, rows = (cache.block_size, max_len) if paged else (cache.max_len, cache.max_len)
    groups = cache.group_of if paged else [0] * cfg.num_layers
    if cfg.logn_attn or not model.rope.static:
        raise Unserved(f"LogN scaling or a length-dependent rotary rule ({cfg.rope.type})")
    embed = model.embed.weight if isinstance(model.embed, (nn.Embedding, TiedEmbedding)) else None
    if embed is None or embed.dtype != torch.float32:
        raise Unserved("embedding not an fp32 table")
    model.rope(torch.zeros(1, 1, dtype=torch.long), bound=rows)  # the tables cover every position
    cos, sin = model.rope.cos_table, model.rope.sin_table
    step = k.DecodeStep(embed.detach().contiguous(), *_norm(model.norm), linear_spec(k, model.head),
                        cos.contiguous(), sin.contiguous(), block_size)
    gates = []
    for i, block in enumerate(model.layers):
        _add_attention(k, step, block, cache.layers[i], groups[i])
        _add_ffn(k, step, block, gates)
    return CompiledStep(step, gates)


def attempt(model: nn.Module, cache, max_len: int | None = None) -> tuple[CompiledStep | None, str]:
    """`build`, or (None, why not): what a runtime owning `cache` keeps and reports."""
    try:
        return build(model, cache, max_len), ""
    except Unserved as e:
        return None, str(e)


def _add_attention(k, step, block: nn.Module, store: dict[str, torch.Tensor], group: int) -> None:
    a = block.attn
    norm, eps = _norm(block.attn_norm)
    window = -1 if a.window is None else int(a.window)
    if isinstance(a, FastAttention):
        if a.rope_dim != a.head_dim:
            raise Unserved("partial rotary")
        qn = kn = None
        qk_eps = 0.0
        if a.q_norm is not None:
            (qn, qk_eps), (kn, _) = _norm(a.q_norm), _norm(a.k_norm)
        step.add_gqa(norm, eps, linear_spec(k, a.wqkv), linear_spec(k, a.wo), a.n_heads, a.n_kv_heads, a.head_dim,
                     qn, kn, qk_eps, a.interleaved, float(a.scale), window, group, store["k"], store["v"])
    elif isinstance(a, FastMLA) and a.use_kernels:
        q_b, q_norm, q_eps = None, None, 0.0
        if a.q_lora_rank is not None:
            q_b = linear_spec(k, a.wq_b)
            q_norm, q_eps = _norm(a.q_norm)
        kv_norm, kv_eps = _norm(a.kv_norm)
        int8_heads = a.uk_heads is not None and linear.ACTIVATIONS == "q8"
        uk = [la.packed(k) for la in a.uk_heads] if int8_heads else []
        uv = [la.packed(k) for la in a.uv_heads] if int8_heads else []
        step.add_mla(norm, eps, linear_spec(k, a.wq_kv_a), linear_spec(k, a.wo), q_b, q_norm, q_eps, kv_norm, kv_eps,
                     a.n_heads, a.q_lora_rank or 0, a.nope, a.rope, a.kv_lora_rank, a.v_dim, a.w_uk_t, a.w_uv_t, uk,
                     uv, a.interleaved, float(a.scale), window, group, store["kv"], store["pe"])
    else:
        raise Unserved(f"attention {type(a).__name__} without the CPU kernels")


def _add_ffn(k, step, block: nn.Module, gates: list[nn.Module]) -> None:
    f = block.ffn
    norm, eps = _norm(block.ffn_norm)
    if isinstance(f, FastMLP):
        step.add_mlp(norm, eps, linear_spec(k, f.w13), linear_spec(k, f.w2))
        return
    if not (isinstance(f, MoE) and isinstance(f.experts, GroupedExperts) and f.experts.use_kernels):
        raise Unserved(f"FFN {type(f).__name__} without the experts' kernels")
    if f.shared is not None and not isinstance(f.shared, FastMLP):
        raise Unserved("shared experts not fused")
    g, ex, m = f.gate, f.experts, f.gate.m
    if g.weight.dtype != torch.float32 or (f.shared_gate is not None and f.shared_gate.bias is not None):
        raise Unserved("router not fp32")
    gates.append(g)
    E = ex.n_experts
    e13 = e2 = d13 = d2 = p13 = p2 = []
    if ex.int8_activations:
        packed = [ex.packed(k, e) for e in range(E)]
        p13, p2 = [p for p, _ in packed], [p for _, p in packed]
    else:
        op13 = [kernel_operands(ex.w13[e]) for e in range(E)]
        op2 = [kernel_operands(ex.w2[e]) for e in range(E)]
        e13, e2 = [w for w, _ in op13], [w for w, _ in op2]
        d13 = [d for _, d in op13] if op13[0][1] is not None else []
        d2 = [d for _, d in op2] if op2[0][1] is not None else []
    s13 = s2 = None
    if f.shared is not None:
        s13, s2 = linear_spec(k, f.shared.w13), linear_spec(k, f.shared.w2)
    sg = None if f.shared_gate is None else f.shared_gate.weight.detach().float().contiguous()
    bias = None if g.bias is None else g.bias.detach().float().contiguous()
    step.add_moe(norm, eps, g.weight.detach().contiguous(), bias, m.scoring == "sigmoid", m.topk_method, m.n_group,
                 m.topk_group, m.top_k, bool(m.norm_topk_prob), float(m.norm_eps), float(m.routed_scaling_factor),
                 e13, e2, d13, d2, p13, p2, ex.w2[0].in_features, s13, s2, sg)
