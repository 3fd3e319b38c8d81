"""Checkpoints that are published atomically, resume selection, and export.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/          DeepSpeed's files (model, optimizer, scheduler), written by every rank
      rank_00000.pt ...     per-rank RNG state, sampler position, non-finite run (tensors and plain
                            values only: loaded with weights_only=True, never unpickled)
      export/               the trainable weights (connector, adapter) for the next stage
      COMPLETE              written last, by rank 0, after every rank finished
    nan_step_00000120/      the state at a non-finite-loss stop: complete, for inspection or an
                            explicit resume, but never a resume target for `auto`
    latest                  the newest published tag, replaced by rename (a hint for people)

A save interrupted at any point leaves no COMPLETE marker, and re-saving a tag
withdraws its marker before any rank writes, so `--resume auto` (the newest
complete `step_*` directory; `latest` is not trusted) never picks a half-written
one. An explicit checkpoint that is missing or incomplete is an error on every
rank (all ranks check the same files), never a fresh start.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vlm_dist import fileio
from vlm_dist.config.schema import ADAPTER_MODES
from vlm_dist.errors import UserError
from vlm_dist.inference.export import EXPORT_CONFIG, publishing

MARKER, LATEST = "COMPLETE", "latest"
_STEP_DIR = re.compile(r"step_(\d{8,})")
LOW_SPACE = 64 << 20   # bytes free under which a failed write is taken for a full disk


class CheckpointError(UserError, RuntimeError):
    """A checkpoint to resume from is missing, incomplete or unreadable."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def nan_tag_for(step: int) -> str:
    """The tag of a non-finite-loss stop's save: not `step_*`, so `--resume auto` never takes it."""
    return f"nan_{tag_for(step)}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete `step_*` checkpoints directly under `root` (no symlinks), oldest first."""
    return [p for p in _step_dirs(root) if is_complete(p)]


def _step_dirs(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(found)]


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
        done = complete_checkpoints(root)
        if done:   # a fresh run would save step 1, 2, ... over this run's checkpoints
            raise CheckpointError(f"{root} already holds checkpoints (newest: {done[-1].name}); continue that run "
                                  "with --resume auto, or start a new one under another --train.output_dir")
        return None
    if resume == "auto":
        # the newest complete one, found by listing: `latest` can lag (a crash between marker and
        # rename) or hold anything, so it is never read here
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
    """Every RNG's state as tensors and plain values (what torch.load(weights_only=True) accepts)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()   # ("MT19937", uint32[624], ...)
    return {"python": random.getstate(),                      # (3, tuple of 625 ints, None | float)
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rank_{rank:05d}.pt"


def save_rank_state(ckpt_dir: Path, rank: int, trainer_state: dict) -> None:
    """This rank's RNG and trainer state (plain values and tensors), published atomically (fileio)."""
    with fileio.atomic_file(_rank_file(ckpt_dir, rank)) as f:
        torch.save({"rng": rng_state(), "trainer": trainer_state}, f)


