"""Metering declared next to the routes, collected once when the middleware is built.

The framework adapters mark what they declare metered with :data:`MARK` (Starlette's
``@metered("api_calls")`` an endpoint, FastAPI's ``metered()`` a dependency);
:func:`declared_routes` walks an app's routes, through ``Mount`` s and sub-apps, and returns the
``"METHOD /full/path"`` table the middleware's ``routes=`` takes. Passed as a
function (``routes=lambda: declared_routes(app.routes)``), it runs when the middleware stack
is built, at start-up, after every route has been added.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from starlette.routing import BaseRoute, Host, Match, Mount, Route, WebSocketRoute, compile_path

from ._overlap import overlap
from .routes import _METHODS, _PARAMETER, UNDECLARED, FoundRoutes, Metered, _split_key, joined

__all__ = [
    "MARK",
    "declarations",
    "declared_routes",
    "framework_app",
    "metering_of",
    "mounted_app",
    "mounted_apps",
    "reached_routes",
    "route_endpoints",
    "route_keys",
    "route_table",
    "routed_app",
    "routes_of",
    "unserved",
    "unwrapped",
    "walk",
    "wrapped_apps",
]

logger = logging.getLogger("billingos_asgi")

MARK = "__billingos_metered__"


def metering_of(route: Route) -> Metered | None:
    """The declaration on a route's endpoint (a function, a partial of one, or a class-based endpoint), if any."""
    declaration = getattr(unwrapped(route.endpoint), MARK, None)
    return declaration if isinstance(declaration, Metered) else None


def unwrapped(endpoint: object) -> object:
    """``endpoint`` without the ``functools.partial`` s around it, as ``Route`` looks at it."""
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    return endpoint


def route_table(
    declarations: Iterable[tuple[str, Metered | None]], also: Mapping[str, str | Metered | None] | None = None
) -> FoundRoutes:
    """The middleware's ``routes=`` from ``("METHOD /path", Metered or None)`` pairs, plus ``also``.

    A path declared twice differently, or given in ``also`` with another feature than its route
    declares, is refused: which one would be billed is not for us to guess. A route found not
    metered (None, or :data:`UNDECLARED`) is metered where ``also`` says so. A ``GET`` key of
    ``also`` (written by hand, of routes not found) takes HEAD too, unless ``also`` gives HEAD its own.
    """
    table = FoundRoutes()
    written = list(_with_heads(also or {}))
    table.written = frozenset(key for key, _ in written)
    for key, declaration in [*declarations, *written]:
        declares = declaration is not None and declaration is not UNDECLARED
        before = table.get(key)
        if declares and before not in (None, UNDECLARED) and _as_metered(before) != _as_metered(declaration):
            raise ValueError(f"routes: {key!r} is declared both as {table[key]!r} and as {declaration!r}")
        if declares or key not in table:
            table[key] = declaration
    return table


def _as_metered(declaration: str | Metered | None) -> Metered | None:
    """A declaration as the middleware reads it: a feature's name is ``Metered(feature)``."""
    return Metered(declaration) if isinstance(declaration, str) else declaration


def _with_heads(also: Mapping[str, str | Metered | None]) -> Iterator[tuple[str, str | Metered | None]]:
    """``also`` 's keys, and beside each GET one the same for HEAD, unless ``also`` has it."""
    split = {key: _split_key(key) for key in also}
    given = set(split.values())
    for key, value in also.items():
        yield key, value
        method, path = split[key]
        if method == "GET" and ("HEAD", path) not in given:
            yield f"HEAD {path}", value


def route_keys(path: str, methods: Iterable[str] | None) -> list[str]:
    """``"METHOD /path"`` keys of a route, one per method it serves.

    No methods (a class-based ``HTTPEndpoint``): the route answers every method, so its key has none.
    """
    if methods is None:
        return [path]
    return [f"{method} {path}" for method in sorted(set(methods))]


def declared_routes(
    routes: Iterable[BaseRoute], *, also: Mapping[str, str | Metered | None] | None = None
) -> FoundRoutes:
    """The table of every ``@metered`` endpoint in ``routes`` (mounts and sub-apps included), plus ``also``."""
    return route_table(declarations(routes), also)


Finder = Callable[[Route], Metered | None]
#: A route as the app routes it: its full path, its methods (None: every method), its declaration if
#: any, and whether it answers on every host (not a ``Host``'s: those are tried for one host only).
Found = tuple[str, Collection[str] | None, Metered | None, bool]
Expander = Callable[[BaseRoute, str], Iterable[Found]]


