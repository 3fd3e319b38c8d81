"""Read the feature cache: image/video key -> (views, patches, dim) tensor, memory-mapped, zero-copy.

    cache = check_cache_for_training("cache/", tower.fingerprint(pool=1))   # refuses a bad cache
    feats = cache[cache.resolve("coco/0001.jpg")]                           # (P, D): view 0
    views = cache.views(key)                                                 # (V, P, D)
    layout = cache.layout(key)       # tiled {"kind": "image", rows, cols, ...} / {"kind": "video", ...}

A key has V views, one shard row each, consecutive: an untiled image 1; a tiled image (built
with --tiling) its thumbnail then its tiles row-major (contract.tiling; a 1x1 grid is 1 view); a
video one per sampled frame, in time order (contract.video). View 0 (thumbnail or first frame)
is what an untiled config reads, and an untiled image's one view equals the thumbnail of the
same image in a tiled cache, bit for bit.

Layout of a cache directory (written by `vlm-cache build`, see preprocess/):

    shards/shard-000000.arrow   Arrow IPC files, uncompressed, one row per view: columns `key`
                                (hex SHA-256 of the file), `features` (fixed-size list of P*D
                                values; bf16 is stored as its raw uint16 bits), `view` (int16,
                                0..V-1) and `layout` (the key's layout as JSON on view 0, null on
                                the others and for an untiled image); a key never crosses shards
    keys.arrow                  key -> (shard, first row, views, layout JSON), sorted by key
                                (binary-searched in place; `read_layouts` reads every layout at once)
    index.arrow                 record image/video reference -> key (and kind), sorted by reference
    failures.jsonl              images and videos that could not be encoded, with the reason and records
    manifest.json               encoder fingerprint, counts, and size/rows/SHA-256 of every file;
                                written last, so its presence means the cache is complete
    verified.json               size and mtime of every file at the last full check (the build,
                                or `vlm-cache verify`), and when it was: training refuses a file
                                changed since. That check trusts metadata: a byte altered with
                                its mtime restored passes it until the next full verify (the
                                Slurm stage templates run one first).

Format "vlm_dist-feature-cache/1" (before views: no `view`/`layout` columns, keys.arrow without
`views`/`layout`) still opens: one view per key, no layouts.

Tensors returned point into the memory-mapped shard: treat them as
read-only (stacking them into a batch copies). The reader re-opens shards
after a fork, so one instance can be handed to DataLoader workers. By default
it keeps every shard mapped: length-grouped batches draw samples uniformly
over the data set, so nearly every shard is touched every step, and a bound
below the shard count re-opens a shard on nearly every lookup. A mapped shard
costs address space and one file descriptor, not memory (the page cache holds
what was read either way); `open_shard_budget` sizes the bound from the
process's descriptor limit.
"""
from __future__ import annotations

import bisect
import json
import os
import resource
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from vlm_dist.dist import print0
from vlm_dist.errors import UserError
from vlm_dist.fileio import sha256_file, write_json_atomic

FORMAT = "vlm_dist-feature-cache/2"
READABLE_FORMATS = ("vlm_dist-feature-cache/1", FORMAT)   # /1: one view per key, no layouts
MANIFEST = "manifest.json"
KEYS_FILE = "keys.arrow"
INDEX_FILE = "index.arrow"
FAILURES_FILE = "failures.jsonl"
SHARD_DIR = "shards"
VERIFIED_FILE = "verified.json"   # sizes and mtimes at the last full check; not in the manifest

# dtype name -> (Arrow storage type, numpy storage dtype, torch dtype)
STORAGE = {
    "bfloat16": (pa.uint16(), np.uint16, torch.bfloat16),
    "float16": (pa.float16(), np.float16, torch.float16),
    "float32": (pa.float32(), np.float32, torch.float32),
}
# Fingerprint fields that name the encoder but do not change its output.
INFORMATIONAL_FIELDS = ("model",)
# Fields added after caches were first built: what a cache without one was made with.
# jpeg_draft_to: the PIL JPEG draft size of the decode (None: every pixel decoded); tiling: the
# TilingSpec's fingerprint (None: one view per image); video_sampling: the FrameSampling's (None:
# built without videos). The last two are also absent from an untiled / video-less fingerprint.
FINGERPRINT_DEFAULTS = {"jpeg_draft_to": None, "tiling": None, "video_sampling": None}


