"""Records + feature cache -> encoded training samples, with every drop counted and listed.

    samples, report = load_samples(records, encoder, cache, max_seq_len)

- A record whose image is not in the cache (it failed to decode, or was never
  cached) is dropped with reason `image_failed` / `image_missing`.
- A sample with no supervised token is dropped with reason `no_supervision`.
- A sample longer than max_seq_len is an error listing every such record,
  unless `truncate` is set (text is cut, never inside an image block).
Each sample's image references are replaced by cache keys (SHA-256).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm_dist.media import IMAGE
from vlm_dist.prompt import EncodedSample, PromptEncoder, SampleError


class DataError(ValueError):
    """The training data cannot be used as given; the message lists the records."""


@dataclass
class DropReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    listed: list[dict] = field(default_factory=list)   # {"id", "reason", "detail"}
    truncated: int = 0

    def drop(self, rid: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.listed.append({"id": rid, "reason": reason, "detail": detail})

    def summary(self) -> str:
        parts = [f"{self.kept} samples kept"] + [f"{n} dropped ({r})" for r, n in sorted(self.dropped.items())]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        return ", ".join(parts)

    def write(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for row in self.listed:
                f.write(json.dumps(row) + "\n")


def load_samples(records: list[dict], encoder: PromptEncoder, cache, max_seq_len: int,
                 truncate: bool = False) -> tuple[list[EncodedSample], DropReport]:
    report = DropReport()
    samples, too_long = [], []
    failed = cache.failed_refs() if cache is not None else {}
    for record in records:
        rid = record["id"]
        keys = []
        for ref in record.get(IMAGE.record_field, []):
            if ref in failed:
                report.drop(rid, "image_failed", f"{ref}: {failed[ref]}")
                break
            key = cache.resolve(ref) if cache is not None else None
            if key is None:
                report.drop(rid, "image_missing", f"{ref} is not in the feature cache")
                break
            keys.append(key)
        else:
            try:
                sample = encoder.encode(record, max_seq_len, truncate=truncate)
            except SampleError as e:
                if e.reason == "too_long":
                    too_long.append(str(e))
                    continue
                report.drop(rid, e.reason, str(e))
                continue
            if keys:
                sample.media[IMAGE.name] = keys[:len(sample.image_keys)]
            report.truncated += sample.truncated
            samples.append(sample)
    if too_long:
        shown = "\n  ".join(too_long[:20])
        raise DataError(f"{len(too_long)} record(s) exceed data.max_seq_len={max_seq_len}:\n  {shown}"
                        + ("\n  ..." if len(too_long) > 20 else "")
                        + "\nRaise --data.max_seq_len, drop them, or set --data.truncate=true "
                          "(text is cut, never an image block)")
    report.kept = len(samples)
    return samples, report
