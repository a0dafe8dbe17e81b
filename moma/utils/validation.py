"""One line for a pydantic validation error: the config, the compare config and a method's
parameters all report their first problem the same way."""

from __future__ import annotations

from pydantic import ValidationError


def validation_message(error: ValidationError, unknown_hint: str = "check its spelling", key_prefix: str = "",
                       noun: str = "config key") -> str:
    """``unknown <noun> '<key>' (<hint>)``, ``<noun> '<key>' is required`` or
    ``<noun> '<key>': <problem> (got <value>)`` for the first error; the key is its dotted location
    after ``key_prefix``."""
    first = error.errors()[0]
    key = key_prefix + ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown {noun} '{key}' ({unknown_hint})"
    if first["type"] == "missing":
        return f"{noun} '{key}' is required"
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return message
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{noun} '{key}': {message}{shown}"
