"""Errors shared by several layers (so that, e.g., evaluation need not import the training loop)."""

from __future__ import annotations


class SetupError(ValueError):
    """A run that cannot start as configured (the message says which setting to change)."""
