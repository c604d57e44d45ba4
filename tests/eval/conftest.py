"""Run directories as `distalign train` + `distalign eval` leave them, built in milliseconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from distalign.stats.metrics import evaluate_samples

PROMPTS = [f"Held-out prompt {i}: tell me about <b>thing {i}</b> & more" for i in range(12)]


def write_run(root, name, *, loss="dpo", shift=0.0, steps=20, lora=False, seed=0):
    """A run directory with config.yaml, metrics.jsonl (with DPO's implicit rewards/*), eval/eval.json
    and eval/samples.jsonl (2 samples per prompt; the policy's gold rewards ``shift`` above the
    reference's on average)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    config = {
        "model": {"name": "tiny", "lora": {"enabled": lora, "r": 16}},
        "data": {"path": "builtin:quickstart_pairs.jsonl", "limit": None},
        "loss": {"name": loss, "beta": 0.1},
        "aggregator": {"name": "mean"},
        "train": {"lr": 1e-3, "batch_size": 16, "max_steps": steps},
        "eval": {"num_prompts": len(PROMPTS), "samples_per_prompt": 2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = [
        {"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.02 * s, "rewards/chosen": 0.01 * s}
        for s in range(1, steps + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "dominance.json").write_text(json.dumps({"rows": 240, "w1": 0.1}))
    rng = np.random.default_rng(seed)
    prompt_index = np.repeat(np.arange(len(PROMPTS)), 2)
    reference = rng.normal(size=prompt_index.size)
    policy = reference + shift + rng.normal(scale=0.3, size=prompt_index.size)
    texts = {
        m: [f"{m} says <i>{i}</i> \x02 & done" for i in range(prompt_index.size)]
        for m in ("policy", "reference")
    }
    result = evaluate_samples(
        texts["policy"],
        policy,
        texts["reference"],
        reference,
        policy_logprobs=-np.full(prompt_index.size, 5.0),
        reference_logprobs=-np.full(prompt_index.size, 5.0 + abs(shift)),
        task="sentiment",
        reward="vader",
        n_boot=100,
        groups=prompt_index,
    )
    result.samples_file = "samples.jsonl"
    result.save(run / "eval" / "eval.json")
    rows = [
        {
            "model": model,
            "prompt": PROMPTS[p],
            "completion": texts[model][i],
            "gold_reward": float(rewards[i]),
        }
        for model, rewards in (("policy", policy), ("reference", reference))
        for i, p in enumerate(prompt_index)
    ]
    (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def two_runs(tmp_path):
    """Two evaluated runs sharing one reference: a DPO run that beats it and an IPO run that does not."""
    return [
        write_run(tmp_path / "runs", "dpo", shift=0.8),
        write_run(tmp_path / "runs", "ipo", loss="ipo", shift=0.0, steps=12, lora=True),
    ]
