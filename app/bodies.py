"""Request bodies are read only from callers with a valid key, and only up to `max_body_bytes`.

`BodyGuard` is ASGI middleware in front of every route. A request that carries a body (a Content-Length
above 0, or any Transfer-Encoding) without a valid `Authorization: Bearer` key is a 401 before one byte of
the body is read; the route's own dependency still checks scopes and rate limits. The size cap trusts no
header alone: a declared Content-Length over the cap is a 413 at once, and the bytes are counted as they
stream, so a chunked body is refused as soon as it passes the cap, not after it has all arrived. Either
answer closes the connection, so the server drops the rest of the body instead of draining it.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import OPENAI_PREFIX, openai_error, problem

UNAUTHORIZED = "a valid API key is required: Authorization: Bearer <key>"


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap. A Starlette HTTPException, so FastAPI's body
    parsing lets it through to the app's handler, which answers it as problem+json."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is over max_body_bytes={max_bytes} bytes")


class BodyGuard:
    """ASGI middleware: no body before a valid key (401), none past `max_bytes` (413)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, authenticated: Callable[[Scope, str | None], bool]) -> None:
        self.app, self.max_bytes, self.authenticated = app, max_bytes, authenticated

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(413, str(BodyTooLarge(self.max_bytes).detail), scope, receive, send)
            return
        if "transfer-encoding" not in headers and (length is None or int(length) == 0):
            await self.app(scope, receive, send)  # no body: the route checks the key as usual
            return
        if not self.authenticated(scope, headers.get("authorization")):
            await self._refuse(401, UNAUTHORIZED, scope, receive, send, slug="unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        received, over, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if over:  # the rest of the body is never read: close rather than drain it
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counting_receive, closing_send)
        except BodyTooLarge as error:  # raised where no handler answered it (outside FastAPI's routes)
            if started:
                raise
            await self._refuse(413, str(error.detail), scope, receive, send)

    @staticmethod
    async def _refuse(status: int, detail: str, scope: Scope, receive: Receive, send: Send, *,
                      slug: str | None = None, headers: dict[str, str] | None = None) -> None:
        headers = {**(headers or {}), "Connection": "close"}
        render = openai_error if str(scope.get("path", "")).startswith(OPENAI_PREFIX) else problem  # as the routes answer
        response = render(status, detail, slug=slug, headers=headers)
        await response(scope, receive, send)
