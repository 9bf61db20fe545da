"""`seekwen bench --quantize` / `--sections ppl`: how much quantization changes perplexity on held-out text
(the bundled model by default, scored before and after `prepare(quantize=...)`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def perplexity(model, chunks: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over chunks [N, L]."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in chunks:
            logits = model(row[None, :-1])[0].float()
            total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))


def held_out_text(model, text_path: str, seq_len: int = 256, val_every: int = 50, n: int = 16) -> torch.Tensor:
    """The first `n` chunks of `text_path` that the trainer's hold-out rule (`train.data.held_out`: every
    `val_every`-th chunk of seq_len + 1 tokens) keeps out of training, [n, seq_len + 1]. The text is
    encoded whole with the model's tokenizer, without the BOS/EOS the trainer adds around each file."""
    from ...train.data import held_out_chunks

    ids = torch.tensor(model.tokenizer.encode(Path(text_path).read_text(), add_special_tokens=False))
    return held_out_chunks(ids, seq_len, val_every)[:n]


def ppl_check(args) -> None:
    """Print fp32 and quantized perplexity on held-out chunks of --ppl-text (skipped if a file is missing)."""
    import seekwen

    from ...fast import prepare
    from ..common import model_path

    path = model_path(args.ppl_model)
    text = args.ppl_text or "runs/kjv.txt"
    if not Path(path).exists() or not Path(text).exists():
        print(f"\n== perplexity: skipped ({path if not Path(path).exists() else text} not found)")
        return
    base = seekwen.load(path, dtype=torch.float32)
    seq = min(256, base.cfg.max_position_embeddings)
    chunks = held_out_text(base, text, seq_len=seq)
    q = prepare(copy.deepcopy(base), quantize=args.quantize or "int8", group_size=args.group_size)
    p0, p1 = perplexity(base, chunks), perplexity(q, chunks)
    print(f"\n== perplexity on {chunks.shape[0]} held-out chunks of {chunks.shape[1] - 1} tokens from {text} ({path})")
    print(f"  fp32 {p0:.4f}   {args.quantize or 'int8'} {p1:.4f}   change {100 * (p1 / p0 - 1):+.3f}%")
