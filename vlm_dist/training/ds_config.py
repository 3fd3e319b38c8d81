"""The DeepSpeed config of a run: the JSON's ZeRO/communication settings plus
the batch, precision, clipping and optimizer values from the run config.

    ds = build_ds_config("ds_configs/zero2.json", cfg, world_size)
    optimizer = build_optimizer(model, cfg, ds)                  # vlm_dist.training.optim
    engine, *_ = deepspeed.initialize(model=model, config=ds, optimizer=optimizer,
                                      lr_scheduler=build_scheduler(optimizer, cfg, total_steps))

The JSON holds only what is DeepSpeed's own (ZeRO, communication, logging).
Batch sizes, gradient accumulation, bf16/fp16 and gradient clipping are filled
in from the run config. A value the JSON also sets is checked, never silently
overridden: equal is fine, different is an error naming both sources; "auto"
counts as absent. The optimizer and schedule are vlm_dist.training.optim's, given to
deepspeed.initialize, so "optimizer" and "scheduler" sections (which DeepSpeed
would then ignore) are errors.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from vlm_dist.config import Config, ConfigError


def load_ds_json(path: str | os.PathLike) -> dict:
    """Read a DeepSpeed JSON; a missing file or invalid JSON names the file and the flag."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist (check --deepspeed; see ds_configs/)")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from e
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {p}: the top level must be an object")
    return ds


def _absent(value: Any) -> bool:
    return value is None or value == "auto"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _fill(section: dict, key: str, ours: Any, flag: str, where: str, src: str) -> None:
    """Put the run config's value in; a different value already there is an error naming both."""
    theirs = section.get(key)
    if not _absent(theirs) and not _same(theirs, ours):
        raise ConfigError(f"{src} sets {where}{key}={json.dumps(theirs)} but the run config says {flag} "
                          f"-> {json.dumps(ours)}: these values come from the run config; "
                          f"remove {where}{key} from {src} or change {flag.split('=')[0]}")
    section[key] = ours


def _section(ds: dict, key: str, src: str) -> dict:
    value = ds.get(key)
    if _absent(value):
        ds[key] = {}
    elif not isinstance(value, dict):
        raise ConfigError(f"{src}: {key} must be an object, got {json.dumps(value)}")
    return ds[key]


def zero_stage(ds: dict) -> int:
    """ZeRO stage of a DeepSpeed config (0 when it has no zero_optimization)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    """True when ZeRO keeps optimizer states on CPU/NVMe (DeepSpeed then needs its own CPU Adam)."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")


def _require_overflow_skip(ds: dict, src: str) -> None:
    """A step whose gradients are not finite must change nothing (the trainer counts such steps and
    stops after --train.nan_patience), so DeepSpeed's skip is set here, never left to a default.

    ZeRO-1/2 under bf16 skips only with bf16.check_grad_overflow (DeepSpeed >= 0.17.1; its default
    was False until 0.19.3); fp16 always checks; fp32 (and ZeRO-3) skip on a non-finite gradient norm
    (DeepSpeed >= 0.19.8), which ZeRO-1/2 computes only with zero_optimization.compute_grad_norm.
    """
    bf16 = ds["bf16"]
    if not _absent(bf16.get("check_grad_overflow")) and bf16["check_grad_overflow"] is not True:
        raise ConfigError(f"{src} sets bf16.check_grad_overflow={json.dumps(bf16['check_grad_overflow'])}: "
                          "a bf16 step with non-finite gradients would then be applied; remove the key "
                          "(the trainer sets it to true)")
    bf16["check_grad_overflow"] = True
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
        raise ConfigError(f"{src} sets zero_optimization.compute_grad_norm=false: DeepSpeed then cannot "
                          "skip a step with non-finite gradients; remove the key")


def build_ds_config(ds_json: str | os.PathLike | dict, cfg: Config, world_size: int) -> dict:
    """The full DeepSpeed config: the JSON (a path or an already-loaded dict) plus run-config values."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    if isinstance(ds_json, dict):
        src, ds = "the DeepSpeed config", copy.deepcopy(ds_json)
    else:
        src, ds = str(ds_json), load_ds_json(ds_json)
    t, m = cfg.train, cfg.model

    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size,
          f"--train.micro_batch_size={t.micro_batch_size}", "", src)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, f"--train.grad_accum={t.grad_accum}", "", src)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
          f"--train.micro_batch_size={t.micro_batch_size} x --train.grad_accum={t.grad_accum} "
          f"x world size {world_size}", "", src)
    _fill(ds, "gradient_clipping", float(t.max_grad_norm), f"--train.max_grad_norm={t.max_grad_norm}", "", src)
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        _fill(_section(ds, key, src), "enabled", m.dtype == dtype, f"--model.dtype={m.dtype}", f"{key}.", src)
    _require_overflow_skip(ds, src)

    # The optimizer and schedule are built by vlm_dist.training.optim and handed to deepspeed.initialize;
    # DeepSpeed would silently ignore JSON sections for them, so their presence is an error.
    if not _absent(ds.get("optimizer")):
        raise ConfigError(f"{src} has an optimizer section, but the optimizer comes from the run config "
                          "(AdamW with per-group learning rates: --train.lr_connector, --train.lr_adapters, "
                          "--train.lr_llm, --train.weight_decay, --train.adam_betas, --train.adam_eps) and "
                          f"DeepSpeed would ignore it: remove optimizer from {src}")
    if not _absent(ds.get("scheduler")):
        raise ConfigError(f"{src} has a scheduler section, but the learning-rate schedule comes from the run "
                          "config (--train.warmup_ratio, --train.min_lr_ratio) and DeepSpeed would ignore it: "
                          f"remove scheduler from {src}")
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    return ds
