"""Reference-model log-probs: the providers, and a disk cache that is never silently stale.

Providers of the reference ``log pi_ref(y | x)``:

* a separate frozen model (:func:`load_reference_model`), for full fine-tunes;
* the policy itself with its LoRA adapters disabled (:func:`adapters_disabled`), so no second copy of
  the base weights is held;
* a precomputed table (:class:`ReferenceLogprobCache`), computed once by either of the above.

The cache key hashes everything the numbers depend on: the reference model's fingerprint, the
tokenised data's fingerprint, the tokenisation settings and the log-prob settings. Any change gives a
new key and hence a recomputation; an entry whose files do not match their recorded checksums is
rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distalign.cache import COMPLETE_MARKER, cache_root, is_complete, publish_directory
from distalign.models.fingerprint import tensor_bytes
from distalign.models.loading import DtypeName, is_peft_model, load_model_and_tokenizer, unwrap_model
from distalign.models.logprobs import SequenceLogprobModel
from distalign.models.token_logprobs import sequence_logprobs

logger = logging.getLogger(__name__)

_CACHE_FORMAT_VERSION = 1
_TENSORS_FILE = "logprobs.safetensors"
_META_FILE = "meta.json"


def reference_key_parts(
    *,
    reference_model_fingerprint: str,
    data_fingerprint: str,
    tokenization: Mapping[str, Any],
    logprob_settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The standard key of a cached reference log-prob table (all values must be JSON-serialisable).

    ``tokenization``: e.g. chat template, max lengths, truncation side, special-token handling.
    ``logprob_settings``: e.g. reference dtype, provider (separate model / adapters off).
    """
    return {
        "format": _CACHE_FORMAT_VERSION,
        "reference_model": reference_model_fingerprint,
        "data": data_fingerprint,
        "tokenization": dict(tokenization),
        "logprobs": dict(logprob_settings),
    }


def _canonical_json(key_parts: Mapping[str, Any]) -> str:
    try:
        return json.dumps(key_parts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"cache key parts must be JSON-serialisable: {error}") from error


def _tensor_sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


