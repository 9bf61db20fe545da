"""The decoder every family shares: embed -> N x [RMSNorm -> attention -> + ; RMSNorm -> MLP/MoE -> +]
-> RMSNorm -> LM head. Which attention (GQA or MLA), which layers are MoE and which slide is all in
the `ModelConfig`; a family is configuration plus a weight map, never a copy of this file."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..runtime.cache import KVCache
from .attention import Attention, AttnContext
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding, logn_scale, qwen_ntk_alpha


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer) if cfg.mla is not None else Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.mlp_layers and cfg.mlp_layers[layer]:
            self.ffn: nn.Module = MoE(cfg.hidden_size, cfg.moe)
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """A causal LM for any supported family. `model(input_ids)` -> logits [B, S, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.rope)
        self.tokenizer = None  # set by seekwen.load when the checkpoint has one

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def context(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        cache: KVCache | None,
    ) -> AttnContext:
        B, S = input_ids.shape
        dev = input_ids.device
        default_positions = positions is None
        if positions is None:
            if cache is not None:
                positions = cache.lens[:, None] + torch.arange(S, device=dev)
            elif attention_mask is not None:  # left or right padding: count real tokens only
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(S, device=dev).expand(B, S)
        rope = self.cfg.rope
        alpha = None
        if rope.type == "qwen_dynamic":
            # Qwen v1 fixes NTK alpha at prefill from each sequence's true length and keeps it: a cached
            # row takes it from the call that starts it (lens 0) and keeps it in the cache (views share it)
            if attention_mask is not None:
                true_len = attention_mask.long().sum(-1) + (0 if cache is None else cache.lens)
            else:
                true_len = positions.max(-1).values + 1
            alpha = torch.tensor([qwen_ntk_alpha(int(n), rope.seq_length) for n in true_len], dtype=torch.float64)
            if cache is not None:
                alpha = torch.where(cache.lens == 0, alpha.to(cache.ntk_alpha.device), cache.ntk_alpha)
                cache.ntk_alpha.copy_(alpha)
        static = cache is not None and cache.static
        cos, sin = self.rope(positions, alpha=alpha, bound=cache.max_len if static else None)
        logn = logn_scale(positions, rope.seq_length) if self.cfg.logn_attn and rope.seq_length else None
        valid = attention_mask if cache is None else None
        ctx = AttnContext(positions, cos, sin, cache=cache, key_valid=valid, logn=logn)
        if cache is not None:
            if static:  # attend over every slot (the mask hides the unused ones): fixed shapes, no sync
                ctx.n_keys = cache.max_len
            elif S == 1:  # decode: each row's key count (the one host sync of a cached call)
                ctx.key_counts = [p + 1 for p in positions[:, 0].tolist()]
                ctx.n_keys = max(ctx.key_counts)
                cache.check(ctx.n_keys)
            else:
                ctx.n_keys = int(positions.max()) + 1  # the one host sync of a cached call
                cache.check(ctx.n_keys)
                # max position S-1 means every row starts at 0 (positions = lens + 0..S-1); right padding
                # only (the cached-call contract), so pads are last and no real token sees them
                ctx.causal = default_positions and ctx.n_keys == S and S > 1
            ctx.new_valid = attention_mask
        else:
            ctx.causal = default_positions and attention_mask is None and S > 1
        return ctx

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, vocab]; with `keep` [B] (an index per row), only the logits
        at that index: [B, 1, vocab] (saves the vocab-sized product for every prompt token).

        attention_mask [B, S] marks real tokens (1) and padding (0). Without a cache, positions count
        real tokens, so left- and right-padded rows give the same logits as unpadded ones. With a
        cache, new tokens go at positions cache.lens + 0..S-1 (right padding only); the caller
        advances `cache.lens` (see runtime.generate)."""
        ctx = self.context(input_ids, attention_mask, positions, cache)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        if keep is not None:
            h = h[torch.arange(h.shape[0], device=h.device), keep][:, None]
        return self.head(self.norm(h))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch_size, max_len, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Sample `max_new_tokens` continuations for a batch: input_ids [B, S] -> new tokens [B, N].

        Greedy when temperature is 0 (the default). Uses the KV cache (the MLA latent cache for
        DeepSeek-V2/V3), and gives the same tokens as re-running the full forward each step, except
        for Qwen v1 with `use_dynamic_ntk`: like Qwen's own code, the NTK alpha is fixed from the
        prompt length at prefill and kept while decoding. Rows that emit an EOS are padded with
        `pad_token_id` (EOS if unset) afterwards. See `seekwen.runtime.generate.generate`."""
        from ..runtime.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
