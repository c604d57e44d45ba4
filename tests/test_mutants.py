"""scripts/mutants.py stays runnable: every planted bug's text is found exactly once where it is planted
(the script refuses otherwise), and every test it names exists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
mutants = importlib.util.module_from_spec(spec)
sys.modules.setdefault("mutants", mutants)  # dataclasses look their module up there
spec.loader.exec_module(mutants)


@pytest.mark.parametrize("bug", mutants.BUGS, ids=lambda bug: bug.name)
def test_each_planted_bug_applies_and_names_existing_tests(bug):
    assert (ROOT / bug.path).read_text().count(bug.original) == 1
    assert bug.planted != bug.original
    paths = [t.split("::")[0] for t in bug.tests if t.startswith("tests/")]
    assert paths and all((ROOT / path).is_file() for path in paths)
    for node in (t for t in bug.tests if "::" in t):
        path, test = node.split("::", 1)
        assert f"def {test.split('[')[0]}(" in (ROOT / path).read_text()


def test_names_are_unique():
    names = [bug.name for bug in mutants.BUGS]
    assert len(names) == len(set(names))
