"""The large sentiment pool, the ``wide`` shift sources and resumable chunked sampling (no model)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from distalign.cli import main
from distalign.errors import ConfigError
from distalign.tasks import get_task, provenance_path
from distalign.tasks.base import is_heldout
from distalign.tasks.sampler import make_task_dataset
from distalign.tasks.shift import SOURCE_SETS, WIDE_SOURCES, build_shift_dataset, source_task
from distalign.tasks.shift_chunks import build_shift_dataset_chunked, chunk_seed

WORDS = (" Wonderful, I loved it.", " It was fine.", " Terrible, I hated it.", " Great value.", " Awful.")


def test_large_pool_is_big_enough_disjoint_and_keeps_the_base_prompts_on_their_side():
    base, large = get_task("sentiment"), get_task("sentiment", pool="large")
    assert (len(base.train_prompts), len(base.heldout_prompts)) == (319, 81)  # unchanged
    train, heldout = large.prompts("train"), large.prompts("heldout")
    assert len(train) >= 1100 and len(heldout) >= 256
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    assert set(base.train_prompts) <= set(train) and set(base.heldout_prompts) <= set(heldout)
    assert all(is_heldout(p, 0.2) for p in heldout) and large.settings["pool"] == "large"
    with pytest.raises(ValueError, match="pool"):
        get_task("sentiment", pool="huge")


def fake_factory(calls):
    """A sampler per (source, seed): seeded choices of canned sentences, so chunks are reproducible."""

    def make(source, seed):
        rng = np.random.default_rng(seed)

        def sample(prompts, k):
            calls.append((source.name, len(prompts)))
            return [
                [f"{WORDS[i]} ({source.name})" for i in rng.choice(len(WORDS), k, False)] for _ in prompts
            ]

        return sample

    return make


def test_wide_sources_give_every_source_its_share_of_pairs():
    task = get_task("sentiment", pool="large")
    samplers = {s.name: fake_factory([])(s, 0) for s in WIDE_SOURCES}
    rows, counts = build_shift_dataset(task, samplers, sources=SOURCE_SETS["wide"], k=3, num_prompts=880)
    per_source = Counter(r["source"] for r in rows)
    assert set(per_source) == {"golden", "hot", "cold", "pirate"}
    assert all(n >= 200 for n in per_source.values()) and len(rows) >= 800
    assert counts["per_source"] == dict(per_source) and counts["prompts"] == 880
    assert all(r["group"] == r["source"] and r["chosen_reward"] > r["rejected_reward"] for r in rows)


def test_instruction_sources_hide_their_instruction_from_the_rows():
    task = get_task("sentiment", pool="large")
    pirate = next(s for s in WIDE_SOURCES if s.name == "pirate")
    assert source_task(task, pirate).messages("Rate it.") == [
        {"role": "user", "content": "Rate it. Answer like a pirate."}
    ]
    assert task.messages("Rate it.") == [{"role": "user", "content": "Rate it."}]
    rows, _ = build_shift_dataset(
        task, {s.name: fake_factory([])(s, 0) for s in WIDE_SOURCES}, sources=WIDE_SOURCES, num_prompts=40
    )
    assert all("pirate" not in r["prompt"] for r in rows)


class Interrupted(Exception):
    pass


def run_chunked(work_dir, factory, **kwargs):
    return build_shift_dataset_chunked(
        get_task("sentiment", pool="large"),
        factory,
        work_dir,
        sources=WIDE_SOURCES,
        k=3,
        seed=5,
        num_prompts=40,
        chunk_size=4,
        label_noise=0.2,
        **kwargs,
    )


def test_an_interrupted_run_resumes_and_gives_the_same_rows(tmp_path):
    full_calls = []
    expected = run_chunked(tmp_path / "full", fake_factory(full_calls))
    assert len(full_calls) == 12  # 4 sources x 10 prompts in chunks of 4 -> 3 chunks each

    calls = []

    def dies_after_one_chunk(source, seed):
        if calls:
            raise Interrupted
        return fake_factory(calls)(source, seed)

    with pytest.raises(Interrupted):
        run_chunked(tmp_path / "resumed", dies_after_one_chunk)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["golden-0000.json", "plan.json"]
    loaded = []
    resumed = run_chunked(
        tmp_path / "resumed",
        fake_factory(calls),
        on_chunk=lambda name, n, was_loaded: loaded.append(was_loaded),
    )
    assert resumed == expected
    assert len(calls) == 12 and loaded == [True] + [False] * 11  # only the missing chunks were sampled
    assert chunk_seed(5, 0, 0) != chunk_seed(5, 0, 1) != chunk_seed(5, 1, 0)


def test_a_work_dir_of_other_settings_is_refused(tmp_path):
    run_chunked(tmp_path, fake_factory([]))
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["k"] == 3 and [s["name"] for s in plan["sources"]] == ["golden", "hot", "cold", "pirate"]
    with pytest.raises(ValueError, match="seed"):
        build_shift_dataset_chunked(
            get_task("sentiment", pool="large"),
            fake_factory([]),
            tmp_path,
            sources=WIDE_SOURCES,
            k=3,
            seed=6,
            num_prompts=40,
            chunk_size=4,
        )


def test_data_make_samples_the_wide_sources_on_the_large_pool(tmp_path):
    # The tiny model's text scores 0 everywhere, so every prompt ties: this checks the wiring only.
    output = tmp_path / "shift.jsonl"
    args = ["data", "make", "sentiment", "--kind", "shift", "--sources", "wide", "--model", "tiny"]
    args += ["--task-setting", "pool=large", "--chat-template", "on", "--num-prompts", "8", "--k", "2"]
    assert main([*args, "--max-new-tokens", "2", "--output", str(output)]) == 0
    provenance = json.loads(provenance_path(output).read_text())
    assert [s["name"] for s in provenance["sources"]] == ["golden", "hot", "cold", "pirate"]
    assert provenance["sources"][3]["instruction"] == "Answer like a pirate."
    assert provenance["task_settings"]["pool"] == "large" and provenance["counts"]["prompts"] == 8


def test_an_unknown_source_set_is_refused_before_loading_a_model(tmp_path):
    with pytest.raises(ConfigError, match="--sources 'nope'"):
        make_task_dataset(
            "sentiment", tmp_path / "x.jsonl", model_name="/nonexistent", kind="shift", source_set="nope"
        )
