"""The "keyword" task: a pointwise constraint for f-DPG (the completion mentions a word or a topic).

The gold reward is boolean, 1.0 when the constraint holds: the target distribution of f-DPG's
pointwise constraint is the base model conditioned on that event, b(y) in {0, 1}.
"""

from __future__ import annotations

from collections.abc import Sequence

from distalign.rewards import build_reward
from distalign.tasks.base import TASKS, Task, expand_templates, split_prompts

TEMPLATES = (
    "Write a sentence about {subject}.",
    "Tell a very short story about {subject}.",
    "Describe {subject} in one sentence.",
    "Write a line of a diary entry about {subject}.",
    "Say something about {subject}.",
    "Write a caption for a photo of {subject}.",
    "Continue the sentence: Yesterday, {subject}",
    "Write a message to a friend about {subject}.",
)

SUBJECTS = (
    "a walk in the park",
    "your morning routine",
    "a rainy afternoon",
    "an old bicycle",
    "a trip to the mountains",
    "a new neighbour",
    "the last day of school",
    "a lost cat",
    "a busy market",
    "a quiet library",
    "a football match",
    "a family dinner",
    "the first snow",
    "a broken umbrella",
    "a road trip",
    "a birthday party",
    "a visit to the doctor",
    "a garden in spring",
    "a late train",
    "a small village",
    "a night sky",
    "a street musician",
    "a job interview",
    "a picnic by the lake",
    "a crowded beach",
    "a chess game",
    "a science fair",
    "an empty office",
    "a winter morning",
    "a long flight",
    "a bakery at dawn",
    "a thunderstorm",
    "a museum visit",
    "a city at night",
    "a fishing trip",
)

#: Built-in topics for a topic constraint: the completion must mention at least one of the words.
TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "amazing": ("amazing",),
    "science": ("science", "scientist", "experiment", "research", "laboratory"),
    "food": ("food", "bread", "cake", "soup", "delicious", "cook"),
    "music": ("music", "song", "sing", "guitar", "melody"),
    "weather": ("rain", "sun", "snow", "wind", "storm", "weather"),
}


@TASKS.register("keyword")
def keyword_task(
    *,
    topic: str = "amazing",
    keywords: Sequence[str] | None = None,
    heldout_fraction: float = 0.2,
    system_prompt: str | None = None,
) -> Task:
    """Everyday subjects (8 templates x 35 subjects = 280 prompts); gold reward = 1.0 when the completion
    contains any of the keywords as a whole word (case-insensitive), else 0.0. ``keywords`` overrides
    the built-in ``topic`` word list (topics: amazing, science, food, music, weather)."""
    if keywords is None:
        if topic not in TOPIC_KEYWORDS:
            raise ValueError(
                f"topic={topic!r} is not built in; choose one of {sorted(TOPIC_KEYWORDS)} or set keywords"
            )
        words = list(TOPIC_KEYWORDS[topic])
    else:
        words = [keywords] if isinstance(keywords, str) else list(keywords)
    prompts = expand_templates(TEMPLATES, {"subject": SUBJECTS})
    train, heldout = split_prompts(prompts, heldout_fraction)
    reward = build_reward({"name": "keyword", "keywords": words, "alias": "keyword_constraint"})
    return Task(
        name="keyword",
        description=f"Everyday subjects; gold reward = 1.0 if the completion mentions any of {words}, else 0.0.",
        train_prompts=train,
        heldout_prompts=heldout,
        gold_reward=reward,
        system_prompt=system_prompt,
        settings={"keywords": words, "heldout_fraction": heldout_fraction, "system_prompt": system_prompt},
    )
