"""Per-route metering configuration, compiled once into a table the hot path can look up cheaply.

Keys are Starlette path templates with an optional method: ``"POST /v1/search"``,
``"/v1/items/{item_id:int}"``. Paths are the full request path (mount prefixes included), so a
route inside a ``Mount`` is configured by the path the client calls. Paths are compared in their
canonical form (one leading slash, no repeated or trailing one), as some frameworks route them
(Litestar serves ``/v1/search/``, ``/v1//search`` and ``v1/search``, a request target without its
leading slash, as ``/v1/search``): a route is never reached unmetered by a slash. Where the
framework answers such a path with a redirect to the canonical one instead (Starlette, Django),
that redirect is not billed: the request that follows it is. (A table found on a Starlette or
FastAPI app's own routes is matched as its router matches them, as requested: ``exact_paths``.)

Methods are compared in upper case (servers pass a method as the client spelt it; Django serves
``get`` as ``GET``). A typed parameter (``{item_id:int}``, ``float``, ``uuid``) takes what
Starlette's pattern takes (Starlette, FastAPI and Django route ``/items/+5`` elsewhere); with
``any_digits``, a number in any script's digits (Quart's ``<int>`` takes ``/items/٥`` before a
``<slug>`` beside it, not ``/items/+5``); with ``parsed_parameters``, those first, then the
spellings that Python's ``int()``, ``float()`` and ``UUID()`` parse, where no other route of the
table does, as Litestar routes them (``/items/+5`` and ``/items/5_0`` are ``{item_id:int}`` there).
"""

from __future__ import annotations

import itertools
import posixpath
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit
from uuid import UUID

from starlette.convertors import CONVERTOR_TYPES
from starlette.requests import Request
from starlette.routing import compile_path

from ._validation import QUANTITY_BOUND, QUANTITY_DECIMALS, check_id, float_of_decimal

__all__ = [
    "EXCLUDED",
    "UNDECLARED",
    "FoundRoutes",
    "Metered",
    "RouteTable",
    "canonical",
    "joined",
    "redirects_to_itself",
]

QuantityFunction = Callable[[Request], float | Decimal | Awaitable[float | Decimal]]
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


@dataclass(frozen=True, slots=True)
class Metered:
    """A metered route: its feature and how many units one successful request uses.

    ``quantity`` is a number, a callable of the request (sync or async; the body is the app's:
    its Request has no receive channel), or None when the endpoint reports its own units with :func:`report_usage` (for
    instance the tokens an LLM call used). Reported units add to a fixed quantity too.
    Quantities are in upstream's resolution (6 decimals): a fixed one may have no more, and what a
    quantity function returns is rounded to it (a request whose quantity rounds to 0 is free).
    ``bill_partial``: keep the units reported before a client disconnect cut a response with status
    < 400 short (default: an aborted response is not billed; an answer >= 400 never is).
    ``late``: the app names the customer itself, where its own auth runs
    (``await UsageContext.identify(customer_id)``, which also runs the gate, or
    :func:`set_customer`), instead of the middleware's resolver.
    """

    feature: str
    quantity: float | QuantityFunction | None = 1
    bill_partial: bool = False
    late: bool = False
    #: The quantity when it is a number (None: asked of the function, or reported), for the request path.
    fixed: float | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        check_id("feature", self.feature)
        for flag in ("bill_partial", "late"):  # ("false" from a setting is true: late, a route left unbilled)
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ValueError(f"Metered({self.feature!r}): {flag} must be True or False, got {value!r}")
        q = self.quantity
        if isinstance(q, Decimal):  # (as report_usage and the client take it: counted as a float)
            q = float_of_decimal(q)
            object.__setattr__(self, "quantity", q)
        if q is not None and not callable(q):
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q < QUANTITY_BOUND:
                raise ValueError(
                    f"Metered({self.feature!r}): quantity must be a number >= 0 and below {QUANTITY_BOUND}, got {q!r}"
                )
            if q != round(q, QUANTITY_DECIMALS):
                raise ValueError(f"Metered({self.feature!r}): quantity {q!r} has more decimals than upstream's 6")
            object.__setattr__(self, "fixed", q)


