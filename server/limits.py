"""Request body size limits, enforced before and while a body is read (pure ASGI middleware).

A request whose `Content-Length` is over the limit of its route gets a 413 (OpenAI-shaped JSON,
naming the limit and the setting) without a byte of its body being read. A body without a
length (`Transfer-Encoding: chunked`) is counted as the application reads it; the read that
crosses the limit fails and the client gets the same 413, whatever the route does with the
error. Either way the response says `Connection: close`, so the server drops the connection
instead of draining the rest of the body.

Limits: `max_upload_bytes` for the admin upload (`POST /admin/adapters`), `max_request_bytes`
for every other route. The upload route also enforces its limit itself while it streams the
body to disk, so it stays bounded without this middleware.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from loraplex.adapters.errors import BadRequest, LoraplexError, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# (method, path) pairs that take an upload and get `max_upload_bytes`.
UPLOAD_ROUTES = frozenset({("POST", "/admin/adapters")})


def _flag(setting: str) -> str:
    return f"LORAPLEX_{setting.upper()} / --{setting.replace('_', '-')}"


def too_large(limit: int, setting: str, size: int | None = None, what: str = "request body"
              ) -> PayloadTooLarge:
    """The 413 for a body over `limit` bytes (`size` when declared, else counted so far)."""
    got = f"of {size} bytes " if size is not None else ""
    return PayloadTooLarge(
        f"{what} {got}is over the limit of {limit} bytes ({setting}); send a smaller body, "
        f"or raise the limit with {setting} ({_flag(setting)})",
        param=None,
    )


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The declared Content-Length, None when absent; BadRequest when malformed or repeated
    with different values (the HTTP server normally refuses those first)."""
    values = {v.strip() for k, v in headers if k.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("conflicting Content-Length headers: send one", param=None)
    (v,) = values
    # bytes.isdigit() is ASCII-only; 20 digits is far over any limit and bounds int().
    if not v.isdigit() or len(v) > 20:
        raise BadRequest(f"invalid Content-Length {v[:40]!r}: a number of bytes", param=None)
    return int(v)


class BodyLimitMiddleware:
    """413 for bodies over the route's limit: up front from Content-Length, else while read."""

    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_upload_bytes: int,
                 upload_routes: Iterable[tuple[str, str]] = UPLOAD_ROUTES):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_routes = frozenset((m.upper(), p) for m, p in upload_routes)

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if (scope.get("method", "").upper(), path.rstrip("/") or "/") in self.upload_routes:
            return self.max_upload_bytes, "max_upload_bytes"
        return self.max_request_bytes, "max_request_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        try:
            declared = content_length(scope.get("headers") or ())
        except BadRequest as exc:
            await _send_error(send, exc)
            return
        if declared is not None and declared > limit:
            await _send_error(send, too_large(limit, setting, declared))
            return

        received = 0
        exceeded: PayloadTooLarge | None = None
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded is not None:
                raise exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = too_large(limit, setting)
                    raise exceeded
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded is not None and not started:
                return  # the app's answer to the failed read; the 413 is sent below instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if exceeded is None or started:
                raise
        if exceeded is not None and not started:
            await _send_error(send, exceeded)


async def _send_error(send: Send, exc: LoraplexError) -> None:
    body = json.dumps(exc.to_openai()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers() or {}).items()]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
