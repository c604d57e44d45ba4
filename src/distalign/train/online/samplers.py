"""What draws the online loop's samples (``online.sampler``): distalign's own exact sampler, or a
generation engine (vLLM) that holds a copy of the weights sampled from and returns token ids only.

Both take the model to sample from (the policy on-policy, the proposal q off-policy) and a *version*
of its weights that changes whenever they do; the engine sampler pushes the weights when the version
it holds differs (:meth:`EngineSampler.sync`), so the engine always samples from exactly the model
the loop computes log q with. The HF sampler returns log q of each draw; the engine sampler returns
none (``Rollout.proposal_logps`` is None) and the loop computes log q with its own head: the engine's
log-probs are renormalised over the tokens a truncation keeps and are computed by other kernels, so
they are logged as a diagnostic (``sampler/logprob_gap``) and never used in a ratio.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from distalign.config import RunConfig
from distalign.errors import SetupError
from distalign.models.engine_weights import engine_weights
from distalign.models.sampling import eos_token_ids
from distalign.models.vllm_engine import EngineSample, GenerationEngine, GenerationRequest, build_vllm_engine
from distalign.train.engine import Engine
from distalign.train.online.setup import PromptSet, Rollout, draw_rollout, seeded_generator, stream_seed


class RolloutSampler(Protocol):
    #: True when the rollouts carry log q of each draw (``Rollout.proposal_logps``).
    returns_logprobs: bool
    #: Weight pushes so far (0 for a sampler that samples from the model object itself).
    weight_pushes: int

    def sync(self, model: torch.nn.Module, version: Hashable) -> bool:
        """Make the sampler draw from ``model``'s current weights, labelled ``version``; True if that
        took a push."""

    def draw(
        self,
        model: torch.nn.Module,
        prompts: PromptSet,
        indices: list[int],
        groups: list[int],
        *,
        step: int,
        rank: int,
    ) -> Rollout:
        """One sample per entry of ``indices`` (prompt-major, as ``repeat_prompts`` lays them out)."""


class HFSampler:
    """distalign's KV-cached exact ancestral sampler (``models.sampling``): log q comes with each draw."""

    returns_logprobs = True
    weight_pushes = 0

    def __init__(self, tokenizer, *, max_new_tokens: int, batch_size: int, seed: int, device: torch.device):
        self.tokenizer, self.max_new_tokens, self.batch_size = tokenizer, max_new_tokens, batch_size
        self.seed, self.device = seed, device

    def sync(self, model: torch.nn.Module, version: Hashable) -> bool:
        return False  # it samples from the model object itself

    def draw(self, model, prompts, indices, groups, *, step, rank) -> Rollout:
        return draw_rollout(
            model,
            self.tokenizer,
            prompts,
            indices,
            groups,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            generator=seeded_generator(self.device, self.seed, "sample", step, rank),
        )


