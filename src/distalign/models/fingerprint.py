"""Content fingerprints of models and tokenised data, the keys of cached reference log-probs.

A fingerprint must change whenever the thing it names would give different log-probs, and should not
change otherwise (so a cache survives a reload from disk). Model fingerprints therefore hash every
weight's name, shape, dtype and bytes plus the architecture-defining config fields, but not
bookkeeping fields such as the path it was loaded from or ``use_cache``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

# Config fields that record where/how a model was loaded or what it returns, not what it computes.
_VOLATILE_CONFIG_FIELDS = frozenset(
    {
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "unk_token_id",
        "initializer_range",
        "gradient_checkpointing",
        "quantization_config",
    }
)


def _base_weight_name(name: str) -> str | None:
    """Name of a base-model weight as the un-adapted model calls it; None for adapter weights.

    peft renames wrapped layers' weights (``q_proj.base_layer.weight``), keeps the original of a fully
    trained module as ``original_module`` and its trained copy under ``modules_to_save``.
    """
    parts = name.split(".")
    if any(part.startswith("lora_") for part in parts) or "modules_to_save" in parts:
        return None
    return ".".join(part for part in parts if part not in ("base_layer", "original_module"))


def _architecture_description(causal_lm: nn.Module) -> dict[str, Any]:
    config = getattr(causal_lm, "config", None)
    fields = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    semantic = {
        key: value
        for key, value in fields.items()
        if not key.startswith("_") and key not in _VOLATILE_CONFIG_FIELDS
    }
    return {"class": type(causal_lm).__name__, "config": semantic}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements (row-major, native byte order), whatever its dtype."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()  # via uint8: numpy has no bfloat16


def model_fingerprint(model: nn.Module, *, exclude_adapters: bool = True) -> str:
    """Hex sha256 of a model's weights (names, shapes, dtypes, bytes) and architecture.

    With ``exclude_adapters`` (default) a peft model is fingerprinted by its base weights only, with
    peft's renaming undone: it matches the fingerprint of the same base model loaded without adapters,
    which is the reference model of an adapters-off run. Compute it on full, unsharded parameters, or
    on ZeRO-3 partitions (gathered one parameter at a time; then every process must call it together).
    """
    from distalign.models.loading import is_peft_model, unwrap_model

    model = unwrap_model(model)
    causal_lm = model.get_base_model() if is_peft_model(model) else model
    digest = hashlib.sha256(b"distalign-model-v1\0")
    description = _architecture_description(causal_lm)
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    parameters = dict(causal_lm.named_parameters(remove_duplicate=False))
    entries = []
    for name, tensor in causal_lm.state_dict().items():
        key = _base_weight_name(name) if exclude_adapters else name
        if key is not None:
            entries.append((key, name, tensor))
    for key, name, tensor in sorted(entries, key=lambda entry: entry[0]):
        with _whole(tensor, parameters.get(name)) as whole:
            header = f"\0{key}\0{whole.dtype}\0{tuple(whole.shape)}\0"
            digest.update(header.encode())
            digest.update(tensor_bytes(whole))
    return digest.hexdigest()


@contextlib.contextmanager
def _whole(tensor: torch.Tensor, parameter: nn.Parameter | None) -> Iterator[torch.Tensor]:
    """``tensor`` whole. A ZeRO-3 partitioned parameter (built by ``deepspeed.zero.Init``: its own
    tensor is empty) is gathered for the moment, which is a collective."""
    if parameter is None or not hasattr(parameter, "ds_id"):
        yield tensor
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter]):
        yield parameter.data


TokenRow = Sequence[int] | torch.Tensor | np.ndarray


def _update_with_ids(digest: Any, ids: TokenRow) -> None:
    if isinstance(ids, torch.Tensor):
        array = ids.detach().to("cpu", torch.int64).numpy()
    else:
        array = np.asarray(ids, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"each token row must be one-dimensional, got shape {array.shape}")
    digest.update(len(array).to_bytes(8, "little"))  # the length prefix keeps row boundaries unambiguous
    digest.update(array.astype("<i8").tobytes())


def data_fingerprint(rows: Iterable[TokenRow | Mapping[str, TokenRow]]) -> str:
    """Hex sha256 of tokenised rows, in order.

    A row is a sequence of token ids, or a mapping of named id sequences (e.g. ``input_ids`` and
    ``completion_mask``, so a different prompt/completion split of the same tokens counts as different
    data). Row order matters: cached results are returned in row order.
    """
    digest = hashlib.sha256(b"distalign-data-v1\0")
    row_count = 0
    for row in rows:
        if isinstance(row, Mapping):
            digest.update(b"M")
            for name in sorted(row):
                digest.update(f"{name}\0".encode())
                _update_with_ids(digest, row[name])
        else:
            digest.update(b"R")
            _update_with_ids(digest, row)
        row_count += 1
    digest.update(row_count.to_bytes(8, "little"))
    return digest.hexdigest()
