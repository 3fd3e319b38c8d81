"""What each checkpoint records about the run that wrote it, and the resume check against it.

Every checkpoint directory holds `run.json`: the resolved config (`config_to_dict`) and the
SHA-256 of the data the run read (each records file, and the feature cache's manifest, which
itself lists the SHA-256 of every shard). It lives in the checkpoint, not only in
<output_dir>/config.yaml, because config.yaml is rewritten by every launch while the record
must describe the run that produced *that* checkpoint (and move with it).

On resume, `check_resume` compares the record with this run's:
- a changed key that changes the run's mathematics (optimizer, schedule, batch, model, data
  content: every key not listed below) is refused: one ConfigError lists each with its old and
  new value, unless the user names it in --checkpoint.allow_changed=key,key;
- HARMLESS keys (logging, eval and checkpoint cadence, workers, resume itself) and a longer
  run (a larger train.max_steps or train.epochs) are accepted; every accepted change is logged.

    notes = check_resume(resume_dir, cfg)     # every rank, before config.yaml is rewritten
    write_run_record(ckpt_dir, cfg, is_main)  # in each save
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from vlm_dist.config import Config, ConfigError, config_to_dict
from vlm_dist.fileio import sha256_file, write_text_atomic

RECORD = "run.json"
# Keys whose change leaves what the run computes unchanged (same samples, order, weights, updates).
HARMLESS = frozenset({
    "train.log_every", "train.eval_every", "train.nan_patience", "data.num_workers",
    "model.gradient_checkpointing",   # recomputation gives the same values
    "model.checkpoint_fraction", "model.kernels",          # the same again; fused kernels: same function
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume", "checkpoint.export",
    "checkpoint.allow_changed",
})
LONGER_OK = ("train.max_steps", "train.epochs")   # a longer run continues the same one


@functools.lru_cache(maxsize=None)
def _digest(records: tuple[str, ...], cache: str | None) -> dict:
    from vlm_dist.cache.reader import read_manifest

    manifest = None if cache is None else read_manifest(cache)
    return {"data.records": [sha256_file(p) for p in records],
            "data.cache": None if manifest is None else
            hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()}


def data_digest(cfg: Config) -> dict:
    """SHA-256 of each records file and of the cache manifest. Hashed once per process: a
    checkpoint records the data the run started with, even if a file changes under the job."""
    return _digest(tuple(s.path for s in cfg.data.records), cfg.data.cache)


def run_record(cfg: Config) -> dict:
    # through JSON, so a fresh record compares equal to one read back from disk (lists, not tuples)
    return json.loads(json.dumps({"config": config_to_dict(cfg), "data": data_digest(cfg)}))


def write_run_record(ckpt_dir: str | os.PathLike, cfg: Config, is_main: bool = True) -> None:
    """`run.json` in the checkpoint (by the main rank only; every rank may call it)."""
    if is_main:
        write_text_atomic(Path(ckpt_dir) / RECORD, json.dumps(run_record(cfg), indent=1))


def _show(value) -> str:
    return json.dumps(value)


def resume_changes(saved: dict, current: dict, allow: list[str] | tuple[str, ...] = ()) -> tuple[list, list]:
    """Compare two run records. Returns (refused, accepted): lines `key: old -> new (why)`."""
    refused, accepted = [], []
    old_cfg = {f"{s}.{k}": v for s, keys in saved["config"].items() for k, v in keys.items()}
    new_cfg = {f"{s}.{k}": v for s, keys in current["config"].items() for k, v in keys.items()}
    changed = {}
    for key, new in new_cfg.items():
        if key not in old_cfg:
            accepted.append(f"{key}: not in the checkpoint's record (saved by an older version), not compared")
        elif old_cfg[key] != new:
            changed[key] = f"{_show(old_cfg[key])} -> {_show(new)}"
    for key, new in current["data"].items():
        old = saved["data"].get(key)
        if key not in changed and old != new:
            changed[key] = f"content changed (sha256 {_short(old)} -> {_short(new)})"
    for key, change in changed.items():
        old, new = old_cfg.get(key), new_cfg.get(key)
        if key in HARMLESS:
            accepted.append(f"{key}: {change} (does not change the run's mathematics)")
        elif key in LONGER_OK and isinstance(old, int) and isinstance(new, int) and new > old:
            accepted.append(f"{key}: {change} (a longer run: the schedule is recomputed for the new length)")
        elif key in allow:
            accepted.append(f"{key}: {change} (allowed by --checkpoint.allow_changed)")
        else:
            refused.append(f"{key}: {change}")
    return refused, accepted


def _short(digest) -> str:
    if isinstance(digest, list):
        return "[" + ", ".join(_short(d) for d in digest) + "]"
    return "none" if digest is None else digest[:12]


def check_resume(resume_dir: Path | None, cfg: Config) -> list[str]:
    """Refuse a resume that changes the run's mathematics (ConfigError naming every changed key);
    otherwise return one line per accepted change, for the log."""
    record = run_record(cfg)   # also pins this run's data digest for its own checkpoints
    if resume_dir is None:
        return []
    path = Path(resume_dir) / RECORD
    if not path.is_file():
        return [f"{resume_dir} has no {RECORD} (saved by an older version): the configuration "
                "and data are not compared"]
    refused, accepted = resume_changes(json.loads(path.read_text()), record, cfg.checkpoint.allow_changed)
    if refused:
        keys = ",".join(line.split(":")[0] for line in refused)
        raise ConfigError(
            f"cannot resume from {resume_dir}: this run would change what it computes:\n  - "
            + "\n  - ".join(refused)
            + f"\nResume with the checkpoint's values (recorded in {path}), start a fresh run in another "
            f"--train.output_dir, or accept the changes explicitly: --checkpoint.allow_changed={keys}")
    return accepted
