"""Decode a video into uniformly sampled RGB frames with their timestamps, or say why not.

    from vlm_dist.contract.video import FrameSampling, load_video, VideoError
    video = load_video("clip.mp4", FrameSampling(num_frames=8, max_fps=2.0))   # or raw bytes
    video.frames        # [PIL.Image RGB], in time order
    video.timestamps    # [seconds from the first frame], one per frame

Decoding is PyAV (FFmpeg's libraries, bundled in its wheel). Sampling is by frame index:
the container is first demuxed without decoding to list every frame's presentation time
(cheap, and exact where the header's frame count or duration is missing or wrong), then
n = min(num_frames, frames in the video, max(1, floor(duration * max_fps))) frames are
taken at the centres of n equal segments (index floor((i + 0.5) * N / n)), as TSN-style
samplers do: the very first and last frames (fades, black) are not favoured, and n = N
takes every frame. `max_fps` caps the density, so a 2-second clip yields at most 4 frames
at 2 fps however large num_frames is. Only the selected frames are converted to RGB, and
decoding stops after the last one. A rotation in the display matrix (phone videos) is
applied, so frames come out upright, as contract.images applies the EXIF orientation.

Bad input raises `VideoError(path, reason)`, shaped like contract.images.ImageError so the
cache lists it in failures.jsonl: zero-byte file, over the byte cap, not a video (format
not recognised, or a still image such as a JPEG), no video stream, unsupported codec (no
decoder in this FFmpeg build: checked before decoding, where PyAV would crash), frames
too large, truncated (fewer frames present than the container's index lists, frames ending
before the duration its header states, an MP4 cut before its index, or a decode error part
way), no frames. A path is read like an image file (a regular file, size
capped on the opened descriptor); under a user-named root, read it with
contract.images.read_under and pass the bytes.
"""
from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import asdict, dataclass

from PIL import Image

from vlm_dist.contract.images import DEFAULT_MAX_PIXELS
from vlm_dist.errors import UserError

SAMPLING_VERSION = 1
# Bytes read from one video file at most: minutes of HD video; a larger file is a failure.
DEFAULT_MAX_VIDEO_BYTES = 1 << 30


class VideoError(UserError, ValueError):
    """A video file that cannot be used. `path` names it, `reason` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video are used: part of a video cache's encoder fingerprint."""

    num_frames: int = 8              # frames per video at most
    max_fps: float | None = 2.0      # sampled frames per second of video at most (None: no cap)
    version: int = SAMPLING_VERSION  # bumped whenever the same settings could pick other frames

    def __post_init__(self):
        if not isinstance(self.num_frames, int) or isinstance(self.num_frames, bool) or self.num_frames < 1:
            raise VideoError("sampling", f"num_frames must be a positive integer, got {self.num_frames!r}")
        if self.max_fps is not None and not (isinstance(self.max_fps, (int, float)) and self.max_fps > 0):
            raise VideoError("sampling", f"max_fps must be a positive number or null, got {self.max_fps!r}")
        if self.version != SAMPLING_VERSION:
            raise VideoError("sampling", f"version {self.version!r} is not {SAMPLING_VERSION}")

    def fingerprint(self) -> dict:
        return {**asdict(self), "rule": "segment-centres"}

    def count(self, available: int, duration: float) -> int:
        """How many frames a video of `available` frames lasting `duration` seconds yields."""
        n = min(self.num_frames, available)
        if self.max_fps is not None:
            n = min(n, max(1, math.floor(duration * self.max_fps + 1e-9)))
        return n

    def indices(self, available: int, duration: float) -> list[int]:
        """Frame indices (into the frames in presentation order) to sample, increasing."""
        n = self.count(available, duration)
        return [math.floor((i + 0.5) * available / n) for i in range(n)]


@dataclass
class Video:
    """Sampled frames of one video."""

    frames: list[Image.Image]       # RGB, in time order
    timestamps: list[float]         # seconds from the first frame, one per frame
    num_available: int              # frames the video has
    duration: float                 # seconds, first frame to the end of the last
    size: tuple[int, int]           # (width, height) of the frames, upright