class EngineSampler:
    """Samples with a :class:`GenerationEngine` (vLLM) holding a copy of the sampled-from weights.

    ``sync`` pushes ``model``'s weights (LoRA merged in) when ``version`` differs from the one pushed
    last, and the first time. Each distinct prompt run of ``indices`` is one request with its own seed,
    derived from (seed, step, rank, request), so a resumed run asks for the same draws. Completions end
    at the first stop token (kept: its probability is part of log q) or at ``max_new_tokens``; an
    engine that stops anywhere else has drawn from another event space, which is an error.
    """

    returns_logprobs = False

    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer,
        stop_token_ids: Sequence[int],
        *,
        max_new_tokens: int,
        seed: int,
    ):
        self.engine, self.tokenizer = engine, tokenizer
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.weight_pushes = 0
        self._pushed_version: Hashable | None = None  # meaningful once weight_pushes > 0

    def sync(self, model: torch.nn.Module, version: Hashable) -> bool:
        if self.weight_pushes and version == self._pushed_version:
            return False
        self.engine.load_weights(engine_weights(model))
        self._pushed_version = version
        self.weight_pushes += 1
        return True

    def draw(self, model, prompts, indices, groups, *, step, rank) -> Rollout:
        if not self.weight_pushes:
            raise RuntimeError("EngineSampler.draw before sync: the engine holds no weights of this run")
        runs = _prompt_runs(indices, groups)
        requests = [
            GenerationRequest(
                list(prompts.ids[index]), count, stream_seed(self.seed, "sample", step, rank, k)
            )
            for k, (index, _, count) in enumerate(runs)
        ]
        outputs = self.engine.generate(
            requests, max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids
        )
        if len(outputs) != len(requests) or any(len(o) != r.num_samples for o, r in zip(outputs, requests)):
            raise RuntimeError("the generation engine returned a different number of completions than asked")
        samples = [sample for output in outputs for sample in output]
        completions, ended = zip(*(self._completion(sample) for sample in samples)) if samples else ((), ())
        completions = list(completions)
        engine_logps = [
            float("nan") if s.engine_logprob is None else float(s.engine_logprob) for s in samples
        ]
        return Rollout(
            prompt_index=torch.tensor(indices, dtype=torch.long),
            group=torch.tensor(groups, dtype=torch.long),
            prompt_ids=[prompts.ids[i] for i in indices],
            completion_ids=completions,
            texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True) if completions else [],
            contexts=[prompts.contexts[i] for i in indices],
            keys=[prompts.keys[i] for i in indices],
            proposal_logps=None,
            ended_with_eos=torch.tensor(ended, dtype=torch.bool),
            engine_logps=torch.tensor(engine_logps, dtype=torch.float64),
        )

    def _completion(self, sample: EngineSample) -> tuple[list[int], bool]:
        """The completion up to and including its first stop token, and whether it has one."""
        ids = list(sample.token_ids)
        stops = [position for position, token in enumerate(ids) if token in self.stop_token_ids]
        if stops:
            ids = ids[: stops[0] + 1]
        if len(ids) > self.max_new_tokens or (not stops and len(ids) < self.max_new_tokens):
            raise RuntimeError(
                f"the generation engine returned a completion of {len(ids)} tokens "
                f"{'with' if stops else 'without'} a stop token (max_new_tokens {self.max_new_tokens}): "
                "completions must end at a stop token or at max_new_tokens, the events log q is computed for"
            )
        return ids, bool(stops)


def _prompt_runs(indices: list[int], groups: list[int]) -> list[tuple[int, int, int]]:
    """(prompt index, group, count) of each run of consecutive equal (index, group) entries."""
    runs: list[tuple[int, int, int]] = []
    for index, group in zip(indices, groups):
        if runs and runs[-1][:2] == (index, group):
            runs[-1] = (index, group, runs[-1][2] + 1)
        else:
            runs.append((index, group, 1))
    return runs


def build_sampler(
    config: RunConfig, engine: Engine, policy, tokenizer, generation_engine: GenerationEngine | None = None
) -> RolloutSampler:
    """The sampler ``online.sampler`` names. ``generation_engine``: an engine to use instead of starting
    vLLM (tests use a CPU one); without it, vLLM is imported here and only here."""
    cfg = config.online
    if cfg.sampler == "hf":
        return HFSampler(
            tokenizer,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.sampling_batch_size,
            seed=config.train.seed,
            device=engine.device,
        )
    if engine.world_size > 1:
        raise SetupError(
            f"online.sampler=vllm runs one engine in this process; {engine.world_size} processes would "
            "each need their own on their own GPU, which is not supported: run one process, or "
            "online.sampler=hf"
        )
    if generation_engine is None:
        settings = cfg.vllm
        generation_engine = build_vllm_engine(
            policy,
            tokenizer,
            dtype=settings.dtype,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=cfg.prompts.max_prompt_length + cfg.max_new_tokens,
            seed=config.train.seed,
            enforce_eager=settings.enforce_eager,
            engine_args=settings.engine_args,
        )
    return EngineSampler(
        generation_engine,
        tokenizer,
        eos_token_ids(policy, tokenizer),
        max_new_tokens=cfg.max_new_tokens,
        seed=config.train.seed,
    )