def declarations(
    routes: Iterable[BaseRoute], *, find: Finder = metering_of, expand: Expander | None = None, prefix: str = ""
) -> Iterator[tuple[str, Metered]]:
    """``("METHOD /full/path", Metered)`` for each declared route, through mounts and hosts (see :func:`walk`).

    The app routes a request to the first route that matches it, the middleware's table to a
    static path before any template. So a declared static route that an earlier route already
    answers (``/reports/export`` after ``/reports/{report_id}``) is never reached: it is left
    out, with a warning, rather than billed for the request the earlier route serves. And an
    undeclared static route before a declared template taking its path (``/items/featured``
    before ``/items/{item_id}``) comes as :data:`UNDECLARED`: the app serves it, metered as the
    routes missing from the table are (``default_feature``, or not at all), never as the template.
    So does an undeclared template before a declared one sharing paths with it (``/users/{name}``
    before ``/users/{user_id:int}``), in the table's templates before it.
    """
    found = [(*route, compile_path(route[0])) for route in walk(routes, find=find, expand=expand, prefix=prefix)]
    declared_templates = [
        (index, path, methods, regex)
        for index, (path, methods, declared, _, (regex, _, convertors)) in enumerate(found)
        if declared and convertors
    ]
    undeclared = {path for path, _, declaration, *_ in found if declaration is None}
    undeclared_keys: set[str] = set()  # of templates: a declared template with the same key is never reached
    earlier: list[tuple[re.Pattern[str], Collection[str] | None]] = []
    free_on_a_host: set[str] = set()  # undeclared routes of a Host's so far: they take its requests first
    for index, (path, methods, declaration, every_host, (regex, _, convertors)) in enumerate(found):
        if declaration is not None and not every_host and path in undeclared:
            logger.warning(
                "%s: metered on a Host's route, and served unmetered by another: the table has no host, "
                "so it is metered on every host (give the hosts different paths, or one app each)",
                path,
            )
        elif declaration is not None and path in free_on_a_host:
            logger.warning(
                "%s: metered, and served unmetered by an earlier Host's route: the table has no host, "
                "so it is metered on every host, that one's too (give the hosts different paths, or one app each)",
                path,
            )
        if declaration is None and not every_host:
            free_on_a_host.add(path)
        if declaration is None and every_host and not convertors:
            if any(later > index and template.match(path) for later, _, _, template in declared_templates):
                for key in route_keys(path, _reachable(path, methods, earlier)):
                    yield key, UNDECLARED
        elif declaration is None and every_host and declared_templates and declared_templates[-1][0] > index:
            later_ones = [(other, taken, template) for i, other, taken, template in declared_templates if i > index]
            for key in route_keys(path, _shared_methods(path, methods, regex, later_ones)):
                undeclared_keys.add(key)
                yield key, UNDECLARED
        if declaration is not None:
            if convertors:
                reachable = _untaken(path, methods, undeclared_keys)
            else:
                reachable = _reachable(path, methods, earlier)
            if reachable != methods:
                lost = set(_METHODS if methods is None else methods) - set(reachable or ())
                logger.warning(
                    "%s %s: an earlier route answers it first (the app takes the first match): not metered as %r",
                    ",".join(sorted(lost)),
                    path,
                    declaration.feature,
                )
            for key in route_keys(path, reachable):
                yield key, declaration
        if every_host:  # a Host's route takes only its host's requests: the others reach the later route
            earlier.append((regex, methods))


def _shared_methods(
    path: str,
    methods: Collection[str] | None,
    regex: re.Pattern[str],
    later: Iterable[tuple[str, Collection[str] | None, re.Pattern[str]]],
) -> Collection[str] | None:
    """The methods of an undeclared template's route that a later declared template also takes,
    on a path both take (None: every method)."""
    shared: set[str] = set()
    lead = path.partition("{")[0]
    for other, taken, template in later:
        other_lead = other.partition("{")[0]  # what precedes the first parameter: both must start alike
        if not (lead.startswith(other_lead) or other_lead.startswith(lead)):
            continue
        shared_paths = overlap(path, other)
        if shared_paths is None:  # a parameter type of the app's own: tried on sample paths of both
            shared_paths = any(template.match(example) for example in _examples(path)) or any(
                regex.match(example) for example in _examples(other)
            )
        if shared_paths:
            if methods is None and taken is None:
                return None
            shared |= set(_METHODS if methods is None else methods) & set(_METHODS if taken is None else taken)
    return shared


