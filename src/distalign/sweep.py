"""Sweeps: a set of runs from one base config, expanded and validated as a whole before any trains.

A sweep file (YAML; the format with an example: ``distalign sweep --help`` and docs/sweep.md) names a
base run config (``base:``, relative to the sweep file), the directory the runs go to (``output_dir:``,
relative to the working directory like a run config's), ``overrides:`` for every run, and ``runs:``:
groups of runs, each with a ``name``, its own settings (``set``) and an optional ``grid`` (the
cartesian product of its keys' values; one run per point, named ``NAME-key=value-...``).

A plain run config with ``--grid key=v1,v2`` is a sweep of one group named after the file. Each run's
config is ``load_config(base, [sweep overrides, command-line overrides, the run's set, its grid point,
output_dir=OUTPUT_DIR/NAME])``: exactly what ``distalign train BASE OVERRIDES...`` would train. Every
run is built and validated here; a bad value in any run fails before anything is created.
Running a sweep (train, evaluate, collect) is :mod:`distalign.sweep_run`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distalign.config import ConfigError, RunConfig, load_config
from distalign.eval.report import flatten

SWEEP_KEYS = ("base", "output_dir", "overrides", "runs")
RUN_KEYS = ("name", "set", "grid")
#: Run names become directory names: letters, digits and ``_ . = + , -``, not starting with ``-`` or ``.``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+,-]*")
MAX_NAME_LENGTH = 160
#: What the sweep itself writes into its output directory; no run may be named so.
RESERVED_NAMES = ("sweep.json", "report.html", "report_files")
#: Keys the sweep decides for every run.
SWEEP_OWNED_KEYS = ("output_dir", "train.overwrite_output_dir")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, its group (the ``name:`` of its entry), the overrides that make it
    differ from the other runs (``key=value``, the entry's ``set`` then its grid point), and its
    validated config (``output_dir`` = the sweep's output directory / name)."""

    name: str
    group: str
    overrides: tuple[str, ...]
    config: RunConfig

    @property
    def path(self) -> Path:
        return Path(self.config.output_dir)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: where it came from, the overrides shared by every run, and the runs in order."""

    source: Path
    base: Path | None
    output_dir: Path
    overrides: tuple[str, ...]
    runs: tuple[SweepRun, ...]


def _yaml_value(value: Any) -> str:
    """``value`` as one line of YAML (without the document-end marker YAML adds after a plain scalar)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True).strip()
    return text.removesuffix("\n...").strip()


def override_text(key: str, value: Any) -> str:
    """``key=value`` with the value written as YAML, so that :func:`distalign.config.parse_overrides`
    reads back exactly ``value`` (a string "1.0" stays a string, a list stays a list)."""
    return f"{key}={_yaml_value(value)}"


def _overrides_of(value: Any, where: str) -> list[str]:
    """A sweep's ``overrides:``: a list of ``key=value`` strings, or a mapping of settings."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [override_text(k, v) for k, v in flatten(value).items()]
    if not isinstance(value, list) or not all(isinstance(item, str) and "=" in item for item in value):
        raise ConfigError(f"{where}: expected a list of key=value strings (e.g. [train.max_steps=4])")
    return list(value)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each grid key's last dotted part, or the whole key where two keys share a last part."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (short if last.count(short) == 1 else key) for key, short in zip(keys, last)}


def _safe(text: str) -> str:
    """``text`` with every character a run name may not hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=+,-]", "_", text) or "_"


def grid_points(group: str, grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, list[str]]]:
    """``(run name, overrides)`` of every point of ``grid`` (first key slowest), named
    ``GROUP-key=value-key2=value2`` by the keys' last dotted parts; no grid gives the group alone."""
    keys = list(grid)
    short = _short_keys(keys)
    points = []
    for values in itertools.product(*(grid[key] for key in keys)):
        parts = [f"{short[key]}={_safe(_yaml_value(value))}" for key, value in zip(keys, values)]
        overrides = [override_text(key, value) for key, value in zip(keys, values)]
        points.append(("-".join([group, *parts]), overrides))
    return points


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{where}: name {name!r} is not a safe directory name (letters, digits and _ . = + , - only, "
            "not starting with - or .)"
        )
    if name in RESERVED_NAMES:
        raise ConfigError(f"{where}: name {name!r} is reserved for the sweep's own files")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"{where}: name {name[:40]!r}... is over {MAX_NAME_LENGTH} characters")
    return name


