"""Typed, documented, validated run configuration: YAML plus dotted ``key=value`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo fails with the field path
(``loss.betaa: unknown field``). ``load_config(path, overrides)`` is the single entry point; the
resolved configuration is written into every run directory as ``config.yaml``.

Loss options default to ``None`` meaning "the loss function's own default": the defaults live once,
in the signature of the registered objective (see :mod:`distalign.losses.base`).
"""

from distalign.config.base import ChatTemplateMode, MixedPrecisionMode, Section
from distalign.config.evaluation import EvalConfig
from distalign.config.online import OnlineConfig
from distalign.config.run import (
    RunConfig,
    build_config,
    dump_config,
    load_config,
    merge_config_trees,
    parse_overrides,
)
from distalign.config.sections import (
    AggregatorConfig,
    DataConfig,
    DesignerConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    ReferenceConfig,
    TrainConfig,
)
from distalign.errors import ConfigError

__all__ = [
    "AggregatorConfig",
    "ChatTemplateMode",
    "ConfigError",
    "DataConfig",
    "DesignerConfig",
    "EvalConfig",
    "LoraConfig",
    "LossConfig",
    "MixedPrecisionMode",
    "ModelConfig",
    "OnlineConfig",
    "ReferenceConfig",
    "RunConfig",
    "Section",
    "TrainConfig",
    "build_config",
    "dump_config",
    "load_config",
    "merge_config_trees",
    "parse_overrides",
]
