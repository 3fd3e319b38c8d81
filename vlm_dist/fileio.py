"""Publishing files so that a reader never sees half of one, and hashing them: the one copy.

A file is written under a temporary name beside its target (same directory, so the same
filesystem), flushed and fsynced, renamed over the target (atomic on POSIX), and the
directory is fsynced so the rename itself survives a crash. A failed write removes its
temporary file; the target keeps its old content.

    with atomic_file(path) as f:        # any writer: torch.save(obj, f), Arrow, json.dump ...
        f.write(data)
    write_text_atomic(path, text)       # the common cases
    write_json_atomic(path, obj)
    sha256_file(path)                   # hex digest, streamed
    sha256_stream(f, limit=max_bytes)   # (digest or None past the limit, bytes read) of an open file
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def tmp_name(path: str | os.PathLike) -> Path:
    """A temporary name beside `path`, unique per host and process (several writers may share a directory)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (a rename, a removal) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file over `path`, durably."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it is fsynced and renamed over `path`.

    Text modes write UTF-8 whatever the locale (records hold any language)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk=chunk)[0]


def sha256_stream(f: IO[bytes], limit: int | None = None, chunk: int = 8 << 20) -> tuple[str | None, int]:
    """(hex SHA-256, bytes read) of the rest of an open binary file, read in chunks.

    With `limit`, reading stops once more than `limit` bytes have come: (None, bytes read so far),
    for a file that grew past a size checked when it was opened.
    """
    h = hashlib.sha256()
    size = 0
    while block := f.read(chunk):
        size += len(block)
        if limit is not None and size > limit:
            return None, size
        h.update(block)
    return h.hexdigest(), size
