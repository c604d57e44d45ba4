"""What the online loop needs around its step: prompts, log a(x|c), the proposal, the loop state that
advances around the pure signal (signal.py), rollouts, gathering.

Kept apart from ``loop.py`` so that the loop reads as the step itself. Exactness conventions:
every context is conditioned on by the *same token ids* when sampling, when scoring under the base
and when computing the policy's log-probs with gradients (``PromptSet.ids``), and samples are drawn by
plain ancestral sampling, so log q is the exact log-probability of what was drawn.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from distalign.config import RunConfig
from distalign.config.online import OnlineConfig
from distalign.data.formats import DataError
from distalign.data.loading import load_rows
from distalign.data.tokenize import tokenize_prompts
from distalign.data.tokenized import TokenizationSettings
from distalign.errors import SetupError
from distalign.models.fingerprint import data_fingerprint
from distalign.models.loading import load_model_and_tokenizer
from distalign.models.reference import adapters_disabled
from distalign.models.sampling import sample_completions, score_completions
from distalign.online_methods import get_online_method
from distalign.targets import LogZEstimator, WindowedMeanBaseline
from distalign.train.engine import Engine
from distalign.train.online.signal import GlobalBatch, Signal, compute_signal
from distalign.train.record import TrainingRecord


def stream_seed(*parts: object) -> int:
    """A seed in [0, 2^63) derived from ``parts`` (e.g. seed, purpose, step, rank): the same parts give
    the same seed in any run, so resuming needs no saved sampler state."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    """A generator seeded with :func:`stream_seed` of ``parts``."""
    return torch.Generator(device=device).manual_seed(stream_seed(*parts))


# --- prompts -----------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    """Contexts to sample from. ``ids[i]``: the exact token ids conditioned on; ``keys[i]``: the rendered
    text (identifies the context for log Z_c); ``contexts[i]``: the prompt text scorers and rewards see."""

    ids: list[list[int]]
    keys: list[str]
    contexts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, config: RunConfig, steps: int, processes: int) -> TrainingRecord:
        """What the model card says about these prompts (source, count, fingerprint) and the run."""
        prompts = config.online.prompts
        source = f"task:{prompts.task}" if prompts.task else (prompts.path or "unconditional")
        return TrainingRecord(source, "prompt", len(self), data_fingerprint(self.ids), steps, processes)


def _raw_text(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))


def load_prompts(config: RunConfig, tokenizer, split: str, engine: Engine | None = None) -> PromptSet:
    """The prompts of ``online.prompts`` (a task's ``split``, a file, or one BOS context), tokenised."""
    cfg = config.online.prompts
    template = cfg.chat_template
    if cfg.task is not None:
        from distalign.tasks import get_task

        try:
            task = get_task(cfg.task, **cfg.task_settings)
        except ValueError as err:
            raise SetupError(f"online.prompts.task_settings: {err}") from None
        texts = task.prompts(split if split in ("train", "heldout") else "train")
        if not texts:
            raise SetupError(f"task {cfg.task!r} has no {split} prompts")
        chat = template == "on" or (template == "auto" and bool(getattr(tokenizer, "chat_template", None)))
        rows = [{"prompt": task.messages(t) if chat else t} for t in texts]
        settings_template = "on" if chat else "off"
    elif cfg.path is not None:
        rows = load_rows(cfg.path, split=cfg.split, limit=cfg.limit).rows
        settings_template = template
    else:  # unconditional: the empty prompt tokenises to one BOS (EOS without BOS) token
        rows, settings_template = [{"prompt": ""}], "off"
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    settings = TokenizationSettings(
        max_length=cfg.max_prompt_length + config.online.max_new_tokens,
        max_prompt_length=cfg.max_prompt_length,
        chat_template=settings_template,
    )
    try:
        tokenized, report = tokenize_prompts(rows, tokenizer, settings)
    except DataError:
        raise
    except ValueError as err:
        raise SetupError(f"online.prompts: {err}") from None
    if engine is not None:
        engine.print(f"prompts ({split}): {report.summary()}")
    if not tokenized:
        raise SetupError("online.prompts: no prompts left after tokenisation")
    return PromptSet(
        ids=[t.prompt_ids for t in tokenized],
        keys=[t.prompt_text for t in tokenized],
        contexts=[_raw_text(rows[t.row_index]["prompt"]) for t in tokenized],
    )


# --- the base model a ---------------------------------------------------------------------------------
class BaseScorer:
    """log a(x|c) of samples, a = the policy's initial weights (or ``reference.model`` when set).

    With LoRA it is the policy with adapters off (no copy, one no-grad forward); a full fine-tune keeps
    a frozen copy made before the first step, when the policy still *is* the base.
    """

    def __init__(self, config: RunConfig, policy, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.batch_size = config.online.sampling_batch_size
        self.adapters_off = False
        if config.reference.model is not None:
            self.model, _ = load_model_and_tokenizer(
                config.reference.model,
                dtype=config.model.dtype,
                trust_remote_code=config.model.trust_remote_code,
            )
        elif config.model.lora.enabled:
            self.model, self.adapters_off = policy, True
        else:
            self.model = copy.deepcopy(policy)
        if not self.adapters_off:
            self.model.requires_grad_(False).eval()

    @contextmanager
    def as_model(self, device) -> Iterator:
        """The base as a plain model on ``device`` for the duration of the block (adapters off for LoRA)."""
        if not self.adapters_off:
            self.model.to(device)
        with adapters_disabled(self.model) if self.adapters_off else nullcontext():
            yield self.model

    def __call__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], device) -> torch.Tensor:
        """[N] float64 log a(completion | prompt), nats, summed over completion tokens (incl. EOS)."""
        with self.as_model(device) as model:
            scores = score_completions(
                model,
                self.tokenizer,
                [""] * len(prompt_ids),
                completion_ids,
                self.batch_size,
                prompt_ids=prompt_ids,
            )
        return scores.double()


