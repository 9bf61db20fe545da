"""DeepSeek-R1-style reasoning: the part of a reply up to `</think>` is `reasoning_content`, the rest `content`.

A reply is in reasoning mode from its start when the chat template opened `<think>` in the generation
prompt, or when the reply itself starts with `<think>` (after whitespace). A reply that does neither is all
content. Tags are found across streamed pieces (a partial tag is held back until decided); the tags are not
returned, nor the whitespace right after them.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def opens_thinking(prompt_text: str) -> bool:
    """Did the chat template leave the generation prompt inside a `<think>` block?"""
    return prompt_text.rstrip().endswith(OPEN)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ReasoningSplitter:
    def __init__(self, thinking: bool = False):
        self.state = "think" if thinking else "start"  # start: a reply that may still open <think>
        self.pending = ""  # held back: a possible tag, or the undecided start of the reply
        self.strip = True  # drop whitespace at the start of the current part
        self.reasoned = thinking  # the reply has a reasoning part

    def _out(self, text: str, reasoning: list[str], content: list[str]) -> None:
        if self.strip:
            text = text.lstrip()
            if not text:
                return
            self.strip = False
        (reasoning if self.state == "think" else content).append(text)

    def push(self, piece: str) -> tuple[str, str]:
        """A new piece of reply text -> (reasoning delta, content delta)."""
        reasoning: list[str] = []
        content: list[str] = []
        text = self.pending + piece
        self.pending = ""
        if self.state == "start":
            head = text.lstrip()
            if head.startswith(OPEN):
                self.state, self.strip, self.reasoned = "think", True, True
                text = head[len(OPEN):]
            elif head and OPEN.startswith(head):
                self.pending = text  # may still become <think>
                return "", ""
            elif head:
                self.state = "content"
            else:
                self.pending = text
                return "", ""
        if self.state == "think":
            i = text.find(CLOSE)
            if i >= 0:
                self._out(text[:i], reasoning, content)
                self.state, self.strip = "content", True
                text = text[i + len(CLOSE):]
            else:
                keep = _partial_suffix(text, CLOSE)
                self._out(text[: len(text) - keep], reasoning, content)
                self.pending = text[len(text) - keep:]
                text = ""
        if self.state == "content" and text:
            self._out(text, reasoning, content)
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The reply ended: release what was held back."""
        text, self.pending = self.pending, ""
        if self.state == "start":
            self.state = "content"
        reasoning: list[str] = []
        content: list[str] = []
        if text:
            self._out(text, reasoning, content)
        return "".join(reasoning), "".join(content)


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """A whole reply -> (reasoning or None, content)."""
    s = ReasoningSplitter(thinking)
    r1, c1 = s.push(text)
    r2, c2 = s.finish()
    return (r1 + r2 if s.reasoned else None), c1 + c2
