"""What the web app's server puts between the network and its routes: ``nosniff`` on every response, the Host check
(DNS rebinding) and a deadline for request headers."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER_TIMEOUT_S = 10.0  # a request's line and headers (a few hundred bytes) must arrive within this many seconds


class AddHeaders:
    """ASGI middleware setting ``headers`` (``{name: value}``) on every HTTP response, replacing any of the same name."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.names = {name for name, _ in self.headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [h for h in message.get("headers", []) if h[0].lower() not in self.names]
                message = {**message, "headers": [*kept, *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class NoSniff(AddHeaders):
    """``X-Content-Type-Options: nosniff``: a browser must not run an upload or an error text as script or HTML."""

    def __init__(self, app: ASGIApp):
        super().__init__(app, {"X-Content-Type-Options": "nosniff"})


_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\[\]:@/\s]*))(?::[0-9]*)?")


def host_name(header: str) -> str:
    """The name part of a Host header: ``"localhost:8000"``, ``"localhost."`` -> ``"localhost"``, ``"[::1]:80"`` ->
    ``"::1"``; any other form (``"localhost:80@evil.example"``) is returned whole, so that it matches no allowed name."""
    header = header.strip()
    match = _HOST.fullmatch(header)
    if match is None:
        return header
    name = match.group("ip6") or match.group("name") or ""
    return name[:-1] if name.endswith(".") else name


class LocalHostOnly:
    """ASGI middleware answering 400 with a one-line JSON error when the Host header names anything but
    ``allowed_hosts`` (compared without the port, case-insensitively): a web page on another site must not reach a
    server on localhost through a name it controls."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # before reading headers: lifespan and websocket scopes pass untouched
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(host).lower() in self.allowed:
            await self.app(scope, receive, send)
            return
        shown = host if len(host) <= 64 else host[:61] + "..."
        error = (f"this server answers only requests addressed to {' or '.join(sorted(self.allowed))} (the request's "
                 f"Host is {shown!r}); start the app with --listen to serve other names")  # fmt: skip
        await JSONResponse({"error": error}, status_code=400)(scope, receive, send)


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol class, closing a connection whose request line and headers have not all arrived within
    ``seconds`` of its opening (or of the previous response when kept alive): uvicorn resets its keep-alive timer on
    every byte, so a client sending a header byte every few seconds ("slowloris") would hold a connection for ever.
    Pass it as ``uvicorn.Config(..., http=header_timeout_protocol())``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        header_timeout = float(seconds)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()  # may parse a pipelined request already buffered: a new cycle then
            if not self.transport.is_closing() and self.cycle is finished:
                self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._cycle_when_armed:  # a new request's headers were parsed: they made it in time
                self._cancel_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._cycle_when_armed: Any = self.cycle
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_late)

        def _cancel_header_deadline(self) -> None:
            handle = getattr(self, "_header_deadline", None)
            if handle is not None:
                handle.cancel()
                self._header_deadline = None

        def _headers_too_late(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11
