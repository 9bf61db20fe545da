"""Packed token data: text files -> one token stream (BOS text EOS per file) -> fixed chunks, every
`val_every`-th chunk held out for validation. Training batches come from the training stream in a
seeded random order per epoch, at an epoch-dependent offset, so epochs see different windows. The
position in that order is (epoch, batch index): saving and restoring it makes resumption exact."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .bpe import BOS, EOS


def read_texts(paths: list[str | Path]) -> list[str]:
    """The files' text; unreadable or empty files raise FileNotFoundError/ValueError with the path."""
    if not paths:
        raise ValueError("no training text given")
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read as UTF-8 text ({e})") from e
        if not text.strip():
            raise ValueError(f"{path}: empty text file")
        texts.append(text)
    return texts


def text_lines(texts: list[str]) -> Iterator[str]:
    for text in texts:
        yield from text.splitlines(keepends=True)


def tokenize(tok: Tokenizer, texts: list[str], block_lines: int = 2000) -> torch.Tensor:
    """One int32 stream: BOS + file + EOS for each file (encoded in batches of lines)."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    out: list[int] = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        blocks = ["".join(lines[i : i + block_lines]) for i in range(0, len(lines), block_lines)]
        out.append(bos)
        for enc in tok.encode_batch(blocks, add_special_tokens=False):
            out.extend(enc.ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.int32)


def stream_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


@dataclass
class Split:
    train: torch.Tensor  # int32 token stream
    val: torch.Tensor  # [n_val, seq_len + 1] held-out chunks


def chunked(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`ids` cut into consecutive chunks of seq_len + 1 tokens, [n_chunks, seq_len + 1] (a view; the tail
    shorter than a chunk is left out)."""
    n = seq_len + 1
    n_chunks = len(ids) // n
    return ids[: n_chunks * n].view(n_chunks, n)


def held_out(n_chunks: int, val_every: int) -> torch.Tensor:
    """The hold-out rule, bool [n_chunks]: which chunks are validation. Every `val_every`-th chunk, starting
    in the middle of the first period (chunk val_every // 2), so held-out text is spread evenly through the
    stream and does not start at its very beginning; none when val_every <= 0. Training (`split`) and
    everything that scores "the text training never saw" use this one rule."""
    is_val = torch.zeros(n_chunks, dtype=torch.bool)
    if val_every > 0 and n_chunks > 0:
        is_val[(val_every // 2) % n_chunks :: val_every] = True
    return is_val


def held_out_chunks(ids: torch.Tensor, seq_len: int, val_every: int) -> torch.Tensor:
    """The validation chunks of a token stream, [n_val, seq_len + 1], in stream order."""
    chunks = chunked(ids, seq_len)
    return chunks[held_out(len(chunks), val_every)]


def split(ids: torch.Tensor, seq_len: int, val_every: int) -> Split:
    """Cut `ids` into chunks of seq_len + 1; the `held_out` ones are validation, the rest (and the tail)
    is concatenated into the training stream."""
    chunks = chunked(ids, seq_len)
    if len(chunks) < 2:
        raise ValueError(f"text too short: {len(ids)} tokens, need at least {2 * (seq_len + 1)} for seq_len {seq_len}")
    is_val = held_out(len(chunks), val_every)
    train = torch.cat([chunks[~is_val].reshape(-1), ids[chunks.numel() :]])
    return Split(train=train, val=chunks[is_val])


class Batches:
    """Batches [B, seq_len + 1] from a training stream, reproducible from (seed, epoch, index)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        if len(stream) < seq_len + 1 + seq_len:
            raise ValueError(f"training stream too short: {len(stream)} tokens for seq_len {seq_len}")
        self.epoch, self.index = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_plan(self) -> tuple[int, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        offset = int(torch.randint(0, self.seq_len, (1,), generator=g))
        n = (len(self.stream) - offset - 1) // self.seq_len
        starts = offset + self.seq_len * torch.randperm(n, generator=g)
        return offset, starts

    def batches_per_epoch(self) -> int:
        return len(self._epoch_plan()[1]) // self.batch_size

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

    def next(self) -> torch.Tensor:
        if self._order is None:
            self._order = self._epoch_plan()[1]
        if (self.index + 1) * self.batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_plan()[1]
        starts = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        return self.stream[idx].long()
