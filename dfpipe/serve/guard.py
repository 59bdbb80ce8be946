"""The ASGI guard in front of every route: body counting and deadline, header checks, token, access log."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from .service import RequestError

from .settings import TOKEN_COOKIE, ServeSettings, megabytes

log = logging.getLogger(__name__)
access_log = logging.getLogger("dfpipe.serve.access")


# ----------------------------------------------------------------------------- the guard
def _open_route(path: str) -> bool:
    return path == "/health"


class Guard:
    """ASGI middleware in front of every route: what must hold before and while a request is read.

    - ``Transfer-Encoding`` together with ``Content-Length``: 400 (which one frames the body is ambiguous, and
      the pair let a 1000 MB chunked body pass a small declared length);
    - the API token, when set, on every route but ``/health``: ``Authorization: Bearer <token>``, or the cookie
      the page sets when opened as ``/?token=<token>``; else 401;
    - a POST body is counted as it arrives, JSON and multipart alike: 413 past the route's limit, 408 when it has
      not all arrived ``request_timeout_s`` after the headers;
    - one access-log line per request: client, method, route, status, milliseconds, pixels of the images decoded.
    """

    def __init__(self, app: Any, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.token = settings.token.encode() if settings.token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, cookie = 0, None

        async def send_logged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cookie:
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal:
                await _send_error(send_logged, *refusal)
                return
            cookie = self._cookie_to_set(scope)
            if scope["method"] == "POST":
                receive = self._counted(receive, self.settings.body_limit(scope["path"]))
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client")
            pixels = scope.get("state", {}).get("pixels", 0)
            # status "-": no response was started (the client left, or the app failed past every handler)
            access_log.info("%s %s %s %s %.1fms pixels=%d", f"{client[0]}:{client[1]}" if client else "-",
                            scope["method"], scope["path"], status or "-", (time.perf_counter() - t0) * 1000, pixels)

    def _refusal(self, scope: dict) -> tuple[int, str, list] | None:
        headers = {k.lower() for k, _ in scope["headers"]}
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return 400, "both Transfer-Encoding and Content-Length: send one of them", [(b"connection", b"close")]
        if self.token and not _open_route(scope["path"]) and not self._authorised(scope):
            return 401, "missing or wrong API token: send 'Authorization: Bearer <token>'", [
                (b"www-authenticate", b"Bearer")]
        return None

    def _authorised(self, scope: dict) -> bool:
        assert self.token is not None
        given = []
        for k, v in scope["headers"]:
            k = k.lower()
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                given.append(v[7:].strip())
            elif k == b"cookie":
                given += _values(v.split(b";"), TOKEN_COOKIE.encode())
        if scope["path"] == "/":
            given += _values(scope.get("query_string", b"").split(b"&"), b"token")
        return any(hmac.compare_digest(g.strip(), self.token) for g in given)

    def _cookie_to_set(self, scope: dict) -> bytes | None:
        """The page opened as /?token=...: its own fetches then carry the token as a cookie (same site only)."""
        if self.token and scope["path"] == "/" and b"token=" in scope.get("query_string", b""):
            return TOKEN_COOKIE.encode() + b"=" + self.token + b"; HttpOnly; SameSite=Strict; Path=/"
        return None

    def _counted(self, receive: Any, limit: int) -> Any:
        received = 0
        deadline = time.monotonic() + self.settings.request_timeout_s

        async def counted() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestError(408, f"request body not received within {self.settings.request_timeout_s:g} s"
                                 ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestError(413, f"request body is larger than the {megabytes(limit)} limit")
            return message

        return counted


def _values(pairs: list[bytes], name: bytes) -> list[bytes]:
    """The values of ``name=value`` items (cookie pairs, query parameters)."""
    return [v for k, _, v in (p.strip().partition(b"=") for p in pairs) if k == name]


async def _send_error(send: Any, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
