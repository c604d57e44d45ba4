"""Reusable test fixtures: an exactly enumerable sequence toy and a tiny word-level language model.

Nothing here is used by the library at run time; tests across the project import it.
"""

from distalign_testing.toy import TabularPolicy, ToySpace, ToyTarget

__all__ = ["TabularPolicy", "ToySpace", "ToyTarget"]
