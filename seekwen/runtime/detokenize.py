"""Incremental detokenization with stop strings.

`Detokenizer.push(token)` returns the new text a token adds, such that

- a multi-byte UTF-8 character split over several byte-level tokens is returned whole, once its last byte
  arrives (text whose decoding still ends in U+FFFD is held back);
- text that could still turn out to be the start of a stop string is held back until that is decided;
- when a stop string appears (also spanning several tokens), the text before it is returned, the stop
  string itself and anything after it are not (unless `include_stop`), and `stopped` is set.

`flush()` returns what is held back when the sequence ends for another reason (EOS, length).

Decoding works on a short window of ids (from `prefix` to the end), as vLLM's and TGI's incremental
detokenizers do: decoding a token together with the one before it keeps the tokenizer's spacing rules
(SentencePiece's leading "▁", cleanup) the same as decoding the whole text, at a cost that does not grow
with the length of the output.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.max_stop = max((len(s) for s in self.stop), default=0)
        # for the hold-back test: per stop string, per character c, the lengths k (longest first) with
        # s[k-1] == c and k < len(s): the only prefixes of s the text can end with when it ends with c
        self._ends: list[tuple[str, dict[str, list[int]]]] = []
        for s in self.stop:
            ends: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                ends.setdefault(s[k - 1], []).append(k)
            self._ends.append((s, ends))
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded last time as the context of the next piece
        self.read = 0  # ids before this are in `text`
        self.text = ""  # all decoded text so far (complete characters)
        self.sent = 0  # characters of `text` already returned
        self.stopped: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def _advance(self, final: bool = False) -> None:
        """Move complete characters of the newest ids into `text`."""
        if self.read >= len(self.ids):
            return
        before = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if not final and (full.endswith(REPLACEMENT) or len(full) <= len(before)):
            return  # an incomplete character (or nothing visible yet): wait for more ids
        if full.startswith(before):
            self.text += full[len(before) :]
        else:  # the window decodes differently from its context (rare): take the new tail of the whole text
            whole = self._decode(self.ids)
            self.text += whole[len(self.text) :]
        self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        if self.stopped is not None:
            return ""
        if self.stop:
            # text before `sent` holds no stop string nor the start of one (that is held back below)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
            if hits:
                i, s = min(hits)
                self.stopped = s
                end = i + len(s) if self.include_stop else i
                piece = self.text[self.sent : max(end, self.sent)]
                self.sent = max(end, self.sent)
                self.text = self.text[: self.sent]
                return piece
        end = len(self.text)
        if self.stop and not final and end > self.sent:  # hold back a tail that may still grow into a stop string
            room = end - self.sent
            hold = 0
            for s, ends in self._ends:
                for k in ends.get(self.text[-1], ()):
                    if k <= hold:
                        break
                    if k <= room and self.text.endswith(s[:k]):
                        hold = k
                        break
            end -= hold
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now certain (possibly "")."""
        if self.stopped is not None:
            return ""
        self.ids.append(int(token_id))
        self._advance()
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence ended (not on a stop string): return whatever is still held back."""
        if self.stopped is not None:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    @property
    def output(self) -> str:
        """The text returned so far."""
        return self.text[: self.sent]
