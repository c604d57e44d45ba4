"""Models: loading (HF / LoRA / GGUF / embedded defaults), exact sequence log-probs, reference log-probs."""

from distalign.models.fingerprint import data_fingerprint, model_fingerprint
from distalign.models.gguf import EmbeddedModelUnavailableError, convert_gguf, smollm2_path
from distalign.models.loading import (
    LoraSettings,
    ModelLoadError,
    apply_lora,
    load_model_and_tokenizer,
    unwrap_model,
)
from distalign.models.logprobs import SequenceLogprobModel, split_pairs
from distalign.models.reference import (
    ReferenceLogprobCache,
    adapters_disabled,
    compute_reference_logprobs,
    load_reference_model,
    reference_key_parts,
)
from distalign.models.saved import save_final_model
from distalign.models.tiny import build_tiny_model, tiny_model_path
from distalign.models.token_logprobs import SequenceLogprobs, sequence_logprobs

__all__ = [
    "EmbeddedModelUnavailableError",
    "LoraSettings",
    "ModelLoadError",
    "ReferenceLogprobCache",
    "SequenceLogprobModel",
    "SequenceLogprobs",
    "adapters_disabled",
    "apply_lora",
    "build_tiny_model",
    "compute_reference_logprobs",
    "convert_gguf",
    "data_fingerprint",
    "load_model_and_tokenizer",
    "load_reference_model",
    "model_fingerprint",
    "reference_key_parts",
    "save_final_model",
    "sequence_logprobs",
    "smollm2_path",
    "split_pairs",
    "tiny_model_path",
    "unwrap_model",
]
