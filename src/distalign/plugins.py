"""Objects a config names as text: user callables ("package.module:function"), regular expressions
with letter flags, and keyword patterns. Rewards and f-DPG features both accept them; a bad name fails with a ValueError
saying what is wrong, which the CLI reports as a user error (exit code 2)."""

from __future__ import annotations

import importlib
import re
from typing import Any

REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def import_callable(path: str) -> Any:
    """The callable at ``"package.module:attribute"`` (dotted attributes like ``mod:Class.method`` work)."""
    module_name, sep, attributes = path.partition(":")
    if not sep or not module_name or not attributes:
        raise ValueError(f"callable path {path!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for {path!r}: {err}") from None
    for name in attributes.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"{path!r}: {module_name!r} has no attribute {attributes!r}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def compile_regex(pattern: str, flags: str = "") -> re.Pattern[str]:
    """``re.compile(pattern)`` with ``flags`` given as letters: any of "imsx" (ignore case, multiline,
    dot-all, verbose)."""
    unknown = set(flags) - set(REGEX_FLAGS)
    if unknown:
        raise ValueError(f"regex flags {flags!r} has unknown letters {sorted(unknown)}; use any of 'imsx'")
    compiled_flags = 0
    for letter in flags:
        compiled_flags |= REGEX_FLAGS[letter]
    try:
        return re.compile(pattern, compiled_flags)
    except re.error as err:
        raise ValueError(
            f"{pattern!r} is not a valid regular expression ({err}): fix the invalid regular expression, "
            "or escape literal text with re.escape"
        ) from None


def keyword_pattern(word: str, *, whole_word: bool = True, case_sensitive: bool = False) -> re.Pattern[str]:
    """A pattern matching ``word`` literally; with ``whole_word``, not inside a longer word ("cat" does
    not match "concat")."""
    body = re.escape(word)
    # Lookarounds rather than \b: they also behave for words that start or end with punctuation.
    if whole_word:
        body = rf"(?<!\w){body}(?!\w)"
    return re.compile(body, 0 if case_sensitive else re.IGNORECASE)
