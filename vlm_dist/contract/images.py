"""Decode any common image file into an upright 8-bit RGB PIL image, or say why not.

    from vlm_dist.contract.images import load_image, ImageError
    img = load_image("photo.jpg")          # or load_image(raw_bytes)
    data = read_image_file("photo.jpg")    # bytes, checked early (readable, an image header)

Every mode comes out as RGB: alpha (RGBA, LA, P with transparency) is
composited on white, CMYK and palette images are converted, 16-bit and 32-bit
integer greyscale is scaled down to 8 bits, and the EXIF orientation tag is
applied. Files that cannot be decoded (zero-byte, truncated, not an image,
more pixels than `max_pixels`) raise `ImageError(path, reason)`; the feature
cache lists them in failures.jsonl instead of stopping.

`resolve_under` / `open_under` / `read_under` are the one way a user-named
path is read under a root the user named (the cache builder, the converters):
symlinks resolved, contained in the root, regular files only, size capped.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vlm_dist.errors import UserError

# PIL's own default limit (about 89.5M pixels, 1/4 GiB of 24-bit pixels).
DEFAULT_MAX_PIXELS = 89_478_485
# Bytes read from one image file at most: far above any real photo, far below a stray disk image.
DEFAULT_MAX_BYTES = 64 << 20

# What PIL raises on malformed input: it has no common base class for decode
# errors, so the ones seen in practice are named here.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  TypeError, KeyError, ZeroDivisionError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


class ImageError(UserError, ValueError):
    """An image file that cannot be used. `path` names it, `reason` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def resolve_under(root: str | os.PathLike, ref: str | os.PathLike) -> Path:
    """The real path of `ref` (relative to `root`), or ImageError if it leaves `root`.

    Symlinks are resolved first, so `..`, an absolute `ref` and a link out of
    the tree are all caught; a link inside the tree to a file inside it is fine.
    """
    real_root = Path(root).resolve()
    path = (real_root / ref).resolve()          # an absolute ref replaces the root: caught below
    if not path.is_relative_to(real_root):
        raise ImageError(os.fspath(ref), f"outside the image root {real_root} (resolves to {path})")
    return path


def open_under(root: str | os.PathLike, ref: str | os.PathLike,
               max_bytes: int = DEFAULT_MAX_BYTES) -> BinaryIO:
    """Open `ref` under `root` for reading: contained, a regular file, at most `max_bytes` bytes.

    The checks are made on the opened descriptor (fstat), not on the name, so
    a file swapped after the check is not read. O_NONBLOCK keeps a FIFO from
    blocking the open; O_NOFOLLOW refuses a last component turned into a link.
    """
    path = resolve_under(root, ref)
    name = os.fspath(ref)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(name, f"unreadable file ({e.strerror or e})") from e
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise ImageError(name, "not a regular file")
    if st.st_size > max_bytes:
        f.close()
        raise ImageError(name, too_large(st.st_size, max_bytes))
    return f


def read_under(root: str | os.PathLike, ref: str | os.PathLike,
               max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of `ref` under `root` (see `open_under`); at most max_bytes + 1 are ever read."""
    with open_under(root, ref, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)        # + 1: a file that grew after fstat is caught
        except OSError as e:
            raise ImageError(os.fspath(ref), f"unreadable file ({e.strerror or e})") from e
    if len(data) > max_bytes:
        raise ImageError(os.fspath(ref), too_large(len(data), max_bytes))
    return data


def too_large(size: int, max_bytes: int) -> str:
    return f"too large: {size} bytes, over the limit of {max_bytes} (--max-bytes)"


def load_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None, draft_to: int | None = None) -> Image.Image:
    """Decode a file path or raw bytes into an upright RGB image.

    `name` is what errors call the image (defaults to the path, or "<bytes>").
    `draft_to`: a JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or 1/8
    scale by the JPEG decoder itself (PIL's `draft`), never below `draft_to` on either side:
    far cheaper than decoding every pixel of a large photo only to shrink it. The pixels
    differ slightly from a full decode; pass twice the encoder's input side, so the
    processor's resize still shrinks at least 2x. At 384 px (draft_to=768) a 3000x2250 photo
    then resizes to within 3 levels of 255 everywhere, 0.2 on average
    (tests/test_images.py pins the bound). Whatever reads images for one encoder must use
    the same `draft_to`, or cached and online features differ for large JPEGs: the cache
    records it (fingerprint `jpeg_draft_to`), exports carry it, and online code decodes
    through `VisionTower.decode`, which applies it.
    """
    data, where = _read_source(source, name)
    try:
        with warnings.catch_warnings():
            # A bomb over PIL's limit is only a warning in PIL; here it is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(where, f"decompression bomb: {w}x{h} = {w * h} pixels "
                                        f"exceeds the limit of {max_pixels}")
            if draft_to and img.format == "JPEG" and min(w, h) >= 2 * draft_to:
                img.draft(None, (draft_to, draft_to))   # keeps both sides >= draft_to
            img.load()                       # decode now so truncation is caught here
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageError(where, "not an image (format not recognised)") from e
    except _DECODE_ERRORS as e:
        raise ImageError(where, f"cannot decode: {type(e).__name__}: {e}") from e


def read_image_file(path: str | os.PathLike, name: str | None = None) -> bytes:
    """The bytes of an image file a user named, checked before any slow work starts: readable,
    not empty, and a format PIL recognises (its header only; the pixels are decoded later, by
    load_image / VisionTower.decode, which still catch a truncated file). Raises ImageError."""
    data, where = _read_source(path, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # load_image decides
            Image.open(io.BytesIO(data)).close()
    except Image.UnidentifiedImageError as e:
        raise ImageError(where, "not an image (format not recognised)") from e
    except _DECODE_ERRORS as e:
        raise ImageError(where, f"cannot decode: {type(e).__name__}: {e}") from e
    return data


def _read_source(source: str | os.PathLike | bytes, name: str | None) -> tuple[bytes, str]:
    """(bytes, what errors call them) of a path or raw bytes; ImageError if unreadable or empty."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), name or "<bytes>"
    else:
        where = name or os.fspath(source)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(where, f"unreadable file ({e.strerror or e})") from e
    if not data:
        raise ImageError(where, "zero-byte file")
    return data, where


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), sixteen_bit=img.mode.startswith("I;16")))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Scale high-bit-depth greyscale to 0..255.

    16-bit modes use the full 0..65535 range; 32-bit integer images (how some
    16-bit files open) are treated as 16-bit when any value exceeds 255;
    float images are taken as 0..1 when they fit in it, else as 0..255.
    """
    if arr.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        out = np.nan_to_num(arr.astype(np.float64)) * scale
    else:
        sixteen_bit = sixteen_bit or int(arr.max(initial=0)) > 255
        out = arr.astype(np.float64) / (257.0 if sixteen_bit else 1.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
