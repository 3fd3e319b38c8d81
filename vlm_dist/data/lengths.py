"""Tokenize every record once, in parallel, cached on disk; lengths for the sampler and packer.

    table = tokenize_records("mix665k.jsonl", tokenizer="Qwen3-8B-Base", template="chatml",
                             image_tokens=64, max_seq_len=4096, num_workers=16)
    # tiles and video: pad slots per view per kind, and each reference's layout from the cache
    table = tokenize_records(..., image_tokens={"image": 64, "video": 16}, layouts={ref: layout})
    table.lengths          # np.int32 (num_records,): tokens per record, in file order
    table.sample(i)        # EncodedSample of record i, read from the cache (no tokenizer)
    table.iter_samples()   # (index, EncodedSample) of every usable record, in file order
    check_supervision(table)          # SupervisionError listing bad records, or nothing
    summarize(table)       # length distribution and supervised-token fraction
    duplicate_ids([table]) # records repeating an earlier record's id (listed, kept)

Each record goes through `vlm_dist.contract.prompt.PromptEncoder` (the one tokenization of
the contract). `layouts` maps a record's media reference (as `images` / `videos` spell it) to
its layout as the feature cache stores it (cache.reader.read_layouts, by key): an image's
Tiling (its block has the thumbnail's and every tile's slots) or a video's VideoLayout (a
timestamp and slots per sampled frame). An image without one is the plain untiled block; a
video without one (it failed, or is not in the cache) is encoded as a one-frame placeholder
so the file is still checked in one pass, and the training set drops that record
(data.samples: `video_failed` / `video_missing`). A record is a problem when it is invalid, longer than
max_seq_len (`too_long`; with truncate=True it is cut instead, but a cut that
would remove a media block is still `too_long`), or has no supervised token
(`no_supervision`). Problems are kept in the table (reason, detail) so the whole
file is checked in one pass, and `check_supervision` fails listing them.

The cache is one Arrow IPC file (uncompressed, memory-mapped on load) named by
a key over: the tokenizer's serialized vocabulary and added tokens, the records
file's SHA-256, the template, image_tokens (per kind), max_seq_len, truncate, a digest of
the layouts, and the source of prompt.py, media.py, tiling.py and video.py. Any change gives a new file; a hit costs one
hash of the records file. Default location: next to the records file, as
`<stem>.lengths-<key>.arrow`. Concurrent callers (every rank at start-up) take a
file lock: one tokenizes, the rest wait and map the result (flock does not reach
across nodes on every network file system; there each node computes once, and the
atomic rename keeps that correct).

    vlm-convert check --records mix665k.jsonl --tokenizer Qwen3-8B-Base --template chatml --max-seq-len 4096
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlm_dist.errors import UserError
from vlm_dist.fileio import atomic_file, sha256_file
from vlm_dist.contract.records import RecordError, read_lines

CHUNK = 2048          # records per worker task
CACHE_VERSION = 3

SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("length", pa.int32()), ("supervised", pa.int32()),
    ("num_images", pa.int16()), ("truncated", pa.bool_()), ("reason", pa.string()), ("detail", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("supervised_mask", pa.list_(pa.bool_())),
    ("image_keys", pa.list_(pa.string())),        # the record's image references, in block order
    ("video_keys", pa.list_(pa.string())),        # its video references
    ("num_videos", pa.int16()),
    ("media_tokens", pa.int32()),                 # pad slots of every media block (views x tokens)
])
# A video reference without a layout is encoded with this one frame, so its record is checked
# (and dropped by data.samples with its reason) instead of failing the whole file.
PLACEHOLDER_VIDEO = {"kind": "video", "timestamps": [0.0], "num_available": 1, "duration": 0.0, "size": [1, 1]}


class SupervisionError(UserError, ValueError):
    """Records that cannot be trained on; the message lists them (id, reason, detail)."""


@dataclass
class LengthTable:
    """The tokenized records of one file, memory-mapped from the cache."""
    records_path: str
    cache_path: str
    key: dict              # what the cache file was computed from
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getstate__(self):
        # pickled into DataLoader workers: send the path and re-map the file, never the buffers
        return {"records_path": self.records_path, "cache_path": self.cache_path, "key": self.key}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.table = _open(self.cache_path)

    @property
    def lengths(self) -> np.ndarray:
        return self.table.column("length").to_numpy()

    @property
    def supervised(self) -> np.ndarray:
        return self.table.column("supervised").to_numpy()

    @property
    def ok(self) -> np.ndarray:
        """True where the record is a usable training sample."""
        return self.table.column("reason").is_null().to_numpy(zero_copy_only=False)

    def problems(self) -> list[dict]:
        bad = self.table.filter(self.table.column("reason").is_valid())
        return bad.select(["index", "id", "reason", "detail", "length"]).to_pylist()

    def sample(self, i: int):
        """The EncodedSample of record i (ValueError if record i is a problem)."""
        row = self.table.slice(i, 1).to_pylist()[0]
        if row["reason"] is not None:
            raise ValueError(f"record {row['id']!r} ({self.records_path}, record {i}) is not a training "
                             f"sample: {row['reason']}: {row['detail']}")
        return _to_sample(row)

    def iter_samples(self):
        """(record index, EncodedSample) of every usable record, in file order, batch by batch."""
        for batch in self.table.to_batches():
            for row in batch.to_pylist():
                if row["reason"] is None:
                    yield row["index"], _to_sample(row)


def _to_sample(row: dict):
    from vlm_dist.contract.media import IMAGE, VIDEO
    from vlm_dist.contract.prompt import EncodedSample
    from vlm_dist.contract.prompt import IGNORE
    media = {kind: row[col] for kind, col in ((IMAGE.name, "image_keys"), (VIDEO.name, "video_keys"))
             if row[col]}
    labels = [t if m else IGNORE for t, m in zip(row["input_ids"], row["supervised_mask"])]
    return EncodedSample(row["id"], row["input_ids"], labels, media, row["truncated"])


# -- fingerprints --------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over what decides token ids: the serialized fast tokenizer and the added tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; "
                         "the supervision check needs one to fingerprint")
    h.update(backend.to_str().encode())
    h.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode())
    return h.hexdigest()


def _code_fingerprint() -> str:
    import vlm_dist.contract.media
    import vlm_dist.contract.prompt
    import vlm_dist.contract.tiling
    import vlm_dist.contract.video
    h = hashlib.sha256()
    for mod in (vlm_dist.contract.prompt, vlm_dist.contract.media, vlm_dist.contract.tiling,
                vlm_dist.contract.video):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def layouts_digest(layouts: dict | None) -> str | None:
    """SHA-256 over every (reference, layout) pair, in reference order; None without layouts."""
    if not layouts:
        return None
    h = hashlib.sha256()
    for ref in sorted(layouts):
        h.update(json.dumps([ref, layouts[ref]], sort_keys=True).encode())
    return h.hexdigest()


def _media_layouts(record: dict, layouts: dict) -> dict:
    """{kind: [layout per item]} of one record, as PromptEncoder.encode takes them."""
    from vlm_dist.contract.media import IMAGE, VIDEO

    def of(ref, kind):
        lay = layouts.get(ref) if isinstance(ref, str) else None
        return lay if lay is not None and lay.get("kind", kind) == kind else None

    out = {IMAGE.name: [of(ref, IMAGE.name) for ref in record.get(IMAGE.record_field) or []]}
    out[VIDEO.name] = [of(ref, VIDEO.name) or PLACEHOLDER_VIDEO for ref in record.get(VIDEO.record_field) or []]
    return out


# -- workers -------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_path: str, template: str, image_tokens: int | dict, max_seq_len: int, truncate: bool,
                 layouts: dict | None = None):
    """Once per worker process: the layouts come here (pickled once per worker), never with a task."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from vlm_dist.contract.prompt import PromptEncoder
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    enc = PromptEncoder(tok, template, image_tokens)
    _W.update(encoder=enc, max_seq_len=max_seq_len, truncate=truncate, layouts=layouts or {},
              pads={enc.blocks[k].pad for k in enc.blocks})


