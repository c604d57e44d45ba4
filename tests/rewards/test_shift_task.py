"""The built-in distribution-shift task: sources, proportions, labels from the gold reward, noise."""

from __future__ import annotations

from collections import Counter

import pytest

from distalign.tasks import get_task
from distalign.tasks.shift import DEFAULT_SOURCES, GOLDEN, build_shift_dataset, flip_labels, source_task

GOOD, BAD = " Wonderful, I loved it.", " Terrible, I hated it."


def _samplers(seen):
    def sampler_for(name):
        def sample(prompts, k):
            seen[name] = seen.get(name, 0) + len(prompts)
            return [[f"{BAD} ({name})", f"{GOOD} ({name})"][:k] for _ in prompts]

        return sample

    return {s.name: sampler_for(s.name) for s in DEFAULT_SOURCES}


def test_rows_come_from_every_source_in_proportion_and_are_labelled_by_the_gold_reward():
    task = get_task("sentiment")
    seen = {}
    rows, counts = build_shift_dataset(task, _samplers(seen), k=2, num_prompts=40, seed=3)
    assert counts["pairs"] == 40 and counts["flipped"] == 0
    assert Counter(r["source"] for r in rows) == {s.name: 10 for s in DEFAULT_SOURCES}
    assert all(r["chosen"].startswith(GOOD) and r["chosen"].endswith(f"({r['source']})") for r in rows)
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert all(r["prompt"] in task.prompts("train") for r in rows)  # the plain prompt, never the style


def test_label_noise_flips_about_that_fraction_and_is_recorded():
    rows, counts = build_shift_dataset(
        get_task("sentiment"), _samplers({}), k=2, num_prompts=200, label_noise=0.3
    )
    flipped = [r for r in rows if r["label_flipped"]]
    assert len(flipped) == counts["flipped"] and 40 <= len(flipped) <= 80
    assert all(r["chosen_reward"] < r["rejected_reward"] for r in flipped)
    noisy = flip_labels(rows, 0.2, seed=1)
    assert sum(a["chosen"] != b["chosen"] for a, b in zip(rows, noisy)) == sum(
        a["label_flipped"] != b["label_flipped"] for a, b in zip(rows, noisy)
    )


def test_style_sources_sample_with_their_hidden_system_prompt():
    task = get_task("sentiment")
    hype = next(s for s in DEFAULT_SOURCES if s.name == "hype")
    assert "advertisement" in source_task(task, hype).messages("x")[0]["content"]
    golden = next(s for s in DEFAULT_SOURCES if s.name == GOLDEN)
    assert source_task(task, golden) is task


@pytest.mark.parametrize("noise", [-0.1, 0.5])
def test_bad_noise_is_refused(noise):
    with pytest.raises(ValueError, match="label_noise"):
        build_shift_dataset(get_task("sentiment"), _samplers({}), num_prompts=8, label_noise=noise)
