"""Records + feature cache -> the run's training samples, with every drop counted and listed.

    train_set, eval_set, report = load_training_set(
        cfg.data.records, tokenizer_path=cfg.model.llm, template=cfg.data.template, num_tokens=64,
        max_seq_len=cfg.data.max_seq_len, truncate=cfg.data.truncate, cache=FeatureCache(cfg.data.cache),
        seed=cfg.data.seed, eval_fraction=0.01)      # eval_set is None when eval_fraction is 0
    # tiles and video: tokens per view per kind; image layouts read only for a tiled config
    load_training_set(..., num_tokens={"image": 64, "video": 16}, tiled=True)

Each records file is tokenized once (vlm_dist.data.lengths, cached on disk), the
eval fraction is held out among the distinct usable records, the mixture is drawn
from the rest (vlm_dist.data.mixture), and samples are built lazily from the
memory-mapped token tables, so a 558K-record stage costs arrays of lengths, not
Python lists of tokens, on every rank.

- over-long records (and invalid ones) stop the run, listing them (the
  supervision check); with data.truncate text is cut, never an image block;
- a record with no supervised token is dropped (reason `no_supervision`);
- a record whose image failed to encode, or is not in the cache, is dropped
  (`image_failed` / `image_missing`); likewise a video (`video_failed` / `video_missing`).

Layouts come from the cache (cache.reader.read_layouts, joined to the records' references
through its index): every video's (its sampled frames' timestamps), and with `tiled=True`
every image's tiling, so each sample's blocks have the slots its cached views fill. An
untiled config (`tiled=False`) encodes every image as one view and reads view 0 of a tiled
cache. Records with videos need a model with a video connector (`video=True`, from
model.video); otherwise they stop the run with the fix named.
Drops are counted in the log and listed in `<output_dir>/dropped.jsonl`. A record
whose id an earlier record already has is kept, counted in the same log line and
listed in `<output_dir>/duplicates.jsonl` (upsampled copies of the mixture are not
duplicates).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from vlm_dist.data.lengths import SupervisionError, duplicate_ids, tokenize_records
from vlm_dist.data.mixture import build_mixture, format_summary, hold_out, sources_from_config
from vlm_dist.data.sampler import MULTI_IMAGE, SINGLE_IMAGE, TEXT, VIDEO
from vlm_dist.contract.media import IMAGE, VIDEO as VIDEO_KIND


@dataclass
class DropReport:
    kept: int = 0
    held_out: int = 0                                  # distinct records set aside for eval
    dropped: Counter = field(default_factory=Counter)
    listed: list[dict] = field(default_factory=list)   # {"id", "file", "reason", "detail"}
    duplicates: list[dict] = field(default_factory=list)   # {"id", "file", "index", "first"}; kept

    def drop(self, rid: str, file: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.listed.append({"id": rid, "file": file, "reason": reason, "detail": detail})

    def summary(self) -> str:
        parts = [f"{self.kept} samples"] + [f"{n} dropped ({r})" for r, n in sorted(self.dropped.items())]
        if self.held_out:
            parts.append(f"{self.held_out} held out for eval")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate id(s) (kept)")
        return ", ".join(parts)

    def write(self, out_dir: str | Path) -> None:
        """dropped.jsonl and duplicates.jsonl in out_dir (empty files when there is nothing to list)."""
        for name, rows in (("dropped.jsonl", self.listed), ("duplicates.jsonl", self.duplicates)):
            with open(Path(out_dir) / name, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")


class TrainingSet:
    """The drawn samples: (table, row) references, turned into EncodedSamples on access."""

    def __init__(self, tables, rows: np.ndarray, ref_to_key: dict[str, str]):
        self.tables, self.rows, self.ref_to_key = tables, rows, ref_to_key
        self.lengths = np.zeros(len(rows), dtype=np.int64)
        self.num_targets = np.zeros(len(rows), dtype=np.int64)   # the sampler's count_targets, per sample
        num_images = np.zeros(len(rows), dtype=np.int64)
        num_videos = np.zeros(len(rows), dtype=np.int64)
        for t, table in enumerate(tables):  # vectorised per table: 558K rows cost milliseconds
            mask = rows[:, 0] == t
            self.lengths[mask] = table.lengths[rows[mask, 1]]
            num_images[mask] = table.table.column("num_images").to_numpy()[rows[mask, 1]]
            num_videos[mask] = table.table.column("num_videos").to_numpy()[rows[mask, 1]]
            # targets collate makes: supervised labels after a sample's first token
            first = pc.list_element(table.table.column("supervised_mask").take(rows[mask, 1]), 0)
            self.num_targets[mask] = (table.supervised[rows[mask, 1]]
                                      - first.to_numpy(zero_copy_only=False).astype(np.int64))
        self.modalities = np.where(num_videos > 0, VIDEO, np.where(
            num_images == 0, TEXT, np.where(num_images == 1, SINGLE_IMAGE, MULTI_IMAGE)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        t, r = self.rows[i]
        sample = self.tables[t].sample(int(r))
        for kind, refs in sample.media.items():   # the table holds the records' references
            sample.media[kind] = [self.ref_to_key[ref] for ref in refs]
        return sample


def read_index(cache_dir) -> dict[str, str]:
    """The cache's record-reference -> media-key map, in one read (not a search per reference)."""
    import pyarrow as pa
    from vlm_dist.cache.reader import INDEX_FILE
    table = pa.ipc.open_file(pa.memory_map(str(Path(cache_dir) / INDEX_FILE))).read_all()
    return dict(zip(table.column("ref").to_pylist(), table.column("key").to_pylist()))