def _encode_chunk(task: tuple[int, list[str]]) -> pa.RecordBatch:
    from vlm_dist.contract.prompt import IGNORE, SampleError
    from vlm_dist.contract.records import RecordError, validate_record

    start, lines = task
    enc, max_len, truncate, layouts = _W["encoder"], _W["max_seq_len"], _W["truncate"], _W["layouts"]
    cols = {name: [] for name in SCHEMA.names}

    def add(i, rid, ids=(), labels=(), keys=(), videos=(), truncated=False, reason=None, detail=None,
            length=None):
        # labels are the token itself where supervised (prompt.py), so a bit mask stores them
        assert all(l == IGNORE or l == t for t, l in zip(ids, labels))
        mask = [l != IGNORE for l in labels]
        for name, v in (("index", start + i), ("id", rid), ("input_ids", list(ids)), ("supervised_mask", mask),
                        ("image_keys", list(keys)), ("truncated", truncated), ("reason", reason),
                        ("detail", detail), ("length", len(ids) if length is None else length),
                        ("supervised", sum(mask)), ("num_images", len(keys)), ("video_keys", list(videos)),
                        ("num_videos", len(videos)),
                        ("media_tokens", sum(1 for t in ids if t in _W["pads"]))):
            cols[name].append(v)

    for i, line in enumerate(lines):
        rid = None
        try:
            record = json.loads(line)
            rid = record.get("id") if isinstance(record, dict) else None
            validate_record(record, f"record {start + i}")
        except (json.JSONDecodeError, RecordError) as e:
            add(i, None if rid is None else str(rid), reason="invalid", detail=str(e))
            continue
        media = _media_layouts(record, layouts)
        try:
            s = enc.encode(record, max_len, truncate, validate=False, layouts=media)
        except SampleError as e:
            full = enc.encode(record, None, False, validate=False, layouts=media) if e.reason == "too_long" else None
            add(i, rid, reason=e.reason, detail=str(e), length=len(full) if full else 0)
            continue
        cut = {kind: len(items) - len(s.media.get(kind, [])) for kind, items in media.items()}
        if s.truncated and any(cut.values()):
            full = enc.encode(record, None, False, validate=False, layouts=media)
            what = " and ".join(f"{n} {kind} block(s)" for kind, n in cut.items() if n)
            add(i, rid, reason="too_long", length=len(full),
                detail=f"record {rid!r}: {len(full)} tokens exceed max_seq_len={max_len} and truncation "
                       f"would cut {what}")
            continue
        add(i, rid, s.input_ids, s.labels, s.image_keys, s.video_keys, s.truncated)
    return pa.RecordBatch.from_pydict(cols, schema=SCHEMA)


