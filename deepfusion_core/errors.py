"""Pydantic's validation errors as the one-line problems every layer reports.

One place for the conversion, so a stages file, a profile's data settings and a CLI option
word their problems alike: `location: message`, without pydantic's "Value error, " prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError


def dotted(loc: tuple) -> str:
    """A pydantic error location as `a.b.0.c`."""
    return ".".join(map(str, loc))


def validation_errors(e: ValidationError,
                      where: Callable[[tuple], str | None] = dotted) -> list[tuple[str, str]]:
    """(location, message) per error of `e`; `where` words a location, None skips the error."""
    out = []
    for err in e.errors():
        location = where(err["loc"])
        if location is not None:
            out.append((location, err["msg"].removeprefix("Value error, ")))
    return out


def validation_lines(e: ValidationError, prefix: str = "") -> list[str]:
    """`prefix.location: message` per error of `e`; an error with neither a prefix nor a
    location is put under the model's name."""
    return [f"{'.'.join(p for p in (prefix, location) if p) or e.title}: {message}"
            for location, message in validation_errors(e)]
