"""Errors in OpenAI's JSON shape, and the two checks that run before any route: the API key and the body
size limit (pure ASGI middleware, so a refused body is never handed to the application)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

MAX_MESSAGE = 1000  # characters of an error message: never echo a large body back


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": bounded(message), "type": type, "param": param, "code": code if code else status}}


def error_bytes(status: int, message: str, **kw) -> bytes:
    return json.dumps(error_body(status, message, **kw), ensure_ascii=False).encode()


async def send_error(send: Callable[[dict], Awaitable[None]], status: int, message: str, headers=(), **kw) -> None:
    body = error_bytes(status, message, **kw)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


class APIKeyMiddleware:
    """With a key set, every path under `protected` needs `Authorization: Bearer KEY` (compared in constant
    time); /health, /metrics and the OpenAPI schema stay open, as in vLLM."""

    def __init__(self, app, api_key: str | None, protected: tuple[str, ...] = ("/v1", "/tokenize", "/detokenize")):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.protected = protected

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith(self.protected):
            return await self.app(scope, receive, send)
        got = _header(scope, b"authorization") or b""
        scheme, _, token = got.partition(b" ")
        ok = hmac.compare_digest(token.strip() if scheme.lower() == b"bearer" else b"", self.key)
        if not ok:
            return await send_error(send, 401, "Invalid or missing API key (send 'Authorization: Bearer KEY')",
                                    headers=[(b"www-authenticate", b"Bearer")], code="invalid_api_key")
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole request body before the application sees it: over `limit` bytes (by Content-Length or
    as it arrives) -> 413. The application then reads the buffered body; later `receive` calls go to the
    client connection (so disconnects are still seen)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body is larger than the limit of {self.limit} bytes"
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await send_error(send, 400, "invalid Content-Length header")
            if int(length) > self.limit:
                return await send_error(send, 413, too_big, code="request_too_large")
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return  # the client left before sending its body
            body = msg.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await send_error(send, 413, too_big, code="request_too_large")
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return buffered
            return await receive()

        return await self.app(scope, replay, send)
