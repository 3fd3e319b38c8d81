"""load_video: uniform frame sampling with timestamps; bad videos raise VideoError naming why.

Clips are written here with PyAV itself: frame i is a flat colour whose red level is 20 * i,
so a decoded frame says which frame it is.
"""
import io
import struct

import av
import numpy as np
import pytest
from PIL import Image

from vlm_dist.contract.video import FrameSampling, VideoError, load_video
from vlm_dist.errors import UserError

FPS, N, W, H = 5, 10, 64, 48      # 2-second clips


def write_clip(path, codec="mpeg4", fmt=None, n=N, fps=FPS, options=None) -> bytes:
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"qscale": "1"} if codec == "mpeg4" else {"crf": "1"}
        for i in range(n):
            arr = np.empty((H, W, 3), np.uint8)
            arr[...] = (20 * i, 255 - 20 * i, 128)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with open(path, "rb") as f:
        return f.read()


def frame_index(img: Image.Image) -> int:
    red = float(np.asarray(img)[..., 0].mean())
    i = round(red / 20)
    assert abs(red - 20 * i) < 6, red          # lossy coding moves a flat colour by a few levels
    return i


CLIPS = [("mpeg4", "mp4"), ("mpeg4", "avi"), ("mpeg4", "mkv"), ("libx264", "mp4")]


@pytest.mark.parametrize("codec,ext", CLIPS)
def test_uniform_sampling_and_timestamps(tmp_path, codec, ext):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    path = tmp_path / f"clip.{ext}"
    write_clip(path, codec)
    video = load_video(path, FrameSampling(num_frames=4, max_fps=None))
    # centres of 4 equal segments of 10 frames: floor((k + 0.5) * 10 / 4)
    assert [frame_index(f) for f in video.frames] == [1, 3, 6, 8]
    assert video.timestamps == pytest.approx([0.2, 0.6, 1.2, 1.6])
    assert video.num_available == N and video.duration == pytest.approx(2.0) and video.size == (W, H)
    assert all(f.mode == "RGB" and f.size == (W, H) for f in video.frames)
    every = load_video(path, FrameSampling(num_frames=50, max_fps=None))      # more than there are
    assert [frame_index(f) for f in every.frames] == list(range(N))
    assert every.timestamps == pytest.approx([i / FPS for i in range(N)])


def test_fps_cap(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(path)
    one_fps = load_video(path, FrameSampling(num_frames=8, max_fps=1.0))        # 2 s -> 2 frames
    assert [frame_index(f) for f in one_fps.frames] == [2, 7]
    assert one_fps.timestamps == pytest.approx([0.4, 1.4])
    assert len(load_video(path, FrameSampling(num_frames=8, max_fps=2.0)).frames) == 4
    assert len(load_video(path, FrameSampling(num_frames=3, max_fps=100.0)).frames) == 3
    assert len(load_video(path, FrameSampling(num_frames=8, max_fps=0.1)).frames) == 1   # at least one


def test_bytes_equal_path_and_are_deterministic(tmp_path):
    data = write_clip(tmp_path / "clip.mkv", fmt="matroska")
    s = FrameSampling(num_frames=3, max_fps=None)
    a, b = load_video(tmp_path / "clip.mkv", s), load_video(data, s, name="clip.mkv")
    assert a.timestamps == b.timestamps
    assert [f.tobytes() for f in a.frames] == [f.tobytes() for f in b.frames]


def test_sampling_counts():
    s = FrameSampling(num_frames=8, max_fps=2.0)
    for available, duration in [(10, 2.0), (300, 10.0), (3, 0.1), (1, 0.04), (1000, 3.99)]:
        idx = s.indices(available, duration)
        assert len(idx) == min(8, available, max(1, int(duration * 2)))
        assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < available
    assert s.fingerprint() == {"num_frames": 8, "max_fps": 2.0, "version": 1, "rule": "segment-centres"}
    for bad in [dict(num_frames=0), dict(num_frames=2.5), dict(max_fps=0), dict(max_fps="2")]:
        with pytest.raises(VideoError, match="num_frames|max_fps"):
            FrameSampling(**bad)


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_videos_name_the_file_and_the_reason(tmp_path):
    # the index (moov) first, as web videos are: a cut inside the frames leaves the index whole
    fast = write_clip(tmp_path / "fast.mp4", options={"movflags": "faststart"})
    avi = write_clip(tmp_path / "clip.avi")
    plain_mp4 = write_clip(tmp_path / "clip.mp4")          # PyAV's default: the index (moov) last
    moov = plain_mp4.find(b"moov")
    mkv = write_clip(tmp_path / "clip.mkv")                    # no frame count in its header
    assert moov > plain_mp4.find(b"mdat") > 0
    assert avi.count(b"FMP4") == 2                # the codec's FourCC, in the stream header twice
    cases = {
        "zero-length": (b"", "zero-byte file"),
        "truncated": (fast[: len(fast) * 3 // 4], "truncated: 4 of the 10 frames"),
        "truncated before the index": (plain_mp4[:moov], "MP4/QuickTime file truncated"),
        "truncated stream": (mkv[: len(mkv) * 2 // 3], "truncated: its frames end at"),
        "not a video": (b"this is a text file, not a video\n" * 20, "not a video"),
        "still image": (_jpeg(), "not a video: a still image"),
        "no video stream": (_audio_only(), "no video stream (streams: audio)"),
        "unsupported codec": (avi.replace(b"FMP4", b"ZZZZ"), "unsupported codec"),
    }
    for case, (data, reason) in cases.items():
        path = tmp_path / f"{case}.bin"
        path.write_bytes(data)
        for source, name in [(path, str(path)), (data, f"{case}.mp4")]:
            with pytest.raises(VideoError) as e:
                load_video(source, name=None if isinstance(source, type(path)) else name)
            assert isinstance(e.value, UserError), case
            assert e.value.path == name and reason in e.value.reason, (case, e.value.reason)
            assert str(e.value) == f"{name}: {e.value.reason}"


def test_caps_and_non_files(tmp_path):
    data = write_clip(tmp_path / "clip.mp4")
    with pytest.raises(VideoError, match="too large: .* over the limit"):
        load_video(tmp_path / "clip.mp4", max_bytes=len(data) - 1)
    with pytest.raises(VideoError, match="too large"):
        load_video(data, max_bytes=len(data) - 1)
    with pytest.raises(VideoError, match=f"frames too large: {W}x{H}"):
        load_video(data, max_pixels=W * H - 1)
    with pytest.raises(VideoError, match="not a regular file"):
        load_video(tmp_path)
    with pytest.raises(VideoError, match="unreadable file"):
        load_video(tmp_path / "missing.mp4")


def test_display_rotation_is_applied(tmp_path):
    """A phone's portrait clip: landscape frames plus a -90 degree display matrix in the track header."""
    with av.open(str(tmp_path / "r.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"qscale": "1"}
        arr = np.zeros((H, W, 3), np.uint8)
        arr[:, : W // 2] = 255                                  # left half white
        for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = (tmp_path / "r.mp4").read_bytes()
    identity = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    portrait = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    at = data.find(identity, data.find(b"tkhd"))
    assert at > 0
    upright = load_video(data[:at] + portrait + data[at + 36:], FrameSampling(1, None))
    assert upright.size == (H, W) and upright.frames[0].size == (H, W)
    a = np.asarray(upright.frames[0]).astype(int)
    assert a[: W // 2].mean() > 250 and a[W // 2:].mean() < 5     # turned clockwise: white on top
    assert load_video(data, FrameSampling(1, None)).size == (W, H)     # no matrix: as stored
