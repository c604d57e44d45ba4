"""Loading causal LMs (local path, hub id, GGUF, embedded defaults), LoRA through peft, and saving.

``load_model_and_tokenizer`` accepts ``"tiny"`` (the locally built test model), ``"smollm2"`` (the
embedded SmolLM2-135M-Instruct), a local model directory, a ``.gguf`` file, or a Hugging Face hub id.
Remote code is never trusted unless asked for, and weights are read with transformers' safe loaders
(safetensors, or ``torch.load(weights_only=True)`` for legacy ``.bin`` files).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distalign.cache import publish_directory
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
    model_class = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
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


def plain_state_key(peft_key: str) -> str | None:
    """Key of a peft-injected base-model parameter in the plain model, or None for adapter-only entries."""
    parts = peft_key.split(".")
    if any(part.startswith("lora_") for part in parts) or "original_module" in parts:
        return None
    plain: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:  # the adapter name after "modules_to_save"
            skip_next = False
        elif part == "modules_to_save":
            skip_next = True
        elif part != "base_layer":
            plain.append(part)
    return ".".join(plain)


def _save_merged_copy(peft_model: Any, directory: Path) -> None:
    """Save base + merged adapters as a plain transformers model, leaving ``peft_model`` bit-identical.

    Merging in place and then unmerging would leave ``W + BA - BA``, which differs from ``W`` in the
    last bits; instead the touched base weights are backed up (to CPU) and copied back afterwards.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    tuner_layers = [module for module in base.modules() if isinstance(module, BaseTunerLayer)]
    backups = [
        (param, param.detach().to("cpu", copy=True))
        for layer in tuner_layers
        for param in layer.get_base_layer().parameters(recurse=False)
    ]
    peft_model.base_model.merge_adapter()
    try:
        plain_state = {}
        for key, tensor in base.state_dict().items():
            plain_key = plain_state_key(key)
            if plain_key is not None:
                plain_state[plain_key] = tensor
        with torch.device("meta"):
            plain = type(base)(copy.deepcopy(base.config))
        plain.load_state_dict(plain_state, strict=True, assign=True)
        plain.tie_weights()
        if getattr(base, "generation_config", None) is not None:
            plain.generation_config = copy.deepcopy(base.generation_config)
        plain.save_pretrained(directory)
    finally:
        peft_model.base_model.unmerge_adapter()
        with torch.no_grad():
            for param, saved in backups:
                param.copy_(saved.to(param.device))


def _unsharded_class(module: torch.nn.Module) -> type:
    """``module``'s own class: FSDP2's ``fully_shard`` swaps in a subclass (``FSDP<Name>``) that mixes in
    ``FSDPModule``; the class it was made from is the first one in the MRO that is not sharding's."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def unsharded_copy(template: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """A plain CPU copy of ``template`` holding ``state_dict``: its whole weights, gathered from the
    shards of an FSDP2 or ZeRO-3 model, named as ``template.state_dict()`` names them.

    ``template`` is a transformers causal LM, optionally peft-wrapped, whose own parameters may be
    shards; only its class, config, peft config, generation config and (never sharded) buffers are
    read. The copy is built on the meta device and takes the tensors of ``state_dict`` as its
    parameters (no second copy of the weights), so :func:`save_final_model` can save it like a model
    trained by one process.
    """
    base = template.get_base_model() if is_peft_model(template) else template
    with torch.device("meta"):
        model = _unsharded_class(base)(copy.deepcopy(base.config))
    if is_peft_model(template):
        from peft import get_peft_model

        adapter = template.active_adapter
        with warnings.catch_warnings():  # peft's use of a deprecated transformers name (see apply_lora)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, copy.deepcopy(template.peft_config[adapter]), adapter_name=adapter)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies) are not in a state dict; FSDP2 and ZeRO-3 keep them
    # whole on every process, so the template's are complete.
    for name, buffer in template.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf in module._buffers and module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    unwrap = model.get_base_model() if is_peft_model(model) else model
    unwrap.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        unwrap.generation_config = copy.deepcopy(base.generation_config)
    return model


ADAPTER_CONFIG = "adapter_config.json"


def set_adapter_base_model(adapter_dir: str | os.PathLike[str], base_model: str) -> Path:
    """Make a saved peft adapter name ``base_model`` (a public id) as the model it applies to.

    peft records the path the base was loaded from, which for an embedded default is a cache directory
    on this machine; ``base_model_name_or_path`` in ``adapter_config.json`` is rewritten, every other
    field kept. Returns the config's path.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def saved_model_layout(directory: str | os.PathLike[str]) -> Literal["model", "adapter"] | None:
    """What a saved model folder (a run's ``final/``) holds: ``"model"``, weights that
    ``AutoModelForCausalLM.from_pretrained`` loads (a full fine-tune, or LoRA merged into its base);
    ``"adapter"``, a LoRA adapter alone in ``adapter/`` (saved with ``model.lora.save_merged=false``),
    to be applied to its base model; None when it holds neither."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return "model"
    if (directory / "adapter" / ADAPTER_CONFIG).is_file():
        return "adapter"
    return None


def load_merged_adapter(
    base_name: str, adapter_dir: str | os.PathLike[str], **options: Any
) -> tuple[Any, Any]:
    """Load ``base_name`` (as :func:`load_model_and_tokenizer` accepts it, with ``options``) and merge the
    LoRA adapter saved in ``adapter_dir`` into its weights: a plain model, computing what the merged copy
    :func:`save_final_model` would have saved (the same merge on the same weights), held once in memory."""
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer(base_name, **options)
    with warnings.catch_warnings():  # peft reads a deprecated transformers attribute (see apply_lora)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    return adapted.merge_and_unload(), tokenizer


@quiet_transformers_progress()
def save_final_model(
    model: Any,
    tokenizer: Any,
    output_dir: str | os.PathLike[str],
    *,
    merge_lora: bool = True,
    base_model_id: str | None = None,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Save the trained model (and tokenizer) to ``output_dir``, replacing it atomically.

    A full fine-tune is saved with ``save_pretrained``. A LoRA model saves its adapter to
    ``output_dir/adapter`` and, with ``merge_lora``, a merged copy to ``output_dir`` itself that plain
    ``AutoModelForCausalLM.from_pretrained`` loads; the live model is not changed. ``base_model_id``:
    the public id the adapter's config names as its base (:func:`set_adapter_base_model`) instead of
    the local path the base was loaded from. ``add_files`` is called with the staging directory before
    it is published, to add files (a model card) in the same atomic step. Call it on one process only,
    with full (not sharded) parameters.
    """
    model = unwrap_model(model)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        if is_peft_model(model):
            model.save_pretrained(staging / "adapter")
            if base_model_id is not None:
                set_adapter_base_model(staging / "adapter", base_model_id)
            if merge_lora:
                _save_merged_copy(model, staging)
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if add_files is not None:
            add_files(staging)
        publish_directory(staging, output_dir, replace=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