#: What :meth:`RouteTable.match` answers for an excluded path: passed through unmetered on purpose,
#: which the framework adapters' declarations accept (an exclusion carved out of a metered template).
EXCLUDED = Metered("excluded by the exclude= option")
#: A route configured as not metered (``None``), in the table: a static route the app serves before
#: a metered template that would take its path.
_UNMETERED = Metered("not metered")
#: What route discovery gives a route the app serves undeclared where a declared template would
#: take its path: metered as a route missing from the table is (``default_feature``, or not at all,
#: an exclusion deciding first), never as the template.
UNDECLARED = Metered("undeclared: metered as default_feature")


class FoundRoutes(dict[str, "str | Metered | None"]):
    """A ``routes=`` table found on the app's routes, whose keys name every method each route
    serves: HEAD included where a route serves it (Starlette's beside GET), left out where it does
    not (FastAPI's), so HEAD does not follow GET here as it does in a table written by hand.
    ``written``: its keys written by hand (``also=``), of routes it could not see (a StaticFiles
    mount's files): compared in their canonical form, as such apps route them."""

    written: frozenset[str] = frozenset()


_SLASHES = re.compile(r"//+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PARAMETER = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::([a-zA-Z_][a-zA-Z0-9_]*))?}")  # as Starlette's
#: What each type's parser takes (a little more, never less: the worst case is a gate before a 404);
#: a path parameter takes newlines too. A UUID's segment is handed to ``UUID()`` itself: what it
#: takes is no regular language (it deletes "urn:" and "uuid:" wherever they are, strips any number
#: of braces and every dash, then parses 32 characters as ``int(..., 16)`` does: "0x", "_", "٨").
_PARSED = {
    "path": r"(?s:.*)",
    "int": r"\s*[+-]?[\d_]+\s*",
    "float": r"\s*[+-]?(?:[\d_.]+(?:[eE][+-]?[\d_]+)?|(?i:inf|infinity|nan))\s*",
    "uuid": r"[^/]+",
}


class _ParsedTemplate:
    """A template whose typed parameters take what their parsers take: its pattern, and the UUID
    parser run on each UUID parameter's segment (an object with a pattern's ``match``)."""

    __slots__ = ("_pattern", "_uuids")

    def __init__(self, pattern: re.Pattern[str], uuids: int) -> None:
        self._pattern = pattern
        self._uuids = uuids

    def match(self, path: str) -> bool:
        found = self._pattern.match(path)
        if found is None:
            return False
        try:
            for group in range(self._uuids):
                UUID(found.group(f"uuid{group}"))
        except ValueError:
            return False
        return True


#: Starlette's number patterns, in any script's digits (``\d``: "٥" is 5 to ``int()`` and Werkzeug).
_ANY_DIGITS = {"int": r"\d+", "float": r"\d+\.\d+"}  # (Werkzeug's float has its point)


def _pattern(path: str, kinds: Mapping[str, str]) -> re.Pattern[str]:
    """The pattern of a template whose parameters of ``kinds`` take those patterns (others, Starlette's)."""
    pattern, end = "^", 0
    for parameter in _PARAMETER.finditer(path):
        kind = parameter.group(2) or "str"
        taken = kinds.get(kind) or CONVERTOR_TYPES[kind].regex
        pattern += re.escape(path[end : parameter.start()]) + f"(?:{taken})"
        end = parameter.end()
    return re.compile(pattern + re.escape(path[end:]) + "$")


def _parsed(path: str) -> _ParsedTemplate | None:
    """The matcher of a template whose typed parameters take what their parsers take; None: none is."""
    pattern, end, parsed, uuids = "^", 0, False, 0
    for parameter in _PARAMETER.finditer(path):
        kind = parameter.group(2) or "str"
        parsed = parsed or kind in _PARSED
        taken = _PARSED.get(kind) or CONVERTOR_TYPES[kind].regex
        group = f"(?P<uuid{uuids}>" if kind == "uuid" else "(?:"
        uuids += kind == "uuid"
        pattern += re.escape(path[end : parameter.start()]) + f"{group}{taken})"
        end = parameter.end()
    return _ParsedTemplate(re.compile(pattern + re.escape(path[end:]) + "$"), uuids) if parsed else None


