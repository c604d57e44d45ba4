"""Data layer: loading with validation at the boundary, tokenisation with an exact completion mask,
collation, and the ``distalign data check`` summary."""

from distalign.data.check import DatasetSummary, LengthStats, summarize_dataset
from distalign.data.collate import collate_pairs, collate_prompts, collate_sequences, collate_unpaired
from distalign.data.formats import DataError, DataFormat, detect_format, unpair_rows, validate_row
from distalign.data.loading import LoadedData, load_rows, resource_path
from distalign.data.tokenize import (
    render_prompt,
    tokenize_listwise,
    tokenize_paired,
    tokenize_prompts,
    tokenize_unpaired,
)
from distalign.data.tokenized import (
    TokenizationReport,
    TokenizationSettings,
    TokenizedCompletion,
    TokenizedList,
    TokenizedPair,
    TokenizedPrompt,
)

__all__ = [
    "DataError",
    "DataFormat",
    "DatasetSummary",
    "LengthStats",
    "LoadedData",
    "TokenizationReport",
    "TokenizationSettings",
    "TokenizedCompletion",
    "TokenizedList",
    "TokenizedPair",
    "TokenizedPrompt",
    "collate_pairs",
    "collate_prompts",
    "collate_sequences",
    "collate_unpaired",
    "detect_format",
    "load_rows",
    "render_prompt",
    "resource_path",
    "summarize_dataset",
    "tokenize_listwise",
    "tokenize_paired",
    "tokenize_prompts",
    "tokenize_unpaired",
    "unpair_rows",
    "validate_row",
]
