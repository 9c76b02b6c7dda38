"""Model specs, parsed in one place: `NAME` (latest committed version), `NAME:VERSION`, `NAME@ALIAS`.

The syntax only (no registry, no I/O): config checks a `train.init` spec with it, and the registry
(`registry.spec`) raises its errors as `SpecError`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
SPEC_FORMS = "NAME, NAME:VERSION or NAME@ALIAS, such as resnet-digits, resnet-digits:3 or resnet-digits@champion"


class SpecError(ValueError):
    """A model spec, name or alias that is not well formed; the message names it and the forms allowed."""


class Spec(NamedTuple):
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return (
            self.name
            + (f":{self.version}" if self.version is not None else "")
            + (f"@{self.alias}" if self.alias else "")
        )


def _checked(value: str, pattern: re.Pattern, what: str, expected: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise SpecError(f"{what} {value!r}: expected {expected}")
    return value


def check_name(name: str) -> str:
    """`name` if it is a model name, else a SpecError saying what one is."""
    expected = "lowercase letters, digits, '.', '_' or '-' (starting with a letter or digit, at most 128)"
    return _checked(name, NAME_RE, "model name", expected)


def check_alias(alias: str) -> str:
    """`alias` if it is an alias name, else a SpecError saying what one is."""
    expected = "a lowercase letter, then letters, digits, '_' or '-' (at most 64), such as champion or staging"
    return _checked(alias, ALIAS_RE, "alias", expected)


def parse_spec(spec: str) -> Spec:
    """Parse a spec; every error names the spec and the part that is wrong."""
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"model spec {spec!r}: empty; expected {SPEC_FORMS}")
    if ":" in spec and "@" in spec:
        raise SpecError(f"model spec {spec!r}: give a version or an alias, not both; expected {SPEC_FORMS}")
    match = re.fullmatch(r"([^:@]*)(?:([:@])(.*))?", spec, re.DOTALL)
    assert match is not None  # the pattern matches every string
    name, sep, rest = match.groups(default="")
    try:
        check_name(name)
    except SpecError as err:
        raise SpecError(f"model spec {spec!r}: {err}; expected {SPEC_FORMS}") from None
    if sep == ":":
        if not rest.isdigit() or int(rest) < 1:
            raise SpecError(f"model spec {spec!r}: version {rest!r} is not a positive integer; expected {SPEC_FORMS}")
        return Spec(name, version=int(rest))
    if sep == "@":
        try:
            return Spec(name, alias=check_alias(rest))
        except SpecError as err:
            raise SpecError(f"model spec {spec!r}: {err}") from None
    return Spec(name)


def is_spec(text: str) -> bool:
    """Whether `text` is a spec `parse_spec` accepts."""
    try:
        parse_spec(text)
    except SpecError:
        return False
    return True