#: What a parameter of each type takes: sample paths of a template, to find a route serving a configured
#: key, or paths two templates share where a parameter type is the app's own (a miss leaves it as it was).
_SAMPLES = {
    "str": ("0", "x"),
    "path": ("0", "x", "x/0"),
    "int": ("0",),
    "float": ("0", "0.5"),
    "uuid": ("00000000-0000-0000-0000-000000000000",),
}


@functools.lru_cache(maxsize=4096)
def _examples(path: str) -> tuple[str, ...]:
    """Paths the template ``path`` takes, its parameters given sample values of their types (64 at most)."""
    parts = _PARAMETER.split(path)  # literal, name, type, literal, name, type, ..., literal
    choices: list[tuple[str, ...]] = [(parts[0],)]
    for at in range(1, len(parts), 3):
        choices += [_SAMPLES.get(parts[at + 1] or "str", _SAMPLES["str"]), (parts[at + 2],)]
    return tuple("".join(example) for example in itertools.islice(itertools.product(*choices), 64))


def _untaken(path: str, methods: Collection[str] | None, taken_keys: Collection[str]) -> Collection[str] | None:
    """The methods of a declared template whose keys no earlier undeclared template holds (None: every method)."""
    if methods is None:
        return set() if path in taken_keys else None
    taken = {method for method in methods if f"{method} {path}" in taken_keys}
    return set(methods) - taken if taken else methods


def _reachable(
    path: str, methods: Collection[str] | None, earlier: Iterable[tuple[re.Pattern[str], Collection[str] | None]]
) -> Collection[str] | None:
    """The methods of a static route that no earlier route answers (None: every method)."""
    taken: set[str] = set()
    for regex, answered in earlier:
        if regex.match(path):
            if answered is None:
                return set()
            taken.update(answered)
    if not taken:
        return methods
    return set(_METHODS if methods is None else methods) - taken


def walk(
    routes: Iterable[BaseRoute], *, find: Finder = metering_of, expand: Expander | None = None, prefix: str = ""
) -> Iterator[Found]:
    """Every route in the order the app tries them, through mounts and hosts, declared or not.

    A ``Mount`` comes after its routes as one more, answering every path under it.

    ``find`` reads a route's declaration; ``expand`` handles route kinds a framework adds
    (given the route and its path prefix), and a ``Mount`` once more after its routes, for what
    its app tries when none of them matched (FastAPI's ``frontend()``). The table has no host:
    a ``Host``'s routes are metered by path. A mounted app wrapped in middleware shows no
    routes: pass its declarations with ``also=``, or give it a middleware of its own.
    """
    for route in routes:
        if isinstance(route, Mount):
            under = joined(prefix, route.path)
            yield from walk(route.routes, find=find, expand=expand, prefix=under)
            if expand is not None:
                yield from expand(route, prefix)
            yield joined(under, "/{path:path}"), None, None, True  # the rest of its path: its own 404 or 405
        elif isinstance(route, Host):
            for path, methods, declaration, _ in walk(route.routes, find=find, expand=expand, prefix=prefix):
                yield path, methods, declaration, False
        elif isinstance(route, Route):
            # (no methods, or none listed, as FastAPI copies an HTTPEndpoint's route: every method, to Starlette)
            yield joined(prefix, route.path), route.methods or None, find(route), True
        elif expand is not None:
            yield from expand(route, prefix)


_INNER = ("app", "application", "wrapped", "__wrapped__")  # where a wrapper keeps the app it wraps


def wrapped_apps(app: object) -> Iterator[object]:
    """``app`` and the apps inside it, as ASGI wrappers hold them: ``.app`` (middleware), Django's
    ``.application`` (its static files handler), ``.wrapped`` or ``__wrapped__`` (others' wrappers,
    ``functools.wraps``), Channels' ``ProtocolTypeRouter`` (its HTTP app)."""
    for _ in range(64):
        yield app
        mapping = getattr(app, "application_mapping", None)
        inner = next((found for name in _INNER if (found := getattr(app, name, None)) is not None), None)
        app = inner or (mapping.get("http") if isinstance(mapping, dict) else None)
        if app is None:
            return


def framework_app(app: object, name: str) -> object | None:
    """The app of framework ``name`` (its top-level package) in :func:`wrapped_apps`, if any; a
    bound method's (Quart's ``asgi_app``, which its middleware wraps) is its instance's; an
    instance of a subclass of the framework's (``class App(Quart)``, in the app's own module) too."""
    for inner in wrapped_apps(app):
        owner = getattr(inner, "__self__", inner)
        if any(kind.__module__.partition(".")[0] == name for kind in type(owner).__mro__):
            return owner
    return None


