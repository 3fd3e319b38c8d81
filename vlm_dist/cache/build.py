"""Build the feature cache: encode every unique image and video once with the frozen vision tower.

    vlm-cache build --records train.jsonl --image-root images/ --vision-model google/siglip-so400m-patch14-384 --out cache/
    vlm-cache build ... --tiling '{"grids": [[2, 2]], "tokens_per_tile": 64}' --frames 8 --max-fps 2

Records' `images` and `videos` are both collected (key = SHA-256 of the file, kind recorded per
reference); a file referenced both as an image and as a video is a listed failure (it is decoded
one way: an animated GIF, say, is either one still image or frames). An image is one view, or with
--tiling (contract.tiling) its thumbnail plus its tiles; a video is its sampled frames
(contract.video, --frames / --max-fps). Every view is one shard row; a key's views are
consecutive rows of one shard (see vlm_dist.cache.reader for the layout).

Steps (each process, `plan` and `encode`; then one `finalize`):
  plan      read the records, hash every referenced file (key = SHA-256 of its bytes), sort the
            unique keys and cut them into shards of `shard_size` keys. The plan is a pure function
            of the inputs, so every process and every re-run computes the same one; it is saved
            in build/ and a re-run with different inputs is refused. Launched ranks other than 0
            read rank 0's saved plan instead of hashing every file again (encoding re-checks
            each file's SHA-256, and rank 0 refuses a plan of other inputs).
  encode    shard j belongs to process j % num_shards. Decoding and preprocessing run in
            DataLoader workers, the forward on the device, the write in a background thread
            (vlm_dist.cache.encode). Large JPEGs decode at reduced scale (PIL draft, down to the
            tower's default_draft_to; --no-jpeg-draft: in full), recorded in the fingerprint as
            jpeg_draft_to, which exports carry to online decoding. A finished shard is written temp -> fsync -> rename,
            after its sidecar (build/shard-j.json: rows, bytes, SHA-256, failed keys).
            Re-runs skip finished shards.
  finalize  when every shard exists: keys.arrow, index.arrow, failures.jsonl, then manifest.json.

Under torchrun / srun / mpirun each rank takes its slice from the environment and rank 0
finalizes once every shard exists; with --shard-index/--num-shards the user runs
`vlm-cache finalize` after the last one. Either way the files are byte-identical.
What a build is asked to do and what it planned: BuildConfig and Plan (vlm_dist.cache.plan).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import torch

from vlm_dist.cache.encode import encode_shards
from vlm_dist.cache.plan import IMAGE_KIND, VIDEO_KIND, BuildConfig, Plan
from vlm_dist.cache.writer import (BUILD_DIR, BuildError, build_lock, sidecar_path, write_bytes_atomic,
                                 write_json_atomic, write_table_atomic)
from vlm_dist.cache.reader import (FAILURES_FILE, FORMAT, INDEX_FILE, KEYS_FILE, MANIFEST, SHARD_DIR,
                                   shard_name, with_fingerprint_defaults, write_verified_stamp)
from vlm_dist.contract.images import ImageError, open_under, too_large
from vlm_dist.model.vision import VisionTower, dtype_name, resolve_dtype
from vlm_dist.contract.records import read_lines, read_records
from vlm_dist.dist import discover
from vlm_dist.fileio import sha256_stream

PLAN_FILE = f"{BUILD_DIR}/plan.json"
REFS_FILE = f"{BUILD_DIR}/refs.arrow"


# -- plan ---------------------------------------------------------------------------------------
@dataclass
class RefUse:
    """How one reference is used: as which kinds (image, video) and by which records."""
    kinds: set[str] = field(default_factory=set)
    records: list[str] = field(default_factory=list)


# record field and list files of each kind
KIND_SOURCES = ((IMAGE_KIND, "images", "image_lists"), (VIDEO_KIND, "videos", "video_lists"))


def collect_references(cfg: BuildConfig) -> tuple[dict[str, RefUse], int, int]:
    """{reference: RefUse} from the records and image/video lists, plus (#records, #references)."""
    refs: dict[str, RefUse] = {}
    num_records = num_refs = 0
    for path in cfg.records:
        for rec in read_records(path):
            num_records += 1
            for kind, record_field, _ in KIND_SOURCES:
                for ref in rec.get(record_field) or []:
                    use = refs.setdefault(ref, RefUse())
                    use.kinds.add(kind)
                    use.records.append(rec["id"])
                    num_refs += 1
    for kind, _, lists in KIND_SOURCES:
        for path in getattr(cfg, lists):
            for _, line in read_lines(path):   # a bad byte or unreadable list is named, by line
                ref = line.strip()
                if ref and not ref.startswith("#"):
                    refs.setdefault(ref, RefUse()).kinds.add(kind)
                    num_refs += 1
    if not refs:
        raise BuildError("no images or videos: give --records and/or --image-list / --video-list "
                         "files that reference some")
    return refs, num_records, num_refs


def kind_name(kinds: set[str]) -> str:
    """A reference's kind as refs.arrow stores it: "image", "video", or "image+video" (a failure)."""
    return "+".join(sorted(kinds))


def refuse_mixed_kinds(refs: list[str], kinds: list[str], ref_keys: list[str | None],
                       ref_errors: list[str | None]) -> None:
    """A file is decoded one way: every reference to a file used both as an image and as a
    video (by one reference, or by two with the same bytes) becomes a failure, in place."""
    key_kinds: dict[str, set[str]] = {}
    key_refs: dict[str, list[str]] = {}
    for ref, kind, key in zip(refs, kinds, ref_keys):
        if key is not None:
            key_kinds.setdefault(key, set()).update(kind.split("+"))
            key_refs.setdefault(key, []).append(ref)
    for i, key in enumerate(ref_keys):
        if key is not None and len(key_kinds[key]) > 1:
            same = ", ".join(key_refs[key])
            ref_keys[i], ref_errors[i] = None, (
                f"referenced both as an image and as a video ({same}; SHA-256 {key[:16]}...): a "
                "file is decoded one way, reference it under one kind (`images` or `videos`)")


def hash_ref(root: str, ref: str, max_bytes: int) -> tuple[str | None, str | None]:
    """(hex SHA-256 of the file's bytes, None) or (None, why it cannot be used).

    Only a regular file inside `root` of at most `max_bytes` is read (vlm_dist.contract.images.open_under).
    """
    try:
        with open_under(root, ref, max_bytes) as f:
            digest, size = sha256_stream(f, limit=max_bytes)
    except ImageError as e:
        return None, e.reason
    except OSError as e:
        return None, f"unreadable file ({e.strerror or e})"
    if digest is None:                                 # grew since it was opened
        return None, too_large(size, max_bytes)
    return digest, None


def set_jpeg_draft(tower: VisionTower, cfg: BuildConfig) -> None:
    """The decode this build uses: JPEG draft down to the tower's default_draft_to (None for NaFlex),
    or a full decode with --no-jpeg-draft. The decode workers read tower.draft_to; the fingerprint
    records it (jpeg_draft_to).

    A tiled build keeps the same draft size, so an untiled image's view equals a tiled cache's
    thumbnail bit for bit whichever cache it comes from. The draft keeps both sides of a large
    JPEG at or above twice the tile size, so a grid with at most 2 tiles across an image's
    shorter side (LLaVA-NeXT's default grids) is never upsampled by it; `draft_warning` names
    the grids that can be."""
    tower.draft_to = tower.default_draft_to if cfg.jpeg_draft else None


def draft_warning(tower: VisionTower, tiling) -> str | None:
    """A warning when JPEG draft decoding may leave a large photo smaller than a tiled canvas:
    grids with more than draft_to / tile_size tiles on both sides."""
    if tiling is None or tower.draft_to is None:
        return None
    most = tower.draft_to // tiling.tile_size
    big = [f"{r}x{c}" for r, c in tiling.candidates() if min(r, c) > most]
    if not big:
        return None
    return (f"[vlm-cache] warning: grids {', '.join(big)} span more than {most} tiles on both sides; "
            f"a large JPEG decoded with the draft (down to {tower.draft_to} px per side) can be "
            "upsampled onto their canvas. Add --no-jpeg-draft to decode every pixel for such grids.")


def make_plan(cfg: BuildConfig, fingerprint: dict, threads: int = 8) -> Plan:
    """Hash every reference and cut the keys into shards. `fingerprint` is the tower's; a build
    with any video reference records cfg.video_sampling in it too (`video_sampling`)."""
    ref_map, num_records, num_refs = collect_references(cfg)
    refs = sorted(ref_map)
    kinds = [kind_name(ref_map[r].kinds) for r in refs]
    limit = {r: cfg.max_video_bytes if VIDEO_KIND in ref_map[r].kinds else cfg.max_bytes for r in refs}
    with ThreadPoolExecutor(max_workers=threads) as pool:   # hashlib releases the GIL
        hashed = list(pool.map(lambda r: hash_ref(cfg.image_root, r, limit[r]), refs,
                               chunksize=64))
    ref_keys, ref_errors = [k for k, _ in hashed], [e for _, e in hashed]
    refuse_mixed_kinds(refs, kinds, ref_keys, ref_errors)
    key_ref = first_ref_per_key(refs, ref_keys)
    key_kind = {key: kind for key, kind in zip(ref_keys, kinds) if key is not None}
    keys = sorted(key_ref)
    if any(VIDEO_KIND in k for k in kinds):
        fingerprint = {**fingerprint, "video_sampling": cfg.video_sampling.fingerprint()}
    digest = hashlib.sha256()
    for ref, key, kind in zip(refs, ref_keys, kinds):
        digest.update(f"{ref}\t{key}\t{kind}\n".encode())
    info = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "shard_size": cfg.shard_size,
        "num_shard_files": -(-len(keys) // cfg.shard_size),
        "num_records": num_records,
        "num_references": num_refs,
        "num_unique_references": len(refs),
        "num_keys": len(keys),
        "num_video_keys": sum(k == VIDEO_KIND for k in key_kind.values()),
        "refs_sha256": digest.hexdigest(),
        "sources": {"records": [os.path.abspath(p) for p in cfg.records],
                    "image_lists": [os.path.abspath(p) for p in cfg.image_lists],
                    "video_lists": [os.path.abspath(p) for p in cfg.video_lists],
                    "image_root": os.path.abspath(cfg.image_root)},
    }
    return Plan(info, refs, ref_keys, ref_errors, [ref_map[r].records for r in refs],
                keys, key_ref, kinds, key_kind)


def first_ref_per_key(refs: list[str], ref_keys: list[str | None]) -> dict[str, str]:
    """key -> the first (sorted) reference with it: the file that is decoded for that key."""
    key_ref: dict[str, str] = {}
    for ref, key in zip(refs, ref_keys):
        if key is not None:
            key_ref.setdefault(key, ref)
    return key_ref


def load_plan(out: Path, timeout: float, poll: float = 2.0) -> Plan:
    """The plan rank 0 saved (waiting up to `timeout` s for it): other ranks need not hash."""
    deadline = time.monotonic() + timeout
    while not ((out / PLAN_FILE).exists() and (out / REFS_FILE).exists()):
        if time.monotonic() > deadline:
            raise BuildError(f"timed out after {timeout:.0f}s waiting for rank 0 to write "
                             f"{out / PLAN_FILE}; did rank 0 fail? Re-run the same command.")
        time.sleep(poll)
    info = json.loads((out / PLAN_FILE).read_text())
    if info.get("format") != FORMAT:
        raise BuildError(f"{out / PLAN_FILE} is a plan of format {info.get('format')!r}, not "
                         f"{FORMAT!r}: that build was started by an older version; use a new --out "
                         "directory, or delete this one to rebuild it")
    t = pa.ipc.open_file(pa.memory_map(str(out / REFS_FILE), "r")).read_all().to_pydict()
    key_ref = first_ref_per_key(t["ref"], t["key"])
    key_kind = {k: kind for k, kind in zip(t["key"], t["kind"]) if k is not None}
    return Plan(info, t["ref"], t["key"], t["error"], t["records"], sorted(key_ref), key_ref,
                t["kind"], key_kind)


def save_plan(out: Path, plan: Plan) -> None:
    """Write the plan, or check it equals the one a previous run of this cache wrote."""
    path = out / PLAN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if isinstance(old.get("fingerprint"), dict):   # planned before a field existed: its default
            old["fingerprint"] = with_fingerprint_defaults(old["fingerprint"])
        new = {**plan.info, "fingerprint": with_fingerprint_defaults(plan.info["fingerprint"])}
        if old != new:
            diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            fp_old, fp_new = old.get("fingerprint") or {}, new["fingerprint"]
            fields = sorted(f for f in set(fp_old) | set(fp_new) if fp_old.get(f) != fp_new.get(f))
            diffs = [f"fingerprint ({', '.join(fields)})" if d == "fingerprint" and fields else d
                     for d in diffs]
            planned = (old.get("fingerprint") or {}).get("jpeg_draft_to")
            now = plan.info["fingerprint"]["jpeg_draft_to"]
            hint = ""
            if old.get("format") != FORMAT:
                hint = f" It was started by an older vlm-cache (format {old.get('format')!r})."
            elif (planned is None) != (now is None):
                hint = (" It was planned with a full JPEG decode: add --no-jpeg-draft to resume it."
                        if planned is None else " It was planned with JPEG draft decoding "
                        f"(jpeg_draft_to={planned}): drop --no-jpeg-draft to resume it.")
            raise BuildError(
                f"{out} holds a build of different inputs (differs in: {', '.join(diffs)}).{hint} "
                "Use a new --out directory, or delete this one to rebuild it.")
    else:
        write_json_atomic(path, plan.info)
    if not (out / REFS_FILE).exists():
        table = pa.table({"ref": pa.array(plan.refs, pa.string()),
                          "key": pa.array(plan.ref_keys, pa.string()),
                          "error": pa.array(plan.ref_errors, pa.string()),
                          "records": pa.array(plan.ref_records, pa.list_(pa.string())),
                          "kind": pa.array(plan.ref_kinds, pa.string())})
        write_table_atomic(out / REFS_FILE, table)


def shard_done(out: Path, j: int) -> bool:
    """A shard is finished when its file exists (renamed last) with the size its sidecar records."""
    arrow, side = out / shard_name(j), sidecar_path(out, j)
    if not (arrow.exists() and side.exists()):
        return False
    return arrow.stat().st_size == json.loads(side.read_text())["bytes"]


# -- finalize -------------------------------------------------------------------------------------
def missing_shards(out: Path, num_files: int) -> list[int]:
    return [j for j in range(num_files) if not shard_done(out, j)]


def finalize(cache_dir: str | os.PathLike) -> dict:
    """Write keys.arrow, index.arrow, failures.jsonl and (last) manifest.json; return the manifest.

    Refused until every planned shard is finished. Three steps: read the shards back
    (`read_shards`), list what failed and who it affects (`collect_failures`), publish the
    index files and the manifest (`publish_index`).
    """
    out = Path(cache_dir)
    if not (out / PLAN_FILE).exists():
        raise BuildError(f"{out}: no {PLAN_FILE}; run `vlm-cache build` first")
    info = json.loads((out / PLAN_FILE).read_text())
    num_files = info["num_shard_files"]
    missing = missing_shards(out, num_files)
    if missing:
        names = ", ".join(shard_name(j) for j in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise BuildError(
            f"{out}: {len(missing)} of {num_files} shards are not finished: {names}. Shard j is "
            "built by --shard-index j %% --num-shards; re-run the build(s) that own them "
            "(finished shards are skipped), then finalize again.".replace("%%", "%"))
    for stale in (out / SHARD_DIR).glob("*.tmp.*"):           # left by killed runs
        stale.unlink(missing_ok=True)
    shards = read_shards(out, num_files)
    refs = pa.ipc.open_file(pa.memory_map(str(out / REFS_FILE), "r")).read_all().to_pylist()
    failures, failure_counts = collect_failures(refs, shards.failed)
    return publish_index(out, info, shards, refs, failures, failure_counts)


@dataclass
class ShardContents:
    """The finished shards read back: their manifest entries, every key and where it is stored."""
    entries: list[dict] = field(default_factory=list)    # manifest "shards": file, rows, bytes, sha256
    keys: list[str] = field(default_factory=list)        # every encoded key, in shard order
    shard: list[int] = field(default_factory=list)       # key i's views are rows row[i] ..
    row: list[int] = field(default_factory=list)         # row[i] + views[i] - 1 of shard shard[i]
    views: list[int] = field(default_factory=list)
    layouts: list[str | None] = field(default_factory=list)      # key i's layout JSON (or None)
    failed: dict[str, str] = field(default_factory=dict)         # key -> why it was not encoded
    written: dict[str, list[int]] = field(default_factory=dict)  # shard file -> [bytes, mtime_ns]

    def add(self, j: int, side: dict, shard_keys: list[str], views: list[int] | None = None,
            layouts: list[str | None] | None = None) -> None:
        """Shard j, as its sidecar (or ShardWriter.finish) describes it, holding `shard_keys` with
        `views` rows each (default 1) in that order, and their `layouts` (default none)."""
        views = [1] * len(shard_keys) if views is None else list(views)
        self.entries.append({"file": shard_name(j), "rows": side["rows"], "bytes": side["bytes"],
                             "sha256": side["sha256"]})
        self.written[shard_name(j)] = [side["bytes"], side["mtime_ns"]]
        self.keys += shard_keys
        self.shard += [j] * len(shard_keys)
        first = 0
        for v in views:                     # a key's first row: the views before it in the shard
            self.row.append(first)
            first += v
        self.views += views
        self.layouts += [None] * len(shard_keys) if layouts is None else list(layouts)


def shard_key_views(table: pa.Table, where: str) -> tuple[list[str], list[int], list[str | None]]:
    """(keys, views per key, layout per key) of one shard's rows: each key's rows consecutive,
    views numbered 0.. (a format /1 shard: one view per key, no layouts)."""
    row_keys = table.column("key").to_pylist()
    if "view" not in table.column_names:
        return row_keys, [1] * len(row_keys), [None] * len(row_keys)
    row_views = table.column("view").to_pylist()
    row_layouts = table.column("layout").to_pylist()
    keys, views, layouts = [], [], []
    for key, view, layout in zip(row_keys, row_views, row_layouts):
        if view == 0:
            keys.append(key)
            views.append(1)
            layouts.append(layout)
        elif not keys or keys[-1] != key or views[-1] != view:
            raise BuildError(f"{where}: row of key {key} view {view} does not follow its view "
                             f"{view - 1}: delete the shard and its sidecar and re-run the build")
        else:
            views[-1] += 1
    return keys, views, layouts


def read_shards(out: Path, num_files: int) -> ShardContents:
    """Every shard's keys, checked against its sidecar; the keys of all shards must be sorted."""
    s = ShardContents()
    for j in range(num_files):
        side = json.loads(sidecar_path(out, j).read_text())
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(out / shard_name(j)), "r"))
            table = reader.read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise BuildError(f"{shard_name(j)} is unreadable ({e}): delete it and re-run the "
                             "build") from e
        if table.num_rows != side["rows"]:
            raise BuildError(f"{shard_name(j)} has {table.num_rows} rows, its sidecar says "
                             f"{side['rows']}: delete both and re-run the build")
        s.add(j, side, *shard_key_views(table, shard_name(j)))
        s.failed.update((f["key"], f["reason"]) for f in side["failures"])
    if s.keys != sorted(s.keys) or len(set(s.keys)) != len(s.keys):
        raise BuildError(f"{out}: shard keys are not in sorted order; the shards come from "
                         "different builds. Delete the cache and rebuild.")
    return s


