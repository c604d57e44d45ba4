"""The README stays true: its two first-screen commands, CI running the test one, and the commands
and files it names existing."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest

from distalign.cli import build_parser
from distalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[:2]
    return [
        next(line for line in block.splitlines() if line and not line.startswith("#")) for block in blocks
    ]


def test_first_screen_has_the_setup_and_test_commands():
    demo, tests = _first_commands()
    assert demo.startswith("bash scripts/setup.sh") and "distalign demo" in demo
    assert tests.startswith("bash scripts/setup.sh --dev") and "pytest" in tests
    first_screen = README.split("---", 1)[0]
    assert demo in first_screen and tests in first_screen


def test_ci_runs_the_readme_test_command():
    _, tests = _first_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_every_distalign_command_in_the_readme_parses():
    parser = build_parser()
    lines = [line.split("#")[0].strip() for line in README.splitlines()]
    commands = [line for line in lines if line.startswith("distalign ")]
    assert commands
    for line in commands:
        args = shlex.split(line)[1:]
        parsed = parser.parse_args(args)
        assert parsed.handler is not None
        if args[0] == "train":  # the config and its overrides resolve, not just the command line
            load_config(args[1], args[2:])


def test_files_the_readme_names_exist():
    for path in re.findall(r"`((?:configs|docs|scripts|benchmarks)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path
    for path in re.findall(r"\b(configs/\w+\.yaml)\b", README):
        assert (ROOT / path).exists(), path


def test_the_readme_loss_example_runs():
    """The first Python block (pure loss functions) executes as written."""
    block = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["loss"].ndim == 0 and namespace["positives"].grad is not None


def test_the_readme_registration_example_trains(tmp_path):
    """The README's one-function loss and aggregator register, take a user option from the config and
    train the tiny model. At step 1 the policy is its reference, so every DPO term is ln 2 and the
    step-1 loss is ln 2 + length_penalty x (a chosen length): twice the penalty, twice the excess over
    ln 2; and the worst row's loss lies above the mean's."""
    from distalign_testing.runs import TINY_BASE, read_metrics

    from distalign.losses import AGGREGATORS, LOSSES
    from distalign.train.offline import train_offline

    block = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "register_loss(" in b)
    try:
        exec(compile(block, "README.md", "exec"), {})

        def first_loss(name: str, *options: str) -> float:
            overrides = [*TINY_BASE, f"output_dir={tmp_path / name}", "loss.name=dpo_plus_length"]
            run = train_offline(load_config(None, [*overrides, "train.max_steps=2", *options]))
            records = read_metrics(run)
            assert len(records) == 2
            return records[0]["loss"]

        worst = first_loss("worst", "loss.length_penalty=0.02", "aggregator.name=worst_row")
        doubled = first_loss("doubled", "loss.length_penalty=0.04", "aggregator.name=worst_row")
        mean = first_loss("mean", "loss.length_penalty=0.02")
        excess = worst - math.log(2)
        assert excess > 0.02 and doubled - math.log(2) == pytest.approx(2 * excess, rel=1e-5)
        assert mean < worst
    finally:
        LOSSES.remove("dpo_plus_length")
        AGGREGATORS.remove("worst_row")


def test_committed_results_name_no_machine_local_paths():
    """docs/results/ is read on other machines: its paths are relative to the repository or name a
    package, never this machine's absolute paths (a /work/... data path, a site-packages encoder)."""
    import json

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    results = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert results
    for path in results:
        local = [
            s for s in strings(json.loads(path.read_text())) if s.startswith("/") or "site-packages" in s
        ]
        assert not local, f"{path.name} names machine-local paths: {local[:3]}"


def test_the_lock_pins_every_declared_dependency_inside_its_range():
    """constraints.txt (what scripts/setup.sh installs) pins each runtime and dev dependency of
    pyproject.toml at a version its range admits, and the setup script installs from it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pinned, prereleases=True), f"{requirement} excludes {pinned}"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and "--latest" in setup
