"""The handler factory: ``RouteSpec``s from routes.yaml -> Tornado URL rules.

Paths may hold ``{name}`` (one segment) or ``{name:path}`` (the rest, slashes included)
templates. Everything is checked here, at start-up: unknown handlers or schemas, bad
templates and duplicate paths stop the gateway with a message naming the route.
"""

from __future__ import annotations

import re
from typing import Iterable

from tornado.web import URLSpec

from .config import ConfigError, RouteSpec

TEMPLATE = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?}")


def compile_path(path: str) -> str:
    """``/openai/deployments/{model}/chat`` -> an anchored regex with named groups."""
    out, pos = [], 0
    for match in TEMPLATE.finditer(path):
        out.append(literal(path, path[pos:match.start()]))
        out.append(f"(?P<{match.group(1)}>{'.+' if match.group(2) else '[^/]+'})")
        pos = match.end()
    out.append(literal(path, path[pos:]))
    return "".join(out) + "$"


def literal(path: str, text: str) -> str:
    """A part of ``path`` between templates: any brace left in it is a malformed template."""
    if "{" in text or "}" in text:
        raise ConfigError(f"route {path}: bad path template")
    return re.escape(text)


def check(specs: Iterable[RouteSpec], handlers: dict, schemas) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.handler not in handlers:
            raise ConfigError(f"route {spec.path}: unknown handler '{spec.handler}' "
                              f"(known: {', '.join(sorted(handlers))})")
        if spec.schema is not None and spec.schema not in schemas:
            raise ConfigError(f"route {spec.path}: no schema '{spec.schema}' in schemas/")
        for path in (spec.path, *spec.aliases):
            regex = compile_path(path)
            if regex in seen:
                raise ConfigError(f"route {spec.path}: path {path} is already served by route {seen[regex]}")
            seen[regex] = spec.path


def build(specs: Iterable[RouteSpec], handlers: dict, schemas, gw) -> list[URLSpec]:
    specs = tuple(specs)
    check(specs, handlers, schemas)
    return [URLSpec(compile_path(path), handlers[spec.handler], {"gw": gw, "route": spec},
                    name=spec.handler if path == spec.path else None)
            for spec in specs for path in (spec.path, *spec.aliases)]
