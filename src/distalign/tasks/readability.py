"""The "readability" task: explanations judged by Flesch reading ease, grade level, or brevity."""

from __future__ import annotations

from typing import Any

from distalign.rewards import build_reward
from distalign.rewards.base import check_choice
from distalign.tasks.base import TASKS, Task, expand_templates, split_prompts

TEMPLATES = (
    "Explain {topic} to a child.",
    "Explain {topic} in plain words.",
    "What is {topic}?",
    "Describe {topic} to someone who has never heard of it.",
    "Give a short explanation of {topic}.",
    "Why does {topic} matter?",
    "How would you teach {topic} to a beginner?",
    "Write a note for a newsletter about {topic}.",
)

TOPICS = (
    "photosynthesis",
    "gravity",
    "the water cycle",
    "inflation",
    "vaccines",
    "the internet",
    "climate change",
    "electricity",
    "volcanoes",
    "the stock market",
    "black holes",
    "recycling",
    "democracy",
    "compound interest",
    "the immune system",
    "machine learning",
    "earthquakes",
    "the moon's phases",
    "solar panels",
    "antibiotics",
    "supply and demand",
    "the human heart",
    "tides",
    "rainbows",
    "encryption",
    "evolution",
    "taxes",
    "sleep",
    "nutrition labels",
    "the seasons",
    "magnets",
    "bread baking",
    "credit scores",
    "plate tectonics",
    "the printing press",
    "sound waves",
    "bees and pollination",
    "jet engines",
    "the periodic table",
    "time zones",
)

#: objective -> (reward spec, what the description says about it)
OBJECTIVES: dict[str, tuple[dict[str, Any], str]] = {
    "flesch": (
        {"name": "readability_flesch", "alias": "flesch_reading_ease"},
        "Flesch reading ease (higher = easier)",
    ),
    "grade": (
        {"name": "readability_grade", "alias": "neg_fk_grade", "direction": "minimize"},
        "minus the Flesch-Kincaid grade level (simpler is better)",
    ),
    "brevity": ({"name": "length", "alias": "brevity"}, "minus the word count (shorter is better)"),
}


@TASKS.register("readability")
def readability_task(
    *, objective: str = "flesch", heldout_fraction: float = 0.2, system_prompt: str | None = None
) -> Task:
    """Explanations of everyday and science topics (8 templates x 40 topics = 320 prompts), for designer
    objectives; ``objective``: "flesch" (reading ease), "grade" (minus FK grade) or "brevity" (minus words)."""
    check_choice("objective", objective, tuple(OBJECTIVES))
    reward_spec, meaning = OBJECTIVES[objective]
    prompts = expand_templates(TEMPLATES, {"topic": TOPICS})
    train, heldout = split_prompts(prompts, heldout_fraction)
    return Task(
        name="readability",
        description=f"Explanations of topics; gold reward = {meaning}.",
        train_prompts=train,
        heldout_prompts=heldout,
        gold_reward=build_reward(reward_spec),
        system_prompt=system_prompt,
        settings={
            "objective": objective,
            "heldout_fraction": heldout_fraction,
            "system_prompt": system_prompt,
        },
    )
