"""Which of the app's routes a request's path matches, for code that runs before (or without) routing: the
middleware answering 401 or 503 before the router runs, and the `Allow` header of a 405."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import Scope


def routes_matching_path(scope: Scope) -> Iterator[BaseRoute]:
    """Every route of the app whose path matches the request's, whatever its method."""
    for route in _flat_routes(scope["app"].routes):
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            yield route


def _flat_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # recent FastAPI keeps an included router whole
        if included is not None:
            yield from _flat_routes(included.routes)
        else:
            yield route
