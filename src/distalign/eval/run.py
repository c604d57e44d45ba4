"""``distalign eval``: sample the policy and the reference on held-out prompts, score, compare, plot.

Both models draw ``samples_per_prompt`` exact ancestral samples (temperature 1, no truncation of the
distribution) for the same prompts; the policy's samples are also scored by the reference
(teacher-forced), so ``log pi(y) - log ref(y)`` on y ~ pi is an unbiased KL(pi || ref) estimate. Gold
rewards come from the task; intervals from a bootstrap over prompts. Outputs go to ``OUT/eval.json``
(:class:`~distalign.stats.metrics.EvalResult`), ``OUT/samples.jsonl`` and PNGs.

The reference's samples depend only on the reference, the prompts and the seed, so they can be drawn
once and shared by the evaluations of several policies (``reference_samples=``): that is what
``distalign demo`` does, and why two runs against one reference show the same reference numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distalign.config import ConfigError, RunConfig, load_config
from distalign.config.evaluation import EvalConfig
from distalign.data.designer import FittedDesigner, designer_for_run
from distalign.eval.outcome import EvalOutcome, EvalPrompts, ModelSamples, write_eval
from distalign.stats.dominance import dominance_metrics
from distalign.stats.metrics import evaluate_samples, mean_with_ci
from distalign.tasks import Task, get_task, select_prompts
from distalign.tasks.sampler import model_device, render_task_prompts, uses_chat_template

#: Offsets of the sampling seeds, so the policy's and the reference's draws are independent streams.
_REFERENCE_STREAM, _POLICY_STREAM = 0, 1_000_003


def _task(cfg: EvalConfig) -> Task:
    try:
        return get_task(cfg.task, **cfg.task_settings)
    except ValueError as err:
        raise ConfigError(f"eval.task_settings: {err}") from None


def eval_prompts(cfg: EvalConfig, tokenizer: Any) -> EvalPrompts:
    """Resolve the task, pick ``num_prompts`` prompts of ``split`` (seeded) and render them."""
    task = _task(cfg)
    available = len(task.prompts(cfg.split))
    if cfg.num_prompts is not None and cfg.num_prompts > available:
        raise ConfigError(
            f"eval.num_prompts={cfg.num_prompts} but task {task.name!r} has {available} {cfg.split} prompts"
        )
    prompts = select_prompts(task, split=cfg.split, num_prompts=cfg.num_prompts, seed=cfg.seed)
    use_chat = uses_chat_template(tokenizer, cfg.chat_template)
    return EvalPrompts(task, prompts, render_task_prompts(task, tokenizer, prompts, use_chat), use_chat)


def draw_samples(
    model: Any, tokenizer: Any, plan: EvalPrompts, cfg: EvalConfig, *, seed: int, description: str
) -> ModelSamples:
    """``samples_per_prompt`` ancestral samples per prompt with exact log-probs, gold-scored."""
    from distalign.models.sampling import sample_completions

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    per_prompt = cfg.samples_per_prompt
    chunk = max(1, cfg.batch_size // per_prompt)
    texts: list[str] = []
    ids: list[list[int]] = []
    logprobs: list[float] = []
    ended: list[bool] = []
    with tqdm(total=len(plan.prompts), desc=description, unit="prompt") as bar:
        for start in range(0, len(plan.rendered), chunk):
            samples = sample_completions(
                model,
                tokenizer,
                plan.rendered[start : start + chunk],
                num_samples=per_prompt,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                generator=generator,
                add_special_tokens=not plan.use_chat_template,
            )
            texts += samples.completion_texts
            ids += samples.completion_ids
            logprobs += samples.logprobs.tolist()
            ended += samples.ended_with_eos.tolist()
            bar.update(len(samples.completion_texts) // per_prompt)
    prompt_index = np.repeat(np.arange(len(plan.prompts)), per_prompt)
    raw_prompts = [plan.prompts[i] for i in prompt_index]
    rewards = plan.task.gold_reward.scores(raw_prompts, texts)
    return ModelSamples(
        prompt_index, texts, ids, np.asarray(logprobs), np.asarray(rewards), np.asarray(ended)
    )


def score_samples(
    model: Any, tokenizer: Any, plan: EvalPrompts, samples: ModelSamples, cfg: EvalConfig, description: str
) -> np.ndarray:
    """Teacher-forced log-probs [N] (nats) of ``samples`` under ``model``."""
    from distalign.models.sampling import score_completions

    rendered = [plan.rendered[i] for i in samples.prompt_index]
    scores: list[float] = []
    with tqdm(total=len(rendered), desc=description, unit="sample") as bar:
        for start in range(0, len(rendered), cfg.batch_size):
            stop = start + cfg.batch_size
            part = score_completions(
                model,
                tokenizer,
                rendered[start:stop],
                samples.completion_ids[start:stop],
                batch_size=cfg.batch_size,
                add_special_tokens=not plan.use_chat_template,
            )
            scores += part.tolist()
            bar.update(len(part))
    return np.asarray(scores)


def draw_reference_samples(
    reference: Any, tokenizer: Any, plan: EvalPrompts, cfg: EvalConfig
) -> ModelSamples:
    """The reference's samples for ``plan``: what :func:`evaluate_models` draws, to share across policies."""
    return draw_samples(
        reference, tokenizer, plan, cfg, seed=cfg.seed + _REFERENCE_STREAM, description="eval: reference"
    )


