"""Running the app under uvicorn with the bounds a public server needs.

uvicorn's h11 protocol times out an idle keep-alive connection but not one that sends part of a request's
headers and then nothing (2,000 such connections were held open forever): :class:`DeadlineH11Protocol` gives
the headers a deadline. The body's deadline and size are the app's (:class:`dfpipe.serve.guard.Guard`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
H11_MAX_HEADER_BYTES = 32 * 1024  # request line + headers (h11's own default is 16 KB)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a request's headers must be complete ``header_timeout`` seconds after the
    connection opened or the request's first bytes arrived, else the connection is closed."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._expire)

    def data_received(self, data: bytes) -> None:
        if self._between_requests() and self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)
        super().data_received(data)
        if not self._between_requests():  # the headers are in: the app's body deadline takes over
            self._cancel_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._between_requests() and not self.transport.is_closing():
            log.info("%s: request headers not complete within %g s; connection closed",
                     "%s:%d" % self.client if self.client else "client", self.header_timeout)
            self.transport.close()


def protocol_with_deadline(header_timeout: float) -> type[DeadlineH11Protocol]:
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"header_timeout": float(header_timeout)})


def uvicorn_config(app: Any, host: str, port: int, *, limit_concurrency: int, header_timeout: float,
                   keep_alive_s: int = 5, log_level: str = "info"):
    """A uvicorn Config with the server's bounds: concurrency (503 above it), header and keep-alive deadlines,
    header size; its own access log off (the app's Guard logs one line per request, with more in it)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=protocol_with_deadline(header_timeout), limit_concurrency=limit_concurrency,
                          timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES)


def return_freed_memory_to_the_os() -> None:
    """glibc only: a fixed mmap threshold (1 MB), so every freed decode buffer goes back to the system.

    By default glibc raises the threshold after each large free (up to 32 MB), and PIL's 16 MB image blocks then
    come from the heap, whose freed memory stays in the process: after a burst of big uploads the server kept
    gigabytes it no longer used. Best effort: elsewhere nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_mmap_threshold = -3
        if libc.mallopt(m_mmap_threshold, 1024 * 1024) != 1:
            log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; freed memory is returned as the allocator sees fit")
