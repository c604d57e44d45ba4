"""Loading causal LMs (local path, hub id, GGUF, embedded defaults) and LoRA through peft; saving and
reading saved model directories is :mod:`distalign.models.saved`.

``load_model_and_tokenizer`` accepts ``"tiny"`` (the locally built test model), ``"smollm2"`` (the
embedded SmolLM2-135M-Instruct), a local model directory, a ``.gguf`` file, or a Hugging Face hub id.
Remote code is never trusted unless asked for, and weights are read with transformers' safe loaders
(safetensors, or ``torch.load(weights_only=True)`` for legacy ``.bin`` files).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distalign.models.gguf import cached_gguf_conversion, smollm2_path
from distalign.models.tiny import tiny_model_path

DtypeName = Literal["auto", "float32", "bfloat16", "float16", "float64"]
_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model name could not be resolved to weights (missing path, unknown hub id, offline hub)."""


@dataclass
class LoraSettings:
    """LoRA adapter settings passed to peft.

    ``r``: adapter rank. ``alpha``: scaling numerator (the update is scaled by ``alpha / r``).
    ``dropout``: dropout on the adapter input. ``target_modules``: module-name suffixes to adapt, or
    ``"all-linear"`` for every linear layer except the output head.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(
                f"lora.target_modules must be a list of names or 'all-linear', got {self.target_modules!r}"
            )
        if not self.target_modules:
            raise ValueError("lora.target_modules must not be empty")


#: Public Hugging Face ids of the embedded defaults: the checkpoints their weights come from.
EMBEDDED_PUBLIC_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub id ("name" or "org/name"), not of a file path."""
    return not (
        name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name
    )


def public_model_id(name: str) -> str | None:
    """The public Hugging Face id that ``model.name`` stands for, or None when it has none.

    ``"smollm2"`` gives the id of the checkpoint the embedded weights come from, a hub id gives itself;
    ``"tiny"`` (a random test model), a local directory and a ``.gguf`` file name files on this
    machine only, so None. Loads, builds and converts nothing.
    """
    if name in EMBEDDED_PUBLIC_IDS:
        return EMBEDDED_PUBLIC_IDS[name]
    if name == "tiny" or Path(name).expanduser().exists() or not _is_hub_id(name):
        return None
    return name


@contextlib.contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Silence transformers' own per-call progress bars ("Loading weights", "Writing model shards")
    inside the block, and restore the previous setting afterwards, so the user's process keeps its bars.

    distalign shows one progress display per phase; a bar per model load or save would repeat inside
    it. Uses transformers' documented switch (``transformers.utils.logging.disable_progress_bar``),
    which also covers huggingface_hub's bars; when those were off already (``HF_HUB_DISABLE_PROGRESS_BARS``)
    but transformers' were on, nothing is changed, since switching them back on would warn.
    """
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled() or are_progress_bars_disabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def build_cached_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Build or convert the cached copy ``name`` stands for (the tiny model, a GGUF conversion), if it
    has one and it is not built yet; loads nothing. Training calls it before its process group starts
    (:func:`distalign.cache.require_saved_model` says why)."""
    with quiet_transformers_progress():
        resolve_model_source(name, cache_dir)


def resolve_model_source(name: str, cache_dir: str | os.PathLike[str] | None = None) -> tuple[str, bool]:
    """Map a model name to ``(path_or_hub_id, is_local)``, building or converting cached copies as needed."""
    if name == "tiny":
        return str(tiny_model_path(cache_dir)), True
    if name == "smollm2":
        return str(smollm2_path(cache_dir)), True
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(cached_gguf_conversion(path, cache_dir)), True
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelLoadError(f"model path {name!r} is a file but not a .gguf file; pass a model directory")
    # Hub ids are "name" or "org/name"; anything else that names no existing file is a missing path.
    if not _is_hub_id(name):
        raise ModelLoadError(f"model path {name!r} does not exist")
    return name, False


