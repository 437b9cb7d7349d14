"""Request ids: the idempotency key of each metered request's usage, and its ``X-Request-ID``.

Made here, not taken from the client (unless a gateway that sets them is trusted): a client
repeating an id must still be billed for every request.
"""

from __future__ import annotations

import os

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

__all__ = ["MAX_REQUEST_ID", "REQUEST_ID_HEADER", "new_request_id", "send_with_request_id", "trusted_request_id"]

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID = 128

_request_ids: list[str] = []  # made in batches: one urandom call and one hex conversion per batch
os.register_at_fork(after_in_child=_request_ids.clear)  # a forked worker must not reuse its parent's
_VERSION_4 = bytes(byte & 0x0F | 0x40 for byte in range(256))  # byte 6 of a version 4 UUID
_VARIANT = bytes(byte & 0x3F | 0x80 for byte in range(256))  # byte 8: the RFC 4122 variant


def _make_request_ids(count: int = 256) -> None:
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    _request_ids.extend(raw.hex(" ", 16).split(" "))  # 32 hex digits each, with no loop in Python


def new_request_id() -> str:
    """A random (version 4) UUID in its 32-hex-digit form, at a fraction of ``uuid.uuid4().hex``'s cost."""
    try:
        return _request_ids.pop()
    except IndexError:
        _make_request_ids()
        return _request_ids.pop()


def trusted_request_id(scope: Scope) -> str | None:
    """The request's one ``X-Request-ID``; None for none, a bad one, or several (a gateway that
    appends its own to the client's: which one is the gateway's is not ours to guess)."""
    found: bytes | None = None
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if found is not None:
                return None
            found = value
    if found is None:
        return None
    text = found.decode("latin-1")
    return text if 0 < len(text) <= MAX_REQUEST_ID and text.isascii() and text.isprintable() else None


async def send_with_request_id(response: Response, request_id: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Send a refusal with its request's ``X-Request-ID``, as every answer on a metered route has one
    (SPEC section 5): the id a client quotes to support for a 429 it did not expect."""
    header = (REQUEST_ID_HEADER, request_id.encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    await response(scope, receive, send_with_id)
