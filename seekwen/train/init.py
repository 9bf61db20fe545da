"""Initialisation for training from scratch (as DeepSeek-V3 and transformers do it): normal(0, std) for
linear weights, embeddings and stacked expert weights, ones for RMSNorm weights, zeros for biases and
the router's e_score_correction_bias."""

from __future__ import annotations

import torch

from ..model.norm import RMSNorm
from ..model.transformer import Transformer


@torch.no_grad()
def init_weights(model: Transformer, std: float = 0.02) -> None:
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, p in model.named_parameters():
        if id(p) in norms:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, std)
