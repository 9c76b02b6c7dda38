"""The registry's errors (re-exported by `storage`, where callers import them from)."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry operation could not be done; the message names the model, version, alias or file."""


class Conflict(Exception):
    """A conditional write lost: the object exists (if_none_match) or changed (if_match)."""


class SizeMismatch(RegistryError):
    """An object is not the size its manifest says (checked before and while it is read)."""
