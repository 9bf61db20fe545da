"""Request bodies, with OpenAI's field names and vLLM's extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, ...). Types are checked by pydantic (strict: no "1" for 1, no NaN); value
ranges are checked in `check()` so each error names its field. Unknown fields are ignored, as vLLM does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .errors import APIError

MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_MESSAGES = 2048
MAX_PROMPTS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
ROLES = ("system", "developer", "user", "assistant", "tool")


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
TokenIds = list[int]


class Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(Base):
    include_usage: bool = False


class SamplingFields(Base):
    model: str | None = None
    max_tokens: int | None = Field(None, description="tokens to generate at most (default: up to the context)")
    temperature: float | None = Field(None, description=">= 0; 0 = greedy (default: the checkpoint's "
                                                        "generation_config.json, else 1)")
    top_p: float | None = Field(None, description="in (0, 1]")
    top_k: int | None = Field(None, description=">= -1; -1 or 0 = off")
    min_p: float | None = Field(None, description="in [0, 1]")
    seed: int | None = None
    stop: Text | list[Text] | None = Field(None, description="stop strings; the stop text is not returned")
    stop_token_ids: list[int] | None = None
    n: int = Field(1, description="choices per prompt")
    presence_penalty: float = Field(0.0, description="in [-2, 2], over the generated tokens")
    frequency_penalty: float = Field(0.0, description="in [-2, 2], over the generated tokens")
    repetition_penalty: float | None = Field(None, description="in (0, 2], over prompt and generated tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None

    def check_sampling(self) -> None:
        def bad(param: str, message: str):
            raise APIError(400, message, param=param)

        if self.temperature is not None and self.temperature < 0:
            bad("temperature", f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < -1:
            bad("top_k", f"top_k must be >= -1 (-1 or 0: off), got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty <= 2:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.n <= MAX_N:
            bad("n", f"n must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            bad("seed", f"seed must be in [{SEED_MIN}, {SEED_MAX}]")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            bad("stop", "stop strings must not be empty")
        if any(len(s) > MAX_STOP_LEN for s in stops):
            bad("stop", f"stop strings must be at most {MAX_STOP_LEN} characters")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > 1024:
            bad("stop_token_ids", "at most 1024 stop_token_ids")
        if self.stream_options is not None and not self.stream:
            bad("stream_options", "stream_options is only allowed when stream is true")
        if self.logit_bias:
            bad("logit_bias", "logit_bias is not supported")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        ..., description="a string, a list of strings, a list of token ids or a list of lists of token ids")
    echo: bool = False
    logprobs: int | None = Field(None, description=f"0..{MAX_LOGPROBS}: logprobs of the chosen and the most "
                                                   "likely tokens")
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_sampling()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (strings or token id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(p[0], int):
            return [p]
        if len(p) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", param="prompt")
        return list(p)


class TextPart(Base):
    type: Literal["text"]
    text: Text


class ChatMessage(Base):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    role: str
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    reasoning_content: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description=f"0..{MAX_LOGPROBS}, with logprobs: true")
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise APIError(400, f"max_completion_tokens must be >= 1, got {self.max_completion_tokens}",
                               param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        self.check_sampling()
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        check_messages(self.messages)
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        check_template_kwargs(self.chat_template_kwargs)


def check_messages(messages: list[ChatMessage]) -> None:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m.role[:40]!r}",
                           param="messages")


def check_template_kwargs(kw: dict | None) -> None:
    for k in kw or {}:
        if not k.isidentifier() or k in ("messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token"):
            raise APIError(400, f"chat_template_kwargs: key {k[:40]!r} is not allowed", param="chat_template_kwargs")


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates read them ("developer" is OpenAI's newer name for "system")."""
    out = []
    for m in messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


class TokenizeRequest(Base):
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Base):
    model: str | None = None
    tokens: list[int]
