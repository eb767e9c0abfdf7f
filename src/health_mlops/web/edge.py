"""What every service puts between the network and its application: a byte limit on each request body, a
deadline for each part of a body, and a client that goes away treated as what it is.

`BodyLimit` wraps an ASGI application (outside FastAPI's own error handling). A body whose declared length is
over its path's limit is refused with 413 before a byte of it is read; a body that streams past the limit (no
length declared, or a false one) is refused with 413 as soon as it does, and the application sees the client
as gone. Memory is thus bounded by the limit, never by what a client sends. A body that stops arriving for
`body_timeout_s` is answered 408. A client that disconnects in the middle of a request is one INFO line, not a
traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("health_mlops.http")

KIB = 1024
MIB = 1024 * KIB
BODY_TIMEOUT_S = 30.0  # the longest wait for the next part of a body that has not all arrived


def _refusal(status: int, detail: str) -> list[Message]:
    body = json.dumps({"detail": detail}).encode()
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]},
            {"type": "http.response.body", "body": body}]


class BodyLimit:
    """Refuses request bodies over `limit_for(path)` bytes with 413 and stalled ones with 408; logs a client
    disconnect as one INFO line."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], *,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.limit_for = limit_for
        self.body_timeout_s = body_timeout_s

    def __getattr__(self, name: str) -> Any:  # the wrapped app's attributes (FastAPI's `state`, `routes`)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = f"the request body may hold at most {limit} bytes on this endpoint"
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            for message in _refusal(413, too_large):
                await send(message)
            return
        received = 0
        body_complete = False
        refused = False  # the body was refused: the application sees a disconnect, its answer is dropped
        answering = False  # the application has started its answer

        async def refuse(status: int, detail: str) -> Message:
            nonlocal refused
            refused = True
            if not answering:
                for answer in _refusal(status, detail):
                    await send(answer)
            return {"type": "http.disconnect"}

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if refused:
                return {"type": "http.disconnect"}
            if body_complete:  # after the body, receive() waits for a disconnect: no deadline for that
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                return await refuse(408, f"no part of the request body arrived for {self.body_timeout_s:.0f} s")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if received > limit:
                    return await refuse(413, too_large)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answering
            if not refused:
                answering = True
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ClientDisconnect:
            if not refused:
                client = scope.get("client") or ("?", 0)
                log.info("%s:%s went away during %s %s", client[0], client[1], scope["method"], scope["path"])


class BlockedPaths:
    """Answers 404 for paths under `prefixes` without passing them to the application: the parts of a framework
    (Gradio's developer, proxy, recording and programmatic-call routes) that this service does not use, so they
    cannot be used against it."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.prefixes = prefixes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            for message in _refusal(404, "Not Found"):
                await send(message)
            return
        await self.app(scope, receive, send)