def fingerprint_field(fingerprint: dict, field: str):
    """A fingerprint's value for `field`, its FINGERPRINT_DEFAULTS value when a cache predates it."""
    return fingerprint[field] if field in fingerprint else FINGERPRINT_DEFAULTS.get(field, "<absent>")


def with_fingerprint_defaults(fingerprint: dict) -> dict:
    """`fingerprint` with every FINGERPRINT_DEFAULTS field present: two fingerprints describe the
    same features when these are equal (a field left out means its default)."""
    return {**FINGERPRINT_DEFAULTS, **fingerprint}


def layout_json(layout: dict | None) -> str | None:
    """A layout dict as the shards and keys.arrow store it (canonical JSON), or None."""
    return None if layout is None else json.dumps(layout, sort_keys=True, separators=(",", ":"))


class CacheError(UserError, RuntimeError):
    """The feature cache is missing, incomplete, corrupt or built for another encoder."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.arrow"


def shard_schema(dtype: str, feature_shape: tuple[int, int]) -> pa.Schema:
    storage = STORAGE[dtype][0]
    p, d = feature_shape
    return pa.schema([("key", pa.string()), ("features", pa.list_(storage, p * d)),
                      ("view", pa.int16()), ("layout", pa.string())],
                     metadata={"feature_shape": json.dumps([p, d]), "dtype": dtype})


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        hint = (" (a build is in progress or was interrupted: re-run the same `vlm-cache build`, "
                "or `vlm-cache finalize` once every --shard-index has finished)"
                if (Path(cache_dir) / "build").exists() else "")
        raise CacheError(f"{cache_dir}: no {MANIFEST}, not a finished feature cache{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e.msg}); the cache is corrupt") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, expected one of "
                         f"{', '.join(map(repr, READABLE_FORMATS))}")
    return manifest


def _open_arrow(path: Path) -> pa.ipc.RecordBatchFileReader:
    return pa.ipc.open_file(pa.memory_map(str(path), "r"))


def _read_table(path: Path) -> pa.Table:
    return _open_arrow(path).read_all()


class _Shard:
    """One memory-mapped shard: its record batches and where each starts."""

    def __init__(self, path: Path, storage_dtype, feature_shape):
        reader = _open_arrow(path)
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches]).tolist()
        self.storage_dtype = storage_dtype
        self.shape = feature_shape
        self.path = path

    def rows(self, row: int, count: int, key: str) -> np.ndarray:
        """`count` consecutive rows from `row` (one key's views), flat: count * P * D values.

        The writer never splits a key across record batches (a batch holds whole items), so
        the rows are one slice of one batch's buffer."""
        b = bisect.bisect_right(self.starts, row) - 1
        batch, r = self.batches[b], row - self.starts[b]
        last = r + count - 1
        keys = batch.column(0)
        if last >= batch.num_rows or keys[r].as_py() != key or keys[last].as_py() != key:
            held = keys[min(last, batch.num_rows - 1)].as_py()
            raise CacheError(f"{self.path}: rows {row}..{row + count - 1} do not all hold {key} "
                             f"(found {keys[r].as_py()} .. {held}); keys.arrow does not match the shard")
        col = batch.column(1)
        values = col.values
        n = self.shape[0] * self.shape[1]
        itemsize = np.dtype(self.storage_dtype).itemsize
        offset = (values.offset + (col.offset + r) * n) * itemsize
        return np.frombuffer(values.buffers()[1], dtype=self.storage_dtype, count=n * count,
                             offset=offset)


# Descriptors left to everything else (sockets, pipes, NCCL, the DataLoader's queues) when
# the shard maps are sized from RLIMIT_NOFILE.
FD_HEADROOM = 1024


def open_shard_budget(num_shards: int) -> int:
    """How many shards one process may keep mapped: all of them when the descriptor limit
    allows, raising the soft limit towards the hard one if that is what it takes (each mapped
    shard holds one descriptor); else what the limit leaves after FD_HEADROOM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = num_shards + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < want:
        new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass             # keep the soft limit; the bound below follows it
    if soft == resource.RLIM_INFINITY:
        return max(1, num_shards)
    return max(1, min(num_shards, soft - min(FD_HEADROOM, soft // 2)))


class FeatureCache:
    """Random access to cached features by image or video key, safe in forked DataLoader workers."""

    def __init__(self, cache_dir: str | os.PathLike, max_open_shards: int | None = None):
        """`max_open_shards`: shards kept mapped at once (LRU); None sizes it from the data
        and the descriptor limit (`open_shard_budget`)."""
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        self.fingerprint = self.manifest["fingerprint"]
        self.dtype = self.fingerprint["dtype"]
        self.jpeg_draft_to = fingerprint_field(self.fingerprint, "jpeg_draft_to")   # how its JPEGs decoded
        self.feature_shape = tuple(self.manifest["feature_shape"])
        _, self._np_dtype, self._torch_dtype = STORAGE[self.dtype]
        if max_open_shards is None:
            max_open_shards = open_shard_budget(len(self.manifest["shards"]))
            n = len(self.manifest["shards"])
            print0(f"[feature-cache] {cache_dir}: {n} shards, up to {max_open_shards} kept mapped "
                   "per process" + ("" if max_open_shards >= n else " (the descriptor limit, "
                                   "ulimit -n, allows no more: lookups will re-open shards)"))
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be at least 1, got {max_open_shards}")
        self.max_open_shards = max_open_shards
        self.shard_opens = 0     # how often a shard was mapped: the LRU's misses
        self._reset()

    def _reset(self):
        self._pid = os.getpid()
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._keys = None        # (sorted key bytes, shard, first row, views arrays, layout StringArray)
        self._index = None       # (sorted reference StringArray, key StringArray)
        self._failures = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_open", "_keys", "_index", "_failures"):
            state[k] = None
        state["_open"] = OrderedDict()
        return state

    def _check_pid(self):
        # Memory maps are not shared sanely across fork: a child starts afresh.
        if self._pid != os.getpid():
            self._reset()

    # -- key lookup ------------------------------------------------------------------------------
    def _key_table(self):
        self._check_pid()
        if self._keys is None:
            t = _read_table(self.cache_dir / KEYS_FILE)
            keys = t.column("key").combine_chunks()
            key_bytes = np.frombuffer(keys.buffers()[1], dtype="S64", count=len(keys),
                                      offset=keys.offset * 64)
            has_views = "views" in t.column_names             # format /1: one view per key
            views = (t.column("views").combine_chunks().to_numpy() if has_views
                     else np.ones(len(keys), dtype=np.int32))
            self._keys = (key_bytes, t.column("shard").combine_chunks().to_numpy(),
                          t.column("row").combine_chunks().to_numpy(), views,
                          t.column("layout").combine_chunks() if has_views else None)
        return self._keys

    def _find(self, key: str) -> int | None:
        keys = self._key_table()[0]
        k = key.encode() if isinstance(key, str) else b""
        i = int(np.searchsorted(keys, k))
        if i < len(keys) and keys[i] == k and len(k) == 64:
            return i
        return None

    def _locate(self, key: str) -> tuple[int, int] | None:
        """(shard, first row) of a key's views, or None."""
        i = self._find(key)
        if i is None:
            return None
        _, shards, rows, _, _ = self._key_table()
        return int(shards[i]), int(rows[i])

    def __contains__(self, key: str) -> bool:
        return self._locate(key) is not None

    def __len__(self) -> int:
        return len(self._key_table()[0])

    def keys(self) -> list[str]:
        return [k.decode() for k in self._key_table()[0]]

    def _shard(self, index: int) -> _Shard:
        self._check_pid()
        shard = self._open.get(index)
        if shard is None:
            path = self.cache_dir / self.manifest["shards"][index]["file"]
            try:
                shard = _Shard(path, self._np_dtype, self.feature_shape)
            except (OSError, pa.ArrowInvalid) as e:
                raise CacheError(f"cannot open shard {path}: {e}; run `vlm-cache verify "
                                 f"{self.cache_dir}`") from e
            self._open[index] = shard
            self.shard_opens += 1
            while len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)    # outstanding tensors keep their mapping alive
        else:
            self._open.move_to_end(index)
        return shard

    def _entry(self, key: str) -> int:
        i = self._find(key)
        if i is None:
            failed = self.failure_for(key)
            why = (f"it failed to encode ({failed['reason']}); see {FAILURES_FILE}" if failed
                   else "it is not in the cache (was it in the build's records?)")
            raise KeyError(f"image key {key!r}: {why}")
        return i

    def _rows(self, key: str, count: int | None) -> torch.Tensor:
        """(count or all views, P, D) of a key from its first view: zero-copy."""
        i = self._entry(key)
        _, shards, rows, views, _ = self._key_table()
        values = self._shard(int(shards[i])).rows(int(rows[i]), int(views[i]) if count is None else count,
                                                  key)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.from_numpy(values)
        return t.view(self._torch_dtype).view(-1, *self.feature_shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        """Features (P, D) of a key's view 0 (the image, a tiled image's thumbnail, a video's first
        frame: what an untiled config reads), a zero-copy view of the memory-mapped shard."""
        return self._rows(key, 1)[0]

    def views(self, key: str) -> torch.Tensor:
        """Features (V, P, D) of every view of a key, in layout order (thumbnail then tiles
        row-major, or frames in time order): one zero-copy slice, its views are consecutive rows."""
        return self._rows(key, None)

    def num_views(self, key: str) -> int:
        return int(self._key_table()[3][self._entry(key)])

    def layout(self, key: str) -> dict | None:
        """A key's layout: {"kind": "image", **Tiling.to_dict()} for every image of a cache built
        with --tiling (a 1x1 grid included), None for an image of one built without (or a format
        /1 cache); a video's VideoLayout.to_dict() (with "kind": "video")."""
        layouts = self._key_table()[4]
        if layouts is None:
            self._entry(key)
            return None
        text = layouts[self._entry(key)].as_py()
        return None if text is None else json.loads(text)

    @property
    def tiling(self):
        """The TilingSpec the cache's images were tiled with, or None (one view per image)."""
        from vlm_dist.contract.tiling import TilingSpec
        spec = fingerprint_field(self.fingerprint, "tiling")
        return None if spec is None else TilingSpec.from_dict(spec)

    @property
    def video_sampling(self):
        """The FrameSampling the cache's videos were sampled with, or None (built without videos)."""
        return sampling_from_fingerprint(fingerprint_field(self.fingerprint, "video_sampling"))

    # -- references and failures -----------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The key of a record's image reference (a path relative to the build's --image-root)."""
        self._check_pid()
        if self._index is None:
            t = _read_table(self.cache_dir / INDEX_FILE)
            self._index = (t.column("ref").combine_chunks(), t.column("key").combine_chunks())
        refs, keys = self._index
        lo, hi = 0, len(refs)
        while lo < hi:
            mid = (lo + hi) // 2
            if refs[mid].as_py() < ref:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(refs) and refs[lo].as_py() == ref:
            return keys[lo].as_py()
        failed = next((f for f in self.failures if ref in (f["paths"] if "key" in f else [f["path"]])), None)
        why = (f"the file could not be read ({failed['reason']})" if failed
               else "it was not in the records the cache was built from")
        raise KeyError(f"image reference {ref!r} is not in the cache index: {why}")

    def features_for(self, ref: str) -> torch.Tensor:
        return self[self.resolve(ref)]

    @property
    def failures(self) -> list[dict]:
        if self._failures is None:
            path = self.cache_dir / FAILURES_FILE
            self._failures = [json.loads(line) for line in path.read_text().splitlines() if line]
        return self._failures

    def failure_for(self, key: str) -> dict | None:
        return next((f for f in self.failures if f.get("key") == key), None)


def sampling_from_fingerprint(d: dict | None):
    """The FrameSampling a fingerprint's "video_sampling" describes (None stays None)."""
    from vlm_dist.contract.video import FrameSampling, VideoError
    if d is None:
        return None
    if d.get("rule", "segment-centres") != "segment-centres":
        raise VideoError("video_sampling", f"rule {d['rule']!r} is not supported by this code")
    return FrameSampling(**{k: v for k, v in d.items() if k != "rule"})


def read_layouts(cache_dir: str | os.PathLike) -> dict[str, dict]:
    """{key: layout dict} for every key with a layout (tiled images, videos), in one read of
    keys.arrow; {} for a cache without layouts (untiled images only, or format /1)."""
    read_manifest(cache_dir)                      # a finished cache, of a format this code reads
    t = _read_table(Path(cache_dir) / KEYS_FILE)
    if "layout" not in t.column_names:
        return {}
    return {k.decode(): json.loads(text) for k, text in
            zip(t.column("key").to_pylist(), t.column("layout").to_pylist()) if text is not None}


# -- verification ------------------------------------------------------------------------------
def verify_cache(cache_dir: str | os.PathLike, quick: bool = False, threads: int = 8) -> list[str]:
    """Check every file against the manifest; return one line per problem (empty: all good).

    Presence, size, Arrow footer and row count always; SHA-256 unless `quick`
    (hashed by `threads` threads: hashlib releases the GIL).
    """
    cache_dir = Path(cache_dir)
    try:
        manifest = read_manifest(cache_dir)
    except CacheError as e:
        return [str(e)]

    def check(rel: str, entry: dict, rows: int | None) -> str | None:
        path = cache_dir / rel
        if not path.exists():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{rel}: {size} bytes, manifest says {entry['bytes']} (truncated or altered)"
        if rows is not None:
            try:
                reader = _open_arrow(path)
                found = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            except (OSError, pa.ArrowInvalid) as e:
                return f"{rel}: unreadable Arrow file ({e})"
            if found != rows:
                return f"{rel}: {found} rows, manifest says {rows}"
        if not quick and sha256_file(path) != entry["sha256"]:
            return f"{rel}: SHA-256 differs from the manifest (altered)"
        return None

    jobs = [(rel, entry, None) for rel, entry in sorted(manifest["files"].items())]
    jobs += [(entry["file"], entry, entry["rows"]) for entry in manifest["shards"]]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda job: check(*job), jobs))
    return [r for r in results if r is not None]


