"""Saved model directories: the final model a run writes (merged weights, a LoRA adapter, or both), an
unsharded copy of a sharded policy to save from, what a directory holds, and loading an adapter merged
into its base. Loading a model by name is :mod:`distalign.models.loading`."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from distalign.cache import publish_directory
from distalign.models.loading import (
    is_peft_model,
    load_model_and_tokenizer,
    quiet_transformers_progress,
    unwrap_model,
)


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