# --- the proposal q -----------------------------------------------------------------------------------
class FrozenProposal:
    """Off-policy proposal q: a frozen copy of the policy, initially the base, replaced by the current
    policy when the refresh rule fires. Its weights are checkpointed through the engine's accelerator."""

    def __init__(self, policy, is_base: bool = True) -> None:
        self.model = copy.deepcopy(policy).requires_grad_(False).eval()
        self.is_base = is_base  # False when the base is a separate reference.model
        self.refreshes = 0
        self.last_refresh_step = 0

    def refresh(self, policy, step: int) -> None:
        self.model.load_state_dict(policy.state_dict())
        self.is_base = False
        self.refreshes += 1
        self.last_refresh_step = step

    def loop_state(self) -> dict:
        return {
            "is_base": self.is_base,
            "refreshes": self.refreshes,
            "last_refresh_step": self.last_refresh_step,
        }

    def load_loop_state(self, state: dict) -> None:
        self.is_base = bool(state["is_base"])
        self.refreshes = int(state["refreshes"])
        self.last_refresh_step = int(state["last_refresh_step"])


# --- the loop's state ---------------------------------------------------------------------------------
@dataclass
class Stalls:
    """Steps in a row that taught the policy nothing (checkpointed, so a resumed run counts on).

    ``without_support``: f-DPG steps with no sample in the target's support (P(x) = 0 for all);
    ``without_signal``: steps whose advantages were all zero (zero gradient); ``support_seen``: some
    sample of some step has been in the support."""

    without_support: int = 0
    without_signal: int = 0
    support_seen: bool = False

    def update(self, in_support: int | None, learning: bool) -> None:
        """Count one step: ``in_support`` samples with P(x) > 0 (None without a target), ``learning``:
        some advantage was non-zero."""
        if in_support is not None:
            self.without_support = 0 if in_support else self.without_support + 1
            self.support_seen = self.support_seen or in_support > 0
        self.without_signal = 0 if learning else self.without_signal + 1

    def metrics(self, has_target: bool) -> dict[str, float]:
        metrics = {"warnings/steps_without_signal": float(self.without_signal)}
        if has_target:
            metrics["warnings/steps_without_support"] = float(self.without_support)
        return metrics


class LoopState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly: the running
    log Z, the baseline window, the proposal's bookkeeping and the fitted moment lambdas.

    The first two change only in :meth:`step_signal`, around the pure ``compute_signal``.
    """

    def __init__(self, window: int, proposal: FrozenProposal | None) -> None:
        self.log_z = LogZEstimator()
        self.window = WindowedMeanBaseline(window)
        self.proposal = proposal
        self.moment_lambdas: list[list[float]] = []
        self.stalls = Stalls()

    def step_signal(self, cfg: OnlineConfig, batch: GlobalBatch) -> Signal:
        """The step's signal, advancing the running estimates: log Z absorbs the batch *before* its
        pseudo-rewards are computed (every sample seen counts, these included); the window is read
        *before* it absorbs the batch's rewards (the baseline must not depend on R_j)."""
        log_z, metrics = None, {}
        if get_online_method(cfg.method).scored_by == "target":
            self.log_z.update(batch.target_logps, batch.proposal_logps, batch.keys)
            log_z = self.log_z.log_z_for(batch.keys)
            metrics = log_z_metrics(self.log_z, batch.keys)
        signal = compute_signal(cfg, batch, log_z, window_mean=self.window.value())
        if cfg.baseline == "window":
            self.window.update(signal.rewards)
        signal.metrics = {**metrics, **signal.metrics}
        return signal

    def state_dict(self) -> dict:
        return {
            "log_z": self.log_z.state_dict(),
            "window": self.window.state_dict(),
            "proposal": None if self.proposal is None else self.proposal.loop_state(),
            "moment_lambdas": self.moment_lambdas,
            "stalls": asdict(self.stalls),
        }

    def load_state_dict(self, state: dict) -> None:
        self.log_z.load_state_dict(state["log_z"])
        self.window.load_state_dict(state["window"])
        if self.proposal is not None:
            self.proposal.load_loop_state(state["proposal"])
        self.moment_lambdas = state["moment_lambdas"]
        self.stalls = Stalls(**state.get("stalls", {}))  # absent in checkpoints of older versions