def load_rank_state(ckpt_dir: Path, rank: int) -> dict:
    """This rank's saved state. Only tensors and plain values are loaded: a pickle is refused."""
    path = _rank_file(ckpt_dir, rank)
    if not path.is_file():
        raise _rank_local(CheckpointError(f"{ckpt_dir}: no state for rank {rank} ({path.name}); was it "
                                          "saved with a different number of ranks?"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _rank_local(CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain values, and loading "
            f"them could run code (crafted, or written by an older vlm_dist). ({str(e).splitlines()[0]})")) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise _rank_local(CheckpointError(f"{path}: unreadable (truncated or corrupt): {e}")) from e
    if not isinstance(state, dict) or {"rng", "trainer"} - set(state):
        raise _rank_local(CheckpointError(f"{path}: not a vlm_dist rank state (expected keys rng, trainer)"))
    return state


def load_engine_state(engine, ckpt_dir: Path) -> None:
    """engine.load_checkpoint for `ckpt_dir`, with every file DeepSpeed reads loaded weights_only.

    DeepSpeed's TorchCheckpointEngine.load calls torch.load(weights_only=False). For this load
    only, the engine's checkpoint engine is wrapped so that its `load` takes tensors, plain
    values and the few DeepSpeed data classes its ZeRO files hold (allow-listed by name); a file
    with anything else is refused, naming the file and the object, never unpickled.
    """
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(inner)
    try:
        engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    finally:
        engine.checkpoint_engine = inner


class _WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose loads are torch.load(weights_only=True); the rest delegates."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        # plain data classes in ZeRO optimizer files: rebuilt from their fields, no code of the file's
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise _rank_local(CheckpointError(
                    f"{path}: refused: it holds Python objects other than tensors, plain values and "
                    f"DeepSpeed's checkpoint classes, and loading them could run code. "
                    f"({str(e).splitlines()[0]})")) from e


def _rank_local(err: CheckpointError) -> CheckpointError:
    err.rank_local = True   # only this rank reads this file: it must say so itself
    return err


def withdraw(ckpt_dir: Path) -> None:
    """Rank 0, before any rank writes into an existing tag: remove its marker, durably.

    A resumed run re-saves the steps after its checkpoint; without this, a step's old COMPLETE
    would stand over the new, half-written files until the new marker replaces it.
    """
    marker = ckpt_dir / MARKER
    if marker.exists():
        marker.unlink()
        fileio.fsync_dir(ckpt_dir)


@contextmanager
def disk_errors(ckpt_dir: Path):
    """A write that fails on a full disk becomes a CheckpointError naming `ckpt_dir` and the bytes free.

    DeepSpeed's torch.save reports ENOSPC as `basic_ios::clear: iostream error` (errno lost), so a
    RuntimeError counts as a full disk when the filesystem has under LOW_SPACE bytes free.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        free = _free_bytes(ckpt_dir)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or free < LOW_SPACE):
            raise
        raise _rank_local(CheckpointError(
            f"{ckpt_dir}: no space left on device ({free:,} bytes free) while saving the checkpoint "
            f"({e}); free space or point --train.output_dir elsewhere, then resume")) from e


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:   # the checkpoint dir may not exist yet
        path = path.parent
    return shutil.disk_usage(path).free


def publish(root: Path, ckpt_dir: Path, info: dict, keep_last: int) -> None:
    """Rank 0, after every rank has written: marker, then `latest` by rename, then prune.

    A `nan_step_*` save gets its marker only: it is kept for inspection, never made the latest.
    """
    fileio.write_text_atomic(ckpt_dir / MARKER, json.dumps(info, sort_keys=True))
    if not _STEP_DIR.fullmatch(ckpt_dir.name):
        return
    fileio.write_text_atomic(root / LATEST, ckpt_dir.name)
    step = int(_STEP_DIR.fullmatch(ckpt_dir.name).group(1))
    # only checkpoints older than this one are pruned: after an explicit resume from an older
    # step, newer ones from the first attempt may stand beside it, and the save just published
    # must never be what keep_last removes
    older = [p for p in complete_checkpoints(root) if int(_STEP_DIR.fullmatch(p.name).group(1)) < step]
    for old in older[:max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    # interrupted saves older than the one just published are garbage
    for p in _step_dirs(root):
        if not is_complete(p) and int(_STEP_DIR.fullmatch(p.name).group(1)) < step:
            shutil.rmtree(p, ignore_errors=True)


def init_adapter(init_from: str | os.PathLike | None, llm_mode: str) -> str | None:
    """The adapter a LoRA/QLoRA stage continues from `init_from` (an export), or None for a fresh one.

    A fresh adapter is right only when that export never had one (its llm_mode is frozen or full);
    an export trained with adapters but without `adapter/` lost them, and starting over would
    silently discard that training.
    """
    if not init_from or llm_mode not in ADAPTER_MODES:
        return None
    export = Path(init_from)
    adapter = export / "adapter"
    if adapter.is_dir():
        return str(adapter)
    cfg_path = export / EXPORT_CONFIG
    try:
        saved_mode = json.loads(cfg_path.read_text())["llm_mode"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--model.init_from={init_from}: cannot read llm_mode from {cfg_path} ({e}); "
                              "expected a vlm_dist export") from e
    if saved_mode in ADAPTER_MODES:
        raise CheckpointError(f"--model.init_from={init_from}: that export was trained with "
                              f"llm_mode={saved_mode} but has no adapter/ ({adapter} is missing); restore it, "
                              "or point --model.init_from at a complete export")
    return None


# -- export ----------------------------------------------------------------------
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
    if llm_mode in ADAPTER_MODES:
        names = [n for n, p in vlm.llm.named_parameters() if "lora_" in n]
        llm_state = gathered_state(vlm.llm, names, keep=is_main)
    elif llm_mode == "full":
        llm_state = gathered_state(unwrap_llm(vlm.llm), keep=is_main)
    if not is_main:
        return
    with publishing(out) as tmp:
        save_connectors(vlm, tmp, state=connector_state)
        cfg = dict(vlm_config, llm_mode=llm_mode)
        if llm_mode in ADAPTER_MODES:
            vlm.llm.save_pretrained(str(tmp / "adapter"), state_dict=llm_state)
        elif llm_mode == "full":
            unwrap_llm(vlm.llm).save_pretrained(str(tmp / "llm"), state_dict=llm_state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "llm"))
            cfg["base_llm"], cfg["llm"] = cfg["llm"], "llm"   # relative: the export can be moved
        fileio.write_text_atomic(tmp / EXPORT_CONFIG, json.dumps(cfg, indent=2, sort_keys=True))


def publish_export(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Copy a checkpoint's export to `out` (e.g. <output_dir>/export), replacing it atomically."""
    with publishing(Path(out)) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
