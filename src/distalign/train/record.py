"""What a finished run's config alone does not say (the rows it trained on, their fingerprint, the
steps, the library versions): :class:`TrainingRecord`, saved as ``final/distalign_training.json`` and read
by the model card and the report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRAINING_RECORD = "distalign_training.json"


def library_versions() -> dict[str, str]:
    """Versions of distalign and of the libraries that compute the training step."""
    import peft
    import torch
    import transformers

    import distalign

    return {module.__name__: module.__version__ for module in (distalign, torch, transformers, peft)}


@dataclass
class TrainingRecord:
    """What the config alone does not say about a finished run; saved as ``final/distalign_training.json``.

    ``data_source``: where the rows came from (``data.path``, or the online loop's prompt source);
    ``data_kind``: paired, unpaired, listwise or prompt; ``rows``: rows trained on, after tokenisation
    and filtering; ``data_fingerprint``: :func:`~distalign.models.fingerprint.data_fingerprint` of the
    tokenised rows (the data key of the reference log-prob cache); ``steps``: optimizer steps taken;
    ``processes``: processes that trained; ``versions``: distalign and the libraries that shape it.
    """

    data_source: str
    data_kind: str
    rows: int
    data_fingerprint: str
    steps: int
    processes: int = 1
    versions: dict[str, str] = field(default_factory=library_versions)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TRAINING_RECORD
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TrainingRecord | None:
        """The record in ``directory``, or None when there is none (a run saved before cards existed)."""
        path = Path(directory) / TRAINING_RECORD
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})
