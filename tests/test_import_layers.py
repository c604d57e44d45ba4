"""The import-linter contracts in pyproject.toml: every import points down the layers of
docs/architecture.md, and no package's modules import each other in a circle."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    command = [str(LINT_IMPORTS), "--config", str(config), "--no-cache"]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_import_contracts_hold():
    result = lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_import_up_the_layers_breaks_the_contract(tmp_path):
    """Control: with data placed above losses, losses' import of data's signal names points up, and
    the same check fails naming it."""
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = settings["contracts"][0]["layers"]
    swapped = [{"losses": "data", "data": "losses"}.get(layer, layer) for layer in layers]
    assert swapped != layers
    contract = "\n".join(
        [
            "[importlinter]",
            "root_package = distalign",
            "[importlinter:contract:layers]",
            "name = swapped",
            "type = layers",
            "containers = distalign",
            "layers =",
            *(f"    {layer}" for layer in swapped),
        ]
    )
    config = tmp_path / "swapped.ini"
    config.write_text(contract + "\n")
    result = lint_imports(config)
    assert result.returncode != 0
    assert "distalign.losses.robust -> distalign.data.signals" in result.stdout


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str) -> list[str]:
    """``module: name`` for each ``from distalign... import _name`` in ``source`` (any depth); dunder
    names (``__version__``) are public."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distalign"):
            found += [f"{node.module}: {alias.name}" for alias in node.names if _private(alias.name)]
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "src" / "distalign").rglob("*.py"))
        if (names := private_imports(path.read_text()))
    }
    assert offenders == {}
    # control: the check sees an import of a private name inside a function
    assert private_imports("def f():\n    from distalign.x import _y, z\n") == ["distalign.x: _y"]
