"""Checks of a loaded config: ranges and combinations (`validate_config`, run at load), and
whether the run has what it needs on disk (`check_run_inputs`). Each error names the flag.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from vlm_dist.config.media import check_media_config
from vlm_dist.config.schema import (ADAPTER_MODES, ALL_PROJECTIONS, SECTIONS, Config, ConfigError, suggest,
                                    valid_keys)


def validate_config(cfg: Config) -> None:
    """Check ranges and combinations; raise ConfigError naming the flag."""
    m, lo, d, t, c = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.checkpoint

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    # model
    need(m.llm.strip() != "", "--model.llm is empty: give a local model directory or a hub id")
    need(m.vision.strip() != "", "--model.vision is empty: give a local model directory or a hub id")
    if m.connector == "resampler":
        need(m.num_latents is not None and m.num_latents >= 1,
             f"--model.num_latents={m.num_latents}: the resampler needs at least 1 latent (LLaVA-style resamplers use 64)")
        need(m.resampler_depth >= 1, f"--model.resampler_depth={m.resampler_depth}: must be >= 1")
        need(m.resampler_heads >= 1, f"--model.resampler_heads={m.resampler_heads}: must be >= 1")
    else:
        need(m.num_latents is None, f"--model.num_latents={m.num_latents} is meaningless with "
             "--model.connector=mlp (one token per patch): set --model.num_latents=null")
    need(0.0 < m.checkpoint_fraction <= 1.0,
         f"--model.checkpoint_fraction={m.checkpoint_fraction}: must be in (0, 1] (1: every decoder layer recomputes)")
    need(m.checkpoint_fraction == 1.0 or m.gradient_checkpointing,
         f"--model.checkpoint_fraction={m.checkpoint_fraction} needs --model.gradient_checkpointing=true "
         "(without it no layer recomputes)")
    check_media_config(m)      # model.tiling, model.video (vlm_dist.config.media)
    # lora
    if m.llm_mode in ADAPTER_MODES:
        need(lo.r is not None and lo.r >= 1,
             f"--model.llm_mode={m.llm_mode} needs a LoRA rank: --lora.r={lo.r} must be >= 1 (LLaVA-1.5 LoRA: 128)")
        need(lo.alpha is not None and lo.alpha > 0,
             f"--model.llm_mode={m.llm_mode} needs --lora.alpha > 0, got {lo.alpha} (LLaVA-1.5 LoRA: 256)")
        need(len(lo.target_modules) > 0,
             f"--model.llm_mode={m.llm_mode} needs --lora.target_modules, e.g. {','.join(ALL_PROJECTIONS)}")
        need(t.lr_adapters > 0, f"--train.lr_adapters={t.lr_adapters}: adapters train in "
             f"--model.llm_mode={m.llm_mode}, so their learning rate must be > 0")
    need(0.0 <= lo.dropout < 1.0, f"--lora.dropout={lo.dropout}: must be in [0, 1)")
    if m.llm_mode == "qlora":
        need(m.dtype != "float32", "--model.llm_mode=qlora computes in 16 bits: use --model.dtype=bfloat16")
    if m.llm_mode == "full":
        need(t.lr_llm > 0, f"--train.lr_llm={t.lr_llm}: the LLM trains in --model.llm_mode=full, so it must be > 0")
    # data
    need(d.max_seq_len >= 16, f"--data.max_seq_len={d.max_seq_len}: must be >= 16")
    need(d.num_workers >= 0, f"--data.num_workers={d.num_workers}: must be >= 0")
    need(0.0 <= d.eval_fraction < 1.0, f"--data.eval_fraction={d.eval_fraction}: must be in [0, 1)")
    for name, sources in (("records", d.records), ("eval_records", d.eval_records)):
        for s in sources:
            need(s.path.strip() != "", f"--data.{name}: an entry has an empty path")
            need(s.weight is None or s.count is None,
                 f"--data.{name}: {s.path} sets both weight and count; give one")
            need(s.weight is None or s.weight > 0, f"--data.{name}: {s.path} weight {s.weight} must be > 0")
            need(s.count is None or s.count >= 1, f"--data.{name}: {s.path} count {s.count} must be >= 1")
        kinds = {("weight" if s.weight is not None else "count" if s.count is not None else "plain")
                 for s in sources}
        need(len(kinds - {"plain"}) <= 1,
             f"--data.{name}: mixes weights and counts; a mixture uses one or the other")
        need(not (kinds & {"weight", "count"}) or "plain" not in kinds,
             f"--data.{name}: some entries have a weight/count and some do not; give every entry one")
    # train
    need(t.output_dir.strip() != "", "--train.output_dir is empty: give the run directory")
    need(t.max_steps is not None or t.epochs is not None,
         "the run has no length: add --train.max_steps=N or --train.epochs=N")
    need(t.max_steps is None or t.epochs is None,
         f"--train.max_steps={t.max_steps} and --train.epochs={t.epochs} are both set: keep one")
    need(t.max_steps is None or t.max_steps >= 1, f"--train.max_steps={t.max_steps}: must be >= 1")
    need(t.epochs is None or t.epochs >= 1, f"--train.epochs={t.epochs}: must be >= 1")
    need(t.micro_batch_size >= 1, f"--train.micro_batch_size={t.micro_batch_size}: must be >= 1")
    need(t.grad_accum >= 1, f"--train.grad_accum={t.grad_accum}: must be >= 1")
    if t.micro_batch_tokens is not None:
        need(d.pack, f"--train.micro_batch_tokens={t.micro_batch_tokens} needs --data.pack=true")
        need(t.micro_batch_tokens >= d.max_seq_len, f"--train.micro_batch_tokens={t.micro_batch_tokens} "
             f"must be >= --data.max_seq_len={d.max_seq_len} (one row)")
    need(t.lr_connector > 0, f"--train.lr_connector={t.lr_connector}: the connector always trains; must be > 0")
    for name in ("lr_adapters", "lr_llm", "weight_decay", "max_grad_norm"):
        need(getattr(t, name) >= 0, f"--train.{name}={getattr(t, name)}: must be >= 0")
    need(len(t.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in t.adam_betas),
         f"--train.adam_betas={t.adam_betas}: two values in [0, 1), e.g. [0.9,0.999]")
    need(t.adam_eps > 0, f"--train.adam_eps={t.adam_eps}: must be > 0")
    need(0.0 <= t.warmup_ratio < 1.0, f"--train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    need(0.0 <= t.min_lr_ratio <= 1.0, f"--train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
    need(t.log_every >= 1, f"--train.log_every={t.log_every}: must be >= 1")
    need(t.eval_every >= 0, f"--train.eval_every={t.eval_every}: must be >= 0 (0: only at the end)")
    need(t.nan_patience >= 1, f"--train.nan_patience={t.nan_patience}: must be >= 1")
    need(t.preempt_check_every >= 1, f"--train.preempt_check_every={t.preempt_check_every}: must be >= 1")
    # checkpoint
    need(c.every >= 0, f"--checkpoint.every={c.every}: must be >= 0 (0: only at the end)")
    need(c.keep_last >= 1, f"--checkpoint.keep_last={c.keep_last}: must be >= 1")
    need(c.resume is None or c.resume.strip() != "",
         "--checkpoint.resume is empty: use null, auto or a checkpoint path")
    for key in c.allow_changed:
        section, _, name = key.partition(".")
        near = [k for k in valid_keys() if k.split(".")[1] == key]
        hint = (suggest(section, name) if section in SECTIONS and name
                else f" (did you mean {', '.join(near)}?)" if near else "")
        need(key in valid_keys(), f"--checkpoint.allow_changed: {key!r} is not a config key{hint}; "
             "name keys as section.key, e.g. train.lr_connector")


# --------------------------------------------------------------------------- what the run needs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _model_problem(flag: str, value: str) -> Optional[str]:
    p = Path(value).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            return f"{flag}={value} has no config.json: point {flag} at a Hugging Face model directory"
        return None
    if _HUB_ID.match(value) and not value.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(value, "config.json"), str):
            return None
        return (f"{flag}={value} is not a local directory and not in the Hugging Face cache: download it "
                f"once before launching (`hf download {value}`) or add {flag}=PATH to a local copy")
    return f"{flag}={value} does not exist: add {flag}=PATH to a Hugging Face model directory"


def check_run_inputs(cfg: Config, *, need_vision: bool = True) -> None:
    """Check the run has what it needs (models, records, cache, init_from); one error lists every gap
    with the flag to add. The checkpoint given by --checkpoint.resume is the trainer's to check."""
    problems = []
    for flag, value, wanted in (("--model.llm", cfg.model.llm, True), ("--model.vision", cfg.model.vision, need_vision)):
        problem = _model_problem(flag, value) if wanted else None
        if problem:
            problems.append(problem)
    if not cfg.data.records:
        problems.append("no records: add --data.records=PATH.jsonl (make one with vlm-convert)")
    for name, sources in (("records", cfg.data.records), ("eval_records", cfg.data.eval_records)):
        for s in sources:
            if not Path(s.path).expanduser().is_file():
                problems.append(f"--data.{name}: {s.path} does not exist: add --data.{name}=PATH.jsonl "
                                "(make one with vlm-convert)")
    if cfg.data.cache is None:
        problems.append("no feature cache: add --data.cache=DIR (build one with vlm-cache build)")
    elif not Path(cfg.data.cache).expanduser().is_dir():
        problems.append(f"--data.cache={cfg.data.cache} does not exist: build it with vlm-cache build "
                        "or add --data.cache=DIR")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).expanduser().is_dir():
        problems.append(f"--model.init_from={cfg.model.init_from} does not exist: give the previous stage's "
                        "export directory (<output_dir>/export) or --model.init_from=null to start fresh")
    if problems:
        raise ConfigError("this run cannot start:\n  - " + "\n  - ".join(problems))

