r"""The training loop: the whole procedure, top to bottom, DeepSpeed ZeRO-2/3 on cached vision features.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json \
        --config launch/configs/stage1_align.yaml [--section.key=value ...]
    vlm-train --config launch/configs/stage1_align.yaml ...   # the installed command: one process,
                                                              # or one per rank under srun / mpirun

Also runs under torchrun, srun (one task per GPU) and mpirun; vlm_dist.dist finds
rank and world size. `train` below is the loop:
set up -> (resume) -> [micro-batches -> backward -> step -> log/eval/save] -> export.
`main` runs it as a command (a user's mistake is one line, exit code 2); the benchmark
imports `build_model` and `train_step` from here.

Loss: the mean over every supervised token of the global batch (all micro-batches,
all ranks): each micro-batch's summed loss is scaled by world x accum / global count,
which DeepSpeed's gradient averaging and accumulation turn back into exactly that mean.
The global count (and the lm_head chunk count all ranks share) is read from the sampler's
global plan, so a step has no collective of ours and no host sync (tests/test_step_syncs.py).

Tiles and video (model.tiling, model.video): the cache must have been built with the same
tiling and frame sampling (they are in the expected fingerprint); each record's blocks are
laid out from the cache's per-key layouts, and the loader hands the connectors every view
(`FeatureCache.views`). An untiled config reads view 0 of any cache (the untiled image).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

from vlm_dist import dist
from vlm_dist.config import (REPO_ROOT, Config, ConfigError, check_run_inputs, config_help, load_config,
                             save_config)
from vlm_dist.config.media import connector_tokens, frame_sampling, tiling_spec
from vlm_dist.data.loader import BatchStream
from vlm_dist.data.sampler import LengthGroupedSampler
from vlm_dist.errors import run_cli
from vlm_dist.model.vlm import ce_chunks
from vlm_dist.training.checkpoint import (disk_errors, init_adapter, load_engine_state, load_rank_state,
                                          nan_tag_for, publish, publish_export, resolve_resume,
                                          save_rank_state, set_rng_state, tag_for, withdraw, write_export)
from vlm_dist.training.ds_config import build_ds_config, zero_stage
from vlm_dist.training.metrics import MetricsLog
from vlm_dist.training.optim import apply_config_after_resume, build_optimizer, build_scheduler
from vlm_dist.training.run_record import check_resume, write_run_record


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="run config keys (--section.key=value):\n" + config_help())
    p.add_argument("--deepspeed", default=str(REPO_ROOT / "ds_configs" / "zero2.json"),
                   help="DeepSpeed JSON with ZeRO/communication settings (default: ds_configs/zero2.json)")
    p.add_argument("--config", default=None, help="run config YAML (default: launch/configs/stage1_align.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


# ----------------------------------------------------------------------------- set-up
def build_data(cfg: Config, cache, num_tokens: int | dict, out_dir: Path, rank: int):
    """Records -> tokenized (cached) -> eval held out -> mixture drawn; drops and duplicates counted and listed.

    `num_tokens`: slots per view, {kind: tokens} (vlm.num_tokens) or one int for images."""
    from vlm_dist.data.samples import load_training_set

    log = dist.print0
    common = dict(tokenizer_path=cfg.model.llm, template=cfg.data.template, num_tokens=num_tokens,
                  max_seq_len=cfg.data.max_seq_len, truncate=cfg.data.truncate, cache=cache,
                  seed=cfg.data.seed, log=log, tiled=cfg.model.tiling is not None,
                  video=cfg.model.video is not None)
    # the held-out fraction is split off among distinct records before the mixture repeats any
    fraction = 0.0 if cfg.data.eval_records else cfg.data.eval_fraction
    train_set, eval_set, report = load_training_set(cfg.data.records, eval_fraction=fraction, **common)
    listed = [name for name, rows in (("dropped.jsonl", report.listed), ("duplicates.jsonl", report.duplicates))
              if rows]
    log(f"data: {report.summary()}" + (f" (listed in {', '.join(str(out_dir / n) for n in listed)})"
                                       if listed else ""))
    if rank == 0:
        report.write(out_dir)
    if cfg.data.eval_records:
        eval_set, _, eval_report = load_training_set(cfg.data.eval_records, **common)
        log(f"eval data: {eval_report.summary()}")
    return train_set, eval_set


def make_sampler(cfg: Config, samples, env, seed: int, grad_accum: int = 1):
    return LengthGroupedSampler(
        samples.lengths, samples.modalities,
        world_size=env.world_size, rank=env.rank, max_seq_len=cfg.data.max_seq_len,
        rows_per_micro=cfg.train.micro_batch_size, packing=cfg.data.pack,
        max_tokens_per_micro=cfg.train.micro_batch_tokens, seed=seed, grad_accum=grad_accum,
        num_targets=samples.num_targets)   # the plan then carries the global counts train_step needs


def build_model(cfg: Config, tokenizer, feature_shape, is_main: bool, llm_weights: dict | None = None,
                zero_stage: int | None = None):
    """The VLM of the run config. `zero_stage` (of the DeepSpeed config; None: unknown) decides,
    with the kernels, whether the loss uses Liger's fused linear cross-entropy (resolve_fused_ce)."""
    from vlm_dist.model.build import (build_vlm, load_connectors, load_llm, resolve_fused_ce, resolve_kernels,
                                      set_trainable, trainable_table)

    dtype = getattr(torch, cfg.model.dtype)
    adapter = init_adapter(cfg.model.init_from, cfg.model.llm_mode)   # an export that lost its adapter: error
    llm = load_llm(cfg.model.llm, cfg.model.llm_mode, dtype, cfg.model.attn_implementation, lora=cfg.lora,
                   adapter=adapter, gradient_checkpointing=cfg.model.gradient_checkpointing, weights=llm_weights,
                   checkpoint_fraction=cfg.model.checkpoint_fraction, kernels=cfg.model.kernels)
    kernels, why = resolve_kernels(cfg.model.kernels)
    fused_ce, why_ce = resolve_fused_ce(kernels, zero_stage)
    if is_main:
        print(f"kernels: {kernels} ({why})", flush=True)
        print(f"loss: {why_ce}", flush=True)
    num_patches, vision_dim = feature_shape
    connector = dict(kind=cfg.model.connector, depth=cfg.model.resampler_depth,
                     heads=cfg.model.resampler_heads, use_layernorm=cfg.model.use_layernorm)
    if cfg.model.connector == "resampler":
        connector["num_latents"] = cfg.model.num_latents
    video_tokens = cfg.model.video.tokens_per_frame if cfg.model.video is not None else None
    try:
        vlm = build_vlm(llm, tokenizer, vision_dim, num_patches, connector, dtype, fused_ce=fused_ce,
                        video_tokens_per_frame=video_tokens)
    except ValueError as e:      # the mlp connector's tokens per frame are the patch count
        if video_tokens is None or "tokens_per_frame" not in str(e):
            raise
        raise ConfigError(f"--{e}") from None
    if cfg.model.init_from:
        load_connectors(vlm, cfg.model.init_from, log=print if is_main else (lambda *_: None))
    set_trainable(vlm, cfg.model.llm_mode)
    if is_main:
        print(trainable_table(vlm), flush=True)
    return vlm


