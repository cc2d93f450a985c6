"""The one run configuration: the schema (`schema`), presets (`presets`), YAML and overrides (`loading`).

Every default lives in `schema`. Names follow ddpo-pytorch (`sample.num_batches_per_epoch`,
`train.timestep_fraction`, ...) so its users feel at home.
"""

from ddpo_ray.config.loading import add_config_arguments, build_config, config_from_args, parse_override
from ddpo_ray.config.presets import PRESETS
from ddpo_ray.config.schema import (
    AdvantageConfig,
    ClusterConfig,
    ConfigError,
    DDPOConfig,
    EvalConfig,
    ModelConfig,
    PromptsConfig,
    RewardConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS", "AdvantageConfig", "ClusterConfig", "ConfigError", "DDPOConfig", "EvalConfig", "ModelConfig",
    "PromptsConfig", "RewardConfig", "SampleConfig", "TrainConfig", "add_config_arguments", "build_config",
    "config_from_args", "parse_override",
]
