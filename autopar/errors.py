"""User-facing errors.

Every error a user can cause by bad input is an :class:`AutoparError`: the CLI
prints its message on one line and exits with code 2, never a traceback. The
message says the observed value, the constraint and the fix (docs/errors.md).
"""

from __future__ import annotations


class AutoparError(ValueError):
    """Bad input or an impossible request; the message names the value and the fix."""


class UnsupportedModelError(AutoparError):
    """The model's architecture is not one autopar can profile or split."""


class TokenIdError(AutoparError, IndexError):
    """A token id outside the vocabulary (one device raises IndexError from its embedding)."""