class ReferenceLogprobCache:
    """Reference log-prob tables on disk, one directory per key: safetensors + a JSON sidecar.

    ``last_event`` records what the latest :meth:`get_or_compute` did: ``"hit"``, ``"computed"`` (no
    entry) or ``"rebuilt"`` (an entry existed but was damaged or did not match its key).
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(cache_dir) if cache_dir is not None else cache_root() / "reference_logprobs"
        self.last_event: str | None = None

    def key(self, key_parts: Mapping[str, Any]) -> str:
        """Hex sha256 of the canonical JSON of ``key_parts``."""
        return hashlib.sha256(_canonical_json(key_parts).encode()).hexdigest()

    def path_for(self, key_parts: Mapping[str, Any]) -> Path:
        """Directory that holds (or would hold) the entry for ``key_parts``."""
        return self.root / self.key(key_parts)

    def load(self, key_parts: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """The cached tensors for ``key_parts`` if a complete, intact entry exists, else None."""
        directory = self.path_for(key_parts)
        if not directory.exists():
            return None
        problem = None
        try:
            tensors, problem = self._read_verified(directory, key_parts)
        except Exception as error:  # any failure to read back (e.g. SafetensorError) means: do not use it
            tensors, problem = None, f"unreadable ({type(error).__name__}: {error})"
        if problem is not None:
            logger.warning(
                "reference log-prob cache entry %s is invalid: %s; recomputing", directory, problem
            )
            return None
        return tensors

    def _read_verified(
        self, directory: Path, key_parts: Mapping[str, Any]
    ) -> tuple[dict[str, Tensor] | None, str | None]:
        if not is_complete(directory):
            return None, "incomplete (no completion marker)"
        meta = json.loads((directory / _META_FILE).read_text())
        if _canonical_json(meta["key_parts"]) != _canonical_json(key_parts):
            return None, "its recorded key parts differ from the requested ones"
        tensors = load_file(directory / _TENSORS_FILE)
        recorded = meta["tensors"]
        if set(tensors) != set(recorded):
            return None, f"tensor names {sorted(tensors)} differ from the recorded {sorted(recorded)}"
        for name, tensor in tensors.items():
            expected = recorded[name]
            if list(tensor.shape) != expected["shape"] or str(tensor.dtype) != expected["dtype"]:
                return (
                    None,
                    f"tensor {name!r} has shape/dtype {tuple(tensor.shape)}/{tensor.dtype}, not as recorded",
                )
            if _tensor_sha256(tensor) != expected["sha256"]:
                return None, f"tensor {name!r} fails its checksum"
        return tensors, None

    def store(self, key_parts: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Write an entry atomically (replacing any previous one); returns the stored CPU tensors."""
        if not tensors or not all(
            isinstance(name, str) and isinstance(t, Tensor) for name, t in tensors.items()
        ):
            raise TypeError("compute_fn must return a non-empty dict of str -> torch.Tensor")
        stored = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        meta = {
            "format": _CACHE_FORMAT_VERSION,
            "key": self.key(key_parts),
            "key_parts": json.loads(_canonical_json(key_parts)),
            "tensors": {
                name: {"shape": list(t.shape), "dtype": str(t.dtype), "sha256": _tensor_sha256(t)}
                for name, t in stored.items()
            },
        }
        directory = self.path_for(key_parts)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=self.root))
        try:
            save_file(stored, staging / _TENSORS_FILE)
            (staging / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            (staging / COMPLETE_MARKER).write_text("ok\n")
            publish_directory(staging, directory, replace=directory.exists())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return stored

    def get_or_compute(
        self, key_parts: Mapping[str, Any], compute_fn: Callable[[], Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Cached tensors for ``key_parts``; otherwise ``compute_fn()``, stored, then returned (on CPU)."""
        cached = self.load(key_parts)
        if cached is not None:
            self.last_event = "hit"
            return cached
        existed = self.path_for(key_parts).exists()
        stored = self.store(key_parts, compute_fn())
        self.last_event = "rebuilt" if existed else "computed"
        return stored


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` (peft LoRA, possibly wrapped) computes with its adapters off.

    This gives the base model's outputs, the reference of a LoRA run. Raises for a model without
    adapters, where "adapters off" would silently make the policy its own reference.
    """
    inner = unwrap_model(model)
    if is_peft_model(inner):
        with inner.disable_adapter():
            yield
    elif getattr(inner, "_hf_peft_config_loaded", False):  # adapters loaded through transformers itself
        inner.disable_adapters()
        try:
            yield
        finally:
            inner.enable_adapters()
    else:
        raise ValueError(
            f"adapters_off needs a model with LoRA adapters, but {type(inner).__name__} has none; "
            "use a separate reference model instead"
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:  # restore each module's own flag, not one flag for all
        for module, training in modes.items():
            module.training = training


def compute_reference_logprobs(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    adapters_off: bool,
    chunk_size: int = 1024,
) -> Tensor:
    """Summed completion log-probs of every sequence in ``batches``, in order, without gradients.

    Args:
        model: causal LM (optionally peft, or a :class:`SequenceLogprobModel` / DDP wrapper of one).
        batches: dicts with ``input_ids``, ``attention_mask``, ``completion_mask`` ([B, T] each) and
            optionally ``position_ids``.
        adapters_off: score with LoRA adapters disabled (the base model as reference).
        chunk_size: see :func:`sequence_logprobs`.

    Returns:
        [N] float32 CPU tensor, N = total rows. The model's train/eval modes are restored afterwards.
    """
    device = next(model.parameters()).device
    scores: list[Tensor] = []
    disabled = adapters_disabled(model) if adapters_off else contextlib.nullcontext()
    with torch.no_grad(), _eval_mode(model), disabled:
        for batch in batches:
            inputs = {
                key: batch[key].to(device) for key in ("input_ids", "attention_mask", "completion_mask")
            }
            position_ids = batch.get("position_ids")
            if position_ids is not None:
                inputs["position_ids"] = position_ids.to(device)
            if isinstance(_strip_ddp(model), SequenceLogprobModel):
                summed, _ = model(**inputs)  # through the wrapper, so sharded (FSDP) parameters work
            else:
                summed = sequence_logprobs(_strip_ddp(model), **inputs, chunk_size=chunk_size).summed
            scores.append(summed.float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def _strip_ddp(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def load_reference_model(
    name: str,
    *,
    dtype: DtypeName = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load a separate reference model by name (see ``load_model_and_tokenizer``), frozen and in eval mode."""
    model, _ = load_model_and_tokenizer(
        name, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision, cache_dir=cache_dir
    )
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    return model.eval()