# ----------------------------------------------------------------------------- the loop pieces
def to_device(batch: dict, device) -> dict:
    out = dict(batch)
    for k in ("input_ids", "position_ids", "targets"):
        out[k] = batch[k].to(device, non_blocking=True)
    # built in the worker, so the step needs no host sync: supervised positions, the samples'
    # boundaries (max_seqlen stays a Python int) and the image slots of the splice
    for k in ("supervised_index", "cu_seqlens"):
        out[k] = batch[k].to(device, non_blocking=True)
    out["media"] = {name: {k: (v if k == "counts" else v.to(device, non_blocking=True)) for k, v in m.items()}
                    for name, m in batch["media"].items()}
    return out


def expected_fingerprint(cfg: Config) -> dict:
    """What the run's feature cache must match: the tower's fingerprint, plus the tiling and the
    frame sampling when configured (loads the tower; run it on one rank)."""
    from vlm_dist.cache.reader import read_manifest
    from vlm_dist.model.vision import VisionTower

    fp = VisionTower.expected_fingerprint(cfg.model.vision, cfg.model.feature_layer,
                                          video_sampling=frame_sampling(cfg.model))
    if cfg.model.tiling is not None:
        # the image connector's tokens per view: num_latents, or (mlp) the cache's patch count
        patches = read_manifest(cfg.data.cache)["feature_shape"][0] if cfg.model.connector == "mlp" else None
        fp["tiling"] = tiling_spec(cfg.model, fp["image_size"], connector_tokens(cfg.model, patches)).fingerprint()
    return fp