def _stat_entries(cache_dir: Path, manifest: dict) -> dict[str, list[int]]:
    out = {}
    for rel in [e["file"] for e in manifest["shards"]] + sorted(manifest["files"]):
        st = (cache_dir / rel).stat()
        out[rel] = [st.st_size, st.st_mtime_ns]
    return out


def write_verified_stamp(cache_dir: str | os.PathLike,
                         known: dict[str, list[int]] | None = None) -> None:
    """Record each file's size and mtime now that it is known good (after a build or full verify).

    Training compares against this instead of re-hashing a terabyte: a file
    written to since (truncated, a byte flipped, replaced) no longer matches.
    `known` gives [size, mtime_ns] recorded when a file was written (the
    builder's shards), so a shard altered before finalize is not blessed.
    """
    cache_dir = Path(cache_dir)
    files = _stat_entries(cache_dir, read_manifest(cache_dir))
    files.update(known or {})
    stamp = {"manifest_sha256": sha256_file(cache_dir / MANIFEST), "files": files,
             "verified_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json_atomic(cache_dir / VERIFIED_FILE, stamp)


def last_verified(cache_dir: str | os.PathLike) -> str | None:
    """When the last full check (build or `vlm-cache verify`) ran, or None if none is recorded."""
    path = Path(cache_dir) / VERIFIED_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("verified_at", "at an unrecorded time")


def changed_since_verified(cache_dir: str | os.PathLike) -> list[str]:
    """Files modified since the last full verification (or every problem if there is no stamp)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / VERIFIED_FILE
    if not path.exists():
        return [f"{VERIFIED_FILE}: missing, the cache has not been verified since it was built or copied"]
    stamp = json.loads(path.read_text())
    if stamp["manifest_sha256"] != sha256_file(cache_dir / MANIFEST):
        return [f"{MANIFEST}: changed since the cache was last verified"]
    manifest = read_manifest(cache_dir)
    problems = []
    for rel, (size, mtime) in stamp["files"].items():
        p = cache_dir / rel
        if not p.exists():
            problems.append(f"{rel}: missing")
            continue
        st = p.stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            problems.append(f"{rel}: modified since the cache was last verified")
    expected = {e["file"] for e in manifest["shards"]} | set(manifest["files"])
    problems += [f"{rel}: not covered by {VERIFIED_FILE}" for rel in sorted(expected - set(stamp["files"]))]
    return problems


def fingerprint_differences(cached: dict, expected: dict) -> list[str]:
    """Fields of `expected` whose cached value differs, as 'field: cache X, configured Y' lines.

    Fields absent from `expected` (e.g. dtype or pool when any will do) and
    informational ones (the model's path or id) are not compared. A field the cache predates
    compares as its FINGERPRINT_DEFAULTS value (no jpeg_draft_to: full decode).
    """
    diffs = []
    for field in sorted(expected):
        if field in INFORMATIONAL_FIELDS:
            continue
        a, b = fingerprint_field(cached, field), expected[field]
        if a != b:
            diffs.append(f"{field}: cache {json.dumps(a, sort_keys=True)}, "
                         f"configured {json.dumps(b, sort_keys=True)}")
    return diffs


def check_cache_for_training(cache_dir: str | os.PathLike, expected_fingerprint: dict,
                             max_open_shards: int | None = None, full: bool = False) -> FeatureCache:
    """Open a cache for training, or raise CacheError saying what is wrong and what to do.

    Refuses a cache built with another encoder (weights, layer, dtype, pooling,
    preprocessing), one that fails the quick verify (missing, truncated or
    unreadable shards), and one with a file modified since its last full check
    (`verified.json`: size and mtime, so a flipped byte is caught without
    hashing the cache). `full=True` re-hashes every shard instead.

    A tiled config ("tiling" in the expected fingerprint) needs a cache built with that tiling,
    a video config ("video_sampling") one built with videos sampled so; an untiled config (no
    "tiling") takes a tiled cache and reads view 0 (the thumbnail) of its images.
    """
    manifest = read_manifest(cache_dir)
    cached = manifest["fingerprint"]
    if expected_fingerprint.get("tiling") is not None and fingerprint_field(cached, "tiling") is None:
        raise CacheError(
            f"feature cache {cache_dir} was built without tiles (one view per image), but the "
            "configured model tiles images; rebuild it with `vlm-cache build --tiling '<the "
            "model.tiling fields as JSON>' ...` or set model.tiling: null")
    if (expected_fingerprint.get("video_sampling") is not None
            and fingerprint_field(cached, "video_sampling") is None):
        raise CacheError(
            f"feature cache {cache_dir} was built without videos (its records referenced none), but "
            "the configured model reads videos; rebuild it from records with `videos` (`vlm-cache "
            "build --records ... --frames N --max-fps F` as model.video says) or set model.video: null")
    diffs = fingerprint_differences(cached, expected_fingerprint)
    if diffs:
        raise CacheError(
            f"feature cache {cache_dir} was built with a different vision encoder than the one "
            f"configured (cache: {manifest['fingerprint'].get('model')!r}, configured: "
            f"{expected_fingerprint.get('model')!r}). Differences:\n  " + "\n  ".join(diffs) +
            "\nRebuild the cache with the configured encoder (`vlm-cache build --vision-model ... "
            "--feature-layer ... --dtype ... --pool ... [--tiling JSON] [--frames N --max-fps F]`) "
            "or configure the encoder the cache was built with.")
    problems = verify_cache(cache_dir, quick=not full)
    if problems:
        raise CacheError(
            f"feature cache {cache_dir} fails verification:\n  " + "\n  ".join(problems) +
            f"\nDelete the broken shards and re-run the `vlm-cache build` command that made the "
            f"cache (finished shards are kept, missing ones are rebuilt), then `vlm-cache verify "
            f"{cache_dir}`.")
    if not full and (changed := changed_since_verified(cache_dir)):
        raise CacheError(
            f"feature cache {cache_dir} changed since it was last verified:\n  " +
            "\n  ".join(changed) + f"\nRun `vlm-cache verify {cache_dir}` (a full SHA-256 check; it "
            "records the cache as good when it passes, e.g. after copying the cache), and rebuild "
            "the shards it names.")
    return FeatureCache(cache_dir, max_open_shards=max_open_shards)