def collect_failures(refs: list[dict], failed: dict[str, str]) -> tuple[list[dict], dict]:
    """failures.jsonl's entries and the manifest's failure counts.

    First each image or video that failed to encode (by key, with its kind and every path and
    record that uses it), then each file that could not be used at all (by path, from the plan:
    unreadable, outside the root, too large, or referenced as both kinds).
    records_with_failed_images counts the records with a failed file of either kind.
    """
    key_failures: dict[str, dict] = {k: {"key": k, "reason": r, "paths": [], "records": set()}
                                     for k, r in failed.items()}
    path_failures = []
    for r in refs:
        kind = r.get("kind") or IMAGE_KIND
        if r["key"] is None:
            path_failures.append({"path": r["ref"], "kind": kind, "reason": r["error"],
                                  "records": sorted(set(r["records"]))})
        elif r["key"] in key_failures:
            key_failures[r["key"]]["kind"] = kind
            key_failures[r["key"]]["paths"].append(r["ref"])
            key_failures[r["key"]]["records"].update(r["records"])
    failures = [dict(f, records=sorted(f["records"])) for _, f in sorted(key_failures.items())]
    failures += path_failures
    bad_records = set()
    for f in failures:
        bad_records.update(f["records"])
    failed_videos = sum(f.get("kind") == VIDEO_KIND for f in key_failures.values())
    return failures, {"failed_images": len(key_failures) - failed_videos, "failed_videos": failed_videos,
                      "unreadable_files": len(path_failures),
                      "records_with_failed_images": len(bad_records)}