def routed_app(app: object) -> Any:
    """The Starlette or FastAPI app (or router) holding the routes, through the middleware around
    it; None for an app that shows none (another framework, a raw ASGI app)."""
    for inner in wrapped_apps(app):
        routes = getattr(inner, "routes", None)
        if isinstance(routes, list) and all(isinstance(route, BaseRoute) for route in routes):
            return inner
    return None


def reached_routes(app: object, depth: int = 0) -> Iterator[BaseRoute]:
    """Every route of ``app`` (see :func:`routes_of`) and of the apps mounted in it, at any depth:
    through hosts, under a mount's middleware, and in the routers FastAPI includes lazily (as the
    app sees them)."""
    for route in routes_of(app) or ():
        contexts = getattr(route, "effective_route_contexts", None)  # a router FastAPI includes lazily
        for each in [getattr(c, "starlette_route", None) for c in contexts()] if callable(contexts) else [route]:
            if isinstance(each, BaseRoute):
                yield each
            if isinstance(each, (Mount, Host)) and depth < 64:
                yield from reached_routes(mounted_app(each), depth + 1)


def mounted_app(mount: Mount | Host) -> object:
    """The app a mount or host holds, under the middleware given to it."""
    return getattr(mount, "_base_app", mount.app)


def mounted_apps(app: object) -> Iterator[object]:
    """The apps mounted in ``app`` (mounts and hosts), at any depth."""
    return (mounted_app(route) for route in reached_routes(app) if isinstance(route, (Mount, Host)))


def route_endpoints(app: object) -> frozenset[int]:
    """The ids of the endpoints of ``app``'s routes (as Starlette names the one it routed a request
    to, in ``scope["endpoint"]``), mounted apps' included; not a mount's app, which the scope names
    on the way to them."""
    return frozenset(id(route.endpoint) for route in reached_routes(app) if isinstance(route, Route))


def routes_of(app: object) -> list[BaseRoute] | None:
    """The routes of :func:`routed_app`, if any."""
    routed = routed_app(app)
    return None if routed is None else routed.routes


def unserved(routes: Iterable[BaseRoute], keys: Iterable[str]) -> list[str]:
    """The ``"METHOD /path"`` keys that no route in ``routes`` serves: a typo, most likely, and the
    route it meant served unmetered. A mount whose app shows no routes serves every path under it;
    a route of a kind unknown here (FastAPI's included routers, a framework's own) is asked, through
    Starlette's ``matches()``, and taken to serve any path when it cannot say."""
    unknown: list[tuple[str, BaseRoute]] = []

    def ask_later(route: BaseRoute, prefix: str) -> Iterator[Found]:
        if not isinstance(route, WebSocketRoute | Mount):  # (never an HTTP request's; a mount's paths: walk's)
            unknown.append((prefix, route))
        return iter(())

    served = [(compile_path(path)[0], methods) for path, methods, _, _ in walk(routes, expand=ask_later)]
    missing = []
    for key in keys:
        method, path = _split_key(key)
        samples = _examples(path) if _PARAMETER.search(path) else (path,)
        samples += tuple(sample + "/" for sample in samples)  # (a route "/items/" serves "/items" by a redirect)
        if not any(
            (methods is None or method is None or method in methods or method == "HEAD" and "GET" in methods)
            and any(regex.match(sample) for sample in samples)
            for regex, methods in served
        ) and not any(_serves(route, prefix, method, samples) for prefix, route in unknown):
            missing.append(key)
    return missing


def _serves(route: BaseRoute, prefix: str, method: str | None, samples: Iterable[str]) -> bool:
    """Whether ``route`` (under ``prefix``) takes a request for one of ``samples`` by ``method``
    (None: any); True when it cannot tell (nothing is said of what it may serve)."""
    methods = ("GET", "HEAD") if method == "HEAD" else (method or "GET",)  # (HEAD follows GET)
    for sample in samples:
        if not sample.startswith(prefix):
            continue
        for verb in methods:
            scope = {"type": "http", "method": verb, "path": sample, "root_path": prefix, "headers": []}
            try:
                match, _ = route.matches(scope)
            except Exception:
                return True
            if match is Match.FULL or (match is Match.PARTIAL and method is None):
                return True
    return False