def evaluate_models(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    cfg: EvalConfig,
    *,
    reference_samples: ModelSamples | None = None,
    plan: EvalPrompts | None = None,
    settings: dict[str, Any] | None = None,
    designer: FittedDesigner | None = None,
) -> EvalOutcome:
    """Evaluate ``policy`` against ``reference`` (both on their devices; one shared tokenizer).

    ``policy is reference`` evaluates a model against itself: two independent sample sets, KL exactly 0.
    Pass ``reference_samples`` (and the ``plan`` they were drawn for) to reuse a reference's samples.
    ``designer`` (:func:`distalign.data.designer.designer_for_run`) adds the designer scores.
    """
    plan = plan or eval_prompts(cfg, tokenizer)
    if reference_samples is None:
        reference_samples = draw_reference_samples(reference, tokenizer, plan, cfg)
    policy_samples = draw_samples(
        policy, tokenizer, plan, cfg, seed=cfg.seed + _POLICY_STREAM, description="eval: policy"
    )
    if policy is reference:
        ref_logps = policy_samples.logprobs.copy()
    else:
        ref_logps = score_samples(
            reference, tokenizer, plan, policy_samples, cfg, "eval: reference log-probs"
        )
    eos_rate = {
        "policy": float(policy_samples.ended_with_eos.mean()),
        "reference": float(reference_samples.ended_with_eos.mean()),
    }
    result = evaluate_samples(
        policy_samples.texts,
        policy_samples.rewards,
        reference_samples.texts,
        reference_samples.rewards,
        policy_logprobs=policy_samples.logprobs,
        reference_logprobs=ref_logps,
        task=plan.task.name,
        reward=plan.task.gold_reward.alias,
        settings={**_eval_settings(cfg, plan), "eos_rate": eos_rate, **(settings or {})},
        n_boot=cfg.n_boot,
        alpha=cfg.alpha,
        seed=cfg.seed,
        groups=policy_samples.prompt_index,
    )
    dominance = dominance_metrics(policy_samples.rewards, reference_samples.rewards)
    dominance.pop("ot_cost")  # AOT's cost at its training beta means nothing on a gold-reward scale
    result.dominance = dominance
    outcome = EvalOutcome(result, plan, policy_samples, reference_samples, ref_logps)
    if designer is not None and designer.can_score_text:
        _add_designer_scores(outcome, designer, cfg)
    elif designer is not None:
        result.settings["designer"] = "not scored: a designer reward is read from a data column"
    return outcome


def _add_designer_scores(outcome: EvalOutcome, designer: FittedDesigner, cfg: EvalConfig) -> None:
    """Designer scores of both sample sets (:attr:`EvalResult.designer`); the per-sample values go to
    samples.jsonl. Differences pair sample j of the policy with sample j of the reference on a prompt."""
    prompts = outcome.prompts.prompts
    scores = {}
    for role, samples in (("policy", outcome.policy), ("reference", outcome.reference)):
        scores[role] = designer.score([prompts[i] for i in samples.prompt_index], samples.texts)
        samples.designer = scores[role]
    boot = {"n_boot": cfg.n_boot, "alpha": cfg.alpha, "seed": cfg.seed, "groups": outcome.policy.prompt_index}
    outcome.result.designer = {
        name: {
            "policy": mean_with_ci(scores["policy"][name], **boot),
            "reference": mean_with_ci(scores["reference"][name], **boot),
            "difference": mean_with_ci(scores["policy"][name] - scores["reference"][name], **boot),
        }
        for name in scores["policy"]
    }
    outcome.result.settings["designer"] = designer.to_json()


def _eval_settings(cfg: EvalConfig, plan: EvalPrompts) -> dict[str, Any]:
    return {
        "task_settings": plan.task.settings,
        "split": cfg.split,
        "samples_per_prompt": cfg.samples_per_prompt,
        "max_new_tokens": cfg.max_new_tokens,
        "sampling": "ancestral, temperature 1, no top-k/top-p (exact log-probs)",
        "chat_template": plan.use_chat_template,
    }


def load_eval_model(name: str, config: RunConfig) -> tuple[Any, Any]:
    """Load ``name`` (as ``model.name`` accepts) with the run's dtype and trust settings, on the eval device."""
    from distalign.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        name,
        dtype=config.model.dtype,
        trust_remote_code=config.model.trust_remote_code,
        revision=config.model.revision,
    )
    return model.to(model_device()).eval(), tokenizer