def _dtype_kwargs(dtype: str) -> dict[str, Any]:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    # transformers renamed torch_dtype to dtype in 4.56.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {keyword: _DTYPES[dtype]}


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> Any:
    """Wrap ``model`` in a peft ``PeftModelForCausalLM`` with freshly initialised LoRA adapters.

    The base weights are frozen; only adapter weights train. The update starts at zero (B = 0), so
    the wrapped model computes exactly what ``model`` did.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning is theirs, not
        # the user's to act on, and would otherwise print on every LoRA run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def load_model_and_tokenizer(
    name: str,
    *,
    dtype: DtypeName = "auto",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    span_attention: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name: ``"tiny"``, ``"smollm2"``, a local model directory, a ``.gguf`` file, or a hub id.
        dtype: parameter dtype; ``"auto"`` keeps the checkpoint's.
        lora: wrap the model with LoRA adapters (peft) when given.
        gradient_checkpointing: recompute activations in backward (non-reentrant), disabling the KV cache.
        trust_remote_code: allow the checkpoint's own Python code; off unless the config says so.
        revision: hub revision (branch, tag or commit) for hub ids.
        cache_dir: distalign cache for built/converted models (the hub cache follows ``HF_HOME``).
        span_attention: load a model that would run on SDPA on span attention instead
            (:mod:`distalign.models.span_attention`: the same attention until a packed forward passes
            spans); a model on another attention, or without SDPA, loads on its own.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (its EOS when it had none), and the
        model config's ``pad_token_id`` matches it.
    """
    dtype_kwargs = _dtype_kwargs(dtype)  # validate before any expensive build or conversion
    with quiet_transformers_progress():  # building the tiny model or converting a GGUF file saves one
        source, is_local = resolve_model_source(name, cache_dir)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None and not is_local:
        common["revision"] = revision
    try:
        # A hub id may download: its download bars stay. A local load's "Loading weights" bar would
        # repeat inside the caller's own progress display.
        with quiet_transformers_progress() if is_local else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
            model = AutoModelForCausalLM.from_pretrained(
                source, **common, **dtype_kwargs, **_attention_kwargs(source, common, span_attention)
            )
    except (OSError, ValueError) as error:
        where = "local directory" if is_local else "Hugging Face hub id (needs network or a warm HF cache)"
        raise ModelLoadError(f"could not load model {name!r} as a {where}: {error}") from error
    _ensure_pad_token(model, tokenizer)
    if gradient_checkpointing:
        _enable_activation_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def _attention_kwargs(source: str, common: dict[str, Any], span_attention: bool) -> dict[str, str]:
    """``attn_implementation`` for ``from_pretrained``: span attention when asked for and the model
    would otherwise run on SDPA (its config names no other attention and its class supports SDPA);
    nothing (transformers' own choice) otherwise."""
    if not span_attention:
        return {}
    from transformers import AutoConfig

    from distalign.models.span_attention import IMPLEMENTATION, register_span_attention

    model_config = AutoConfig.from_pretrained(source, **common)
    if getattr(model_config, "_attn_implementation", None) not in (None, "sdpa"):
        return {}  # the checkpoint chose its attention (e.g. a flash kernel): packing uses that
    model_class = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING.get(
        type(model_config), None
    )
    if model_class is None or not getattr(model_class, "_supports_sdpa", False):
        return {}  # remote code or no SDPA: the model's own attention, which packing_problem judges
    register_span_attention()
    return {"attn_implementation": IMPLEMENTATION}


def _enable_activation_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing needs no input grads, which matters when LoRA freezes the embeddings.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.config.use_cache = False


def _ensure_pad_token(model: PreTrainedModel, tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (checked without importing peft)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap_model(model: Any) -> Any:
    """Strip DDP-style ``.module`` wrappers and distalign's ``SequenceLogprobModel`` to reach the LM."""
    from distalign.models.logprobs import SequenceLogprobModel

    while True:
        if isinstance(model, SequenceLogprobModel):
            model = model.model
        elif isinstance(model, torch.nn.Module) and isinstance(
            getattr(model, "module", None), torch.nn.Module
        ):
            model = model.module
        else:
            return model
