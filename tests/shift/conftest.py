"""Helpers for the shift tests: tiny two-source data files and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

TOPICS = ["the weather", "a soup recipe", "learning to swim", "Roman history", "saving money", "a good book"]


def formal(topic: str, i: int) -> str:
    return (
        f"Certainly. Regarding {topic}, I would recommend a careful and measured approach; "
        f"consider the evidence and proceed thoughtfully (note {i})."
    )


def slangy(topic: str, i: int) -> str:
    return f"omg {topic} is sooo awesome lol!!! totally epic vibes, u gotta try it bro #{i}"


def paired_rows(per_source: int = 20, *, sources=("human", "bot")) -> list[dict]:
    """Paired rows of two sources whose responses differ in style (formal vs slang; not just casing:
    the MiniLM tokenizer is uncased)."""
    rows = []
    for source, style in zip(sources, (formal, slangy)):
        for i in range(per_source):
            topic = TOPICS[i % len(TOPICS)]
            rows.append(
                {
                    "prompt": f"Tell me about {topic}.",
                    "chosen": style(topic, i),
                    "rejected": f"I do not know about {topic}.",
                    "source": source,
                    "extra": i,
                }
            )
    random.Random(0).shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def shift_main(monkeypatch):
    """``distalign.cli.main`` (the shift command is one of its commands)."""
    from distalign import cli

    return cli.main