def load_trained_model(final: str | Path, config: RunConfig) -> tuple[Any, Any]:
    """A run's trained model (``RUN_DIR/final``) on the eval device: its saved weights, or, for a LoRA run
    saved without merged weights (``model.lora.save_merged=false``), its adapter merged into
    ``model.name`` in memory (the weights the merged copy would have held)."""
    from distalign.models.saved import load_merged_adapter, saved_model_layout

    if saved_model_layout(final) != "adapter":
        return load_eval_model(str(final), config)
    model, tokenizer = load_merged_adapter(
        config.model.name,
        Path(final) / "adapter",
        dtype=config.model.dtype,
        trust_remote_code=config.model.trust_remote_code,
        revision=config.model.revision,
    )
    return model.to(model_device()).eval(), tokenizer


def _check_same_vocabulary(policy_tokenizer: Any, reference_tokenizer: Any, reference: str) -> None:
    from distalign.errors import SetupError

    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise SetupError(
            f"the reference {reference!r} uses a different vocabulary than the policy: the KL estimate "
            "scores the policy's token ids under the reference, so both must share one tokenizer"
        )


def evaluate_run(
    run_dir: str | Path, overrides: Sequence[str] = (), output: str | Path | None = None
) -> Path:
    """Evaluate ``RUN_DIR/final`` against the run's reference (``reference.model``, else ``model.name``).

    ``overrides`` apply to the run's config.yaml (e.g. ``eval.num_prompts=16``). Writes
    ``RUN_DIR/eval/`` and refreshes the model card ``final/README.md`` with it (or writes ``output``
    only), and returns the path of eval.json.
    """
    from distalign.errors import SetupError
    from distalign.models.saved import saved_model_layout

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise SetupError(f"{run_dir} is not a run directory: it has no config.yaml")
    final = run_dir / "final"
    if saved_model_layout(final) is None:
        raise SetupError(f"{run_dir} has no trained model in final/ (did training finish?)")
    config = load_config(run_dir / "config.yaml", list(overrides))
    reference_name = config.reference.model or config.model.name
    print(f"eval: policy {final}, reference {reference_name}, task {config.eval.task}")
    policy, tokenizer = load_trained_model(final, config)
    reference, reference_tokenizer = load_eval_model(reference_name, config)
    _check_same_vocabulary(tokenizer, reference_tokenizer, reference_name)
    outcome = evaluate_models(
        policy,
        reference,
        tokenizer,
        config.eval,
        settings={"policy": str(final), "reference": reference_name},
        designer=run_designer(config, run_dir),
    )
    written = write_eval(outcome, output or run_dir / "eval", save_samples=config.eval.save_samples)
    if output is None:  # the run's own evaluation: final/README.md (the model card) shows it
        from distalign.train.card import refresh_model_card

        refresh_model_card(run_dir, outcome.result, overrides)
    return written


def evaluate_config(config: RunConfig, output: str | Path | None = None) -> Path:
    """Evaluate the config's (untrained) model against itself: the baseline numbers of a run.

    Writes a run-like directory (default ``OUTPUT_DIR/baseline``) holding config.yaml and eval/, which
    ``distalign report`` accepts next to trained runs. Returns the path of eval.json.
    """
    from distalign.config import dump_config

    out_dir = Path(output) if output is not None else Path(config.output_dir) / "baseline"
    print(f"eval: baseline {config.model.name} against itself, task {config.eval.task}")
    model, tokenizer = load_eval_model(config.model.name, config)
    outcome = evaluate_models(
        model,
        model,
        tokenizer,
        config.eval,
        settings={"policy": config.model.name, "reference": config.model.name},
        designer=run_designer(config, None),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(config))
    return write_eval(outcome, out_dir / "eval", save_samples=config.eval.save_samples)


def run_designer(config: RunConfig, run_dir: Path | None) -> FittedDesigner | None:
    """The fitted designer rewards that score a run's samples (see :func:`designer_for_run`); a bad
    designer section is a :class:`~distalign.errors.SetupError`."""
    from distalign.errors import SetupError

    try:
        return designer_for_run(config, run_dir)
    except ValueError as err:
        raise SetupError(f"designer: {err}") from None


def evaluate_target(target: str, overrides: Sequence[str] = (), output: str | None = None) -> Path:
    """``distalign eval TARGET``: a run directory or a config file; returns the path of eval.json."""
    from distalign.errors import SetupError

    path = Path(target)
    if path.is_dir():
        return evaluate_run(path, overrides, output)
    if path.is_file():
        return evaluate_config(load_config(path, list(overrides)), output)
    raise SetupError(f"{target}: no such run directory or config file")
