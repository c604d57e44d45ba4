"""``distalign eval``, ``distalign report`` and ``distalign demo`` (evaluation issue)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Registered by the evaluation work; nothing yet."""
