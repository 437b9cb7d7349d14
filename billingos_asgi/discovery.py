"""Metering declared next to the routes, collected once when the middleware is built.

``@metered("api_calls")`` marks a Starlette endpoint (FastAPI's adapter marks its dependencies
the same way); :func:`declared_routes` walks an app's routes, through ``Mount`` s and sub-apps,
and returns the ``"METHOD /full/path"`` table the middleware's ``routes=`` takes. Passed as a
function (``routes=lambda: declared_routes(app.routes)``), it runs when the middleware stack
is built, at start-up, after every route has been added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from starlette.routing import BaseRoute, Mount, Route

from .routes import Metered, QuantityFunction

__all__ = ["declared_routes", "metered", "metering_of"]

MARK = "__billingos_metered__"
F = TypeVar("F", bound=Callable[..., Any])
Finder = Callable[[Route], Metered | None]


def metered(
    feature: str, *, quantity: float | QuantityFunction | None = 1, bill_partial: bool = False
) -> Callable[[F], F]:
    """Declare an endpoint metered: ``@metered("api_calls")`` (see :class:`Metered` for the options)."""
    declaration = Metered(feature, quantity, bill_partial)

    def mark(endpoint: F) -> F:
        setattr(endpoint, MARK, declaration)
        return endpoint

    return mark


def metering_of(route: Route) -> Metered | None:
    """The declaration on a route's endpoint (a function, or a class-based endpoint), if any."""
    declaration = getattr(route.endpoint, MARK, None)
    return declaration if isinstance(declaration, Metered) else None


def declared_routes(
    routes: Iterable[BaseRoute],
    *,
    find: Finder = metering_of,
    also: Mapping[str, str | Metered] | None = None,
    prefix: str = "",
) -> dict[str, str | Metered]:
    """``{"METHOD /full/path": Metered}`` for every declared route (mounts and sub-apps included), plus ``also``.

    A path given in ``also`` with another feature than its route declares is refused.
    """
    table: dict[str, str | Metered] = {}
    for route in routes:
        if isinstance(route, Mount):
            table.update(declared_routes(route.routes, find=find, prefix=prefix + route.path))
        elif isinstance(route, Route):
            declaration = find(route)
            if declaration is None:
                continue
            methods = sorted((route.methods or {"GET"}) - {"HEAD"})  # HEAD follows GET
            for method in methods:
                table[f"{method} {prefix}{route.path}"] = declaration
    for key, value in (also or {}).items():
        if key in table and table[key] != value:
            raise ValueError(f"routes: {key!r} is declared on its route as {table[key]!r} and given as {value!r}")
        table[key] = value
    return table
