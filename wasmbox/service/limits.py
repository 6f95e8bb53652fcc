"""Request body limits, enforced on the declared length and on the bytes actually received."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was being read.

    An `HTTPException`, so that body parsers pass it on instead of turning it into a 400.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413, chunked or not; a malformed
    Content-Length gets 400. Both are answered before the application reads anything."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = judge_declared(scope["headers"], self.max_bytes)
        if verdict is not None:
            await _reply(send, *verdict)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reply(send, 413, f"request body larger than {self.max_bytes} bytes")


def judge_declared(headers: list[tuple[bytes, bytes]], limit: int) -> tuple[int, str] | None:
    """(status, reason) refusing a request by its declared length alone, or None.

    A length that is not a plain decimal number, or two that disagree, is 400 (RFC 9112
    6.3: an invalid Content-Length is an unrecoverable framing error); one over the limit is
    413. Neither answer reads a byte of the body.
    """
    declared = {value for name, value in headers if name.lower() == b"content-length"}
    if not declared:
        return None
    if len(declared) > 1:
        return 400, "conflicting Content-Length headers"
    (value,) = declared
    if not value.isdigit():
        return 400, "Content-Length is not a decimal number"
    # Compare by digit count first: int() refuses numbers of thousands of digits.
    if len(value.lstrip(b"0")) > len(str(limit)) or int(value) > limit:
        return 413, f"request body larger than {limit} bytes"
    return None


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