def log_z_metrics(estimator: LogZEstimator, keys: list) -> dict[str, float]:
    """log Z with its ESS and standard error; for a conditional target, averaged over the batch's contexts."""
    distinct = list(dict.fromkeys(keys))
    values = [estimator.log_z(k) for k in distinct]
    finite = [v for v in values if math.isfinite(v)]
    metrics = {
        "log_z": sum(finite) / len(finite) if finite else -math.inf,
        "log_z/ess": min(estimator.ess(k) for k in distinct),
        "log_z/stderr": max(math.sqrt(estimator.log_z_variance(k)) for k in distinct),
    }
    if distinct != [None]:
        metrics["log_z/contexts_seen"] = float(len(estimator.keys()))
    return metrics


# --- rollouts -----------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """This process's samples of one step.

    ``prompt_index`` [N] indexes the PromptSet; ``group`` [N] is the prompt's position in the step's
    global prompt list (the leave-one-out groups); ``proposal_logps`` [N] float64 is log q of the draw,
    or None from a sampler that returns token ids only (vLLM: the loop computes log q with its own
    head); ``engine_logps`` [N] float64: such a sampler's own log-probs of its draws where it reports
    them (NaN where not), a diagnostic that never enters an estimator."""

    prompt_index: torch.Tensor
    group: torch.Tensor
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    contexts: list[str]
    keys: list[str]
    proposal_logps: torch.Tensor | None
    ended_with_eos: torch.Tensor
    engine_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.texts)


def draw_rollout(
    model,
    tokenizer,
    prompts: PromptSet,
    prompt_indices: list[int],
    groups: list[int],
    *,
    max_new_tokens: int,
    batch_size: int,
    generator: torch.Generator,
) -> Rollout:
    """One exact ancestral sample from ``model`` per entry of ``prompt_indices`` (repeat an index for
    several samples of a prompt); ``groups`` [same length] labels the leave-one-out groups."""
    samples = sample_completions(
        model,
        tokenizer,
        [prompts.keys[i] for i in prompt_indices],
        prompt_ids=[prompts.ids[i] for i in prompt_indices],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        generator=generator,
    )
    return Rollout(
        prompt_index=torch.tensor(prompt_indices, dtype=torch.long),
        group=torch.tensor(groups, dtype=torch.long),
        prompt_ids=[prompts.ids[i] for i in prompt_indices],
        completion_ids=samples.completion_ids,
        texts=samples.completion_texts,
        contexts=[prompts.contexts[i] for i in prompt_indices],
        keys=[prompts.keys[i] for i in prompt_indices],
        proposal_logps=samples.logprobs.double(),
        ended_with_eos=samples.ended_with_eos,
    )


def repeat_prompts(prompt_indices: list[int], samples_per_prompt: int) -> tuple[list[int], list[int]]:
    """(prompt index, group) per sample: each prompt ``samples_per_prompt`` times, grouped by position."""
    indices = [i for i in prompt_indices for _ in range(samples_per_prompt)]
    groups = [k for k in range(len(prompt_indices)) for _ in range(samples_per_prompt)]
    return indices, groups


def gather(engine: Engine, values: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor from every process, concatenated in rank order, on the CPU."""
    return engine.gather_varlen(values.to(engine.device)).cpu()


def gather_texts(
    engine: Engine, tokenizer, token_lists: list[list[int]], local_texts: list[str] | None = None
) -> list[str]:
    """Decoded completions of every process in rank order (token ids travel, not strings).
    ``local_texts``: this process's completions already decoded (used as they are on one process)."""
    if engine.world_size == 1:
        if local_texts is not None:
            return list(local_texts)
        return tokenizer.batch_decode(token_lists, skip_special_tokens=True)
    lengths = gather(engine, torch.tensor([len(t) for t in token_lists], dtype=torch.long))
    flat = gather(engine, torch.tensor([i for t in token_lists for i in t], dtype=torch.long))
    rows = torch.split(flat, lengths.tolist())
    return tokenizer.batch_decode([r.tolist() for r in rows], skip_special_tokens=True)


def shard(items: list, engine: Engine) -> list:
    """This process's contiguous share of ``items`` (sizes differ by at most one)."""
    bounds = [round(len(items) * r / engine.world_size) for r in range(engine.world_size + 1)]
    return items[bounds[engine.rank] : bounds[engine.rank + 1]]
