"""Experiment configuration: typed dataclasses, strict YAML with `base:`, overrides, validation.

A config file is nested YAML with one mapping per section (model, parallel, optim, train, data,
log, checkpoint). `base: other.yaml` (relative to the including file) inherits another file; the
including file's keys deep-merge over it. Loading is strict: an unknown key, a wrong type or a value
out of range is a `ConfigError` that names the dotted key, the file and the fix. Each section checks
its own fields; `validate(config, world_size)` does the checks that need several sections or the
world size, and returns the `Topology` the run will use.

The modules: `fields` (ConfigError, field typing, the section base class), `sections` (one dataclass
per section, and `Config`), `loading` (YAML files, `base:`, overrides, dict <-> Config) and
`validation` (the cross-field checks). Import the names from `megalm.config`.
"""

from megalm.config.fields import ConfigError
from megalm.config.loading import apply_overrides, config_from_dict, config_to_dict, config_to_yaml, load_config
from megalm.config.sections import (
    _SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    _nearby_divisor,
)
from megalm.config.validation import grad_accum_steps, resolved_decay_steps, validate

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "TrainConfig", "apply_overrides", "config_from_dict", "config_to_dict", "config_to_yaml",
    "grad_accum_steps", "load_config", "resolved_decay_steps", "validate",
]
