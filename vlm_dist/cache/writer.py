"""Crash-safe file writing for the feature cache builder, and its build lock.

Every file the builder publishes is written under a temporary name, fsynced,
renamed into place and its directory fsynced (vlm_dist.fileio): after a crash a file is either
complete or absent. `ShardWriter` streams record batches into one Arrow IPC
shard and hashes the bytes as they are written (on a hashing thread when given
one), so finishing a shard never re-reads it. A full disk is a `BuildError`
naming the file and the free space.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlm_dist import fileio
from vlm_dist.cache.reader import shard_schema
from vlm_dist.errors import UserError


class BuildError(UserError, RuntimeError):
    """The build cannot complete (bad arguments, inputs changed, shards missing, disk full)."""


BUILD_DIR = "build"     # the builder's own state: plan, per-shard sidecars, summaries


def sidecar_path(out: Path, j: int) -> Path:
    """build/shard-j.json: rows, bytes, SHA-256 and failed keys of shard j, written before it."""
    return out / BUILD_DIR / f"shard-{j:06d}.json"


@contextmanager
def disk_full_is_an_error(path: Path):
    """Turn ENOSPC / EDQUOT while writing `path` into a BuildError naming it and the free space."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            free = f"{shutil.disk_usage(path.parent).free} bytes free"
        except OSError:
            free = "free space unknown"
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        raise BuildError(f"{path}: {what} ({free} on {path.parent}); free some space and re-run "
                         "the same command (finished shards are kept)") from e


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """fileio.write_bytes_atomic; a full disk is a BuildError naming `path`."""
    with disk_full_is_an_error(path):
        fileio.write_bytes_atomic(path, data)


def write_json_atomic(path: Path, obj) -> None:
    """fileio.write_json_atomic; a full disk is a BuildError naming `path`."""
    with disk_full_is_an_error(path):
        fileio.write_json_atomic(path, obj)


