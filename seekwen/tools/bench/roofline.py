"""What the roofline compares against: weight bytes one decode step reads, matmul work per prompt token,
parameter counts. (The KV-cache bytes per token a model should have: `ModelConfig.kv_bytes_per_token`.)"""

from __future__ import annotations


def decode_bytes(model) -> int:
    """Weight bytes one batch-1 decode step reads: everything but an untied embedding table (one row
    is read) and the routed experts not chosen (top_k of n_routed per MoE layer)."""
    cfg = model.cfg
    head = {id(p) for p in model.head.parameters()}
    total = 0
    for name, p in model.named_parameters():  # shared (tied) tensors once
        if name.startswith("embed.") and id(p) not in head:
            continue
        frac = cfg.moe.top_k / cfg.moe.n_routed_experts if ".experts." in name else 1.0
        total += int(stored_bytes(model, name, p) * frac)
    return total


def stored_bytes(model, name: str, p) -> int:
    """A parameter's bytes as a step reads them: a Q8_0 / Q4_0 layer's codes released after packing
    (`fast.linear._BlockLinear.packed`) count as their packed groups (which hold the scales too: its d
    then counts once, here)."""
    if name.endswith("codes") and p.numel() == 0:
        packed = getattr(model.get_submodule(name.rpartition(".")[0]), "_qpacked", None)
        if packed is not None:
            return packed[1].numel() - model.get_parameter(name.rpartition(".")[0] + ".d").numel() * 2
    return p.numel() * p.element_size()


def matmul_params_per_token(model) -> int:
    """Weights every prompt token is multiplied by: all active parameters except the embedding (a
    lookup) and the LM head (applied to the last token only)."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    n -= cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    if cfg.moe is not None:
        per_expert = 3 * cfg.hidden_size * cfg.moe.intermediate_size
        n -= sum(cfg.mlp_layers) * per_expert * (cfg.moe.n_routed_experts - cfg.moe.top_k)
    return n


def count_params(cfg) -> int:
    """Parameters of the model `cfg` describes (built on the meta device: no memory)."""
    from ...hf.loader import build

    return sum(p.numel() for p in build(cfg, device="meta").parameters())


def decode_bytes_plain(cfg) -> int:
    """fp32 weight bytes a batch-1 decode step reads in the unquantized model."""
    from ...hf.loader import build

    return decode_bytes(build(cfg, device="meta"))