def joined(prefix: str, path: str) -> str:
    """A mount's ``prefix`` and a path under it, as one template: a parameter name of ``path`` that
    ``prefix`` already has renamed (Starlette matches the mount and the route each on its own, so
    ``Mount("/users/{id}")`` may hold ``Route("/posts/{id}")``; one pattern cannot name two groups alike)."""
    names = {parameter.group(1) for parameter in _PARAMETER.finditer(prefix)}
    if not names or "{" not in path:
        return prefix + path

    def renamed(parameter: re.Match[str]) -> str:
        name, kind = parameter.groups()
        if name in names:
            name = next(f"{name}_{n}" for n in itertools.count(2) if f"{name}_{n}" not in names)
        names.add(name)
        return f"{{{name}:{kind}}}" if kind else f"{{{name}}}"

    return prefix + _PARAMETER.sub(renamed, path)


def _specificity(template: str) -> tuple[int, ...]:
    """The order in which a routing tree tries templates (Litestar's, Werkzeug's for Quart): segment
    by segment, a literal before a parameter, a number before another parameter, a path parameter
    last; so ``/v1/items/{id}`` takes ``/v1/items/schema`` before ``/v1/{kind}/schema``, and
    ``/items/{n:int}`` takes ``/items/5`` before ``/items/{slug}``, wherever either is written."""
    return tuple(_rank(segment) for segment in template.split("/"))


#: A segment's rank: a literal's 0, a plain parameter's 2 (Werkzeug tries its number converters
#: before, and its path converter, the rest of the path, after).
_KINDS = {"int": 1, "float": 1, "path": 3}


def _rank(segment: str) -> int:
    parameter = _PARAMETER.search(segment)
    return 0 if parameter is None else _KINDS.get(parameter.group(2) or "str", 2)


def canonical(path: str) -> str:
    """``path`` without repeated slashes and without a trailing one (``/`` stays)."""
    return _SLASHES.sub("/", path).rstrip("/") or "/"


def redirects_to_itself(
    path: str,
    query: str,
    host: str | None,
    location: str,
    scheme: str = "http",
    status: int = 307,
    server: tuple[str, int | None] | None = None,
) -> bool:
    """Whether a redirect of ``path?query`` (on ``host``, over ``scheme``) to ``location`` only adds
    or removes slashes, or is a permanent or method-keeping move from http to https on the same
    host (Starlette's ``HTTPSRedirectMiddleware``, Django's ``SECURE_SSL_REDIRECT``): the
    framework's canonical URL, as opposed to an endpoint's own redirect (a download link, a form's
    next page, even to its own path), which is billed. ``server``: the ASGI scope's, whose address
    Starlette names instead of a Host header it cannot use (none, or one with a path or user info)."""
    host, location = _host_path_dropped(host, location)
    try:
        target = urlsplit(location)
    except ValueError:  # not a URL: not ours to judge
        return False
    # Django quotes the path it redirects to; Starlette leaves a "%" of it as it is ("/a%41" for "/a%2541").
    target_path = next((p for p in (unquote(target.path), target.path) if canonical(p) == canonical(path)), None)
    # A raw "#" in the request's query comes back as it is, where it starts a fragment; a raw "|"
    # or "{" (browsers send them so) comes back quoted.
    target_query = f"{target.query}#{target.fragment}" if "#" in location else target.query
    if target_path is None or target_query != query and _unquoted(target_query) != _unquoted(query):
        return False
    netlocs, names = _authorities(host, server, scheme)
    if target.scheme and target.scheme != scheme:
        to_https = scheme == "http" and target.scheme == "https" and status in (301, 307, 308)
        return to_https and target.hostname is not None and target.hostname in names
    # (Werkzeug names the host as it normalises it: "API.example.com:80" is "api.example.com".)
    same_origin = target.netloc in netlocs or _origin(target.netloc, scheme) in [_origin(n, scheme) for n in netlocs]
    return target_path != path and (not target.netloc or same_origin)


