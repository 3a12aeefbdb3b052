"""Typed configuration: dataclasses with help on every field, YAML in, `key.sub=value` overrides.

Every check names the key and what was expected, so a bad recipe fails before any work starts. fields.py holds the
machinery, sections.py the recipe's sections, run.py the whole recipe (RunConfig) and its loader.
"""

from rayalign.config.fields import ConfigError, build_dataclass, config_field, set_override
from rayalign.config.fields import describe_fields as _describe
from rayalign.config.run import OFFLINE_ONLY, RUN_MODES, RunConfig, load_config, save_config
from rayalign.config.sections import (TINY_MODEL, is_tiny_model, ModelConfig, PromptColumnsConfig, PromptsConfig, SamplingConfig,
                                     EnginesConfig, LatentRewardConfig, ImplicitRewardConfig,
                                     ConsistencyRewardConfig, RewardModelConfig, UserRewardConfig, RewardsConfig,
                                     PAIR_METHODS, PairsConfig, TRAINING_LOSSES, TrainingConfig,
                                     ONLINE_ALGORITHMS, OnlineConfig, WANDB_MODES, WandbConfig, LoggingConfig,
                                     ClusterConfig, LIKELIHOODS, ACCURACY_SCORINGS, EvalConfig)

__all__ = ['ConfigError', 'build_dataclass', 'config_field', 'set_override', 'describe_fields', 'OFFLINE_ONLY',
           'RUN_MODES', 'RunConfig', 'load_config', 'save_config', 'TINY_MODEL', 'is_tiny_model', 'ModelConfig',
           'PromptColumnsConfig', 'PromptsConfig', 'SamplingConfig', 'EnginesConfig', 'LatentRewardConfig',
           'ImplicitRewardConfig', 'ConsistencyRewardConfig', 'RewardModelConfig', 'UserRewardConfig',
           'RewardsConfig', 'PAIR_METHODS', 'PairsConfig', 'TRAINING_LOSSES', 'TrainingConfig',
           'ONLINE_ALGORITHMS', 'OnlineConfig', 'WANDB_MODES', 'WandbConfig', 'LoggingConfig',
           'ClusterConfig', 'LIKELIHOODS', 'ACCURACY_SCORINGS', 'EvalConfig']


def describe_fields(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field of a recipe (or of `cls`), for `rayalign config`-style listings."""
    return _describe(cls or RunConfig, prefix)
