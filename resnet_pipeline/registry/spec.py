"""Model specs for the registry: the syntax of `resnet_pipeline.modelspec`, its errors raised as
`RegistryError` (what every registry caller catches)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from resnet_pipeline import modelspec
from resnet_pipeline.modelspec import ALIAS_RE, NAME_RE, SPEC_FORMS, Spec, is_spec  # noqa: F401 - this module's API
from resnet_pipeline.registry.errors import RegistryError

T = TypeVar("T")


def _as_registry_error(fn: Callable[[str], T]) -> Callable[[str], T]:
    @functools.wraps(fn)
    def checked(value: str) -> T:
        try:
            return fn(value)
        except modelspec.SpecError as err:
            raise RegistryError(str(err)) from None

    return checked


check_name = _as_registry_error(modelspec.check_name)
check_alias = _as_registry_error(modelspec.check_alias)
parse_spec = _as_registry_error(modelspec.parse_spec)
