"""Training loops: ``offline`` (preference / labelled data) and ``online`` (sample -> score -> step)."""

from __future__ import annotations

from pathlib import Path

from distalign.config import RunConfig


def run_training(config: RunConfig) -> Path:
    """Run the loop the config asks for (online when it has an ``online`` section) and return the run directory."""
    if config.online is not None:
        from distalign.train.online import train_online

        return train_online(config)
    from distalign.train.offline import train_offline

    return train_offline(config)
