"""The run configuration: one tree of typed dataclasses, loaded from YAML and
overridden on the command line, validated at load.

    cfg = load_config("launch/configs/stage2_sft.yaml", ["--train.max_steps=100", "--data.records=a.jsonl"])
    save_config(cfg, "runs/x/config.yaml")      # the resolved config, reloads identically
    check_run_inputs(cfg)                       # names the flag to add for whatever the run lacks
    print(config_help())                        # every key with its type, default and meaning

schema.py     the dataclasses, a docstring under each field, and the shared constants
              (LLM_MODES, ALL_PROJECTIONS); standard library only
overrides.py  YAML + `--section.key=value` overrides, typed, with "did you mean" for typos;
              saving and help
checks.py     ranges and combinations (run at load), and what the run needs on disk

A resume that changes the run's mathematics is refused unless `--checkpoint.allow_changed=key,...`
names each changed key (vlm_dist.training.run_record).
"""
from vlm_dist.config.checks import check_run_inputs, validate_config
from vlm_dist.config.overrides import (DEFAULT_CONFIG, REPO_ROOT, config_help, config_to_dict, load_config,
                                       save_config)
from vlm_dist.config.schema import (ADAPTER_MODES, ALL_PROJECTIONS, LLM_MODES, SECTIONS, CheckpointConfig, Config,
                                    ConfigError, DataConfig, LoraConfig, ModelConfig, RecordSource, TrainConfig,
                                    field_docs)

__all__ = ["check_run_inputs", "validate_config", "DEFAULT_CONFIG", "REPO_ROOT", "config_help", "config_to_dict", "load_config",
           "save_config", "ADAPTER_MODES", "ALL_PROJECTIONS", "LLM_MODES", "SECTIONS", "CheckpointConfig", "Config",
           "ConfigError", "DataConfig", "LoraConfig", "ModelConfig", "RecordSource", "TrainConfig", "field_docs"]
