"""Checkpoints that are published atomically, resume selection, and export.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/          DeepSpeed's files (model, optimizer, scheduler), written by every rank
      rank_00000.pt ...     per-rank RNG state and the sampler position (trainer state)
      export/               the trainable weights (connector, adapter) for the next stage
      COMPLETE              written last, by rank 0, after every rank finished
    latest                  the newest complete tag, replaced by rename

A save interrupted at any point leaves no COMPLETE marker, so `--resume auto`
never picks it. An explicit checkpoint that is missing or incomplete is an
error on every rank (all ranks check the same files), never a fresh start.
"""
from __future__ import annotations

from vlm_dist.errors import UserError

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

MARKER, LATEST = "COMPLETE", "latest"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint to resume from is missing, incomplete or unreadable."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p))


def resolve_resume(resume: str | None, root: str | os.PathLike, world_size: int | None = None) -> Path | None:
    """The checkpoint directory to resume from, or None for a fresh run.

    With `world_size`, a checkpoint saved by another number of ranks is refused here,
    before any loading (the sampler's plan and the per-rank states depend on it).
    """
    found = _resolve(resume, root)
    if found is not None and world_size is not None:
        saved = json.loads((found / MARKER).read_text()).get("world_size")
        if saved is not None and saved != world_size:
            raise CheckpointError(f"{found} was saved by {saved} ranks; this run has {world_size}. Resume with "
                                  f"{saved} ranks (resuming on another world size is not supported)")
    return found


def _resolve(resume: str | None, root: str | os.PathLike) -> Path | None:
    if resume is None or resume == "":
        return None
    if resume == "auto":
        latest = Path(root) / LATEST
        if latest.is_file():
            cand = Path(root) / latest.read_text().strip()
            if is_complete(cand):
                return cand
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint.resume={resume}: no such checkpoint directory "
                              f"(complete ones under {root}: {[p.name for p in complete_checkpoints(root)]})")
    if not is_complete(path):
        raise CheckpointError(f"--checkpoint.resume={resume}: checkpoint is incomplete (no {MARKER} marker; "
                              "its save was interrupted). Pick another or use --resume auto")
    return path


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(ckpt_dir: Path, rank: int, trainer_state: dict) -> None:
    """This rank's RNG and trainer state, temp -> fsync -> rename."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"rank_{rank:05d}.pt"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save({"rng": rng_state(), "trainer": trainer_state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_rank_state(ckpt_dir: Path, rank: int) -> dict:
    path = ckpt_dir / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no state for rank {rank} ({path.name}); was it saved with "
                              "a different number of ranks?")
    return torch.load(path, weights_only=False)


def publish(root: Path, ckpt_dir: Path, info: dict, keep_last: int) -> None:
    """Rank 0, after every rank has written: marker, then `latest` by rename, then prune."""
    _write_atomic(ckpt_dir / MARKER, json.dumps(info, sort_keys=True))
    _write_atomic(root / LATEST, ckpt_dir.name)
    done = complete_checkpoints(root)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    # interrupted saves older than the one just published are garbage
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and not is_complete(p) and p.name < ckpt_dir.name:
            shutil.rmtree(p, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- export ----------------------------------------------------------------------
EXPORT_CONFIG = "vlm_config.json"


def gathered_state(module: torch.nn.Module, names: list[str] | None = None,
                   keep: bool = True) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of `module`'s parameters (all, or `names`), gathered if ZeRO-3 partitioned them.

    Every rank must call this (the gather is a collective); only ranks with `keep` copy.
    """
    params = dict(module.named_parameters())
    wanted = names if names is not None else list(params)
    plist = [params[n] for n in wanted]

    def copy():
        return {n: _cpu_copy(params[n]) for n in wanted} if keep else None

    if any(hasattr(p, "ds_id") for p in plist):
        import deepspeed
        with deepspeed.zero.GatheredParameters(plist, modifier_rank=None):
            return copy()
    return copy()


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.cpu() if t.device.type != "cpu" else t.clone()


def write_export(vlm, out_dir: str | os.PathLike, vlm_config: dict, llm_mode: str, is_main: bool,
                 tokenizer=None) -> None:
    """Write the trainable weights for the next stage and for inference. Collective under ZeRO-3.

    out_dir/connector.safetensors + connector_config.json   always
    out_dir/adapter/                                         lora, qlora (a PEFT adapter directory)
    out_dir/llm/                                             full (the fine-tuned LLM + tokenizer)
    out_dir/vlm_config.json                                  what rebuilds the model (written last)
    """
    from vlm_dist.model.build import save_connectors
    from vlm_dist.model.vlm import unwrap_llm

    out = Path(out_dir)
    connector_state = gathered_state(vlm.connectors, keep=is_main)
    llm_state = None
    if llm_mode in ("lora", "qlora"):
        names = [n for n, p in vlm.llm.named_parameters() if "lora_" in n]
        llm_state = gathered_state(vlm.llm, names, keep=is_main)
    elif llm_mode == "full":
        llm_state = gathered_state(unwrap_llm(vlm.llm), keep=is_main)
    if not is_main:
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_connectors(vlm, tmp, state=connector_state)
    cfg = dict(vlm_config, llm_mode=llm_mode)
    if llm_mode in ("lora", "qlora"):
        vlm.llm.save_pretrained(str(tmp / "adapter"), state_dict=llm_state)
    elif llm_mode == "full":
        unwrap_llm(vlm.llm).save_pretrained(str(tmp / "llm"), state_dict=llm_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "llm"))
        cfg["base_llm"], cfg["llm"] = cfg["llm"], "llm"   # relative: the export can be moved
    _write_atomic(tmp / EXPORT_CONFIG, json.dumps(cfg, indent=2, sort_keys=True))
    _replace_dir(tmp, out)


def publish_export(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Copy a checkpoint's export to `out` (e.g. <output_dir>/export), replacing it atomically."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    _replace_dir(tmp, out)


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
