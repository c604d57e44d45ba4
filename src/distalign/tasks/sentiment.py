"""The "sentiment" task: short reviews and opinions, judged by VADER compound sentiment."""

from __future__ import annotations

from distalign.rewards import build_reward
from distalign.tasks.base import TASKS, Task, expand_templates, split_prompts

TEMPLATES = (
    "Write a one-sentence review of {item}.",
    "Give your honest opinion of {item} in a few words.",
    "Describe your experience with {item}.",
    "What did you think of {item}?",
    "Write a short comment about {item} for a friend.",
    "Summarise how you feel about {item} in one sentence.",
    "Post a quick review of {item} online.",
    "Tell me briefly what {item} was like.",
)

ITEMS = (
    "the new coffee shop downtown",
    "the hotel you stayed at last summer",
    "your latest phone",
    "the movie you watched yesterday",
    "the restaurant on the corner",
    "a budget laptop",
    "the train ride to the coast",
    "your new running shoes",
    "the museum's modern art wing",
    "the local bakery",
    "a science fiction novel",
    "the city bus service",
    "your online grocery order",
    "the concert last night",
    "a wireless keyboard",
    "the neighbourhood gym",
    "a cooking class",
    "the airport lounge",
    "your favourite video game",
    "the public library",
    "a camping tent",
    "the dentist's office",
    "a streaming service",
    "the farmers market",
    "a pair of headphones",
    "the weekend hiking trail",
    "a board game night",
    "the pizza delivery",
    "a language learning app",
    "the theme park",
    "an electric scooter",
    "the customer support call",
    "a documentary about oceans",
    "the hair salon",
    "a fantasy book series",
    "the car rental company",
    "the yoga studio",
    "a kitchen blender",
    "the coworking space",
    "the ferry crossing",
    "a new pair of glasses",
    "the jazz bar",
    "the campus cafeteria",
    "a smart watch",
    "the bike repair shop",
    "the holiday cottage",
    "a podcast about history",
    "the ice cream parlour",
    "a winter jacket",
    "the botanical garden",
)


@TASKS.register("sentiment")
def sentiment_task(*, heldout_fraction: float = 0.2, system_prompt: str | None = None) -> Task:
    """Reviews and opinions (8 templates x 50 items = 400 prompts); gold reward = VADER compound in [-1, 1]."""
    prompts = expand_templates(TEMPLATES, {"item": ITEMS})
    train, heldout = split_prompts(prompts, heldout_fraction)
    return Task(
        name="sentiment",
        description="Short reviews and opinions; gold reward = VADER compound sentiment in [-1, 1] (positive is better).",
        train_prompts=train,
        heldout_prompts=heldout,
        gold_reward=build_reward({"name": "vader_sentiment", "alias": "vader_compound"}),
        system_prompt=system_prompt,
        settings={"heldout_fraction": heldout_fraction, "system_prompt": system_prompt},
    )
