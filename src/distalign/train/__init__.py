"""Training loops: ``offline`` (preference / labelled data) and ``online`` (sample -> score -> step)."""

from __future__ import annotations

import os
from pathlib import Path

from distalign.config import RunConfig
from distalign.errors import SetupError


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse, before anything is loaded or written, an ``output_dir`` that cannot become a run
    directory: an existing file, or a directory (or, if it does not exist yet, its nearest existing
    parent) that this process cannot write to. Creates nothing."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise SetupError(f"output_dir {path}: exists and is not a directory; choose another output_dir")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"output_dir {path}: {existing} is a file, so {path} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        raise SetupError(f"output_dir {path}: {what}; choose another output_dir")


def run_training(config: RunConfig) -> Path:
    """Run the loop the config asks for (online when it has an ``online`` section) and return the run
    directory. The output directory is checked first, before any model or data is loaded."""
    check_output_dir(config.output_dir)
    if config.online is not None:
        from distalign.train.online import train_online

        return train_online(config)
    from distalign.train.offline import train_offline

    return train_offline(config)