def feature_lookups(cfg: Config, cache) -> dict:
    """{kind: key -> features}: every view of a tiled image (`cache.views`), or view 0 untiled
    (`cache[key]`, also from a tiled cache); every frame of a video."""
    lookups = {"image": cache.views if cfg.model.tiling is not None else cache.__getitem__}
    if cfg.model.video is not None:
        lookups["video"] = cache.views
    return lookups


def plan_counts(b: dict) -> tuple[int, int]:
    """(targets of this micro-step over all ranks, lm_head chunks every rank runs), as python ints
    from the sampler's global plan (vlm_dist.data.sampler): no collective and no host sync."""
    if "global_num_supervised" not in b:
        raise ValueError("batch has no global_num_supervised: build its sampler with target counts "
                         "(LengthGroupedSampler.from_samples, or num_targets=...)")
    # the same chunk count on every rank: under ZeRO-3 each lm_head call gathers it on all ranks
    return b["global_num_supervised"], ce_chunks(b["max_num_supervised"])


def train_step(engine, batches: list[dict], world: int) -> tuple[torch.Tensor, int]:
    """One optimizer step over `batches` (this rank's micro-batches). Returns summed loss and the
    global supervised count (all micro-batches, all ranks)."""
    global_count = sum(plan_counts(b)[0] for b in batches)
    scale = world * len(batches) / max(global_count, 1)
    loss_sum = torch.zeros((), device=engine.device)
    for b in batches:
        out = engine(**to_device(b, engine.device), validate=False, num_ce_chunks=plan_counts(b)[1])
        engine.backward(out["loss_sum"] * scale)
        engine.step()
        loss_sum += out["loss_sum"].detach()
    return loss_sum, global_count


@torch.no_grad()
def evaluate(engine, stream) -> float:
    engine.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    for b in stream:
        global_count, chunks = plan_counts(b)
        out = engine(**to_device(b, engine.device), validate=False, num_ce_chunks=chunks)
        total += out["loss_sum"].double()
        count += global_count        # already over all ranks
    engine.train()
    total = dist.all_reduce_sum(total)
    return (total / max(count, 1)).item()


def save(engine, vlm, cfg: Config, step: int, sampler, tokenizer, vlm_config: dict, env, nan_run: int,
         resume_target: bool = True) -> Path:
    """DeepSpeed checkpoint + per-rank state + export, published atomically by rank 0.

    Not a `resume_target` (a non-finite-loss stop): saved as nan_step_*, which `--resume auto`
    never takes and `latest` never names.
    """
    root = Path(cfg.train.output_dir) / "checkpoints"
    tag = tag_for(step) if resume_target else nan_tag_for(step)
    if env.rank == 0:   # a resumed run re-saves this step: its old marker goes before any rank writes
        withdraw(root / tag)
    dist.barrier()
    with disk_errors(root / tag):
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        save_rank_state(root / tag, env.rank, {"step": step, "sampler": sampler.state_dict(), "nan_run": nan_run})
        write_run_record(root / tag, cfg, env.rank == 0)   # config + data digest, for the resume check
        if cfg.checkpoint.export:
            write_export(vlm, root / tag / "export", vlm_config, cfg.model.llm_mode, env.rank == 0, tokenizer)
    dist.barrier()
    if env.rank == 0:
        with disk_errors(root / tag):
            publish(root, root / tag, {"step": step, "world_size": env.world_size, "nan_run": nan_run},
                    cfg.checkpoint.keep_last)
    dist.barrier()
    return root / tag


def loss_fault(step: int, loss_sum: torch.Tensor) -> torch.Tensor:
    """VLM_DIST_NAN_LOSS_AT=STEP reports that step's loss as NaN after its update was applied: a
    non-finite loss that DeepSpeed's overflow check did not catch (tests of the loop's own check)."""
    return loss_sum + float("nan") if os.environ.get("VLM_DIST_NAN_LOSS_AT") == str(step) else loss_sum


