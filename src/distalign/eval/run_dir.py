"""Reading a run directory: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (the training log),
``eval/eval.json`` (:class:`~distalign.stats.metrics.EvalResult`) and the PNGs under ``plots/`` and
``eval/``, into a :class:`RunSummary` that the report's sections render. A missing or unreadable
piece is listed in ``problems``, never raised: the report still shows the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distalign.eval.plots import read_metrics_jsonl
from distalign.stats.metrics import EvalResult


@dataclass
class RunSummary:
    """What could be read from one run directory; ``problems`` lists what could not."""

    name: str
    path: Path
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalResult | None = None
    pngs: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The loss name from the config (``loss.name``), or "?" when unknown."""
        loss = (self.config or {}).get("loss")
        name = loss.get("name") if isinstance(loss, dict) else loss
        return str(name) if name is not None else "?"


#: Sections no run config lacks (a run saves every section, every default written out).
RUN_CONFIG_SECTIONS = frozenset({"model", "loss"})


def not_a_run_directory(path: Path) -> str | None:
    """Why ``path`` is not the output directory of a distalign run, or None when it is one (finished
    or still running). A run writes its resolved config to ``config.yaml`` before its first step; a
    folder without one, or whose ``config.yaml`` is not a run config (top-level keys that are not
    run-config sections, or no model or loss section: an unrelated project's), is refused rather than
    written into."""
    from distalign.config import RunConfig

    config_file = path / "config.yaml"
    if not path.is_dir():
        return f"no such directory {path}" if not path.exists() else f"{path} is not a directory"
    if not config_file.is_file():
        return f"{path} has no config.yaml"
    try:
        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return f"{config_file} is not readable YAML ({type(err).__name__})"
    keys = set(loaded) if isinstance(loaded, dict) else set()
    unknown = sorted(keys - set(RunConfig.model_fields))
    missing = sorted(RUN_CONFIG_SECTIONS - keys)
    if missing or unknown:
        what = f"no {', '.join(missing)} section" if missing else f"unknown sections {', '.join(unknown)}"
        return f"{config_file} is not a distalign run config ({what})"
    return None


def load_run(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """Read a run directory; never raises for missing or malformed pieces (they go to ``problems``)."""
    path = Path(run_dir)
    run = RunSummary(name=name or path.name, path=path)
    if not path.is_dir():
        run.problems.append(f"{path} is not a directory")
        return run
    try:
        loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        run.config = loaded if isinstance(loaded, dict) else None
    except FileNotFoundError:
        run.problems.append("no config.yaml")
    except (OSError, yaml.YAMLError) as err:
        run.problems.append(f"config.yaml unreadable: {err}")
    if (path / "metrics.jsonl").is_file():
        run.metrics = read_metrics_jsonl(path / "metrics.jsonl")
    else:
        run.problems.append("no metrics.jsonl")
    eval_path = path / "eval" / "eval.json"
    if eval_path.is_file():
        try:
            run.eval = EvalResult.load(eval_path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            run.problems.append(f"eval/eval.json unreadable: {err!r}")
    else:
        run.problems.append("no eval/eval.json (run `distalign eval` to add gold-reward results)")
    run.pngs = sorted(p for sub in ("plots", "eval") for p in (path / sub).glob("*.png") if p.is_file())
    return run
