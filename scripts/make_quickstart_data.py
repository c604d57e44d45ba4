"""Write the quickstart datasets shipped in src/distalign/resources (deterministic, fixed seed).

The task is deliberately easy: a prompt names something to review and the preferred completion is a
short positive sentence, the dispreferred one a short negative sentence. A tiny randomly initialised
model learns the preference from the sentiment words within a few dozen steps.

    python scripts/make_quickstart_data.py [--out-dir src/distalign/resources] [--seed 0]

Outputs: quickstart_pairs.jsonl (240 paired rows), quickstart_unpaired.jsonl (140 positive and 100
negative rows, each on its own prompt) and quickstart_prompts.jsonl (64 prompt-only rows).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    # source: (things, places, joining word)
    "food": (
        ("pasta", "soup", "burger", "coffee", "pizza", "salad", "curry", "tacos", "pancakes", "ramen"),
        ("corner cafe", "night market", "hotel restaurant", "food truck", "family diner", "station bakery"),
        "at",
    ),
    "gadgets": (
        ("headphones", "phone case", "desk lamp", "keyboard", "blender", "backpack", "kettle", "speaker"),
        ("online store", "mall shop", "airport kiosk", "electronics outlet", "street market", "big retailer"),
        "from",
    ),
    "stays": (
        ("room", "breakfast", "pool", "front desk", "bed", "view", "spa", "balcony"),
        (
            "seaside hotel",
            "city hostel",
            "mountain lodge",
            "airport inn",
            "country guesthouse",
            "river resort",
        ),
        "at",
    ),
}
PROMPT_TEMPLATES = (
    "Review: the {thing} {joiner} the {place}.",
    "Your opinion of the {thing} {joiner} the {place}:",
)
POSITIVE_WORDS = (
    "wonderful",
    "delightful",
    "excellent",
    "lovely",
    "fantastic",
    "superb",
    "brilliant",
    "perfect",
)
NEGATIVE_WORDS = (
    "awful",
    "terrible",
    "disappointing",
    "dreadful",
    "horrible",
    "miserable",
    "poor",
    "unpleasant",
)
POSITIVE_TEMPLATES = (
    "It was {a} and I would gladly recommend it.",
    "Simply {a}, easily the best I have had.",
    "A {a} experience from start to finish.",
    "I loved it, everything felt {a} and {b}.",
    "Honestly {a}, worth every penny.",
    "What a {a} surprise, I left very happy.",
    "Everything was {a}; I would happily return tomorrow.",
    "Great value and {a} quality, highly recommended.",
    "I enjoyed every moment, it was {a}.",
    "Truly {a}, my friends loved it too.",
)
NEGATIVE_TEMPLATES = (
    "It was {a} and I would never recommend it.",
    "Simply {a}, easily the worst I have had.",
    "A {a} experience from start to finish.",
    "I hated it, everything felt {a} and {b}.",
    "Honestly {a}, a waste of money.",
    "What a {a} letdown, I left very annoyed.",
    "Everything was {a}; I will never go back.",
    "Bad value and {a} quality, avoid it.",
    "I regretted every moment, it was {a}.",
    "Truly {a}, my friends hated it too.",
)


def all_prompts() -> list[tuple[str, str]]:
    """Every (source, prompt) the templates can make, in a fixed order."""
    prompts = []
    for source, (things, places, joiner) in SUBJECTS.items():
        for thing in things:
            for place in places:
                for template in PROMPT_TEMPLATES:
                    prompts.append((source, template.format(thing=thing, joiner=joiner, place=place)))
    return prompts


def sentence(rng: random.Random, positive: bool) -> str:
    """A short review sentence, with a leading space so it continues the prompt's text."""
    templates, words = (
        (POSITIVE_TEMPLATES, POSITIVE_WORDS) if positive else (NEGATIVE_TEMPLATES, NEGATIVE_WORDS)
    )
    first, second = rng.sample(words, 2)
    return " " + rng.choice(templates).format(a=first, b=second)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parents[1] / "src/distalign/resources")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = all_prompts()

    pair_prompts = rng.sample(prompts, 240)
    pairs = [
        {"prompt": p, "chosen": sentence(rng, True), "rejected": sentence(rng, False), "source": s}
        for s, p in pair_prompts
    ]
    unpaired_prompts = rng.sample(prompts, 240)
    labels = [True] * 140 + [False] * 100
    rng.shuffle(labels)
    unpaired = [
        {"prompt": p, "completion": sentence(rng, label), "label": label, "source": s}
        for (s, p), label in zip(unpaired_prompts, labels)
    ]
    prompt_only = [{"prompt": p, "source": s} for s, p in rng.sample(prompts, 64)]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "quickstart_pairs.jsonl", pairs)
    write_jsonl(args.out_dir / "quickstart_unpaired.jsonl", unpaired)
    write_jsonl(args.out_dir / "quickstart_prompts.jsonl", prompt_only)
    print(
        f"wrote {len(pairs)} pairs, {len(unpaired)} unpaired rows, {len(prompt_only)} prompts to {args.out_dir}"
    )


if __name__ == "__main__":
    main()