def fault_injection(step: int, rank: int) -> None:
    """VLM_DIST_KILL_AT=STEP:RANK makes that rank SIGKILL itself after that step (crash tests)."""
    spec = os.environ.get("VLM_DIST_KILL_AT")
    if spec and spec == f"{step}:{rank}":
        print(f"rank {rank}: VLM_DIST_KILL_AT={spec}: killing myself with SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- the loop
def train(argv: list[str] | None = None) -> int:
    """Train as the command line `argv` (default: sys.argv[1:]) says; returns the exit code."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, overrides)
    check_run_inputs(cfg)
    env = dist.init_distributed()
    # right away: a SIGUSR1 before the first step must not kill the rank
    stop = dist.Preemption(check_every=cfg.train.preempt_check_every)
    out_dir = Path(cfg.train.output_dir)
    # resume target first: a missing explicit checkpoint fails on every rank before any work
    resume_dir = resolve_resume(cfg.checkpoint.resume, out_dir / "checkpoints", env.world_size)
    # a resume that changes the run's mathematics is refused before config.yaml is rewritten
    for note in check_resume(resume_dir, cfg):
        dist.print0(f"resume: {note}")
    if env.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    dist.barrier()
    torch.manual_seed(cfg.train.seed)

    from transformers import AutoTokenizer

    from vlm_dist.cache.reader import check_cache_for_training
    from vlm_dist.contract.tiling import TilingSpec
    from vlm_dist.inference.export import media_fields

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.llm)
    # one rank loads the fp32 tower and hashes its weights
    expected = dist.compute_on_rank0(lambda: expected_fingerprint(cfg))
    cache = check_cache_for_training(cfg.data.cache, expected)
    feature_shape = cache.feature_shape
    ds_config = build_ds_config(args.deepspeed, cfg, env.world_size)   # its ZeRO stage decides the loss path
    vlm = build_model(cfg, tokenizer, feature_shape, env.rank == 0, zero_stage=zero_stage(ds_config))
    num_tokens = vlm.num_tokens["image"]
    samples, eval_samples = build_data(cfg, cache, dict(vlm.num_tokens), out_dir, env.rank)

    sampler = make_sampler(cfg, samples, env, cfg.data.seed, cfg.train.grad_accum)
    # epochs: each epoch's own plan (packed epochs differ), each a whole number of optimizer steps
    total_steps = cfg.train.max_steps or sampler.optimizer_steps(cfg.train.epochs)
    optimizer = build_optimizer(vlm, cfg, ds_config)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    engine, _, _, scheduler = dist.ds_initialize(vlm, None, ds_config, optimizer=optimizer,
                                                 lr_scheduler=scheduler)
    vlm = engine.module
    vlm_config = {"llm": cfg.model.llm, "vision": cfg.model.vision, "feature_layer": cfg.model.feature_layer,
                  "pool": cache.fingerprint["pool"], "vision_dtype": cache.fingerprint["dtype"],
                  "jpeg_draft_to": cache.jpeg_draft_to,   # online decoding must match the cache's
                  "template": cfg.data.template,
                  "num_media_tokens": num_tokens, "dtype": cfg.model.dtype}
    # how images were tiled and videos sampled: generation, serving and evaluation do the same
    vlm_config.update(media_fields(
        TilingSpec.from_dict(expected["tiling"]) if "tiling" in expected else None,
        frame_sampling(cfg.model), vlm.num_tokens.get("video"),
        cfg.model.video.token_budget if cfg.model.video is not None else None))

    step, nan_run = 0, 0
    if resume_dir is not None:
        load_engine_state(engine, resume_dir)   # DeepSpeed's files too: weights_only, never unpickled
        apply_config_after_resume(scheduler, cfg, total_steps)   # accepted changes take effect
        state = load_rank_state(resume_dir, env.rank)
        sampler.load_state_dict(state["trainer"]["sampler"])
        set_rng_state(state["rng"])
        step, nan_run = state["trainer"]["step"], state["trainer"]["nan_run"]   # "K in a row" spans a resume
        dist.print0(f"resumed from {resume_dir} at step {step}")

    loader_args = dict(pad_id=tokenizer.pad_token_id, max_seq_len=cfg.data.max_seq_len,
                       feature_shape=feature_shape, num_workers=cfg.data.num_workers,
                       pin_memory=torch.cuda.is_available(), pad_ids=vlm.pad_ids,
                       device=engine.device, move=to_device)   # on CUDA: copied a batch ahead, side stream
    lookups = feature_lookups(cfg, cache)
    stream = iter(BatchStream(sampler, samples, lookups, **loader_args))
    eval_stream = None
    if eval_samples:
        eval_sampler = make_sampler(cfg, eval_samples, env, seed=0)

        def whole_eval_set():  # the whole held-out set, from its start, every time
            eval_sampler.set_position(0, 0)
            return BatchStream(eval_sampler, eval_samples, lookups, max_epochs=1, **loader_args)
        eval_stream = whole_eval_set

    metrics = MetricsLog(out_dir, enabled=env.rank == 0, total_steps=total_steps, start_step=step)

    def stop_nonfinite(why: str) -> int:
        """Save for inspection as nan_step_* (never a resume target: `--resume auto` and `latest` keep
        the last good checkpoint, taken before these updates) and stop."""
        path = save(engine, vlm, cfg, step, sampler, tokenizer, vlm_config, env, nan_run, resume_target=False)
        dist.print0(f"stopping: {why}; state saved to {path} for inspection (--resume auto continues from "
                    "the last checkpoint before it)")
        dist.shutdown()
        return 3

    engine.train()
    since_log, t_log = [0, 0], time.perf_counter()   # local tokens and samples since the last log line
    # DeepSpeed skips a step whose gradients are not finite (bf16.check_grad_overflow, set by
    # build_ds_config). A non-finite loss whose update was applied anyway is flagged here on the
    # device, with no host sync per step, and read when logging and before any save.
    bad_update, checked = torch.zeros((), dtype=torch.bool, device=engine.device), step
    while step < total_steps:
        batches = [next(stream) for _ in range(cfg.train.grad_accum)]
        loss_sum, count = train_step(engine, batches, env.world_size)
        step += 1
        loss_sum = loss_fault(step, loss_sum)
        applied = engine.was_step_applied()
        if applied:
            bad_update |= ~torch.isfinite(loss_sum)
        # the loss itself is read back (a host sync) only when logging or after a skipped step
        log_now = step % cfg.train.log_every == 0 or step == 1 or not applied
        loss = dist.all_reduce_sum(loss_sum).item() / max(count, 1) if log_now else None
        if not applied:
            nan_run += 1
            ids = [i for b in batches for row in b["sample_ids"] for i in row]
            metrics.note(step, f"non-finite loss {loss}: step skipped ({nan_run} in a row); samples {ids[:8]}")
            if nan_run >= cfg.train.nan_patience:
                return stop_nonfinite(f"{nan_run} non-finite losses in a row, last at step {step} "
                                      f"(samples {ids})")
        else:
            nan_run = 0
        since_log[0] += sum(int(b["num_tokens"]) for b in batches)
        since_log[1] += sum(len(r) for b in batches for i, r in enumerate(b["sample_ids"])
                            if i not in b["filler_rows"])
        if log_now:
            tokens, samples_n = dist.all_reduce_sum(since_log[0]), dist.all_reduce_sum(since_log[1])
            metrics.step(step, loss=loss, lr=scheduler.get_last_lr()[0],
                         grad_norm=engine.get_global_grad_norm(), tokens=tokens, samples=samples_n,
                         seconds=time.perf_counter() - t_log)
            since_log, t_log = [0, 0], time.perf_counter()
        if eval_stream and cfg.train.eval_every and step % cfg.train.eval_every == 0:
            metrics.eval(step, evaluate(engine, eval_stream()))
        fault_injection(step, env.rank)
        preempt = stop.should_stop()
        save_now = preempt or step == total_steps or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        if log_now or save_now:
            if dist.all_reduce_max(bad_update.int()).item():
                metrics.note(step, f"non-finite loss with its update applied, between steps {checked + 1} and {step}")
                return stop_nonfinite(f"a non-finite loss between steps {checked + 1} and {step} had its update "
                                      "applied (DeepSpeed's overflow check did not skip it): the weights since "
                                      "then are suspect")
            checked = step
        if save_now:
            save(engine, vlm, cfg, step, sampler, tokenizer, vlm_config, env, nan_run)
        if preempt:
            dist.exit_for_requeue()

    if eval_stream and not (cfg.train.eval_every and step % cfg.train.eval_every == 0):
        metrics.eval(step, evaluate(engine, eval_stream()))
    if cfg.checkpoint.export and env.rank == 0:  # the last step's save wrote it already
        publish_export(out_dir / "checkpoints" / tag_for(step) / "export", out_dir / "export")
    metrics.close()
    dist.barrier()
    dist.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: `train`, with a user's mistake reported as one line and exit code 2."""
    return run_cli("train", lambda: train(argv))