def reference_layouts(cache_dir, ref_to_key: dict[str, str], tiled: bool) -> dict[str, dict]:
    """{record reference: layout} from the cache (one read): every video's, and every image's
    when `tiled` (an untiled config encodes images as one view, whatever the cache holds)."""
    from vlm_dist.cache.reader import read_layouts
    by_key = read_layouts(cache_dir)
    out = {}
    for ref, key in ref_to_key.items():
        layout = by_key.get(key)
        if layout is not None and (tiled or layout.get("kind") == VIDEO_KIND.name):
            out[ref] = layout
    return out


def load_training_set(sources, tokenizer_path: str, template: str, num_tokens: int | dict, max_seq_len: int,
                      truncate: bool, cache, seed: int, eval_fraction: float = 0.0,
                      log=print, tiled: bool = False, video: bool = False, num_workers: int | None = None
                      ) -> tuple[TrainingSet, TrainingSet | None, DropReport]:
    """Tokenize (cached), check supervision, drop unusable records, hold out eval, draw the mixture.

    `num_tokens`: pad slots per view, one int or {"image": T, "video": Tf}; `tiled`: images
    have the cache's tiling; `video`: the model has a video connector (module docstring).
    Returns (train set, held-out eval set or None when eval_fraction is 0, report).
    """
    report = DropReport()
    ref_to_key = read_index(cache.cache_dir)
    layouts = reference_layouts(cache.cache_dir, ref_to_key, tiled)
    # failures.jsonl rows: {"key", "paths", ...} for files read but not encodable, {"path", ...} for unreadable
    failed = {path: f["reason"] for f in cache.failures for path in (f["paths"] if "key" in f else [f["path"]])}
    failed_keys = {f["key"]: f["reason"] for f in cache.failures if "key" in f}

    def media_problem(kind: str, ref: str) -> tuple[str, str] | None:
        """(reason, detail) when a record's image or video cannot be trained on, else None."""
        why = failed.get(ref) or failed_keys.get(ref_to_key.get(ref))
        if why is not None:
            return f"{kind}_failed", f"{ref}: {why}"
        if ref not in ref_to_key:
            return f"{kind}_missing", f"{ref} is not in the feature cache"
        if ref not in layouts and (kind == VIDEO_KIND.name or tiled):   # its views' layout is unknown
            return f"{kind}_missing", f"{ref} has no {'video' if kind == VIDEO_KIND.name else 'tiling'} " \
                                      "layout in the feature cache"
        return None

    tables, usable, usable_ids = [], {}, {}
    for src in sources:
        table = tokenize_records(src.path, tokenizer_path, template, num_tokens, max_seq_len, truncate,
                                 num_workers=num_workers, layouts=layouts)
        fatal = [p for p in table.problems() if p["reason"] != "no_supervision"]
        if fatal:
            lines = "\n  ".join(f"{p['id']!r} (record {p['index']}): {p['reason']}: {p['detail']}"
                                for p in fatal[:20])
            raise SupervisionError(
                f"{src.path}: {len(fatal)} record(s) cannot be trained on (max_seq_len={max_seq_len}):\n  "
                f"{lines}\nFix or drop them, raise --data.max_seq_len, or set --data.truncate=true "
                "(text is cut, never an image or video block). `vlm-convert check` lists them all.")
        ids = table.table.column("id").to_pylist()
        refs = table.table.column("image_keys").to_pylist()
        video_refs = table.table.column("video_keys").to_pylist()
        with_video = [ids[r] for r, (v, why) in enumerate(zip(video_refs, table.table.column("reason").to_pylist()))
                      if v and why is None]
        if with_video and not video:
            raise SupervisionError(
                f"{src.path}: {len(with_video)} record(s) have videos (e.g. {with_video[:3]}) but the model "
                "has no video connector: set model.video (e.g. --model.video='{num_frames: 8, "
                "tokens_per_frame: 16}') or train on records without videos")
        ok_rows = []
        for row, (rid, reason, detail) in enumerate(zip(ids, table.table.column("reason").to_pylist(),
                                                        table.table.column("detail").to_pylist())):
            if reason is not None:
                report.drop(rid, src.path, reason, detail)
                continue
            problem = next(filter(None, [media_problem(IMAGE.name, ref) for ref in refs[row]]
                                         + [media_problem(VIDEO_KIND.name, ref) for ref in video_refs[row]]), None)
            if problem is not None:
                report.drop(rid, src.path, *problem)
                continue
            ok_rows.append(row)
        tables.append(table)
        usable[src.path] = np.asarray(ok_rows, dtype=np.int64)
        usable_ids[src.path] = [ids[r] for r in ok_rows]
    report.duplicates = duplicate_ids(tables)
    if not any(len(v) for v in usable.values()):
        raise SupervisionError(f"no usable training records ({report.summary()})")
    which = {s.path: k for k, s in enumerate(sources)}
    # the eval split comes first, among distinct records: the mixture's repeats then cannot leak into it
    held, pools = hold_out({p: v for p, v in usable_ids.items() if len(v)}, eval_fraction, seed)
    eval_set = None
    if eval_fraction > 0:
        rows = np.array([(which[p], usable[p][i]) for p, pos in held.items() for i in pos],
                        dtype=np.int64).reshape(-1, 2)
        eval_set = TrainingSet(tables, rows, ref_to_key)
        report.held_out = len(rows)
    train_rows = {p: usable[p][pos] for p, pos in pools.items()}
    mix = sources_from_config([s for s in sources if s.path in train_rows],
                              {p: len(v) for p, v in train_rows.items()})
    order, summary = build_mixture(mix, seed)
    rows = np.array([(which[name], train_rows[name][i]) for name, i in order], dtype=np.int64).reshape(-1, 2)
    log(format_summary(summary))
    report.kept = len(rows)
    return TrainingSet(tables, rows, ref_to_key), eval_set, report
