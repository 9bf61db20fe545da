"""tokenizer.json through the `tokenizers` library, plus the chat template from tokenizer_config.json
(or chat_template.jinja), rendered with jinja2 in a sandbox the way transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


def _token_text(tok) -> str | None:
    if tok is None:
        return None
    return tok["content"] if isinstance(tok, dict) else str(tok)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None, chat_template: str | None = None):
        self.tok = tok
        self.config = config or {}
        self.chat_template = chat_template or self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer | None:
        folder = Path(folder)
        config = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        template = None
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        path = folder / "tokenizer.json"
        if path.is_file():
            return cls(HFTokenizer.from_file(str(path)), config, template)
        tiktoken = folder / "qwen.tiktoken"  # Qwen v1 ships a tiktoken vocabulary and remote code only
        if tiktoken.is_file():
            from .qwen_tiktoken import QWEN_CHATML, load_qwen_tiktoken

            config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", **config}
            return cls(load_qwen_tiktoken(tiktoken), config, template or config.get("chat_template") or QWEN_CHATML)
        return None

    # ids <-> text
    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def tojson(x, indent=None, ensure_ascii=False):
            return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **extra,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """The template already writes the special tokens (BOS included), so none are added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece
