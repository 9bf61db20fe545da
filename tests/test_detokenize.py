"""Incremental detokenization: whole UTF-8 characters only, stop strings held back until decided and never
returned, also when they span tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from seekwen.runtime.detokenize import Detokenizer
from seekwen.tools.common import bundled_model_path

TOKENIZER = bundled_model_path() / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="bundled tokenizer missing")

TEXTS = ["In the beginning God created the heaven and the earth.", "中文😀é€ and 👩‍👩‍👧 (a family), ½ ☃ 𝄞",
         "  leading spaces\n\nnew lines\ttabs", "</think> tags <think>"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(TOKENIZER))


def run(tok, ids, stop=(), include=False):
    d = Detokenizer(tok, list(stop), include_stop=include)
    pieces = []
    for t in ids:
        pieces.append(d.push(t))
        if d.stopped is not None:
            break
    if d.stopped is None:
        pieces.append(d.flush())
    return pieces, d


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_reassemble(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 3
    pieces, d = run(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == d.output
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids) or text.isascii()  # multi-byte characters waited for bytes


def test_stop_string_spanning_tokens_and_hold_back(tok):
    text = "中文😀é€ and more"
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, d = run(tok, ids, stop=["😀é"])  # 6 byte tokens
    assert "".join(pieces) == "中文" and d.stopped == "😀é"
    pieces, d = run(tok, ids, stop=["😀é"], include=True)
    assert "".join(pieces) == "中文😀é"
    # a possible start of a stop string is held back, then released when it turns out not to be one
    ids = tok.encode("the heaven and the earth", add_special_tokens=False).ids
    d = Detokenizer(tok, ["the end"])
    out = [d.push(t) for t in ids]
    assert "the" not in out[0] and "".join(out) + d.flush() == "the heaven and the earth"
    assert d.stopped is None


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab cd中😀é\n.")), min_size=1, max_size=30), st.data())
def test_stop_strings_property(text, data):
    tok = Tokenizer.from_file(str(TOKENIZER))
    ids = tok.encode(text, add_special_tokens=False).ids
    full = tok.decode(ids)
    i = data.draw(st.integers(0, max(len(full) - 1, 0)))
    j = data.draw(st.integers(i + 1, len(full))) if full else 0
    stop = full[i:j] or "x"
    pieces, d = run(tok, ids, stop=[stop])
    out = "".join(pieces)
    k = full.find(stop)
    assert out == (full[:k] if k >= 0 else full)
    assert (d.stopped == stop) == (k >= 0)
    assert stop not in out
