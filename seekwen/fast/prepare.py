"""`prepare(model)`: swap the fast path's sibling modules (`fast.layers`) in for the reference ones, and
`plan(model)`: which implementation runs where.

- every linear layer -> `FastLinear` (SIMD kernel for decode, `F.linear` for prefill), or one of the weight
  formats of `linear.make_linear` (bf16, f16, GGUF's q8_0 / q4_0 blocks, per-channel int8, int4 groups);
- attention, MLA, dense MLPs and shared experts -> `FastAttention`, `FastMLA`, `FastMLP` (fused products);
- stacked MoE experts -> `GroupedExperts` on CPU or when quantized (on a GPU, unquantized, the stacked
  experts stay: they run as grouped matmuls, `model.moe.dispatch_grouped`);
- a tied LM head -> one [vocab, hidden] matrix, which the embedding lookup reads rows of (no 2nd copy);
- RMSNorm -> `FastRMSNorm` (one fused `F.rms_norm`).
The router (`Gate`) stays as it is: tiny, and its fp32 numerics matter for which experts are chosen.
The reference modules are replaced, never edited: a reference module taken out of the model before
`prepare` still computes as before.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.mla import MLA
from ..model.mlp import MLP
from ..model.moe import Experts, MoE, grouped_mm_works
from ..model.norm import RMSNorm
from .layers import FastAttention, FastMLA, FastMLP, FastRMSNorm, GroupedExperts, TiedEmbedding, fast_linear
from .linear import QUANTIZE, FastLinear, describe_linear


def _swap_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is RMSNorm:
            setattr(module, name, FastRMSNorm.from_reference(child))
        else:
            _swap_norms(child)


def _prepare_block(block: nn.Module, quantize: str | None, group_size: int) -> None:
    fast_attn = FastMLA if isinstance(block.attn, MLA) else FastAttention
    block.attn = fast_attn.from_reference(block.attn, quantize, group_size)
    ffn = block.ffn
    if isinstance(ffn, MLP):
        block.ffn = FastMLP.from_reference(ffn, quantize, group_size)
    elif isinstance(ffn, MoE):
        if ffn.experts.w1.device.type == "cpu" or quantize:
            ffn.experts = GroupedExperts.from_reference(ffn.experts, quantize, group_size)
        if ffn.shared is not None:
            ffn.shared = FastMLP.from_reference(ffn.shared, quantize, group_size)


@torch.no_grad()
def prepare(model: nn.Module, quantize: str | None = None, group_size: int = 64) -> nn.Module:
    """Swap in the fast path (see module docstring). quantize: None (weights as loaded), "bf16" / "f16"
    (16-bit weights, fp32 activations), "q8_0" / "q4_0" (GGUF's blocks of 32 with an fp16 scale; layers
    with in % 32 != 0 stay bf16), "int8" (per-output-channel) or "int4" (groups of `group_size` input
    channels, asymmetric). Idempotent."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r} (use one of {', '.join(q for q in QUANTIZE if q)})")
    done = getattr(model, "prepared", None)
    if done is not None:
        if done != (quantize or "fp"):
            raise ValueError(f"model already runs the fast path as {done!r}; load it with fast=False to "
                             f"prepare it as {quantize or 'fp'!r}")
        return model
    for block in model.blocks():  # the decoder layers and the MTP layers' blocks
        _prepare_block(block, quantize, group_size)
    for mtp in model.mtp:
        mtp.eh_proj = fast_linear(mtp.eh_proj, quantize, group_size)
        mtp.head = fast_linear(mtp.head, quantize, group_size)
    _swap_norms(model)
    model.head = fast_linear(model.head, quantize, group_size)
    if model.cfg.tie_word_embeddings and quantize is None and isinstance(model.head, FastLinear):
        model.embed = TiedEmbedding(model.head)  # (a block-quantized head keeps the embedding as loaded)
    model.prepared = quantize or "fp"
    return model


def _describe(module: nn.Module) -> str:
    if hasattr(module, "describe"):
        return module.describe()
    if isinstance(module, Experts):
        if module.w1.is_cuda and grouped_mm_works("cuda", module.w1.dtype):
            return f"{module.w1.shape[0]} stacked experts, three torch._grouped_mm calls (fixed shapes)"
        return f"{module.w1.shape[0]} stacked experts, one F.linear per expert that got tokens (reference)"
    if isinstance(module, nn.Linear):
        return f"{str(module.weight.dtype).removeprefix('torch.')} F.linear (reference)"
    if type(module) is RMSNorm:
        return "RMSNorm in fp32 (reference)"
    return f"{type(module).__name__} (reference)"


def plan(model: nn.Module) -> list[tuple[str, str]]:
    """Which implementation runs where: (component, implementation) rows, one per kind of layer, the
    way vLLM logs its attention backend. Layers of one kind that run the same way share a row."""
    rows: dict[str, list[str]] = {}

    def add(kind: str, text: str) -> None:
        if text not in rows.setdefault(kind, []):
            rows[kind].append(text)

    prepared = getattr(model, "prepared", None)
    add("path", f"{'fast' if prepared else 'reference (plain modules)'}; "
                f"{str(model.dtype).removeprefix('torch.')} on {model.device}")
    add("quantization", "none" if prepared in (None, "fp") else prepared)
    for block in model.layers:
        attn = block.attn
        kind = "attention (MLA)" if isinstance(attn, MLA) else "attention (GQA)" if attn.n_kv_heads != attn.n_heads \
            else "attention (MHA)"
        reference = "reference: naive prefill, absorbed decode (einsum)" if isinstance(attn, MLA) \
            else "reference: separate q/k/v products, SDPA"
        add(kind, _describe(attn) if hasattr(attn, "describe") else reference)
        ffn = block.ffn
        if isinstance(ffn, MoE):
            add("routed experts", _describe(ffn.experts))
            if ffn.shared is not None:
                add("shared experts", _describe(ffn.shared) if hasattr(ffn.shared, "describe") else "reference MLP")
        else:
            add("dense MLP", _describe(ffn) if hasattr(ffn, "describe") else "reference: separate gate/up/down")
    head = model.head
    add("LM head", describe_linear(head) if hasattr(head, "in_features") and not isinstance(head, nn.Linear)
        else _describe(head))
    norms = {_describe(m) for m in model.modules() if isinstance(m, RMSNorm)}
    add("norms", " / ".join(sorted(norms)))
    return [(kind, "; ".join(texts)) for kind, texts in rows.items()]


def format_plan(model: nn.Module, extra: list[tuple[str, str]] | None = None, indent: int = 2) -> str:
    """`plan(model)` (plus e.g. the runtime's rows) as aligned text lines."""
    rows = plan(model) + (extra or [])
    width = max(len(kind) for kind, _ in rows)
    return "\n".join(f"{' ' * indent}{kind:<{width}}  {text}" for kind, text in rows)