def _open_source(source, name: str | None, max_bytes: int):
    """(file object, name) for a path or bytes: a regular file at most max_bytes long."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = name or "<bytes>"
        if len(source) > max_bytes:
            raise VideoError(where, f"too large: {len(source)} bytes, over the limit of {max_bytes}")
        if not len(source):
            raise VideoError(where, "zero-byte file")
        return io.BytesIO(bytes(source)), where
    where = name or os.fspath(source)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise VideoError(where, f"unreadable file ({e.strerror or e})") from e
    st = os.fstat(fd)             # checked on the descriptor: a file swapped after open is not read
    reason = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
              "zero-byte file" if st.st_size == 0 else
              f"too large: {st.st_size} bytes, over the limit of {max_bytes}" if st.st_size > max_bytes
              else None)
    if reason:
        os.close(fd)
        raise VideoError(where, reason)
    return os.fdopen(fd, "rb"), where


def load_video(source: str | os.PathLike | bytes, sampling: FrameSampling = FrameSampling(),
               name: str | None = None, max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Video:
    """Decode a video file path or raw bytes into its sampled frames (see the module docstring).

    `name` is what errors call the video (defaults to the path, or "<bytes>"); `max_pixels`
    bounds one frame's width * height.
    """
    import av

    f, where = _open_source(source, name, max_bytes)
    with f:
        try:
            container = av.open(f, mode="r")
        except av.error.FFmpegError as e:
            f.seek(4)
            what = ("an MP4/QuickTime file truncated or corrupt (no usable index)"
                    if f.read(4) == b"ftyp" else "not a video (format not recognised)")
            raise VideoError(where, f"{what}: {e.strerror or e}") from e
        with container:
            fmt = container.format.name
            if fmt == "image2" or fmt.endswith("_pipe"):
                raise VideoError(where, f"not a video: a still image ({fmt})")
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise VideoError(where, f"no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            if stream.codec_context is None:   # decoding such a stream crashes PyAV
                raise VideoError(where, "unsupported codec: this FFmpeg build has no decoder for "
                                        "the video stream")
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise VideoError(where, f"frames too large: {w}x{h} = {w * h} pixels exceeds the "
                                        f"limit of {max_pixels}")
            pts, frame_duration = _frame_times(container, stream, where)
            listed = stream.frames
            if listed and len(pts) < listed:
                raise VideoError(where, f"truncated: {len(pts)} of the {listed} frames its index "
                                        "lists are present")
            time_base = stream.time_base                 # a Fraction: exact seconds, then float
            duration = float((pts[-1] - pts[0] + frame_duration) * time_base)
            stated = _stated_duration(container, stream)
            if stated and duration < 0.9 * stated - float(frame_duration * time_base):
                raise VideoError(where, f"truncated: its frames end at {duration:.2f} s of the "
                                        f"{stated:.2f} s its header states")
            wanted = [pts[i] for i in sampling.indices(len(pts), duration)]
        f.seek(0)         # second pass from the start: reopening is exact in every format, a seek is not
        with av.open(f, mode="r") as container:
            frames = _decode(container, container.streams.video[0], set(wanted), where)
    missing = [p for p in wanted if p not in frames]
    if missing:
        raise VideoError(where, f"truncated or corrupt: the frame at "
                                f"{float((missing[0] - pts[0]) * time_base):.3f} s could not be decoded")
    images = [frames[p] for p in wanted]
    return Video(images, [float((p - pts[0]) * time_base) for p in wanted], len(pts), duration,
                 images[0].size)


def _frame_times(container, stream, where: str) -> tuple[list[int], int]:
    """Every frame's presentation time (stream time base), sorted, and one frame's duration."""
    import av

    pts, durations = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:           # the demuxer's end-of-stream flush packet
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                raise VideoError(where, "frames carry no timestamps")
            pts.append(t)
            if packet.duration:
                durations.append(packet.duration)
    except av.error.FFmpegError as e:
        raise VideoError(where, f"truncated or corrupt: demuxing failed after {len(pts)} frames "
                                f"({e.strerror or e})") from e
    if not pts:
        raise VideoError(where, "no frames in the video stream")
    pts.sort()
    steps = sorted(b - a for a, b in zip(pts, pts[1:]) if b > a)
    frame_duration = (sorted(durations)[len(durations) // 2] if durations else
                      steps[len(steps) // 2] if steps else 0)
    return pts, frame_duration


def _stated_duration(container, stream) -> float | None:
    """The video's length in seconds by its header: the stream's, or the container's when the
    video is its only stream (another stream may be longer); None when unknown."""
    if stream.duration:
        return stream.duration * float(stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000      # AV_TIME_BASE
    return None


def _decode(container, stream, wanted: set[int], where: str) -> dict[int, Image.Image]:
    """Decode until every wanted frame is seen: wanted pts -> RGB image."""
    import av

    out: dict[int, Image.Image] = {}
    try:
        for frame in container.decode(stream):
            t = frame.pts if frame.pts is not None else frame.dts
            if t in wanted and t not in out:
                img = frame.to_image()                         # RGB
                if frame.rotation % 360:      # the display matrix (phones): make it upright
                    img = img.rotate(frame.rotation, expand=True)    # counterclockwise, exact at 90s
                out[t] = img
                if len(out) == len(wanted):
                    break
    except av.error.FFmpegError as e:
        raise VideoError(where, f"truncated or corrupt: decoding failed after {len(out)} sampled "
                                f"frames ({e.strerror or e})") from e
    return out


# -- the token block of one video ------------------------------------------------------------------
# Layout (choice): <|vision_start|> "0.2s" Tf*<|video_pad|> "\n" "0.8s" Tf*<|video_pad|> ... <|vision_end|>
# Each sampled frame's run of pad slots follows its timestamp as ordinary text (what "when does
# X appear" needs, a few tokens a frame, no new position scheme); frames are separated by the
# "\n" token, as tiled rows are (contract.tiling); every token is already in Qwen3's vocabulary.
TIMESTAMP_FORMAT = "{:.1f}s"


@dataclass(frozen=True)
class VideoLayout:
    """What a cache records per video key (beside its frames' features) and a block is made from."""

    timestamps: tuple[float, ...]   # seconds from the first frame, one per sampled frame
    num_available: int              # frames the video has
    duration: float                 # seconds
    size: tuple[int, int]           # (width, height) of the frames, upright

    @property
    def num_views(self) -> int:
        """Feature rows of this video in the cache: one per sampled frame."""
        return len(self.timestamps)

    @classmethod
    def of(cls, video: "Video") -> "VideoLayout":
        return cls(tuple(round(t, 6) for t in video.timestamps), video.num_available,
                   round(video.duration, 6), tuple(video.size))

    def to_dict(self) -> dict:
        return {"kind": "video", "timestamps": list(self.timestamps), "num_available": self.num_available,
                "duration": self.duration, "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: dict) -> "VideoLayout":
        try:
            return cls(tuple(float(t) for t in d["timestamps"]), int(d["num_available"]),
                       float(d["duration"]), tuple(d["size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise VideoError("layout", f"malformed video layout {d!r} ({e})") from None


def video_block_ids(tokenizer, timestamps, tokens_per_frame: int) -> list[int]:
    """Token ids of one video's block (layout above): pad slots tokens_per_frame per frame, in
    frame order, which the splice fills with the video connector's output frame by frame."""
    from vlm_dist.contract.media import VIDEO, token_id
    from vlm_dist.contract.tiling import row_separator_id

    if not len(timestamps):
        raise VideoError("layout", "a video block needs at least one frame")
    start, pad, end = (token_id(tokenizer, t) for t in (VIDEO.start_token, VIDEO.pad_token, VIDEO.end_token))
    nl = row_separator_id(tokenizer)
    ids = [start]
    for i, t in enumerate(timestamps):
        if i:
            ids.append(nl)
        ids += tokenizer(TIMESTAMP_FORMAT.format(t), add_special_tokens=False,
                         split_special_tokens=True)["input_ids"]
        ids += [pad] * tokens_per_frame
    return ids + [end]
