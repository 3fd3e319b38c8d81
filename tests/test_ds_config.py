"""DeepSpeed config merging: the JSON's ZeRO settings + the run config's batch,
precision and clipping; a disagreement is an error naming both sources.

    python -m pytest tests/test_ds_config.py -q
"""
import json
from pathlib import Path

import pytest

from vlm_dist.config import ConfigError, load_config
from vlm_dist.training.ds_config import build_ds_config, load_ds_json, offloads_optimizer, zero_stage

DS = Path(__file__).resolve().parents[1] / "ds_configs"
RUN_VALUES = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


@pytest.fixture
def cfg():
    return load_config(None, ["--train.max_steps=10", "--train.micro_batch_size=3", "--train.grad_accum=2",
                              "--train.max_grad_norm=0.5"])


@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, False), ("zero3", 3, False),
                                                  ("zero3_offload", 3, True)])
def test_shipped_jsons_hold_only_deepspeed_settings_and_get_the_run_values(cfg, name, stage, offload):
    raw = load_ds_json(DS / f"{name}.json")
    assert not set(raw) & set(RUN_VALUES), f"{name}.json holds run-config values"
    ds = build_ds_config(DS / f"{name}.json", cfg, world_size=4)
    assert zero_stage(ds) == stage and offloads_optimizer(ds) is offload
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["fp16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"] == raw["zero_optimization"]


def test_deepspeed_accepts_the_built_config(cfg):
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in ("zero2", "zero3", "zero3_offload"):
        ds = DeepSpeedConfig(build_ds_config(DS / f"{name}.json", cfg, world_size=1))
        assert (ds.train_batch_size, ds.gradient_accumulation_steps, ds.gradient_clipping) == (6, 2, 0.5)
        assert ds.zero_config.stage == zero_stage(load_ds_json(DS / f"{name}.json"))


def test_fp32_and_fp16_runs_set_precision(cfg):
    cfg.model.dtype = "float32"
    ds = build_ds_config(DS / "zero2.json", cfg, 1)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    cfg.model.dtype = "float16"
    assert build_ds_config(DS / "zero2.json", cfg, 1)["fp16"]["enabled"] is True


def test_a_disagreeing_value_names_both_sources(cfg, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as e:
        build_ds_config(path, cfg, 1)
    msg = str(e.value)
    assert str(path) in msg and "train_micro_batch_size_per_gpu=8" in msg and "--train.micro_batch_size=3" in msg


@pytest.mark.parametrize("json_part, flag", [
    ({"gradient_accumulation_steps": 4}, "--train.grad_accum=2"),
    ({"train_batch_size": 64}, "world size 2"),
    ({"gradient_clipping": 1.0}, "--train.max_grad_norm=0.5"),
    ({"bf16": {"enabled": False}}, "--model.dtype=bfloat16"),
    ({"fp16": {"enabled": True}}, "--model.dtype=bfloat16"),
])
def test_each_run_value_is_checked(cfg, json_part, flag):
    with pytest.raises(ConfigError, match=flag):
        build_ds_config(json_part, cfg, 2)


def test_agreeing_and_auto_values_are_fine(cfg):
    ds = build_ds_config({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": "auto",
                          "train_batch_size": "auto", "gradient_clipping": 0.5,
                          "bf16": {"enabled": "auto", "immediate_grad_update": True}, "optimizer": "auto"}, cfg, 2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 12
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True,   # DeepSpeed's own keys stay
                          "check_grad_overflow": True}
    assert "optimizer" not in ds


def test_optimizer_and_scheduler_sections_are_errors(cfg):
    with pytest.raises(ConfigError, match="optimizer comes from the run config.*remove optimizer"):
        build_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, cfg, 1)
    with pytest.raises(ConfigError, match=r"--train\.warmup_ratio.*remove scheduler"):
        build_ds_config({"scheduler": {"type": "WarmupLR"}}, cfg, 1)


def test_bad_json_names_the_file(tmp_path, cfg):
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        build_ds_config(bad, cfg, 1)
    with pytest.raises(ConfigError, match=r"missing\.json does not exist \(check --deepspeed"):
        build_ds_config(tmp_path / "missing.json", cfg, 1)


def test_the_input_dict_is_not_modified(cfg):
    src = {"zero_optimization": {"stage": 2}}
    build_ds_config(src, cfg, 1)
    assert src == {"zero_optimization": {"stage": 2}}


def test_a_non_finite_step_is_skipped_by_config_never_by_a_default(cfg):
    """bf16.check_grad_overflow is set explicitly (its default changed across DeepSpeed versions);
    a JSON turning the skip off is refused."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_ds_config(DS / "zero2.json", cfg, world_size=1)
    assert DeepSpeedConfig(ds).bfloat16_config.check_grad_overflow is True
    with pytest.raises(ConfigError, match="bf16.check_grad_overflow=false"):
        build_ds_config({"bf16": {"check_grad_overflow": False}}, cfg, 1)
    with pytest.raises(ConfigError, match="zero_optimization.compute_grad_norm=false"):
        build_ds_config({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, cfg, 1)


def test_zero2_reduces_the_connector_in_one_bucket_without_a_device_sync():
    """Stages 0-3 run on zero2.json. DeepSpeed's ZeRO-2 with overlap_comm synchronises the device at the
    end of every backward; without it the reduce-scatter runs on the compute stream. Stage 1's whole
    trainable set (the connector, whose gradients arrive last) fits one bucket: one reduce per micro-batch."""
    import torch

    from vlm_dist.model.connector import Connector

    zero = load_ds_json(DS / "zero2.json")["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is False
    m = load_config(None).model   # stage 1
    vision = json.loads((DS.parent / "launch" / "model_configs" / "siglip-so400m-patch14-384.json").read_text())
    llm = json.loads((DS.parent / "launch" / "model_configs" / "qwen3-8b-base.json").read_text())
    with torch.device("meta"):
        conn = Connector(vision_dim=vision["vision_config"]["hidden_size"], llm_dim=llm["hidden_size"],
                         kind=m.connector, num_latents=m.num_latents, depth=m.resampler_depth,
                         heads=m.resampler_heads, use_layernorm=m.use_layernorm)
    assert sum(p.numel() for p in conn.parameters()) <= zero["reduce_bucket_size"]


def test_every_shipped_json_is_explained_in_the_readme_and_accepted_by_deepspeed(cfg):
    """The reasons for each setting live in ds_configs/README.md because DeepSpeed refuses unknown keys
    (a "_comment" in zero_optimization is a validation error)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    readme = (DS / "README.md").read_text()
    shipped = sorted(DS.glob("*.json"))
    assert shipped
    for path in shipped:
        assert f"`{path.name}`" in readme, f"{path.name} is not described in ds_configs/README.md"
        DeepSpeedConfig(build_ds_config(path, cfg, world_size=1))
    with pytest.raises(ValidationError, match="_comment"):
        DeepSpeedConfig(build_ds_config({"zero_optimization": {"stage": 2, "_comment": "why"}}, cfg, 1))