def media_statistics(layouts: list[str | None], views: list[int]) -> dict:
    """What `vlm-cache info` shows of the encoded keys: images by grid, views per image, frames
    per video and video durations (from the layouts, no decoding)."""
    grids: dict[str, int] = {}
    image_views, frames, seconds = [], [], []
    for text, v in zip(layouts, views):
        layout = json.loads(text) if text else {"kind": IMAGE_KIND}
        if layout.get("kind") == VIDEO_KIND:
            frames.append(v)
            seconds.append(layout["duration"])
            continue
        image_views.append(v)
        if "rows" in layout:
            grid = f"{layout['rows']}x{layout['cols']}"
            grids[grid] = grids.get(grid, 0) + 1

    def summary(values):
        return ({"mean": round(sum(values) / len(values), 3), "min": min(values), "max": max(values)}
                if values else None)
    return {"images": len(image_views), "images_by_grid": dict(sorted(grids.items())),
            "views_per_image": summary(image_views), "videos": len(frames),
            "frames_per_video": summary(frames), "video_seconds": summary(seconds),
            "views": sum(views)}


def publish_index(out: Path, info: dict, shards: ShardContents, refs: list[dict], failures: list[dict],
                  failure_counts: dict) -> dict:
    """keys.arrow, index.arrow and failures.jsonl, then manifest.json (which names and hashes them,
    so a reader that finds it finds them complete), then the verified stamp. Returns the manifest."""
    files = {}

    def publish(name: str, data: bytes):
        write_bytes_atomic(out / name, data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def table_bytes(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        return sink.getvalue().to_pybytes()

    publish(KEYS_FILE, table_bytes(pa.table({
        "key": pa.array([k.encode() for k in shards.keys], pa.binary(64)),
        "shard": pa.array(shards.shard, pa.int32()), "row": pa.array(shards.row, pa.int32()),
        "views": pa.array(shards.views, pa.int32()), "layout": pa.array(shards.layouts, pa.string())})))
    indexed = [r for r in refs if r["key"] is not None]
    publish(INDEX_FILE, table_bytes(pa.table({
        "ref": pa.array([r["ref"] for r in indexed], pa.string()),
        "key": pa.array([r["key"] for r in indexed], pa.string()),
        "kind": pa.array([r.get("kind") or IMAGE_KIND for r in indexed], pa.string())})))
    publish(FAILURES_FILE, "".join(json.dumps(f, sort_keys=True) + "\n"
                                   for f in failures).encode())
    fp = info["fingerprint"]
    media = media_statistics(shards.layouts, shards.views)
    num_videos = info.get("num_video_keys", 0)
    manifest = {
        "format": FORMAT,
        "fingerprint": fp,
        "feature_shape": fp["feature_shape"],
        "dtype": fp["dtype"],
        "pool": fp["pool"],
        "shard_size": info["shard_size"],
        "counts": {
            "records": info["num_records"],
            "references": info["num_references"],
            "unique_references": info["num_unique_references"],
            "unique_images": info["num_keys"] - num_videos,
            "unique_videos": num_videos,
            "encoded": len(shards.keys),
            "encoded_videos": media["videos"],
            "views": media["views"],
            "failed_videos": 0,
            **failure_counts,
            "shard_bytes": sum(s["bytes"] for s in shards.entries),
        },
        "media": media,
        "sources": info["sources"],
        "shards": shards.entries,
        "files": files,
    }
    write_json_atomic(out / MANIFEST, manifest)
    write_verified_stamp(out, shards.written)    # shards were hashed as they were written
    return manifest


def wait_for_shards(out: Path, num_files: int, timeout: float, poll: float = 5.0) -> None:
    """Rank 0: wait until every rank's shards exist, or fail naming the missing ones."""
    deadline = time.monotonic() + timeout
    while missing := missing_shards(out, num_files):
        if time.monotonic() > deadline:
            raise BuildError(f"timed out after {timeout:.0f}s waiting for {len(missing)} shard(s) "
                             f"from other ranks, e.g. {shard_name(missing[0])}; did a rank fail? "
                             "Re-run the same command to resume.")
        time.sleep(poll)


# -- the whole build ------------------------------------------------------------------------------
def pick_device(device: str, local_rank: int) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def resolve_tiling(cfg: BuildConfig, tower: VisionTower) -> BuildConfig:
    """cfg with its tiling a TilingSpec checked against the tower: a dict of TilingSpec fields
    (--tiling JSON) gets tile_size = the tower's input side unless it names one (which must
    equal it); SigLIP2 NaFlex cannot be tiled (contract.tiling.TilingError)."""
    if cfg.tiling is None:
        return cfg
    spec = (tower.tiling_spec(cfg.tiling) if isinstance(cfg.tiling, dict)
            else tower.check_tiling(cfg.tiling))
    return replace(cfg, tiling=spec)


def build(cfg: BuildConfig) -> dict:
    """Plan, encode this process's shards and (when it is the one to) finalize. Returns a summary."""
    t0 = time.monotonic()
    resolve_dtype(cfg.dtype)
    env = discover()         # torchrun, deepspeed, srun, mpirun, or one plain process (rank 0 of 1)
    if cfg.num_shards is not None or cfg.shard_index is not None:
        if cfg.num_shards is None or cfg.shard_index is None:
            raise BuildError("--shard-index and --num-shards go together")
        index, count, local, auto_finalize = cfg.shard_index, cfg.num_shards, 0, cfg.num_shards == 1
    else:
        index, count, local, auto_finalize = env.rank, env.world_size, env.local_rank, env.rank == 0
    if not 0 <= index < count:
        raise BuildError(f"--shard-index {index} must be in [0, --num-shards {count})")
    if cfg.shard_size < 1 or cfg.batch_size < 1 or cfg.pool < 1:
        raise BuildError("--shard-size, --batch-size and --pool must be positive")
    show = index == 0 or cfg.shard_index is not None   # rank 0 speaks
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    with build_lock(out, index, count):    # a second build of this slice would clobber it
        device = pick_device(cfg.device, local)
        tower = VisionTower.from_pretrained(cfg.vision_model, feature_layer=cfg.feature_layer,
                                            dtype=cfg.dtype, device=device)
        set_jpeg_draft(tower, cfg)                       # before the fingerprint, which records it
        cfg = resolve_tiling(cfg, tower)
        if show and (warning := draft_warning(tower, cfg.tiling)):
            print(warning, flush=True)
        fingerprint = tower.fingerprint(pool=cfg.pool, tiling=cfg.tiling)
        if cfg.shard_index is None and index > 0:
            plan = load_plan(out, cfg.wait_timeout)     # rank 0 hashes every file, once for all
            if "video_sampling" in plan.info["fingerprint"]:       # rank 0 found videos
                fingerprint = {**fingerprint, "video_sampling": cfg.video_sampling.fingerprint()}
            if with_fingerprint_defaults(plan.info["fingerprint"]) != with_fingerprint_defaults(fingerprint):
                raise BuildError(f"{out / PLAN_FILE} was planned for another encoder than this "
                                 "rank's; give every rank the same arguments")
        else:
            plan = make_plan(cfg, fingerprint, threads=max(4, cfg.workers))
            save_plan(out, plan)
        mine = [j for j in range(plan.num_shard_files) if j % count == index]
        todo = [j for j in mine if not shard_done(out, j)]
        for j in todo:
            for stale in (out / SHARD_DIR).glob(f"shard-{j:06d}.arrow.tmp.*"):
                stale.unlink()
        if show:
            videos = plan.info.get("num_video_keys", 0)
            print(f"[vlm-cache] {plan.info['num_unique_references']} references, "
                  f"{plan.info['num_keys'] - videos} unique images and {videos} videos in "
                  f"{plan.num_shard_files} shards; "
                  f"slice {index}/{count}: {len(mine)} shards, {len(mine) - len(todo)} already done; "
                  f"device {device}, dtype {dtype_name(tower.dtype)}, features "
                  f"{tower.feature_shape(cfg.pool)}", flush=True)
        t_enc = time.monotonic()
        stats = encode_shards(cfg, tower, plan, todo, out, show and cfg.progress)
        encode_s = time.monotonic() - t_enc
        summary = {"shard_index": index, "num_shards": count, "device": device, **stats,
                   "encode_seconds": round(encode_s, 3),
                   "images_per_second": round(stats["images"] / encode_s, 2) if encode_s > 0 else None}
        write_json_atomic(out / BUILD_DIR / f"summary-{index:05d}-of-{count:05d}.json", summary)

        if auto_finalize:
            if count > 1:
                wait_for_shards(out, plan.num_shard_files, cfg.wait_timeout)
            manifest = finalize(out)
            summary["manifest"] = manifest["counts"]
        summary["seconds"] = round(time.monotonic() - t0, 3)
        if show:
            print(format_summary(summary), flush=True)
            if not auto_finalize and cfg.shard_index is not None:
                print(f"[vlm-cache] slice {index}/{count} done; after every slice has finished run "
                      f"`vlm-cache finalize {out}`", flush=True)
        return summary


def format_summary(s: dict) -> str:
    lines = [f"[vlm-cache] this process: {s['images']} images and videos ({s['views']} views) in "
             f"{s['encode_seconds']}s ({s['images_per_second']} items/s, {s['input_wait_seconds']}s of "
             f"it waiting for decoded input, {s['output_wait_seconds']}s for the writer): "
             f"{s['encoded']} encoded, {s['failed']} failed, "
             f"{s['bytes'] / 1e9:.3f} GB written"]
    if "manifest" in s:
        c = s["manifest"]
        failed = c["failed_images"] + c["failed_videos"] + c["unreadable_files"]
        lines.append(f"[vlm-cache] cache: {c['records']} records, {c['references']} references, "
                     f"{c['unique_images']} unique images, {c['unique_videos']} videos, "
                     f"{c['encoded']} encoded ({c['views']} views), {failed} failed "
                     f"({c['records_with_failed_images']} records affected, see {FAILURES_FILE}), "
                     f"{c['shard_bytes'] / 1e9:.3f} GB, {s['seconds']}s total")
    return "\n".join(lines)