def _entry_runs(entry: Any, where: str) -> list[tuple[str, str, list[str]]]:
    """``(name, group, overrides)`` of one ``runs:`` entry: its ``set`` then each point of its grid."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name, set and grid")
    unknown = [key for key in entry if key not in RUN_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a run takes: {', '.join(RUN_KEYS)})")
    group = _check_name(entry.get("name"), where)
    settings, grid = entry.get("set") or {}, entry.get("grid") or {}
    if not isinstance(settings, Mapping) or not isinstance(grid, Mapping):
        raise ConfigError(f"{where} ({group}): set and grid must be mappings of settings")
    fixed, grid = flatten(settings), flatten(grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where} ({group}): grid.{key} must be a non-empty list of values")
    for key in [*fixed, *grid]:
        if key in SWEEP_OWNED_KEYS:
            raise ConfigError(f"{where} ({group}): {key} is set by the sweep for every run")
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ConfigError(f"{where} ({group}): {both[0]} is both in set and in grid")
    own = [override_text(key, value) for key, value in fixed.items()]
    return [(name, group, own + point) for name, point in grid_points(group, grid)]


def parse_grid_options(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["loss.beta=0.1,0.2", "train.lr=1e-3,1e-4"]`` (the ``--grid`` options) -> ``{key: [values]}``;
    each comma-separated value is read as YAML, like an override's value."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(
                f"--grid {item!r} is not of the form key=value1,value2 (e.g. loss.beta=0.1,0.2)"
            )
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        try:
            grid[key] = [yaml.safe_load(value) for value in raw.split(",")]
        except yaml.YAMLError as err:
            raise ConfigError(f"--grid {item!r}: cannot parse a value: {err}") from None
    return grid


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def is_sweep_file(tree: Mapping[str, Any]) -> bool:
    """A sweep file has ``runs:`` or ``base:`` at the top level; a run config has neither."""
    return "runs" in tree or "base" in tree


def load_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    grid: Sequence[str] = (),
    output_dir: str | Path | None = None,
) -> Sweep:
    """Expand and validate a sweep file, or a run config with ``grid`` (``--grid`` options), into a
    :class:`Sweep`. ``overrides`` apply to every run after the file's own; ``output_dir`` replaces the
    file's (default: the file's, else the base config's ``output_dir``). Raises :class:`ConfigError`
    naming the file, the run and the field; reads files only, creates nothing."""
    path = Path(path)
    tree = _read_yaml_mapping(path)
    _refuse_owned_keys(overrides, "override")
    if is_sweep_file(tree):
        if grid:
            raise ConfigError(
                f"{path} is a sweep file: put the grid under one of its runs (grid:), not --grid"
            )
        return _sweep_from_file(path, tree, list(overrides), output_dir)
    points = parse_grid_options(grid)
    _refuse_owned_keys([f"{key}=" for key in points], "--grid")
    group = _check_name(_safe(path.stem).lstrip("-.") or "run", str(path))
    entries = [(name, group, point) for name, point in grid_points(group, points)]
    return _build(path, path, list(overrides), entries, output_dir)


def _refuse_owned_keys(overrides: Sequence[str], where: str) -> None:
    """The sweep alone places runs (``output_dir``) and never starts a finished run over."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in SWEEP_OWNED_KEYS:
            raise ConfigError(f"{where} {item!r}: {key} is set by the sweep for every run (use --output-dir)")


def _sweep_from_file(
    path: Path, tree: dict[str, Any], overrides: list[str], output_dir: str | Path | None
) -> Sweep:
    unknown = [key for key in tree if key not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (a sweep file takes: {', '.join(SWEEP_KEYS)})")
    base = None
    if tree.get("base") is not None:
        base = path.parent / str(tree["base"])
        if not base.is_file():
            raise ConfigError(f"{path}: base: {base} is not a file (the path is relative to the sweep file)")
    runs = tree.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: runs: expected a non-empty list of runs (each with a name)")
    entries = [run for i, entry in enumerate(runs) for run in _entry_runs(entry, f"{path}: runs[{i}]")]
    shared = _overrides_of(tree.get("overrides"), f"{path}: overrides")
    _refuse_owned_keys(shared, f"{path}: overrides:")
    shared += overrides
    default_dir = output_dir if output_dir is not None else tree.get("output_dir")
    return _build(path, base, shared, entries, default_dir)


def _check_unique(entries: Sequence[tuple[str, str, list[str]]], source: Path) -> None:
    seen: dict[str, int] = {}
    for index, (name, _, _) in enumerate(entries):
        if name in seen:
            raise ConfigError(
                f"{source}: two runs are named {name!r} (runs number {seen[name] + 1} and {index + 1} of the "
                "expansion); run names must be unique"
            )
        seen[name] = index


def _build(
    source: Path,
    base: Path | None,
    shared: list[str],
    entries: list[tuple[str, str, list[str]]],
    output_dir: str | Path | None,
) -> Sweep:
    """Validate every run's config (base + shared + the run's overrides + its output_dir)."""
    _check_unique(entries, source)
    if output_dir is None:
        output_dir = load_config(base, shared).output_dir
    out = Path(output_dir)
    runs = []
    for name, group, own in entries:
        where = override_text("output_dir", str(out / name))
        try:
            config = load_config(base, [*shared, *own, where])
        except ConfigError as err:
            raise ConfigError(f"{source}: run {name!r}: {err}") from None
        if config.train.overwrite_output_dir:
            raise ConfigError(
                f"{source}: run {name!r}: train.overwrite_output_dir=true would start the run over on every "
                "rerun of the sweep; delete a run's directory to train it again"
            )
        runs.append(SweepRun(name, group, tuple(own), config))
    return Sweep(source, base, out, tuple(shared), tuple(runs))


def select_runs(sweep: Sweep, only: Sequence[str]) -> list[SweepRun]:
    """The runs named in ``only`` (run names or group names), in sweep order; all runs if empty."""
    if not only:
        return list(sweep.runs)
    known = {run.name for run in sweep.runs} | {run.group for run in sweep.runs}
    missing = [name for name in only if name not in known]
    if missing:
        names = ", ".join(run.name for run in sweep.runs)
        raise ConfigError(
            f"--only {missing[0]}: no run or group of that name in {sweep.source} (runs: {names})"
        )
    return [run for run in sweep.runs if run.name in only or run.group in only]
