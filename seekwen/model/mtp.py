"""DeepSeek-V3's multi-token-prediction (MTP) module: predicts the token after next.

One MTP layer takes the main model's hidden state h_i at position i (final-normed, as vLLM and
SGLang pass it) and the embedding of the *next* token t_{i+1}, and predicts t_{i+2}:

    x_i    = eh_proj([RMSNorm_e(Emb(t_{i+1})) ; RMSNorm_h(h_i)])      (embedding half first)
    x'_i   = Block(x_i)                                                (one decoder block, causal over i)
    logits = head(RMSNorm(x'_i))                                       (the "shared head")

The V3 report writes the concatenation as [h ; e]; every implementation that runs the released
weights (vLLM `deepseek_mtp.py`, SGLang `deepseek_nextn.py`, TensorRT-LLM, Megatron) puts the
embedding half first, so the columns of `eh_proj` are read in that order here. Chaining (drafting
t_{i+3}, ...) feeds x'_i back as the next step's h. The block attends over its own sequence of
positions, so it has a KV cache of its own (one layer: `MTPLayer.cfg` is a one-layer config).

Checkpoints ship `embed` and `head` as copies of the main model's (`model.layers.{L}.embed_tokens`,
`shared_head.head`); training ties them to the main model's (the report shares them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import ForwardBatch, kept_tokens
from .norm import RMSNorm


def mtp_block_config(cfg: ModelConfig) -> ModelConfig:
    """The one-layer config an MTP block is built from: attention as the main model's, the MLP kind and
    window of the main model's last layer (DeepSeek-V3: MLA + MoE, like layers 3..60)."""
    moe = bool(cfg.mlp_layers[-1]) if cfg.mlp_layers else False
    window = cfg.sliding_window[-1] if cfg.sliding_window else None
    return cfg.replace(num_layers=1, mlp_layers=[moe], sliding_window=[window], num_mtp_layers=0)


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from .transformer import Block  # (transformer.py builds MTP layers: import here, no cycle)

        self.cfg = mtp_block_config(cfg)
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(self.cfg, 0)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # shared_head.norm
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)  # shared_head.head

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        batch: ForwardBatch,
        keep: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, S] (t_{i+1}), hidden [B, S, d] (h_i) -> logits [B, S, vocab] for t_{i+2}
        (with `keep` [B]: [B, 1, vocab] at that index per row). `return_hidden`: (logits, x' [B, S, d]),
        the block's output before the head's norm: the h of the next chained step."""
        e = self.enorm(self.embed_tokens(input_ids))
        h = self.hnorm(hidden.to(e.dtype))
        x = self.block(self.eh_proj(torch.cat((e, h), dim=-1)), batch)  # [B, S, d]
        logits = self.logits(self.norm(kept_tokens(x, keep)))
        return (logits, x) if return_hidden else logits

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> [B, S, d] (a tensor-parallel layer overrides it, as `Transformer.embed_tokens`)."""
        return self.embed(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, S, d] -> [B, S, vocab] (a tensor-parallel layer overrides it, as `Transformer.logits`)."""
        return self.head(h)


def share_embeddings(model) -> None:
    """Tie every MTP layer's embedding and output head to the main model's (training: the V3 report
    shares them; checkpoints store copies)."""
    for layer in model.mtp:
        layer.embed.weight = model.embed.weight
        layer.head.weight = model.head.weight


def mtp_logits(model, hidden: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The MTP layers over a training sequence, without a cache (DeepSeek-V3 report, section 2.2).

    tokens [B, T+1]: the main model read t_0..t_{T-1}; hidden [B, T, d] its final-normed hidden states.
    Depth k (1-based) combines h^{k-1}_i (h^0 = the main model's) with Emb(t_{i+k}) for i < T - k and
    predicts t_{i+k+1}: returns one logits tensor [B, T-k, vocab] per depth, targets tokens[:, k+1:]."""
    T = hidden.shape[1]
    out, h = [], hidden
    for k, layer in enumerate(model.mtp, start=1):
        if T - k < 1:
            break
        ids = tokens[:, k:T]  # t_{i+k}, i = 0 .. T-k-1
        logits, h = layer(ids, h[:, : T - k], model.uncached_batch(ids, None, None), return_hidden=True)
        out.append(logits)
    return out
