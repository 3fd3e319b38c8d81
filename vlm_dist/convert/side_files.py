"""The files every vlm-convert command writes next to its --out: what it dropped and its counts.

    records.jsonl -> records.dropped.jsonl (each skipped record with its reason)
                     records.stats.json    (read / kept / dropped by reason)

`vlm-convert check` (vlm_dist.convert.supervision) writes its own beside each records file:
records.supervision.json, records.problems.jsonl and records.duplicates.jsonl.
"""
from __future__ import annotations

import json
from pathlib import Path


def side_path(out: str | Path, suffix: str) -> Path:
    """records.jsonl -> records.<suffix>; other names get .<suffix> appended."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{suffix}")


def write_side_files(out: Path, stats: dict, dropped: list[dict]) -> tuple[Path, Path]:
    dropped_path, stats_path = side_path(out, "dropped.jsonl"), side_path(out, "stats.json")
    with open(dropped_path, "w", encoding="utf-8") as f:
        for d in dropped:
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")
    stats_path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return dropped_path, stats_path
