"""Token sampling with per-row parameters, as pure functions on tensors.

Order, as vLLM's sampler: penalties on the raw logits (they change greedy picks too), then
temperature, then min-p, top-k and top-p filtering, then a draw. Definitions:

- repetition penalty (Keskar et al. 2019, HF/vLLM): every token that occurs in the prompt or the output so
  far has its logit divided by `r` if positive, multiplied by `r` if negative (r > 1 discourages);
- frequency penalty (OpenAI): logit -= f * (times the token occurs in the output so far);
- presence penalty (OpenAI): logit -= p * (1 if the token occurs in the output so far);
- min-p: after temperature, drop tokens whose probability is below `min_p` x the top token's;
- top-k: keep the k most likely tokens (k <= 0: off); top-p: keep the smallest set of most likely tokens
  whose mass reaches p (always at least one).

Logprobs (`logprobs`) are of the model's own distribution (log-softmax of the raw logits, before
penalties and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

import torch


def _per_row(x: float | torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(n) if t.dim() == 0 else t


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    seen: torch.Tensor | None = None,
    presence: float | torch.Tensor = 0.0,
    frequency: float | torch.Tensor = 0.0,
    repetition: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """logits [B, V] (float), output_counts [B, V] (occurrences of each token in each row's output so far),
    seen [B, V] bool (token occurs in the prompt or the output; default: output only) -> penalised logits."""
    B, V = logits.shape
    dev = logits.device
    presence = _per_row(presence, B, torch.float32, dev)[:, None]
    frequency = _per_row(frequency, B, torch.float32, dev)[:, None]
    repetition = _per_row(repetition, B, torch.float32, dev)[:, None]
    counts = output_counts.to(torch.float32)
    if seen is None:
        seen = counts > 0
    x = logits.float()
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    return x - frequency * counts - presence * (counts > 0).float()


def filter_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, min-p, top-k, top-p. Returns (sorted logits [B, V] with dropped entries -inf, the
    vocabulary order [B, V] they are sorted in). Rows with temperature <= 0 are treated as temperature 1
    (the caller takes their argmax)."""
    B, V = logits.shape
    dev = logits.device
    temperature = _per_row(temperature, B, torch.float32, dev)
    top_k = _per_row(top_k, B, torch.long, dev)
    top_p = _per_row(top_p, B, torch.float32, dev)
    min_p = _per_row(min_p, B, torch.float32, dev)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).clamp(min=1e-5)
    x = logits.float() / t[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=dev)[None, :]
    full = sorted_x.softmax(dim=-1)
    drop = full < min_p[:, None] * full[:, :1]  # min-p on the tempered distribution
    drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each candidate
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays
    return sorted_x.masked_fill(drop, float("-inf")), order


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Each parameter is a scalar or one value per row;
    temperature 0 means greedy, top_k 0, top_p 1 and min_p 0 mean off."""
    B, V = logits.shape
    temperature = _per_row(temperature, B, torch.float32, logits.device)
    greedy = logits.argmax(dim=-1)
    if bool((temperature <= 0).all()):
        return greedy
    sorted_x, order = filter_logits(logits, temperature, top_k, top_p, min_p)
    pick = torch.multinomial(sorted_x.softmax(dim=-1), 1, generator=generator)
    sampled = order.gather(1, pick)[:, 0]
    return torch.where(temperature <= 0, greedy, sampled)


def distribution(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """logits [B, V] -> the probabilities [B, V] (fp32, vocabulary order) that `sample` draws from with
    the same parameters; a greedy row (temperature 0) is one-hot on its argmax. Speculative decoding
    needs the distributions themselves (the rejection rule compares target and draft probabilities)."""
    B, V = logits.shape
    temperature = _per_row(temperature, B, torch.float32, logits.device)
    one_hot = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
    one_hot.scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    if bool((temperature <= 0).all()):
        return one_hot
    sorted_x, order = filter_logits(logits, temperature, top_k, top_p, min_p)
    probs = torch.zeros_like(one_hot).scatter_(1, order, sorted_x.softmax(dim=-1))
    return torch.where((temperature <= 0)[:, None], one_hot, probs)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V], chosen tokens [B] -> (logprob of each chosen token [B], top-k token ids [B, k],
    their logprobs [B, k], most likely first), all from the log-softmax of `logits` in float32."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None].long())[:, 0]
    k = min(max(int(k), 0), lp.shape[-1])
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    return chosen, top_i, top_v
