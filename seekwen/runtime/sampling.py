"""Token sampling with per-row parameters: greedy (temperature 0), temperature, top-k, top-p."""

from __future__ import annotations

import torch


def _per_row(x: float | torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(n) if t.dim() == 0 else t


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Each parameter is a scalar or one value per row;
    temperature 0 means greedy, top_k 0 and top_p 1 mean off."""
    B, V = logits.shape
    dev = logits.device
    temperature = _per_row(temperature, B, torch.float32, dev)
    top_k = _per_row(top_k, B, torch.long, dev)
    top_p = _per_row(top_p, B, torch.float32, dev)
    greedy = logits.argmax(dim=-1)
    if bool((temperature <= 0).all()):
        return greedy
    x = logits.float() / temperature.clamp(min=1e-5)[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=dev)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each candidate
    drop |= (before >= top_p[:, None]) & (rank > 0)
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    pick = torch.multinomial(sorted_x.softmax(dim=-1), 1, generator=generator)
    sampled = order.gather(1, pick)[:, 0]
    return torch.where(temperature <= 0, greedy, sampled)
