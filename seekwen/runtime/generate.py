"""Generation with a preallocated KV cache: one batched prefill, then one token per row per step, both
through the runtime's `Decoder`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decoder import Decoder
from .sampling import sample
from .speculative import Proposer, Sampling, SpecStats, speculative_generate


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (any padding side in, right padding out).
    Returns (ids [B, S], lengths [B])."""
    B, S = input_ids.shape
    if attention_mask is None:
        return input_ids, torch.full((B,), S, dtype=torch.long, device=input_ids.device)
    mask = attention_mask.bool()
    order = (~mask).long().argsort(dim=-1, stable=True)  # real tokens first, in order
    return input_ids.gather(1, order), mask.sum(-1)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    graphs: bool | None = None,
    speculative: str | Proposer | None = None,
    num_speculative_tokens: int = 3,
    draft_model=None,
    speculative_stats: SpecStats | None = None,
) -> torch.Tensor:
    """input_ids [B, S] (padding marked by attention_mask, either side) -> new tokens [B, N].

    N = max_new_tokens, or fewer if every row has emitted an EOS (`stop_at_eos`). `eos_token_id`
    defaults to the config's; rows that finished are filled with `pad_token_id` (default: first
    EOS). `on_token(tokens [B])` is called after each step (streaming). `graphs`: replay the decode
    steps from CUDA graphs (default: when the model allows it, i.e. on a CUDA device).

    `speculative`: "ngram" (prompt lookup), "draft" (with `draft_model`, same tokenizer) or "mtp"
    (DeepSeek-V3's multi-token-prediction layer), or a `runtime.speculative.Proposer`: up to
    `num_speculative_tokens` drafts per round, verified in one target forward
    (`runtime/speculative.py`). Greedy output is the plain greedy output token for token; sampled
    output has the target's distribution. `speculative_stats` (a `SpecStats`) receives the acceptance
    metrics; on_token is then called per output column once every row has it."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    cfg = model.cfg
    if int(input_ids.max()) >= cfg.vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids contain ids outside the vocabulary [0, {cfg.vocab_size})")
    if eos_token_id is None:
        eos = cfg.eos_ids
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    dev = model.device
    ids, lens = right_align(input_ids.to(dev), None if attention_mask is None else attention_mask.to(dev))
    B, S = ids.shape
    if max_new_tokens == 0:
        return ids.new_zeros(B, 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed)
    if speculative is not None:
        sampling = Sampling(temperature, top_k, top_p, generator)
        return speculative_generate(model, ids, lens, max_new_tokens, sampling, eos, pad, speculative,
                                    num_speculative_tokens, draft_model, stop_at_eos, on_token, speculative_stats)
    decoder = Decoder(model, B, S + max_new_tokens, graphs=graphs)
    logits = decoder.prefill(ids, lens)
    eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
    greedy = isinstance(temperature, (int, float)) and temperature <= 0  # one argmax per step, nothing else
    for step in range(max_new_tokens):
        tok = logits.argmax(dim=-1) if greedy else sample(logits, temperature, top_k, top_p, generator)
        tok = decoder.agree(tok)  # rank 0's under torchrun
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if eos:
            done |= torch.isin(tok, eos_t)
        if (stop_at_eos and bool(done.all())) or step == max_new_tokens - 1:
            break
        logits = decoder.step(tok)
    return torch.stack(out, dim=1)
