"""Build the feature cache: encode every unique image once with the frozen vision tower.

    vlm-cache build --records train.jsonl --image-root images/ --vision-model google/siglip-so400m-patch14-384 --out cache/

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
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from vlm_dist.cache.encode import encode_shards
from vlm_dist.cache.plan import BuildConfig, Plan
from vlm_dist.cache.writer import (BUILD_DIR, BuildError, build_lock, sidecar_path, write_bytes_atomic,
                                 write_json_atomic, write_table_atomic)
from vlm_dist.cache.reader import (FAILURES_FILE, FINGERPRINT_DEFAULTS, FORMAT, INDEX_FILE, KEYS_FILE,
                                   MANIFEST, SHARD_DIR, shard_name, write_verified_stamp)
from vlm_dist.contract.images import ImageError, open_under, too_large
from vlm_dist.model.vision import VisionTower, dtype_name, resolve_dtype
from vlm_dist.contract.records import read_lines, read_records
from vlm_dist.dist import discover
from vlm_dist.fileio import sha256_stream

PLAN_FILE = f"{BUILD_DIR}/plan.json"
REFS_FILE = f"{BUILD_DIR}/refs.arrow"


# -- plan ---------------------------------------------------------------------------------------
def collect_references(cfg: BuildConfig) -> tuple[dict[str, list[str]], int, int]:
    """{reference: [record ids]} from the records and image lists, plus (#records, #references)."""
    refs: dict[str, list[str]] = {}
    num_records = num_refs = 0
    for path in cfg.records:
        for rec in read_records(path):
            num_records += 1
            for ref in rec["images"]:
                refs.setdefault(ref, []).append(rec["id"])
                num_refs += 1
    for path in cfg.image_lists:
        for _, line in read_lines(path):   # a bad byte or unreadable list is named, by line
            ref = line.strip()
            if ref and not ref.startswith("#"):
                refs.setdefault(ref, [])
                num_refs += 1
    if not refs:
        raise BuildError("no images: give --records and/or --image-list files that reference some")
    return refs, num_records, num_refs


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
    records it (jpeg_draft_to)."""
    tower.draft_to = tower.default_draft_to if cfg.jpeg_draft else None


def make_plan(cfg: BuildConfig, fingerprint: dict, threads: int = 8) -> Plan:
    ref_map, num_records, num_refs = collect_references(cfg)
    refs = sorted(ref_map)
    with ThreadPoolExecutor(max_workers=threads) as pool:   # hashlib releases the GIL
        hashed = list(pool.map(lambda r: hash_ref(cfg.image_root, r, cfg.max_bytes), refs,
                               chunksize=64))
    ref_keys = [k for k, _ in hashed]
    key_ref = first_ref_per_key(refs, ref_keys)
    keys = sorted(key_ref)
    digest = hashlib.sha256()
    for ref, key in zip(refs, ref_keys):
        digest.update(f"{ref}\t{key}\n".encode())
    info = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "shard_size": cfg.shard_size,
        "num_shard_files": -(-len(keys) // cfg.shard_size),
        "num_records": num_records,
        "num_references": num_refs,
        "num_unique_references": len(refs),
        "num_keys": len(keys),
        "refs_sha256": digest.hexdigest(),
        "sources": {"records": [os.path.abspath(p) for p in cfg.records],
                    "image_lists": [os.path.abspath(p) for p in cfg.image_lists],
                    "image_root": os.path.abspath(cfg.image_root)},
    }
    return Plan(info, refs, ref_keys, [e for _, e in hashed], [ref_map[r] for r in refs],
                keys, key_ref)


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
    t = pa.ipc.open_file(pa.memory_map(str(out / REFS_FILE), "r")).read_all().to_pydict()
    key_ref = first_ref_per_key(t["ref"], t["key"])
    return Plan(info, t["ref"], t["key"], t["error"], t["records"], sorted(key_ref), key_ref)


def save_plan(out: Path, plan: Plan) -> None:
    """Write the plan, or check it equals the one a previous run of this cache wrote."""
    path = out / PLAN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if isinstance(old.get("fingerprint"), dict):   # planned before a field existed: its default
            old["fingerprint"] = {**FINGERPRINT_DEFAULTS, **old["fingerprint"]}
        if old != plan.info:
            diffs = sorted(k for k in set(old) | set(plan.info) if old.get(k) != plan.info.get(k))
            planned = (old.get("fingerprint") or {}).get("jpeg_draft_to")
            now = plan.info["fingerprint"]["jpeg_draft_to"]
            hint = ""
            if (planned is None) != (now is None):
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
                          "records": pa.array(plan.ref_records, pa.list_(pa.string()))})
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
    shard: list[int] = field(default_factory=list)       # key i is row row[i] of shard shard[i]
    row: list[int] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)         # key -> why it was not encoded
    written: dict[str, list[int]] = field(default_factory=dict)  # shard file -> [bytes, mtime_ns]

    def add(self, j: int, side: dict, shard_keys: list[str]) -> None:
        """Shard j, as its sidecar (or ShardWriter.finish) describes it, holding `shard_keys`."""
        self.entries.append({"file": shard_name(j), "rows": side["rows"], "bytes": side["bytes"],
                             "sha256": side["sha256"]})
        self.written[shard_name(j)] = [side["bytes"], side["mtime_ns"]]
        self.keys += shard_keys
        self.shard += [j] * len(shard_keys)
        self.row += range(len(shard_keys))


def read_shards(out: Path, num_files: int) -> ShardContents:
    """Every shard's keys, checked against its sidecar; the keys of all shards must be sorted."""
    s = ShardContents()
    for j in range(num_files):
        side = json.loads(sidecar_path(out, j).read_text())
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(out / shard_name(j)), "r"))
            shard_keys = reader.read_all().column("key").to_pylist()
        except (OSError, pa.ArrowInvalid) as e:
            raise BuildError(f"{shard_name(j)} is unreadable ({e}): delete it and re-run the "
                             "build") from e
        if len(shard_keys) != side["rows"]:
            raise BuildError(f"{shard_name(j)} has {len(shard_keys)} rows, its sidecar says "
                             f"{side['rows']}: delete both and re-run the build")
        s.add(j, side, shard_keys)
        s.failed.update((f["key"], f["reason"]) for f in side["failures"])
    if s.keys != sorted(s.keys):
        raise BuildError(f"{out}: shard keys are not in sorted order; the shards come from "
                         "different builds. Delete the cache and rebuild.")
    return s


