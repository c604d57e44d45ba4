"""The "sentiment" task: short reviews and opinions, judged by VADER compound sentiment."""

from __future__ import annotations

from distalign.rewards import build_reward
from distalign.rewards.base import check_choice
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


# ``pool="large"`` adds these to the templates and items above (the base prompts stay, unchanged, a
# subset of the large pool; the hash split keeps each of them on the same side).
EXTRA_TEMPLATES = (
    "Leave a star rating and a line of feedback for {item}.",
    "A friend is thinking about trying {item}. What would you tell them?",
    "Write a short text message to your sister about {item}.",
    "How was {item}? Be honest.",
    "Jot down a quick note in your diary about {item}.",
    "Would you recommend {item}? Say why in a sentence or two.",
    "Write the first line of a blog post about {item}.",
    "Reply to a survey asking what you think of {item}.",
)

EXTRA_ITEMS = (
    "the sushi place near the station",
    "your new mattress",
    "the swimming pool in town",
    "an audiobook you finished last week",
    "the vegetarian cookbook",
    "the night bus home",
    "a used car you bought",
    "the escape room",
    "the pottery workshop",
    "your noise-cancelling earbuds",
    "the street food festival",
    "a robot vacuum cleaner",
    "the flight to Lisbon",
    "the new season of your favourite show",
    "the bookshop on the high street",
    "a meal-kit subscription",
    "the music festival in July",
    "your landlord",
    "the walking tour of the old town",
    "a secondhand bicycle",
    "the zoo",
    "the tea room by the river",
    "a standing desk",
    "the plumber who came on Monday",
    "the children's playground",
    "a budget airline",
    "the comedy show",
    "your electric toothbrush",
    "the night market",
    "a photography course",
    "the campsite by the lake",
    "the new shopping centre",
    "a fitness tracker",
    "the vet clinic",
    "the Thai takeaway",
    "the art supply store",
    "a mystery novel",
    "the ski resort",
    "the laundrette",
    "a slow cooker",
    "the aquarium",
    "the wedding venue",
    "your internet provider",
    "the dance class",
    "a travel backpack",
    "the cinema's new seats",
    "the organic vegetable box",
    "the post office queue",
    "a houseplant from the garden centre",
    "the roller coaster",
)

#: pool -> (templates, items): "base" is the original 400 prompts, "large" 16 templates x 100 items.
POOLS = {
    "base": (TEMPLATES, ITEMS),
    "large": (TEMPLATES + EXTRA_TEMPLATES, ITEMS + EXTRA_ITEMS),
}


@TASKS.register("sentiment")
def sentiment_task(
    *, pool: str = "base", heldout_fraction: float = 0.2, system_prompt: str | None = None
) -> Task:
    """Reviews and opinions; gold reward = VADER compound in [-1, 1]. ``pool``: "base" (8 templates x 50
    items = 400 prompts) or "large" (16 templates x 100 items = 1600 prompts, the base ones included)."""
    check_choice("pool", pool, tuple(POOLS))
    templates, items = POOLS[pool]
    prompts = expand_templates(templates, {"item": items})
    train, heldout = split_prompts(prompts, heldout_fraction)
    return Task(
        name="sentiment",
        description="Short reviews and opinions; gold reward = VADER compound sentiment in [-1, 1] (positive is better).",
        train_prompts=train,
        heldout_prompts=heldout,
        gold_reward=build_reward({"name": "vader_sentiment", "alias": "vader_compound"}),
        system_prompt=system_prompt,
        settings={"pool": pool, "heldout_fraction": heldout_fraction, "system_prompt": system_prompt},
    )