def _chunks(path: Path):
    start, lines = 0, []
    for _, line in read_lines(path):   # blank lines skipped, as read_records does: indices count records
        lines.append(line)
        if len(lines) == CHUNK:
            yield start, lines
            start, lines = start + len(lines), []
    if lines:
        yield start, lines


# -- public --------------------------------------------------------------------
def tokenize_records(records_path: str | os.PathLike, tokenizer: str | os.PathLike, template: str,
                     image_tokens: int | dict, max_seq_len: int, truncate: bool = False,
                     cache_dir: str | os.PathLike | None = None, num_workers: int | None = None,
                     progress: bool = True, layouts: dict | None = None) -> LengthTable:
    """Tokenize (or load from the cache) every record of a JSONL file; see the module docstring.

    `tokenizer` is a folder loadable with AutoTokenizer.from_pretrained (each worker loads it).
    `image_tokens`: pad slots per view, one int or {"image": T, "video": Tf}. `layouts`:
    {media reference: layout dict as the feature cache stores it} (None: every image untiled).
    """
    from transformers import AutoTokenizer

    records_path = Path(records_path)
    if not records_path.is_file():
        raise RecordError(f"records file {records_path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    tokens = ({k: int(v) for k, v in sorted(image_tokens.items())} if isinstance(image_tokens, dict)
              else int(image_tokens))
    key = {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tok),
           "records": sha256_file(records_path), "template": template, "image_tokens": tokens,
           "max_seq_len": int(max_seq_len), "truncate": bool(truncate), "layouts": layouts_digest(layouts),
           "code": _code_fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = records_path.name[:-len(".jsonl")] if records_path.name.endswith(".jsonl") else records_path.name
    cache = Path(cache_dir or records_path.parent) / f"{stem}.lengths-{digest}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # every rank of a job may call this at start-up: one computes, the others wait and map the file
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.exists():
            _build(cache, records_path, key, (str(tokenizer), template, tokens, int(max_seq_len),
                                              bool(truncate), layouts or None), num_workers, progress)
    return LengthTable(str(records_path), str(cache), key, _open(cache))


def _build(cache: Path, records_path: Path, key: dict, init: tuple, num_workers: int | None, progress: bool):
    """Tokenize every record into `cache` (fileio.atomic_file: a reader never sees half a file)."""
    from tqdm import tqdm

    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    schema = SCHEMA.with_metadata({"vlm_dist.lengths.key": json.dumps(key, sort_keys=True)})
    bar = tqdm(desc=f"tokenize {records_path.name}", unit=" rec", disable=None if progress else True)
    try:
        with atomic_file(cache) as sink, pa.ipc.new_file(sink, schema) as writer:
            if workers <= 1:
                _init_worker(*init)
                batches = map(_encode_chunk, _chunks(records_path))
            else:
                # a RecordError raised by _chunks (bad bytes) reaches us through imap, in order
                pool = mp.get_context("spawn").Pool(workers, _init_worker, init)
                batches = pool.imap(_encode_chunk, _chunks(records_path))
            try:
                for batch in batches:
                    writer.write_batch(batch)
                    bar.update(batch.num_rows)
            finally:
                if workers > 1:
                    pool.terminate()
    finally:
        bar.close()


