"""Qwen v1's qwen.tiktoken vocabulary converted to a `tokenizers` BPE must encode exactly like
tiktoken's algorithm (whole piece if known, else repeatedly merge the lowest-ranked adjacent pair)."""

import base64
from collections import Counter

import pytest
import regex

from seekwen.hf.qwen_tiktoken import QWEN_PATTERN, build_tokenizer, load_qwen_tiktoken, read_ranks
from seekwen.hf.tokenizer import Tokenizer

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And God said, Let there be light: and there was light. "
    "Naïve café — 12345 tokens, can't won't it's   spaced\n\nnew lines\r\n\tand 中文 text."
)


def train_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """A tiny tiktoken-style rank table: 256 byte tokens, then greedy pair merges inside regex pieces."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in p.encode()] for p in regex.findall(QWEN_PATTERN, text)]
    for _ in range(n_merges):
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    ids = []
    for piece in regex.findall(QWEN_PATTERN, text):
        b = piece.encode()
        if b in ranks:
            ids.append(ranks[b])
            continue
        parts = [bytes([x]) for x in b]
        while True:
            joined = [(parts[i] + parts[i + 1], i) for i in range(len(parts) - 1)]
            cands = [(ranks[j], i) for j, i in joined if j in ranks]
            if not cands:
                break
            _, i = min(cands)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def ranks():
    return train_ranks(TEXT * 3, 120)


def test_encoding_matches_tiktoken_algorithm(ranks):
    tok = build_tokenizer(ranks)
    for text in [TEXT, "the theee heaven!!  x", "God   said\n\n\nLet", "naïve 中文"]:
        assert tok.encode(text).ids == tiktoken_encode(text, ranks), text
        assert tok.decode(tok.encode(text).ids) == text


def test_qwen_folder_loads_with_specials_and_chatml(tmp_path, ranks):
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (tmp_path / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    assert read_ranks(tmp_path / "qwen.tiktoken") == ranks
    tok = Tokenizer.from_folder(tmp_path)
    n = len(ranks)
    assert tok.token_id("<|endoftext|>") == n and tok.token_id("<|im_start|>") == n + 1
    assert tok.eos_token_id == n
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == n + 1 and tok.decode(ids, skip_special_tokens=False) == prompt
    # the conversion is cached and gives the same tokenizer the second time
    again = load_qwen_tiktoken(tmp_path / "qwen.tiktoken")
    assert again.encode(TEXT).ids == tok.tok.encode(TEXT).ids


def test_bad_tiktoken_line(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("not-a-valid-line\n")
    with pytest.raises(ValueError, match="qwen.tiktoken:1"):
        read_ranks(tmp_path / "qwen.tiktoken")
