"""image_url / video_url -> media bytes: data: URLs, http(s) fetched with a timeout and a byte cap,
file:// under one root.

    data, name = read_image_url(url, MediaLimits(max_bytes=20 << 20, local_root="/data/images"),
                                where="messages[1].content[0].image_url")
    data, name = read_media_url(url, MediaLimits(max_bytes=100 << 20, kind="video",
                                flag="--max-video-bytes"), where="messages[1].content[1].video_url")

Only the bytes are produced here; they are decoded by the export's `VisionTower.decode` (images)
or `VisionTower.decode_video` (videos), as the feature cache decodes, so served features equal
cached ones. Images and videos follow the same rules, each kind with its own byte cap. Every refusal is a RequestError
naming the message part: 400 for a malformed URL, bad base64, a failed fetch or a path outside
the allowed root, 413 for more bytes than the cap. A fetch streams the body and stops reading
at the cap; redirects are followed only to http(s) (httpx speaks no other scheme), at most 3.
file:// needs `--allowed-local-media-path`: the path is resolved (symlinks included) and must
lie inside it (contract.images.read_under, the converters' and cache's reader).
"""
from __future__ import annotations

import base64
import binascii
import urllib.parse
from dataclasses import dataclass

from vlm_dist.contract.images import ImageError, read_under
from vlm_dist.serve.errors import RequestError


@dataclass
class MediaLimits:
    max_bytes: int = 20 << 20
    """Largest image in bytes (after base64 decoding; a fetched body is cut off here)."""
    fetch_timeout: float = 10.0
    """Seconds for an http(s) image fetch (connect, and each read)."""
    local_root: str | None = None
    """The only directory file:// URLs may read under (--allowed-local-media-path); None: no file://."""
    kind: str = "image"
    """What the bytes are (image, video): named in errors and error codes."""
    flag: str = "--max-image-bytes"
    """The server flag that sets max_bytes, named in a 413."""


def read_image_url(url: str, limits: MediaLimits, where: str) -> tuple[bytes, str]:
    """The image bytes behind `url` and a short name for errors; RequestError (4xx) if refused."""
    return read_media_url(url, limits, where)


def read_media_url(url: str, limits: MediaLimits, where: str) -> tuple[bytes, str]:
    """The bytes behind `url` (an image or a video: limits.kind) and a short name for errors;
    RequestError (4xx) if refused."""
    kind = limits.kind
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: {kind}_url.url must be a non-empty string", param="messages")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, limits, where), f"{where} (data: URL)"
    if scheme in ("http", "https"):
        return _fetch(url, limits, where), url
    if scheme == "file":
        return _local(url, limits, where), url
    raise RequestError(400, f"{where}: unsupported {kind} URL {url[:60]!r}; use a data: URL (base64), "
                            "http(s):// or file:// (with --allowed-local-media-path)", param="messages")


def too_large(where: str, size: str, limits: MediaLimits) -> RequestError:
    return RequestError(413, f"{where}: {limits.kind} too large ({size} bytes; the server's limit is "
                             f"{limits.max_bytes} bytes, {limits.flag})", code=f"{limits.kind}_too_large",
                        param="messages")


def _data_url(url: str, limits: MediaLimits, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise RequestError(400, f"{where}: a data: URL must be data:<mime>;base64,<data>", param="messages")
    payload = "".join(payload.split())                  # line breaks in pasted base64
    if len(payload) * 3 // 4 > limits.max_bytes + 2:    # refuse before decoding a huge payload
        raise too_large(where, f"about {len(payload) * 3 // 4}", limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: malformed base64 in the data: URL ({e})",
                           code="invalid_base64", param="messages") from None
    if len(data) > limits.max_bytes:
        raise too_large(where, str(len(data)), limits)
    return data


def _fetch(url: str, limits: MediaLimits, where: str) -> bytes:
    """GET `url`: uncompressed only (a compressed body could inflate far past the cap before a chunk
    is counted), at most max_bytes, each read within fetch_timeout and the whole fetch within 3x it."""
    import time

    import httpx

    chunks, size = [], 0
    deadline = time.monotonic() + 3 * limits.fetch_timeout
    try:
        with httpx.Client(timeout=limits.fetch_timeout, follow_redirects=True, max_redirects=3,
                          headers={"Accept-Encoding": "identity"}) as client:
            with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise RequestError(400, f"{where}: fetching {url} answered HTTP {r.status_code}",
                                       code=f"{limits.kind}_fetch_failed", param="messages")
                encoding = r.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise RequestError(400, f"{where}: {url} was sent with Content-Encoding {encoding!r}; "
                                            f"{limits.kind}s are fetched uncompressed only", code=f"{limits.kind}_fetch_failed",
                                       param="messages")
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise too_large(where, declared, limits)
                for chunk in r.iter_raw():
                    size += len(chunk)
                    if size > limits.max_bytes:          # stop reading at the cap
                        raise too_large(where, f"more than {limits.max_bytes}", limits)
                    if time.monotonic() > deadline:
                        raise RequestError(400, f"{where}: fetching {url} took longer than "
                                                f"{3 * limits.fetch_timeout:g} s", code=f"{limits.kind}_fetch_failed",
                                           param="messages")
                    chunks.append(chunk)
    except RequestError:
        raise
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:   # InvalidURL, IDNA/Unicode errors: a bad URL
        raise RequestError(400, f"{where}: cannot fetch {url!r}: {type(e).__name__}: {e}",
                           code=f"{limits.kind}_fetch_failed", param="messages") from None
    return b"".join(chunks)


def _local(url: str, limits: MediaLimits, where: str) -> bytes:
    if limits.local_root is None:
        raise RequestError(400, f"{where}: file:// URLs are refused; the server reads local files only "
                                "under --allowed-local-media-path", param="messages")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise RequestError(400, f"{where}: file:// URL with a host ({parsed.netloc!r}); use file:///abs/path",
                           param="messages")
    path = urllib.parse.unquote(parsed.path)
    if "\x00" in path:
        raise RequestError(400, f"{where}: a file:// path with a NUL byte", code="invalid_local_path",
                           param="messages")
    try:
        return read_under(limits.local_root, path, max_bytes=limits.max_bytes)
    except ImageError as e:
        if e.reason.startswith("too large"):
            raise too_large(where, e.reason.split()[2].rstrip(":"), limits) from None
        raise RequestError(400, f"{where}: {e}", code="invalid_local_path", param="messages") from None
