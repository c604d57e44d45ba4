"""One small registry per kind of plug-in: a decorator and a dict.

Losses, f-divergences, aggregators, rewards and scorers each get one ``Registry``. Looking up an
unknown name raises ``UnknownNameError`` listing every valid name, so a typo in a config fails with
the fix in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no plug-in was registered under; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of plug-ins of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; registering a name twice is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REGISTRY.register("name")``."""

        def decorator(entry: T) -> T:
            return self.add(name, entry)

        return decorator

    def remove(self, name: str) -> None:
        """Unregister ``name`` (for tests that register a throwaway plug-in)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def typed_options(field: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with every value checked against the type of its option's default (a float option
    takes numbers, a switch takes booleans, ...), coerced as pydantic coerces a config field ("0.25"
    for a float is 0.25). A plug-in's options are its keyword-only parameters, so their defaults are
    the one type declaration every plug-in has, a user's included. Options whose default is not a
    bool, int, float or str (None, say), and names that are not options, are passed through. Raises
    ValueError naming ``field.option`` and the value, e.g. "aggregator.alpha: Input should be a valid
    number, ... (got 'quarter')"."""
    from pydantic import TypeAdapter, ValidationError

    checked = dict(given)
    for name, value in given.items():
        kind = type(defaults.get(name))
        if kind not in (bool, int, float, str):
            continue
        problem = None
        if isinstance(value, bool) and kind is not bool:
            problem = f"Input should be a {'number' if kind in (int, float) else kind.__name__}, not a switch"
        else:
            try:
                checked[name] = TypeAdapter(kind).validate_python(value)
            except ValidationError as err:
                problem = err.errors()[0]["msg"]
        if problem is not None:
            raise ValueError(f"{field}.{name}: {problem} (got {value!r})")
    return checked
