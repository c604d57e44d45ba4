"""A generation engine that draws token ids only: the small interface the online loop's vLLM sampler
needs, and the one class that calls vLLM (imported lazily, so distalign works without it).

The interface is two calls: ``load_weights`` (replace the engine's weights by the given named tensors)
and ``generate`` (for each request, ``num_samples`` untruncated ancestral draws from the prompt's token
ids, seeded by the request's seed). Tests implement it with a plain transformers model on the CPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distalign.errors import SetupError

INSTALL_HINT = (
    "install it with `pip install 'distalign[vllm]'` on a machine with a CUDA GPU, or set "
    "online.sampler=hf (distalign's own exact sampler, any device)"
)


@dataclass(frozen=True)
class GenerationRequest:
    """``num_samples`` completions of the prompt ``prompt_ids``, drawn with a generator seeded by ``seed``."""

    prompt_ids: list[int]
    num_samples: int
    seed: int


@dataclass(frozen=True)
class EngineSample:
    """One completion's token ids (up to and including the stop token, when there is one) and, where the
    engine reports it, its own log-prob of them (a diagnostic only: never used in an estimator)."""

    token_ids: list[int]
    engine_logprob: float | None = None


class GenerationEngine(Protocol):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by these (plain transformers names); later draws use them."""

    def generate(
        self, requests: Sequence[GenerationRequest], *, max_new_tokens: int, stop_token_ids: Sequence[int]
    ) -> list[list[EngineSample]]:
        """Per request, its ``num_samples`` completions: untruncated ancestral sampling at temperature
        1, each stopping at a token of ``stop_token_ids`` (kept) or after ``max_new_tokens`` tokens."""


def import_vllm():
    """The vllm module, or a SetupError with the install hint."""
    # Weights are pushed into the model object, which must live in this process (vLLM's V1 engine
    # otherwise runs it in a child process); set before vllm reads its environment.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise SetupError(
            f"online.sampler is 'vllm' but vLLM cannot be imported ({err}): {INSTALL_HINT}"
        ) from None
    return vllm


class VLLMEngine:
    """vLLM's offline ``LLM`` behind :class:`GenerationEngine`: the only code in distalign that calls vLLM.

    The engine starts from ``model_dir`` with ``load_format="dummy"`` (random weights: nothing is read
    twice) and must receive real weights through :meth:`load_weights` before its first draw, which the
    sampler always does. Prefix caching is on only where the cache can be reset after a push, since
    cached prompt states computed with the old weights would otherwise be reused with the new ones.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str,
        gpu_memory_utilization: float,
        max_model_len: int,
        seed: int,
        enforce_eager: bool = False,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        self._resets_prefix_cache = hasattr(vllm.LLM, "reset_prefix_cache")
        arguments = {
            "model": str(model_dir),
            "load_format": "dummy",
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": self._resets_prefix_cache,
            **(engine_args or {}),
        }
        self._llm = vllm.LLM(**arguments)

    def _model(self) -> torch.nn.Module:
        """The engine's model object (in this process), where ``load_weights`` lives."""
        executor = self._llm.llm_engine.model_executor
        worker = executor.driver_worker
        for holder in (worker, getattr(worker, "worker", None)):
            runner = getattr(holder, "model_runner", None)
            if runner is not None and hasattr(runner, "model"):
                return runner.model
        raise SetupError(
            f"vLLM {getattr(self._vllm, '__version__', '?')}: cannot reach the engine's model to push "
            "weights into (llm_engine.model_executor.driver_worker.model_runner.model); use a vLLM "
            "version with in-process workers, or online.sampler=hf"
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._model().load_weights(weights)
        if self._resets_prefix_cache:
            self._llm.reset_prefix_cache()

    def generate(
        self, requests: Sequence[GenerationRequest], *, max_new_tokens: int, stop_token_ids: Sequence[int]
    ) -> list[list[EngineSample]]:
        # Every setting that could reshape the distribution is spelled out at its identity, so neither
        # vLLM's defaults nor a model's generation config can change what is drawn.
        params = [
            self._vllm.SamplingParams(
                n=request.num_samples,
                temperature=1.0,
                top_p=1.0,
                top_k=-1,
                min_p=0.0,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                max_tokens=max_new_tokens,
                stop_token_ids=list(stop_token_ids),
                seed=request.seed,
                logprobs=0,  # the drawn token's log-prob only: the gap diagnostic
                detokenize=False,
            )
            for request in requests
        ]
        prompts = [{"prompt_token_ids": list(request.prompt_ids)} for request in requests]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [[_engine_sample(completion) for completion in output.outputs] for output in outputs]


def _engine_sample(completion) -> EngineSample:
    ids = list(completion.token_ids)
    stop = getattr(completion, "stop_reason", None)
    # A stop token id that ended the completion belongs to it (its probability is part of log q);
    # put it back if this vLLM version left it out of token_ids.
    if completion.finish_reason == "stop" and isinstance(stop, int) and (not ids or ids[-1] != stop):
        ids.append(stop)
    return EngineSample(ids, getattr(completion, "cumulative_logprob", None))


def build_vllm_engine(
    policy: torch.nn.Module, tokenizer, *, dtype: str, **engine_settings: Any
) -> VLLMEngine:
    """A :class:`VLLMEngine` with ``policy``'s architecture (config and tokenizer written to a temporary
    directory, so any model distalign loads - a GGUF file, the tiny test model, a hub id - works).
    ``dtype`` "auto" = the policy's parameter dtype; ``engine_settings``: :class:`VLLMEngine`'s other
    keyword arguments. Refuses, naming the setting, a machine without
    CUDA and a dtype vLLM does not run."""
    from distalign.models.loading import is_peft_model, unwrap_model

    import_vllm()
    if not torch.cuda.is_available():
        raise SetupError(
            "online.sampler is 'vllm' but this machine has no CUDA GPU (torch.cuda.is_available() is "
            "False); vLLM's GPU engine cannot run here: set online.sampler=hf"
        )
    plain = unwrap_model(policy)
    if is_peft_model(plain):
        plain = plain.get_base_model()
    if dtype == "auto":
        dtype = str(next(plain.parameters()).dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SetupError(
            f"online.vllm.dtype: vLLM runs float32, bfloat16 or float16, not {dtype}; set it, or model.dtype"
        )
    # Kept for the engine's lifetime: vLLM may read the config or tokenizer again after it starts.
    model_dir = tempfile.TemporaryDirectory(prefix="distalign-vllm-")
    plain.config.save_pretrained(model_dir.name)
    tokenizer.save_pretrained(model_dir.name)
    engine = VLLMEngine(model_dir.name, dtype=dtype, **engine_settings)
    engine.model_dir = model_dir
    return engine
