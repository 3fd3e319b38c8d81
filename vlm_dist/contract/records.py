"""The sample contract: one JSON record per line.

    {"id": str, "images": [image keys], "videos": [video keys],
     "conversations": [{"role": ..., "content": ...}]}

The k-th `<image>` across the conversation is `images[k]`, the k-th `<video>` is `videos[k]`
(per kind: a record mixing both keeps each kind's own order; `videos` may be absent). `validate_record`
raises `RecordError` naming the record id and the rule broken; `read_records`
validates every line of a JSONL file and names the file and line on error.
Every reader of a records/JSON file goes through `read_lines` / `read_text`:
UTF-8 (a leading BOM is accepted), and a byte that is not UTF-8 is a RecordError
naming the file, line and byte offset.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from vlm_dist.contract.media import MEDIA_KINDS
from vlm_dist.errors import UserError
from vlm_dist.fileio import atomic_file

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
MEDIA_FIELDS = tuple((k.record_field, k.placeholder) for k in MEDIA_KINDS.values())  # (field, placeholder)
ROLES = ("system", "user", "assistant")


class RecordError(UserError, ValueError):
    """A record breaks the sample contract. The message names the record and the rule."""


def count_placeholders(record: dict, placeholder: str = IMAGE_PLACEHOLDER) -> int:
    return sum(turn["content"].count(placeholder) for turn in record["conversations"])


def validate_record(record, where: str = "") -> dict:
    """Check one record against the contract; return it unchanged or raise RecordError."""
    rid = record.get("id") if isinstance(record, dict) else None
    name = f"record {rid!r}" + (f" ({where})" if where else "")

    def fail(rule: str):
        raise RecordError(f"{name}: {rule}")

    if not isinstance(record, dict):
        fail(f"must be a JSON object, got {type(record).__name__}")
    if not isinstance(rid, str) or not rid:
        fail("'id' must be a non-empty string")
    for fld, _ in MEDIA_FIELDS:
        items = record.get(fld, [])
        if not isinstance(items, list) or not all(isinstance(k, str) and k for k in items):
            fail(f"'{fld}' must be a list of non-empty strings ({fld[:-1]} keys)")
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        fail("'conversations' must be a non-empty list of {role, content} turns")
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn \
                or "content" not in turn:
            fail(f"turn {i} must be an object with exactly 'role' and 'content'")
        if turn["role"] not in ROLES:
            fail(f"turn {i} has unknown role {turn['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(turn["content"], str):
            fail(f"turn {i} content must be a string, got {type(turn['content']).__name__}")
        if not turn["content"].strip():
            fail(f"turn {i} ({turn['role']}) has empty content")
        if turn["role"] == "system" and i != 0:
            fail(f"turn {i}: a system turn may only come first")
    if not any(t["role"] == "assistant" for t in convs):
        fail("no assistant turn: nothing would be supervised")
    for fld, placeholder in MEDIA_FIELDS:
        if any(placeholder in t["content"] for t in convs if t["role"] == "assistant"):
            fail(f"an assistant turn contains {placeholder}: {fld} are inputs, not targets")
        n, items = count_placeholders(record, placeholder), record.get(fld, [])
        if n != len(items):
            fail(f"has {n} {placeholder} placeholder(s) but {len(items)} {fld[:-1]}(s)")
    return record


def _decode(path, data: bytes, lineno: int, offset: int) -> str:
    """`data` (starting at byte `offset`, line `lineno` of `path`) as text; RecordError on a non-UTF-8 byte."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")   # a BOM only counts at the file start
    except UnicodeDecodeError as e:
        line = lineno + data.count(b"\n", 0, e.start)
        raise RecordError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset "
                          f"{offset + e.start}); save the file as UTF-8") from None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file; see `_decode` for bad bytes."""
    with _open(path) as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            line = _decode(path, raw, lineno, offset)
            offset += len(raw)
            if line.strip():
                yield lineno, line


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 file as text (a JSON list); a bad byte is named by line and offset."""
    with _open(path) as f:
        return _decode(path, f.read(), 1, 0)


def _open(path: str | os.PathLike):
    try:
        return open(path, "rb")
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e.strerror or e})") from e


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """Yield validated records from a JSONL file; errors name the file and line."""
    for lineno, line in read_lines(path):
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: not valid JSON ({e.msg})") from None
        yield validate_record(record, where)


def write_records(path: str | os.PathLike, records) -> int:
    """Write records as JSONL (validated, deterministic key order); return the count.

    Written through fileio.atomic_file (a temporary file, then a rename): on any error (a bad
    record, a bad input line upstream, Ctrl-C) the partial file is removed and `path` is untouched.
    """
    n = 0
    with atomic_file(path, "w") as f:     # UTF-8
        for r in records:
            validate_record(r)
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n