def write_table_atomic(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


# Bytes a shard's hashing may lag behind its writes before the writer waits for it (the queued
# buffers are the feature batches themselves, pinned memory on CUDA).
MAX_HASH_LAG = 512 << 20


class _HashingFile:
    """A write-only file object that hashes and counts what passes through it.

    With `hasher` (a one-thread executor of this file's own: updates must run in order) the
    SHA-256 runs beside the writes, and beside the next shard's: hashlib releases the GIL, and
    the queued job keeps Arrow's immutable buffer alive.
    """

    def __init__(self, f, hasher: ThreadPoolExecutor | None = None):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.hasher = hasher
        self.pending: deque = deque()          # (future, bytes) of queued updates, oldest first
        self.lag = 0

    def write(self, data) -> int:
        n = len(data)
        if self.hasher is None:
            self.sha.update(data)
        else:
            self.pending.append((self.hasher.submit(self.sha.update, data), n))
            self.lag += n
            while self.lag > MAX_HASH_LAG:
                self._wait_oldest()
        self.size += n
        return self.f.write(data)

    def _wait_oldest(self):
        future, n = self.pending.popleft()
        future.result()
        self.lag -= n

    def hexdigest(self) -> str:
        while self.pending:
            self._wait_oldest()
        if self.hasher is not None:
            self.hasher.shutdown()
        return self.sha.hexdigest()

    def cancel(self) -> None:
        if self.hasher is not None:
            self.hasher.shutdown(wait=False, cancel_futures=True)

    def flush(self):
        self.f.flush()

    def tell(self) -> int:
        return self.size

    def close(self):
        pass            # the ShardWriter closes the real file after fsync

    @property
    def closed(self) -> bool:
        return self.f.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class ShardWriter:
    """Stream (keys, features) batches into one shard; `close()`, `finish()`, then `publish()` it.

    `close()` ends the Arrow stream; `finish()` (which closes first if needed) waits for the hash
    and fsyncs, so a caller may hand a closed writer to another thread to finish while it
    starts the next shard. `hash_in_background`: the SHA-256 on a thread of the shard's own
    (else inline, in `write`).
    """

    def __init__(self, path: Path, dtype: str, feature_shape: tuple[int, int],
                 hash_in_background: bool = False):
        self.path, self.tmp = path, fileio.tmp_name(path)
        self.schema = shard_schema(dtype, feature_shape)
        self.width = feature_shape[0] * feature_shape[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.hashing = _HashingFile(self.file, ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
                                    if hash_in_background else None)
        self.closed = False
        try:
            self.writer = pa.ipc.new_file(self.hashing, self.schema)   # writes the header
        except BaseException:
            self.abort()
            raise
        self.rows = 0

    def write(self, keys: list[str], features: np.ndarray, views: list[int] | None = None,
              layouts: list[str | None] | None = None) -> None:
        """One row per view: `keys[r]`, `features[r]` ((R, P*D) in the storage dtype, uint16 bits
        for bf16), view number `views[r]` (default 0: one view per key) and `layouts[r]` (the
        key's layout JSON on its view 0, None elsewhere; default None)."""
        flat = pa.array(np.ascontiguousarray(features).reshape(-1))
        n = len(keys)
        batch = pa.record_batch([pa.array(keys, pa.string()),
                                 pa.FixedSizeListArray.from_arrays(flat, self.width),
                                 pa.array([0] * n if views is None else views, pa.int16()),
                                 pa.array([None] * n if layouts is None else layouts, pa.string())],
                                schema=self.schema)
        self.writer.write_batch(batch)
        self.rows += len(keys)

    def close(self) -> None:
        """Write the Arrow footer and hand the bytes to the OS: no more batches."""
        if not self.closed:
            self.writer.close()
            self.file.flush()
            self.closed = True

    def finish(self) -> dict:
        """Close and fsync the temporary file; return {"rows", "bytes", "sha256", "mtime_ns"}."""
        self.close()
        sha256 = self.hashing.hexdigest()
        os.fsync(self.file.fileno())
        self.file.close()
        # rename keeps the mtime: finalize stamps the shard as it was written, not as it is then
        return {"rows": self.rows, "bytes": self.hashing.size, "sha256": sha256,
                "mtime_ns": os.stat(self.tmp).st_mtime_ns}

    def publish(self) -> None:
        """Rename the finished file into place: from here on the shard exists."""
        fileio.publish(self.tmp, self.path)

    def abort(self) -> None:
        self.hashing.cancel()
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


# -- the build lock ---------------------------------------------------------------------------
@contextmanager
def build_lock(out: Path, index: int, count: int):
    """Hold slice `index` of `count` of the build in `out`, or raise BuildError naming the holder.

    Slices of one build (torchrun ranks, --shard-index jobs) own disjoint shards and run side
    by side. Two builds of the same slice, or builds cut into different numbers of slices
    (whose shards overlap), would delete each other's temporary files: refused while one
    runs. flock is released by the kernel when its holder dies, so a killed build leaves
    no stale lock; the file's text (pid, host, start) is only for the message.
    """
    folder = out / BUILD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lock-{index:05d}-of-{count:05d}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try_flock(fd, fcntl.LOCK_EX, path):
            raise BuildError(f"{out}: slice {index}/{count} is being built by another process "
                             f"({_holder(path)}); wait for it to finish or stop it")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        for other in sorted(folder.glob("lock-*-of-*")):
            if other.name.endswith(f"-of-{count:05d}"):
                continue                                 # a sibling slice: disjoint shards
            probe = os.open(other, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if not _try_flock(probe, fcntl.LOCK_SH, other):
                    raise BuildError(f"{out}: another build with a different number of slices "
                                     f"({other.name}) is running ({_holder(other)}); its shards "
                                     "overlap this one's, wait for it to finish or stop it")
            finally:
                os.close(probe)                          # closing releases the probe's lock
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int, kind: int, path: Path) -> bool:
    """Lock without waiting: False when another process holds it. A file system without
    flock (some NFS/Lustre mounts) only warns: the build still works, unguarded."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        print(f"[vlm-cache] warning: cannot lock {path} ({e.strerror}); concurrent builds of the "
              "same cache are not detected on this file system", flush=True)
    return True


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "holder not recorded yet"
