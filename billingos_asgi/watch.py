"""Watching an app's response through the ``send`` and ``receive`` it is given: its status, and
whether the client got all of it, which decides whether the request is billed (SPEC section 5)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

import anyio
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ._validation import content_length
from .context import UsageContext
from .responses import quota_headers, refusal_in
from .routes import redirects_to_itself

__all__ = ["ResponseWatch"]

_PATHSEND = "http.response.pathsend"
_ZEROCOPYSEND = "http.response.zerocopysend"
#: The last message of a response whose start announced trailers (ASGI's HTTP trailers extension).
_TRAILERS = "http.response.trailers"
#: The headers of an app's CORS layer, kept on a refusal sent in place of the app's 500.
_CORS = (b"access-control-", b"vary")

#: A framework's slash redirect: Starlette answers 307, Django 301 (never 303, "see other").
_SLASH_REDIRECTS = frozenset({301, 302, 307, 308})


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of header ``name`` (lower case) in raw ASGI headers, or None."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _to_itself(scope: Scope, start: Message, context: UsageContext, endpoints: Callable[[], frozenset[int]]) -> bool:
    """Whether a response (its start message) is the framework's redirect of the request to its own
    URL: slashes aside, sent before any endpoint ran (an endpoint's own is billed, a form's next
    page even); or to https (``HTTPSRedirectMiddleware``'s, which a route's own middleware may send
    after its routing too)."""
    if start["status"] not in _SLASH_REDIRECTS:
        return False
    location = _header(start.get("headers", ()), b"location")
    if location is None:
        return False
    scheme = scope.get("scheme", "http")
    to_https = scheme == "http" and location[:6].lower() == "https:"
    if not to_https and (context.routed or _endpoint_ran(scope, endpoints)):
        return False
    host = _header(scope["headers"], b"host")
    query = scope.get("query_string", b"").decode("latin-1")
    status = start["status"]
    server = scope.get("server")
    return any(
        redirects_to_itself(path, query, host, location, scheme, status, server) for path in _routed_paths(scope)
    )


def _endpoint_ran(scope: Scope, endpoints: Callable[[], frozenset[int]]) -> bool:
    """Whether the scope names the endpoint that answered: Starlette's router sets ``route`` (1.x;
    FastAPI, its own routes') or ``endpoint`` to a route's once it matched, and to a ``Mount``'s or
    its app on the way there (told apart by the app's routes' ``endpoints``, their ids); Litestar
    names its ``route_handler``."""
    if isinstance(scope.get("route"), Route) or "route_handler" in scope:
        return True
    endpoint = scope.get("endpoint")
    return endpoint is not None and id(endpoint) in endpoints()


def target_path(target: str) -> str:
    """The path of a request target that is not origin-form ("http://host/v1/x", "v1/x") as Quart
    routes it (urlparse's); the target as it is where urlparse refuses it (a bad IPv6 host)."""
    try:
        return urlparse(target).path
    except ValueError:
        return target


def _routed_paths(scope: Scope) -> list[str]:
    """The request's path, and the one a framework that parses the target (Quart) routes, where it
    differs: an absolute-form target's path, one without its leading slash, and what follows the
    root path where no slash does ("/apiv1/dir" under "/api": "/api/v1/dir" to its redirect)."""
    path: str = scope["path"]
    routed = path if path[:1] == "/" else "/" + target_path(path).lstrip("/")
    root_path = scope.get("root_path") or ""
    if root_path and routed.startswith(root_path) and routed[len(root_path) : len(root_path) + 1] not in ("/", ""):
        routed = f"{root_path}/{routed[len(root_path) :]}"
    return [path] if routed == path else [path, routed]


#: Statuses whose response has no body (RFC 9110 section 6.4.1).
_BODILESS = frozenset({204, 304})


def _served(scope: Scope, start: Message, sent: int) -> bool:
    """Whether the client has every byte of a started response once ``sent`` body bytes are out:
    one without a body (HEAD, 204, 304), or one whose ``Content-Length`` is reached. Such a client
    may close before the app's last (empty) message, as a server may stop the app at its headers."""
    if scope["method"] == "HEAD" or start["status"] in _BODILESS:
        return True
    header = _header(start.get("headers", ()), b"content-length")
    length = None if header is None else content_length(header)
    return length is not None and length <= sent


async def _nowhere(message: Message) -> None:
    """Where the app's messages go once its answer was replaced."""


class ResponseWatch:
    """What the app's response does, seen through the channels it is given (:meth:`receive` and
    :meth:`send`): its status, and whether it completes (the client has every byte) or the client
    leaves first. Also adds the request id and quota headers to the response's start.

    A class with slots rather than two closures sharing their state: a closure's every variable
    is a cell of its own, made and freed per request, which cost more than this object.
    """

    __slots__ = (
        "_context",
        "_endpoints",
        "_receive",
        "_scope",
        "_send",
        "completed",
        "disconnected",
        "left_once_sent",
        "refused",
        "sent",
        "start",
        "status",
        "to_itself",
        "trailers",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        context: UsageContext,
        endpoints: Callable[[], frozenset[int]],
    ) -> None:
        self._scope = scope
        self._endpoints = endpoints  # the ids of the app's routes' endpoints (see _endpoint_ran)
        self._receive = receive
        self._send = send
        self._context = context
        self.status = 0
        self.start: Message | None = None
        self.sent = 0  # body bytes sent before the last message
        self.completed = False
        self.disconnected = False
        self.left_once_sent = False  # the client left while (or after) the last message was being sent
        self.to_itself = False  # a framework's redirect to the canonical path: the request after it is billed
        self.refused = False  # the app's 500 was replaced by the refusal it was made of
        self.trailers = False  # announced by the start: the last message is the trailers, not the body

    async def _answer_refusal(self, start: Message) -> bool:
        """Send the refusal that the app's 500 answers, if it answers one (the exception its error
        handling is handling: a refusal its handlers could not tell for one, wrapped in a task
        group's ExceptionGroup), in its place; what the app sends after goes nowhere. The 500's
        CORS headers (the app's CORS layer's) stay, so that the page can read the refusal."""
        denied = refusal_in(sys.exc_info()[1])
        if denied is None:
            return False
        response = denied.response
        self.refused, self.status = True, response.status_code
        cors = [(name, value) for name, value in start.get("headers", ()) if name.lower().startswith(_CORS)]
        headers = [*response.raw_headers, *cors, (b"x-request-id", self._context.request_id.encode())]
        send, self._send = self._send, _nowhere
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        body = b"" if self._scope["method"] == "HEAD" else bytes(response.body)
        await send({"type": "http.response.body", "body": body})
        return True

    def _all_sent(self) -> bool:
        """Whether the client has every byte of the response so far sent (a response announcing
        trailers has not, until they are sent: its last message)."""
        return self.start is not None and not self.trailers and _served(self._scope, self.start, self.sent)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            if self.completed:
                self.left_once_sent = True
            elif not self.to_itself and self._all_sent():
                self.completed = True  # the client had it all, and left before the app's last message
            else:
                self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.start is not None:  # a second start (which the server refuses): the first decided,
                await self._send(message)  # as the answer the client has
                return
            context = self._context
            # A new message: the app's may be one it sends again (a constant), and its headers any
            # iterable, a generator even, read once here.
            headers = [*message.get("headers", ()), (b"x-request-id", context.request_id.encode())]
            if "trailers" in message:  # (the HTTP trailers extension: the response ends with them)
                self.trailers = bool(message["trailers"])
            message = self.start = dict(message)
            message["headers"] = headers
            status = self.status = message["status"]
            if 300 <= status < 400:
                self.to_itself = _to_itself(self._scope, message, context, self._endpoints)
            elif status == 500 and await self._answer_refusal(message):
                return
            gated = context.quota
            if gated is not None and gated.limit is not None and status < 400 and not self.to_itself:  # billed
                left = gated.limit - gated.usage - gated.local  # (its reported units included) clamped at 0 there
                headers += quota_headers(context.feature, gated.limit, left, gated.resets_at)
        elif (
            (kind == "http.response.body" or kind == _ZEROCOPYSEND)
            and not message.get("more_body", False)
            and not self.trailers
            or (kind == _PATHSEND)
            or (kind == _TRAILERS and not message.get("more_trailers", False))
        ):
            if self.completed:  # a second last message (which the server refuses): the first decided
                await self._send(message)
                return
            # Complete unless the client left before, or the send fails: a server may take the
            # last bytes and yield, and the client, served, close meanwhile (Hypercorn does);
            # under trio the app's disconnect listener (Starlette's) then cancels this send.
            self.completed = not self.disconnected and not self.to_itself
            try:
                await self._send(message)
            except BaseException as exc:
                if isinstance(exc, OSError):  # (ASGI: a send to a client gone raises an OSError)
                    self.disconnected = True
                cancelled_by_close = self.left_once_sent and isinstance(exc, anyio.get_cancelled_exc_class())
                self.completed = self.completed and (cancelled_by_close or self._all_sent())
                raise
            return
        try:
            await self._send(message)
        except OSError:  # (ASGI: a send to a client gone raises an OSError)
            self.disconnected = True
            raise
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))  # once the server has taken them
