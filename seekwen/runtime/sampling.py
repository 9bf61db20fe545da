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


def distribution(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """logits [B, V] -> the probabilities [B, V] (fp32, vocabulary order) that `sample` draws from with
    the same parameters; a greedy row (temperature 0) is one-hot on its argmax. Speculative decoding
    needs the distributions themselves (the rejection rule compares target and draft probabilities)."""
    B, V = logits.shape
    dev = logits.device
    temperature = _per_row(temperature, B, torch.float32, dev)
    top_k = _per_row(top_k, B, torch.long, dev)
    top_p = _per_row(top_p, B, torch.float32, dev)
    one_hot = torch.zeros(B, V, dtype=torch.float32, device=dev).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    if bool((temperature <= 0).all()):
        return one_hot
    x = logits.float() / temperature.clamp(min=1e-5)[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=dev)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    drop |= (before >= top_p[:, None]) & (rank > 0)
    kept = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)  # [B, V] in sorted order
    probs = torch.zeros_like(kept).scatter_(1, order, kept)
    return torch.where((temperature <= 0)[:, None], one_hot, probs)
