"""Metering declared next to the routes, collected once when the middleware is built.

``@metered("api_calls")`` marks a Starlette endpoint (FastAPI's adapter marks its dependencies
the same way); :func:`declared_routes` walks an app's routes, through ``Mount`` s and sub-apps,
and returns the ``"METHOD /full/path"`` table the middleware's ``routes=`` takes. Passed as a
function (``routes=lambda: declared_routes(app.routes)``), it runs when the middleware stack
is built, at start-up, after every route has been added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from starlette.routing import BaseRoute, Host, Mount, Route

from .routes import Metered, QuantityFunction

__all__ = ["declarations", "declared_routes", "metered", "metering_of", "route_keys", "route_table"]

MARK = "__billingos_metered__"
F = TypeVar("F", bound=Callable[..., Any])


def metered(
    feature: str,
    *,
    quantity: float | QuantityFunction | None = 1,
    bill_partial: bool = False,
    late: bool = False,
) -> Callable[[F], F]:
    """Declare an endpoint metered: ``@metered("api_calls")`` (see :class:`Metered` for the options)."""
    declaration = Metered(feature, quantity, bill_partial, late)

    def mark(endpoint: F) -> F:
        setattr(endpoint, MARK, declaration)
        return endpoint

    return mark


def metering_of(route: Route) -> Metered | None:
    """The declaration on a route's endpoint (a function, or a class-based endpoint), if any."""
    declaration = getattr(route.endpoint, MARK, None)
    return declaration if isinstance(declaration, Metered) else None


def route_table(
    declarations: Iterable[tuple[str, Metered]], also: Mapping[str, str | Metered] | None = None
) -> dict[str, str | Metered]:
    """The middleware's ``routes=`` from ``("METHOD /path", Metered)`` pairs, plus ``also``.

    A path declared twice differently, or given in ``also`` with another feature than its route
    declares, is refused: which one would be billed is not for us to guess.
    """
    table: dict[str, str | Metered] = {}
    for key, declaration in [*declarations, *(also or {}).items()]:
        if key in table and table[key] != declaration:
            raise ValueError(f"routes: {key!r} is declared both as {table[key]!r} and as {declaration!r}")
        table[key] = declaration
    return table


def route_keys(path: str, methods: Iterable[str] | None) -> list[str]:
    """``"METHOD /path"`` keys of a route (HEAD follows GET in the table, so beside GET it is left out).

    No methods (a class-based ``HTTPEndpoint``): the route answers every method, so its key has none.
    """
    if methods is None:
        return [path]
    keys = set(methods)
    if "GET" in keys:
        keys.discard("HEAD")
    return [f"{method} {path}" for method in sorted(keys)]


def declared_routes(
    routes: Iterable[BaseRoute], *, also: Mapping[str, str | Metered] | None = None
) -> dict[str, str | Metered]:
    """The table of every ``@metered`` endpoint in ``routes`` (mounts and sub-apps included), plus ``also``."""
    return route_table(declarations(routes), also)


Finder = Callable[[Route], Metered | None]
Expander = Callable[[BaseRoute, str], Iterable[tuple[str, Metered]]]


def declarations(
    routes: Iterable[BaseRoute], *, find: Finder = metering_of, expand: Expander | None = None, prefix: str = ""
) -> Iterator[tuple[str, Metered]]:
    """``("METHOD /full/path", Metered)`` for each declared route, through mounts and hosts.

    ``find`` reads a route's declaration; ``expand`` handles route kinds a framework adds
    (given the route and its path prefix). The table has no host: a ``Host``'s routes are
    metered by path. A mounted app wrapped in middleware shows no routes: pass its declarations
    with ``also=``, or give it a middleware of its own.
    """
    for route in routes:
        if isinstance(route, Mount):
            yield from declarations(route.routes, find=find, expand=expand, prefix=prefix + route.path)
        elif isinstance(route, Host):
            yield from declarations(route.routes, find=find, expand=expand, prefix=prefix)
        elif isinstance(route, Route):
            declaration = find(route)
            if declaration is not None:
                for key in route_keys(prefix + route.path, route.methods):
                    yield key, declaration
        elif expand is not None:
            yield from expand(route, prefix)