def _open(path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def check_supervision(table: LengthTable, max_listed: int = 20) -> None:
    """Raise SupervisionError listing the records that cannot be trained on (too long, no supervision)."""
    problems = table.problems()
    if not problems:
        return
    counts = Counter(p["reason"] for p in problems)
    lines = [f"{p['id']!r} (record {p['index']}): {p['reason']}: {p['detail']}" for p in problems[:max_listed]]
    more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
    raise SupervisionError(
        f"{table.records_path}: {len(problems)} record(s) cannot be trained on "
        f"({', '.join(f'{r} {n}' for r, n in sorted(counts.items()))}); max_seq_len={table.key['max_seq_len']}, "
        f"template={table.key['template']}. Fix or drop them (or set truncate for over-long text):\n  "
        + "\n  ".join(lines) + more)


def duplicate_ids(tables: list[LengthTable]) -> list[dict]:
    """Records whose id an earlier record of these files already has, in order: {"id", "file", "index", "first"}.

    Only repeats inside the input files count (a mixture's upsampling repeats are
    intended); "first" names where the id was seen first ("<file> record <index>").
    """
    first: dict[str, str] = {}
    out = []
    for t in tables:
        for i, rid in enumerate(t.table.column("id").to_pylist()):
            if rid is None:
                continue   # an invalid record without an id is listed as a problem already
            if rid in first:
                out.append({"id": rid, "file": t.records_path, "index": i, "first": first[rid]})
            else:
                first[rid] = f"{t.records_path} record {i}"
    return out


def summarize(table: LengthTable) -> dict:
    """Length distribution and supervised-token fraction over the usable records."""
    ok = table.ok
    lengths, sup = table.lengths[ok].astype(np.int64), table.supervised[ok].astype(np.int64)
    imgs = table.table.column("num_images").to_numpy()[ok]
    vids = table.table.column("num_videos").to_numpy()[ok]
    media = table.table.column("media_tokens").to_numpy()[ok].astype(np.int64)
    out = {"records": len(table), "ok": int(ok.sum()),
           "problems": dict(sorted(Counter(p["reason"] for p in table.problems()).items())),
           "truncated": int(table.table.column("truncated").to_numpy(zero_copy_only=False)[ok].sum()),
           "tokens": int(lengths.sum()), "supervised_tokens": int(sup.sum()),
           "supervised_fraction": round(float(sup.sum() / lengths.sum()), 4) if lengths.sum() else 0.0,
           "images": int(imgs.sum()), "videos": int(vids.sum()),
           "text_only_records": int(((imgs == 0) & (vids == 0)).sum()),
           # pad slots of every media block (views x tokens per view), per usable sample
           "media_tokens": {"total": int(media.sum()),
                            "mean_per_sample": round(float(media.mean()), 1) if len(media) else 0.0,
                            "max_per_sample": int(media.max()) if len(media) else 0},
           "duplicate_ids": len(duplicate_ids([table]))}
    if len(lengths):
        q = np.percentile(lengths, [50, 90, 99])
        out["length"] = {"min": int(lengths.min()), "p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]),
                         "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
    return out


def format_summary(name: str, s: dict) -> str:
    """One line per dataset for the run log."""
    text = f"{name}: {s['ok']}/{s['records']} records usable"
    if s["problems"]:
        text += " (" + ", ".join(f"{r} {n}" for r, n in s["problems"].items()) + ")"
    if "length" in s:
        L = s["length"]
        text += (f"; tokens min {L['min']} p50 {L['p50']} p90 {L['p90']} p99 {L['p99']} max {L['max']}"
                 f" mean {L['mean']}")
    text += f"; supervised {s['supervised_fraction']:.1%} of {s['tokens']} tokens; {s['images']} images"
    if s.get("videos"):
        text += f", {s['videos']} videos"
    if s.get("media_tokens", {}).get("total"):
        m = s["media_tokens"]
        text += f"; media tokens per sample mean {m['mean_per_sample']} max {m['max_per_sample']}"
    if s["truncated"]:
        text += f"; {s['truncated']} truncated"
    if s["duplicate_ids"]:
        text += f"; {s['duplicate_ids']} duplicate id(s)"
    return text