def _origin(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    """A netloc's host name (lower case) and port (the scheme's default when none is given); None: not
    one (a Host header with a path or user info is no origin of ours)."""
    if any(mark in netloc for mark in "/?#@"):
        return None
    try:
        parts = urlsplit("//" + netloc)
        return (parts.hostname or "", parts.port or _DEFAULT_PORTS.get(scheme))
    except ValueError:  # a port out of range, an unclosed "["
        return None


def _unquoted(query: str) -> bytes:
    """A query string's bytes, its %-escapes decoded: the request's as the server passed them (a
    client may send "?q=é" as raw UTF-8, read here as Latin-1), the redirect's as the framework quoted
    them (Django's "?q=%C3%A9")."""
    try:
        return unquote_to_bytes(query.encode("latin-1"))
    except UnicodeEncodeError:  # (not from a header or a scope: text beyond Latin-1)
        return unquote_to_bytes(query)


def _host_path_dropped(host: str | None, location: str) -> tuple[str | None, str]:
    """A Host header with a path ("app/x") and a redirect's location, both without that path:
    Starlette before 1.1 writes such a Host into the URL as it is, its path ahead of the request's
    ("http://app/x/v1/jobs" for "/v1/jobs/"); later ones name the server's address instead."""
    if host is None or "/" not in host:
        return host, location
    scheme, sep, rest = location.partition("://")
    if not sep or not rest.startswith(host + "/"):
        return host, location
    name = host.partition("/")[0]
    return name, f"{scheme}://{name}{rest[len(host) :]}"


def _authorities(host: str | None, server: tuple[str, int | None] | None, scheme: str) -> tuple[list[str], list[str]]:
    """The netlocs a framework may name this request's origin by (its Host header, or the server's
    address as Starlette writes it), and their host names."""
    netlocs: list[str] = []
    names: list[str] = []
    if host is not None:
        netlocs.append(host)
        try:
            name = urlsplit("//" + host).hostname
        except ValueError:  # "[::1": Starlette names the server instead
            name = None
        if name:
            names.append(name)
    if server is not None:
        address, port = server
        names.append(address.strip("[]").lower())
        if ":" in address and not address.startswith("["):
            address = f"[{address}]"
        netlocs.append(address if port == _DEFAULT_PORTS.get(scheme) else f"{address}:{port}")
    return netlocs, names


def _metered(value: object, where: str) -> Metered:
    """A feature key or a :class:`Metered`, as the metering of a route; a clear error otherwise."""
    if isinstance(value, Metered):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: a feature key or a Metered(...), got {value!r}")
    try:
        return Metered(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _compiled(path: str, where: str) -> tuple[re.Pattern[str], str, dict[str, Any]]:
    """Starlette's pattern of a path template, its faults named with the setting they come from."""
    try:
        return compile_path(path)
    except (AssertionError, ValueError) as exc:  # an unknown convertor is an assertion there
        raise ValueError(f"{where}: {exc}") from None


#: A key of ``routes=`` as read: the key, its value, its method (None: any) and its path.
_Entry = tuple[str, "str | Metered | None", str | None, str]


def _split_key(key: str, *, exact: bool = False) -> tuple[str | None, str]:
    if not isinstance(key, str):
        raise ValueError(f'routes: keys are "METHOD /path" strings, got {key!r}')
    key = key.strip()
    # "METHOD /path", or "/path": the path is all that follows the method, spaces included ("/my files").
    prefix, path = ("", key) if key.startswith("/") else key.partition(" ")[::2]
    path = path.lstrip(" ")
    method = prefix.upper() or None
    if method is not None and method not in _METHODS:
        raise ValueError(f"routes: {key!r}: unknown HTTP method {method!r}")
    if not path.startswith("/"):
        raise ValueError(f"routes: {key!r}: the path must start with '/'")
    _check_template(path, f"routes: {key!r}")
    return method, path if exact else canonical(path)


def _shape(path: str) -> str:
    """A template without its parameters' names: ``/items/{id}`` and ``/items/{item_id}`` take the same paths."""
    return _PARAMETER.sub(lambda parameter: f"{{:{parameter.group(2) or 'str'}}}", path)


def _methods_first(entries: list[_Entry]) -> list[_Entry]:
    """``entries`` with each template's keys that name a method before its key without one (where
    the first of them was), the rest in their order: a stable sort."""
    first: dict[str, int] = {}
    for at, (_, _, _, path) in enumerate(entries):
        first.setdefault(_shape(path), at)
    return sorted(entries, key=lambda entry: (first[_shape(entry[3])], entry[2] is None))


def _configured_twice(key: str, first: Metered, second: Metered) -> ValueError:
    return ValueError(
        f"routes: {key!r} is configured twice, as {first.feature!r} and as {second.feature!r}"
        " (paths are compared without repeated or trailing slashes)"
    )


def _check_template(path: str, where: str) -> None:
    """Refuse what no request path holds: a query string or fragment, a brace outside a parameter."""
    if "?" in path or "#" in path:
        raise ValueError(f"{where}: a route is a path alone, without a query string ('?') or fragment ('#')")
    literal = _PARAMETER.sub("", path)
    if "{" in literal or "}" in literal:
        raise ValueError(f"{where}: a brace outside a parameter (parameters are {{name}} or {{name:type}})")


class RouteTable:
    """Which feature (if any) a request meters: its route, else the default, unless excluded.

    A route configured as ``None`` is not metered, whatever a template or the default would say
    (a static route that the app serves before a metered template taking its path). A configured
    route that an exclusion also covers is refused at construction. ``canonical_paths``: the app
    routes a path without its repeated or trailing slashes (Litestar), so that path alone decides.
    There, and with ``any_digits`` (Quart) or ``parsed_parameters``, templates are tried as a routing tree tries them,
    a literal segment before a parameter, not in the table's order (Starlette's: the first route).
    ``mounts``: paths under which the app sends every path that starts with them, even where no slash
    follows (Litestar's ASGI mounts take "/reportsX" for "/reports"), metered as "/reports/X" is,
    except the ``plain`` paths the app serves itself first (Litestar's routes without parameters).
    ``exact_paths``: the table is the app's own routes (found on a Starlette or FastAPI app), which it
    routes as requested: ``/items/`` and ``/items`` are two paths there, each matched as the app
    matches it (exclusions still cover their slash variants). ``anchored_paths``: the app's routes
    match up to the path's very end (Django's ``path()`` patterns), where Starlette's ``$`` matches
    before a final newline: ``/docs/index`` and a newline is no static route there.
    """

    def __init__(
        self,
        routes: Mapping[str, str | Metered | None] | None = None,
        *,
        default_feature: str | Metered | None = None,
        exclude: Iterable[str] = (),
        parsed_parameters: bool = False,
        any_digits: bool = False,
        canonical_paths: bool = False,
        mounts: Iterable[str] = (),
        plain: Iterable[str] = (),
        exact_paths: bool = False,
        anchored_paths: bool = False,
    ) -> None:
        self._static: dict[str, dict[str | None, Metered]] = {}  # path -> method (None: any) -> metering
        self._dynamic: list[tuple[str | None, re.Pattern[str], Metered]] = []
        self._parsed: list[tuple[str | None, _ParsedTemplate, Metered]] = []  # typed parameters, as parsed
        self._canonical_paths = canonical_paths
        any_digits = any_digits or parsed_parameters
        self._tree = canonical_paths or any_digits  # routed by a tree: literal segments compared as they are
        self._literal_newline = self._tree or anchored_paths  # a final newline is part of the path there
        self._exact_paths = exact_paths and not canonical_paths
        # With exact paths, the keys written by hand, compared canonically (by what the app they name routes).
        written = routes.written if self._exact_paths and isinstance(routes, FoundRoutes) else frozenset()
        self._written_static: dict[str, dict[str | None, Metered]] = {}
        self._written_dynamic: list[tuple[str | None, re.Pattern[str], Metered]] = []
        self._mounts = tuple(canonical(mount) for mount in mounts if mount.startswith("/") and canonical(mount) != "/")
        self._plain = frozenset(canonical(path) for path in plain)
        configured: list[tuple[str, str, bool]] = []  # key, path, whether static
        if not isinstance(routes, Mapping | None):
            raise ValueError(f'routes must map "METHOD /path" to a feature, got {routes!r}')
        if isinstance(exclude, str):
            raise ValueError(f"exclude must be a list of paths, got the string {exclude!r}")
        self._default = None if default_feature is None else _metered(default_feature, "default_feature")
        undeclared: list[tuple[str, str | None]] = []  # static UNDECLARED routes: an exclusion decides first
        # HEAD is GET without the body, unless configured on its own (or the table says what serves HEAD).
        head_follows_get = not isinstance(routes, FoundRoutes)
        entries = [
            (key, value, *_split_key(key, exact=self._exact_paths and key not in written))
            for key, value in (routes or {}).items()
        ]
        if self._tree:  # a routing tree's order, not the table's (a stable sort)
            entries.sort(key=lambda entry: _specificity(entry[3]))
        if head_follows_get:  # written by hand: on a template, as on a static path, a key with a method
            entries = _methods_first(entries)  # wins over one without, whatever order they come in
        heads = {path for _, _, method, path in entries if method == "HEAD"}
        templates: dict[tuple[str | None, str], Metered] = {}  # (method, shape) -> metering
        for key, value, method, path in entries:
            if value is UNDECLARED:
                metered = self._default or _UNMETERED
            else:
                metered = _UNMETERED if value is None else _metered(value, f"routes: {key!r}")
            regex, _, convertors = _compiled(path, f"routes: {key!r}")
            if value is not None and value is not UNDECLARED:
                configured.append((key, path, not convertors))
            if convertors:
                other = templates.setdefault((method, _shape(path)), metered)
                if other != metered and head_follows_get:  # (one found on the app's routes: as the app tries them)
                    raise _configured_twice(key, other, metered)
                parsed = _parsed(path) if parsed_parameters else None
                if any_digits:  # a number in any digits, as Werkzeug's converters and int() take them
                    regex = _pattern(path, _ANY_DIGITS)
                also_head = head_follows_get and method == "GET" and path not in heads
                for taken in ("GET", "HEAD") if also_head else (method,):
                    (self._written_dynamic if key in written else self._dynamic).append((taken, regex, metered))
                    if parsed is not None:
                        self._parsed.append((taken, parsed, metered))
            else:
                by_method = self._static.setdefault(path, {})
                if by_method.get(method, metered) != metered:  # ("/items" and "/items/" alike: one route here)
                    raise _configured_twice(key, by_method[method], metered)
                by_method[method] = metered
                if key in written:
                    self._written_static.setdefault(path, {})[method] = metered
                if value is UNDECLARED:
                    undeclared.append((path, method))
        excluded_paths: set[str] = set()
        written_paths: set[str] = set()  # as written: the spelling of an excluded route the app serves
        prefixes: list[str] = []
        self._excluded_patterns: list[re.Pattern[str]] = []
        self._excluded_as_requested: list[re.Pattern[str]] = []  # (with exact paths) each as written
        excluded_shapes: set[str] = set()  # excluded templates, their parameters' names aside
        for path in exclude:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"exclude: {path!r}: a path starting with '/'")
            if "*" in path[:-1]:  # (taken as a literal, "/internal/*/status" would exclude nothing the app serves)
                raise ValueError(f"exclude: {path!r}: '*' only ends a prefix ('/static/*'); use templates for the rest")
            _check_template(path, f"exclude: {path!r}")
            if path.endswith("*"):
                prefixes.append(_SLASHES.sub("/", path[:-1]))  # "/static/*" keeps its slash: "/staticky" is not in
                continue
            written_paths.add(path)
            as_written, path = path, canonical(path)
            regex, _, convertors = _compiled(path, f"exclude: {path!r}")
            if convertors:
                self._excluded_patterns.append(regex)
                excluded_shapes.add(_shape(as_written if self._exact_paths else path))
                # "/items/{item_id}/": that spelling is the app's route, excluded as is; "/items/42" a variant
                # (another route's, maybe metered)
                as_requested = regex if as_written == path else _compiled(as_written, f"exclude: {as_written!r}")[0]
                self._excluded_as_requested.append(as_requested)
            else:
                excluded_paths.add(path)
        self._excluded = frozenset(excluded_paths)
        self._excluded_shapes = frozenset(excluded_shapes)
        self._excluded_as_written = frozenset(written_paths)
        self._excluded_prefixes = tuple(prefixes)
        # Where the app routes the canonical path (Litestar serves "/v1/files/" as "/v1/files"), that
        # path alone says whether a prefix excludes it; elsewhere "/static/*" takes "/static/" too.
        self._raw_prefixes = () if canonical_paths else self._excluded_prefixes
        self._refuse_conflicts(configured)
        for path, method in undeclared:  # (a static route is looked up before the prefixes and patterns)
            if self._covered(path, True):
                self._static[path][method] = EXCLUDED
        for by_method in self._static.values() if head_follows_get else ():
            if "GET" in by_method:
                by_method.setdefault("HEAD", by_method["GET"])
        # Every metered (method, path) of a static route, looked up in one step: the common case.
        # (A path both configured as not metered and excluded is left to match(): excluded wins.)
        self._exact: dict[tuple[str, str], Metered] = {
            (method, path): found
            for path, by_method in self._static.items()
            if canonical(path) not in self._excluded
            for method in _METHODS
            if (found := by_method.get(method) or by_method.get(None)) is not None and found is not _UNMETERED
        }
        # Static (method, path) lookups, dynamic routes and the default need no per-request work
        # beyond a dict lookup when nothing dynamic or excluded-by-pattern is configured.
        self._simple = (
            not self._dynamic
            and not self._written_dynamic
            and not self._excluded_patterns
            and not prefixes
            and not self._mounts
        )

    def configures(self, method: str, path: str) -> bool:
        """Whether ``method path`` is a static route metered as configured (not by the default)."""
        return (method, canonical(path)) in self._exact

    @property
    def features(self) -> frozenset[str]:
        """The features that requests may meter here (to check against the plans)."""
        metered = [m for by_method in self._static.values() for m in by_method.values()]
        metered += [m for _, _, m in (*self._dynamic, *self._written_dynamic)]
        if self._default is not None:
            metered.append(self._default)
        return frozenset(m.feature for m in metered if m is not _UNMETERED and m is not EXCLUDED)

    def _refuse_conflicts(self, configured: Iterable[tuple[str, str, bool]]) -> None:
        """A route that an exclusion covers is refused: which of the two the user meant is not for us to guess."""
        for key, path, static in configured:
            if self._covered(path, static):
                raise ValueError(f"routes: {key!r} is also excluded (exclude=): configure it in one place")

    def _covered(self, path: str, static: bool) -> bool:
        """Whether an exclusion covers the route ``path`` (a template: by a path, a prefix or the same
        template; one excluding part of it, "/files/public" under "/files/{name}", is a carve-out)."""
        exact, path = path, canonical(path)  # (an exact path's slash variants too)
        return (
            path in self._excluded
            or path.startswith(self._excluded_prefixes)
            or exact.startswith(self._excluded_prefixes)  # ("/internal/*" takes "/internal/")
            or (
                any(pattern.match(path) for pattern in self._excluded_patterns)
                if static
                else _shape(exact if self._exact_paths else path) in self._excluded_shapes  # (as the app has it)
            )
        )

    def match(self, method: str, path: str, *, raw: str | None = None, collapsed: str = "") -> Metered | None:
        """The metering of ``method path``: None when it is not metered, :data:`EXCLUDED` when excluded.

        (``raw``: the path as requested, when ``path`` is its canonical form; ``collapsed``: ``raw``
        with one leading slash and no repeated one, its final newlines kept, and with canonical
        paths no trailing slash either: as Litestar routes it.)
        """
        found = self._exact.get((method, path))
        if found is not None:
            return found
        found = self._match_exact(method, path) if self._exact_paths else self._match(method, path, raw, collapsed)
        unknown = found is None and not self._exact_paths  # (with exact paths, keys written by hand resolve them)
        if (found is EXCLUDED or unknown) and raw is None and "/." in path:
            # Dot segments: a handler that resolves them (StaticFiles) serves "/static/free/../paid.zip"
            # from outside the excluded "/static/free/*": excluded only where what they resolve to is;
            # and "/static/x/../paid.zip" as the metered "/static/paid.zip" it resolves to.
            resolved = "/" + posixpath.normpath(path).lstrip("/")
            if path.endswith(("/", "/.", "/..")) and resolved != "/":
                resolved += "/"  # (a directory, as requested: "/public/sub/.." is "/public/")
            if resolved != path:
                again = self.match(method, resolved)
                return again if found is EXCLUDED or again is not EXCLUDED else None
        return found

    def _excluded_unless_served(self, method: str, path: str) -> Metered | None:
        """With exact paths, an excluded path's slash variant as requested (``/v1/files/`` where
        ``/v1/files`` is excluded) that no route of the app serves at that spelling, but a metered
        template does (``/v1/files/{name:path}``): metered as that template, as the app routes it.
        (A table written by hand does not know which route serves the variant: excluded there.)"""
        plain = path.removesuffix("\n")  # (a pattern's "$" takes one final newline, not two)
        if plain not in self._excluded_as_written and plain not in self._static:
            method = method.upper()
            for route_method, regex, metered in self._dynamic:
                if (route_method is None or route_method == method) and regex.match(path):
                    return metered if metered is not _UNMETERED else None
        return EXCLUDED

    def _match_exact(self, method: str, path: str) -> Metered | None:
        """:meth:`match` of a path as the app routes it, as requested (``exact_paths``)."""
        # An exclusion and a key written by hand cover their slash variants (and a final newline); a key
        # written by hand, its dot segments too: the app it names (StaticFiles) resolves them.
        plain = canonical(path.rstrip("\n")) if self._excluded or self._excluded_patterns else ""
        if plain in self._excluded:
            return EXCLUDED if plain == path else self._excluded_unless_served(method, path)
        written = ""
        if self._written_static or self._written_dynamic:
            written = path.rstrip("\n")
            written = canonical(posixpath.normpath(written) if "/." in written else written)
        if not method.isupper():
            method = method.upper()
        by_method = self._static.get(path)
        if by_method is None and path[-1:] == "\n":  # a pattern's "$" matches before a final newline
            by_method = self._static.get(path[:-1])
        if by_method is None and self._written_static:
            by_method = self._written_static.get(written)
        if by_method is not None:
            found = by_method.get(method) or by_method.get(None)
            if found is not None:
                return found if found is not _UNMETERED else None
        if self._simple:
            return self._default
        if path.startswith(self._excluded_prefixes):
            return EXCLUDED
        if self._excluded_patterns:  # as requested, excluded; a variant, unless a metered template serves it
            if any(pattern.match(path) for pattern in self._excluded_as_requested):
                return EXCLUDED
            if any(pattern.match(plain) for pattern in self._excluded_patterns):
                return self._excluded_unless_served(method, path)
        for routes, compared in ((self._dynamic, path), (self._parsed, path), (self._written_dynamic, written)):
            for route_method, regex, metered in routes:
                if (route_method is None or route_method == method) and regex.match(compared):
                    return metered if metered is not _UNMETERED else None
        return self._default

    def _match(self, method: str, path: str, raw: str | None, collapsed: str) -> Metered | None:
        if path in self._excluded:
            return EXCLUDED
        if not method.isupper():
            method = method.upper()
        by_method = self._static.get(path)  # (keys are canonical: a path found is one)
        if by_method is not None:
            found = by_method.get(method) or by_method.get(None)
            if found is not None:
                return found if found is not _UNMETERED else None
        elif raw is None and (path[-1:] in ("\n", "/") and path != "/" or "//" in path or path[:1] != "/"):
            # Once, in one step: Starlette's route patterns end in "$", which matches before a final
            # newline ("/v1/export%0A" reaches /v1/export), and Litestar routes the canonical path,
            # with a leading slash where the request target had none ("GET v1/search HTTP/1.1").
            collapsed = _SLASHES.sub("/", "/" + path)
            if self._canonical_paths:
                # Litestar serves "/v1/files/" as "/v1/files", and compares the rest as it is: "/reports/public\n"
                # is no plain route there, but goes to the mount or template around it.
                collapsed = collapsed.rstrip("/") or "/"
                return self.match(method, collapsed, raw=path, collapsed=collapsed)
            # A routing tree (Quart's) compares literal segments as they are too, and Django's patterns
            # end at the path's end: "/docs/index\n" is their "/docs/<name>".
            plain = path if self._literal_newline else path.rstrip("\n")
            return self.match(method, canonical("/" + plain), raw=path, collapsed=collapsed)
        if self._simple:
            return self._default
        if self._excluded_prefixes and (
            path.startswith(self._excluded_prefixes) or (raw is not None and raw.startswith(self._raw_prefixes))
        ):
            return EXCLUDED  # ("/static/*" takes "/static/", not "/static")
        for pattern in self._excluded_patterns:
            if pattern.match(path):
                return EXCLUDED
        if self._mounts and path not in self._plain:
            for mount in self._mounts:
                if path.startswith(mount) and path[len(mount) : len(mount) + 1] not in ("/", ""):
                    # The app sends every path starting with a mount's to it ("/reportsX" to "/reports",
                    # as Litestar does): metered as the path under the mount it reaches ("/reports/X").
                    return self._match(method, f"{mount}/{path[len(mount) :]}", None, "")
        for routes in (self._dynamic, self._parsed):
            for route_method, regex, metered in routes:
                if (route_method is None or route_method == method) and (
                    regex.match(path)
                    or raw is not None
                    and (regex.match(collapsed) or not self._canonical_paths and regex.match(raw))
                ):
                    # (A template takes the path as requested too, where the app routes it so: "[^/]+"
                    # takes "/v1/search/\n"'s "\n"; with canonical paths, only as the app routes it.)
                    return metered if metered is not _UNMETERED else None
        return self._default