def collect_failures(refs: list[dict], failed: dict[str, str]) -> tuple[list[dict], dict]:
    """failures.jsonl's entries and the manifest's failure counts.

    First each image that failed to encode (by key, with every path and record that uses it),
    then each file that could not be read at all (by path, from the plan).
    """
    key_failures: dict[str, dict] = {k: {"key": k, "reason": r, "paths": [], "records": set()}
                                     for k, r in failed.items()}
    path_failures = []
    for r in refs:
        if r["key"] is None:
            path_failures.append({"path": r["ref"], "reason": r["error"],
                                  "records": sorted(set(r["records"]))})
        elif r["key"] in key_failures:
            key_failures[r["key"]]["paths"].append(r["ref"])
            key_failures[r["key"]]["records"].update(r["records"])
    failures = [dict(f, records=sorted(f["records"])) for _, f in sorted(key_failures.items())]
    failures += path_failures
    bad_records = set()
    for f in failures:
        bad_records.update(f["records"])
    return failures, {"failed_images": len(key_failures), "unreadable_files": len(path_failures),
                      "records_with_failed_images": len(bad_records)}


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
        "shard": pa.array(shards.shard, pa.int32()), "row": pa.array(shards.row, pa.int32())})))
    indexed = [r for r in refs if r["key"] is not None]
    publish(INDEX_FILE, table_bytes(pa.table({
        "ref": pa.array([r["ref"] for r in indexed], pa.string()),
        "key": pa.array([r["key"] for r in indexed], pa.string())})))
    publish(FAILURES_FILE, "".join(json.dumps(f, sort_keys=True) + "\n"
                                   for f in failures).encode())
    fp = info["fingerprint"]
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
            "unique_images": info["num_keys"],
            "encoded": len(shards.keys),
            **failure_counts,
            "shard_bytes": sum(s["bytes"] for s in shards.entries),
        },
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
        fingerprint = tower.fingerprint(pool=cfg.pool)
        if cfg.shard_index is None and index > 0:
            plan = load_plan(out, cfg.wait_timeout)     # rank 0 hashes every file, once for all
            if {**FINGERPRINT_DEFAULTS, **plan.info["fingerprint"]} != fingerprint:
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
            print(f"[vlm-cache] {plan.info['num_unique_references']} image references, "
                  f"{plan.info['num_keys']} unique images in {plan.num_shard_files} shards; "
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
    lines = [f"[vlm-cache] this process: {s['images']} images in {s['encode_seconds']}s "
             f"({s['images_per_second']} img/s, {s['input_wait_seconds']}s of it waiting for "
             f"decoded input, {s['output_wait_seconds']}s for the writer): "
             f"{s['encoded']} encoded, {s['failed']} failed, "
             f"{s['bytes'] / 1e9:.3f} GB written"]
    if "manifest" in s:
        c = s["manifest"]
        lines.append(f"[vlm-cache] cache: {c['records']} records, {c['references']} image references, "
                     f"{c['unique_images']} unique images, {c['encoded']} encoded, "
                     f"{c['failed_images'] + c['unreadable_files']} failed "
                     f"({c['records_with_failed_images']} records affected, see {FAILURES_FILE}), "
                     f"{c['shard_bytes'] / 1e9:.3f} GB, {s['seconds']}s total")
    return "\n".join(lines)

