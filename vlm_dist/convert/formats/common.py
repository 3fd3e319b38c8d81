"""Shared converter machinery: raw rows -> contract records, with counted, listed drops.

Each format module (llava.py, llava_video.py, mantis.py, jsonl.py) only knows how to read
its native rows and pull out an id, image and video references and (role, text) turns as a
`RawRecord`. Everything else is here, so all formats obey the same rules:

- roles human/user -> user, gpt/assistant -> assistant, system -> system;
- leading assistant turns (conversations that open with the model) are removed
  and counted as a repair, as LLaVA's own loader does;
- a record with images but no `<image>` gets one `<image>\\n` per image at the
  start of its first user turn (counted as a repair); any other count mismatch
  is dropped; videos likewise with `<video>` (the k-th `<video>` is videos[k]);
- image and video references become paths relative to --image-root (one media root
  for both, the feature cache's); a missing or empty file drops the record (reason
  "missing image" / "empty image file", "missing video" / "empty video file");
- embedded image bytes (Mantis parquet) are written once under
  <image-root>/sha256/<aa>/<sha256><ext>, named by their content;
- duplicate ids get a "#2", "#3"... suffix (counted) so ids stay unique.

Run through `vlm-convert` (vlm_dist.convert.cli).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlm_dist.errors import UserError
from vlm_dist.contract.images import ImageError, resolve_under
from vlm_dist.contract.records import (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, RecordError, read_lines, read_text,
                                       validate_record)
from vlm_dist.fileio import write_bytes_atomic

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "system": "system"}


class Drop(Exception):
    """Skip this input record. `reason` is a short fixed phrase (counted); `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class ConvertError(UserError, ValueError):
    """A problem with the whole conversion (bad flag, unreadable file), not one record."""


@dataclass(frozen=True)
class EmbeddedImage:
    """Image bytes carried inside the input (Mantis parquet); `name` only hints the extension."""
    data: bytes
    name: str = ""


@dataclass
class RawRecord:
    """What a format module extracts from one native row, before any rule is applied."""
    id: Any
    images: list            # str paths (relative to --images-from, or absolute) or EmbeddedImage
    turns: list[tuple[Any, Any]]  # (raw role, raw text)
    videos: list = field(default_factory=list)   # str paths, resolved like images
    source: str | None = None     # the subset a row says it comes from (LLaVA-Video's data_source)


@dataclass
class ConvertOptions:
    image_root: Path            # output image paths are relative to this folder
    images_from: Path | None = None  # where relative input image paths start (None: format default)
    id_prefix: str = ""
    role_map: dict[str, str] = field(default_factory=dict)   # extra raw role -> contract role
    require_image: bool = False  # llava-pretrain: a caption record without an image is dropped


@dataclass
class ConvertStats:
    """Counts of one conversion; `dropped` and `repaired` are keyed by reason."""
    format: str
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    images_written: int = 0
    images_reused: int = 0
    kept_by_source: Counter = field(default_factory=Counter)   # formats whose rows name their subset

    def to_dict(self) -> dict:
        out = {"format": self.format, "read": self.read, "kept": self.kept,
               "dropped": sum(self.dropped.values()),
               "dropped_by_reason": dict(sorted(self.dropped.items())),
               "repaired": dict(sorted(self.repaired.items())),
               "images_written": self.images_written, "images_reused": self.images_reused}
        if self.kept_by_source:
            out["kept_by_source"] = dict(sorted(self.kept_by_source.items()))
        return out

    def line(self) -> str:
        drops = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) or "none"
        text = f"{self.format}: read {self.read}, kept {self.kept}, dropped {sum(self.dropped.values())} ({drops})"
        if self.repaired:
            text += "; repaired: " + ", ".join(f"{r} {n}" for r, n in sorted(self.repaired.items()))
        if self.images_written or self.images_reused:
            text += f"; embedded images written {self.images_written}, already present {self.images_reused}"
        if self.kept_by_source:
            text += "; kept by source: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kept_by_source.items()))
        return text


def turn_fields(turn, role_keys=("from", "role"), text_keys=("value", "content", "text")):
    """(raw role, raw text) of one native turn dict; Drop if it is not a dict."""
    if not isinstance(turn, dict):
        raise Drop("malformed turn", f"turn is a {type(turn).__name__}, not an object")
    role = next((turn[k] for k in role_keys if k in turn), None)
    text = next((turn[k] for k in text_keys if k in turn), None)
    return role, text


def image_list(value) -> list:
    """Normalise an image field: None/"" -> [], "a.jpg" -> ["a.jpg"], {"path", "bytes"} -> ref."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data:
                out.append(EmbeddedImage(bytes(data), path or ""))
            elif path:
                out.append(path)
            else:
                raise Drop("malformed image reference", f"image entry {item!r} has neither bytes nor path")
        elif isinstance(item, str) and item:
            out.append(item)
        else:
            raise Drop("malformed image reference", f"image entry {item!r} is not a path")
    return out


class ImageResolver:
    """Turns input image (or video: `kind`) references into paths relative to the image root,
    checking each once.

    Paths are kept as given (a symlink inside the image tree stays a link name),
    but each is checked on its real path: a link that leads out of the image
    root is dropped, listed, never read (vlm_dist.contract.images.resolve_under, the
    rule the feature cache applies too).
    """

    def __init__(self, image_root: Path, images_from: Path, stats: ConvertStats, kind: str = "image"):
        self.root = Path(os.path.realpath(image_root))
        self.src = os.path.realpath(images_from)
        self._prefix = os.path.join(str(self.root), "")
        self.stats = stats
        self.kind = kind
        self._seen: dict[str, str | Drop] = {}

    def __call__(self, ref) -> str:
        if isinstance(ref, EmbeddedImage):
            return self._store(ref)
        cached = self._seen.get(ref)
        if cached is None:
            cached = self._seen[ref] = self._check(ref)
        if isinstance(cached, Drop):
            raise cached
        return cached

    def _check(self, ref: str) -> str | Drop:
        path = os.path.normpath(os.path.join(self.src, ref))
        kind = self.kind
        if not path.startswith(self._prefix):
            raise ConvertError(f"{kind} {ref!r} resolves to {path}, outside --image-root {self.root}; "
                               f"pass an --image-root that contains the {kind}s")
        try:
            st = os.stat(resolve_under(self.root, path))
        except ImageError as e:                      # a symlink out of the image tree
            return Drop(f"{kind} outside image root", e.reason)
        except FileNotFoundError:
            return Drop(f"missing {kind}", path)
        if not stat.S_ISREG(st.st_mode):
            return Drop(f"missing {kind}", f"{path} is not a file")
        if st.st_size == 0:
            return Drop(f"empty {kind} file", path)
        return path[len(self._prefix):].replace(os.sep, "/")

    def _store(self, image: EmbeddedImage) -> str:
        digest = hashlib.sha256(image.data).hexdigest()
        ext = Path(image.name).suffix.lower() or _sniff_extension(image.data)
        rel = f"sha256/{digest[:2]}/{digest}{ext}"
        path = self.root / rel
        if path.exists():
            self.stats.images_reused += 1
            return rel
        # durable before it is named: a crash must not leave an empty file that a re-run reuses
        write_bytes_atomic(path, image.data)
        self.stats.images_written += 1
        return rel


def _sniff_extension(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except UnidentifiedImageError:
        return ".bin"   # the feature cache will report it as undecodable, naming the file
    return {"JPEG": ".jpg"}.get(fmt, "." + fmt.lower()) if fmt else ".bin"


def normalize(raw: RawRecord, index: int, opts: ConvertOptions, resolve: ImageResolver,
              stats: ConvertStats, resolve_video: ImageResolver | None = None) -> dict:
    """Apply the shared rules to one RawRecord; return a contract record or raise Drop.

    `resolve_video` resolves `raw.videos` (None: a format without videos; a video is then a Drop)."""
    rid = raw.id
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = f"row{index}"
        stats.repaired["id from row number"] += 1
    rid = f"{opts.id_prefix}{rid}"

    if not isinstance(raw.turns, list) or not raw.turns:
        raise Drop("no conversation", "conversation list is missing or empty")
    roles = {**ROLE_MAP, **opts.role_map}
    turns = []
    for i, (role, text) in enumerate(raw.turns):
        if role not in roles:
            raise Drop("unknown role", f"turn {i} role {role!r}")
        if not isinstance(text, str):
            raise Drop("malformed turn", f"turn {i} text is {type(text).__name__}, not a string")
        if not text.strip():
            raise Drop("empty turn", f"turn {i} ({role}) is empty")
        turns.append({"role": roles[role], "content": text.strip()})

    lead = 0
    while lead < len(turns) and turns[lead]["role"] == "assistant":
        lead += 1
    if lead:
        turns = turns[lead:]
        stats.repaired["leading assistant turn removed"] += 1
    if not any(t["role"] == "assistant" for t in turns):
        raise Drop("no assistant turn")
    if any(t["role"] == "system" for t in turns[1:]):
        raise Drop("system turn not first")
    if any(ph in t["content"] for t in turns if t["role"] == "assistant"
           for ph in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)):
        raise Drop("placeholder in assistant turn")

    if opts.require_image and not raw.images:
        raise Drop("no image", "this format is image-caption data")
    if raw.videos and resolve_video is None:
        raise Drop("video not supported", "this format's converter reads no videos")
    _match_placeholders(turns, raw.images, IMAGE_PLACEHOLDER, "image", stats)
    _match_placeholders(turns, raw.videos, VIDEO_PLACEHOLDER, "video", stats)

    images = [resolve(ref) for ref in raw.images]
    record = {"id": rid, "images": images, "conversations": turns}
    if raw.videos:      # only where there are videos: image-only outputs stay as they were
        record = {"id": rid, "images": images, "videos": [resolve_video(ref) for ref in raw.videos],
                  "conversations": turns}
    try:
        validate_record(record)
    except RecordError as e:
        raise Drop("contract violation", str(e)) from None
    if raw.source is not None:
        stats.kept_by_source[raw.source] += 1
    return record


def _match_placeholders(turns: list[dict], refs: list, placeholder: str, noun: str, stats: ConvertStats) -> None:
    """One `placeholder` per item: none at all -> one per item at the start of the first user
    turn (a counted repair); any other mismatch -> Drop."""
    n_ph = sum(t["content"].count(placeholder) for t in turns)
    if refs and n_ph == 0:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise Drop(f"placeholder/{noun} count mismatch", f"{len(refs)} {noun}(s), no user turn to hold them")
        first_user["content"] = (placeholder + "\n") * len(refs) + first_user["content"]
        stats.repaired["placeholders added"] += 1
    elif n_ph != len(refs):
        raise Drop(f"placeholder/{noun} count mismatch", f"{n_ph} {placeholder} for {len(refs)} {noun}(s)")


def unique_ids(records: Iterator[dict], stats: ConvertStats) -> Iterator[dict]:
    """Give repeated ids a '#k' suffix, deterministically, counting each rename."""
    seen: dict[str, int] = {}
    for rec in records:
        base = rec["id"]
        k = seen.get(base, 0) + 1
        seen[base] = k
        if k > 1:
            new = f"{base}#{k}"
            while new in seen:
                k += 1
                new = f"{base}#{k}"
            seen[base] = k
            seen[new] = 1
            rec["id"] = new
            stats.repaired["duplicate id renamed"] += 1
        yield rec


def json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, row) from a JSON list file or a JSONL file, with 0-based row numbers in source.

    Text is read through vlm_dist.contract.records (UTF-8, BOM accepted): a non-UTF-8 byte is
    an error naming the file and line, since it means the whole file is mis-encoded.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            rows = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, row in enumerate(rows):
            yield f"{path.name}[{i}]", row
        return
    for lineno, line in read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # one broken line is a record we cannot read: listed, not fatal
            yield f"{path.name}:{lineno}", Drop("invalid JSON", e.msg)
            continue
        yield f"{path.name}:{lineno}", row
