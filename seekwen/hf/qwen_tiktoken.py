"""Qwen v1's tokenizer without its remote code: `qwen.tiktoken` (base64 token, rank per line) turned
into a byte-level BPE for the `tokenizers` library.

tiktoken encodes a regex piece by repeatedly merging the adjacent pair whose concatenation has the
lowest rank. A BPE with merges ordered by rank does the same, so the merge list is recovered by
running that procedure on every multi-byte token with only lower-ranked tokens allowed: the last
step joins exactly two parts, and that pair is the token's merge.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
QWEN_SPECIAL_START = 151643

# ChatML, as Qwen v1's chat code (make_context) writes it
QWEN_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a 'base64-token rank' line") from e
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _split_in_two(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes] | None:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def build_tokenizer(
    ranks: dict[bytes, int], pattern: str = QWEN_PATTERN, specials: dict[str, int] | None = None
) -> Tokenizer:
    enc = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        pair = _split_in_two(tok, ranks, rank)
        if pair is None:
            raise ValueError(f"tiktoken rank {rank} cannot be built from lower-ranked tokens")
        merges.append((text(pair[0]), text(pair[1])))
    # ignore_merges: like tiktoken, a piece that is itself a token is taken whole
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for name, idx in sorted((specials or {}).items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size() != idx:
            raise ValueError(f"special token {name} expects id {idx}, vocabulary has {tok.get_vocab_size()}")
        tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return tok


def load_qwen_tiktoken(path: str | Path, cache_dir: str | Path | None = None) -> Tokenizer:
    """qwen.tiktoken -> tokenizers.Tokenizer, cached as tokenizer.json (conversion takes seconds)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cache = Path(cache_dir or Path.home() / ".cache" / "seekwen" / "tokenizers") / f"qwen-{digest}.json"
    if cache.is_file():
        return Tokenizer.from_file(str(cache))
    ranks = read_ranks(path)
    specials = {name: QWEN_SPECIAL_START + i for i, name in enumerate(QWEN_SPECIALS)}
    if max(ranks.values()) + 1 != QWEN_SPECIAL_START:  # a small or modified vocabulary: specials follow it
        specials = {name: max(ranks.values()) + 1 + i for i, name in enumerate(QWEN_SPECIALS)}
    tok = build_tokenizer(ranks, QWEN_PATTERN, specials)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(json.loads(tok.to_str())))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: convert again next time
    return tok
