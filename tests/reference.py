"""Pieces written from the formulas (or driving the cache by hand) that several test files compare against."""

from __future__ import annotations

import torch

from seekwen.runtime.decoder import Decoder


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def greedy_full_forward(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    seq = ids.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            tok = model(seq)[:, -1].argmax(-1)
            out.append(tok)
            seq = torch.cat((seq, tok[:, None]), 1)
    return torch.stack(out, 1)


def decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill then greedy decode through the cache; logits of every step [steps + 1, B, V]."""
    B, S = ids.shape
    dec = Decoder(model, B, S + steps)
    out = []
    with torch.no_grad():
        logits = dec.prefill(ids)
        out.append(logits)
        for _ in range(steps):
            logits = dec.step(logits.argmax(-1))
            out.append(logits)
    return torch.stack(out)
