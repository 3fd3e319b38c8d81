"""load_image: every common mode becomes upright RGB; unusable files raise ImageError naming why."""
import io
import os
import signal
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from vlm_dist.contract.images import ImageError, load_image, read_image_file, read_under, resolve_under

RED, WHITE = (255, 0, 0), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def px(img, xy):
    return img.getpixel(xy)


def test_rgb_passes_through():
    out = load_image(encode(Image.new("RGB", (8, 6), RED), "PNG"))
    assert out.mode == "RGB" and out.size == (8, 6) and px(out, (3, 3)) == RED


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    img = Image.new("RGBA", (4, 2), RED + (255,))
    img.putpixel((0, 0), (0, 0, 0, 0))                     # fully transparent black
    img.putpixel((1, 0), (0, 0, 0, 128))                   # half-transparent black
    out = load_image(encode(img.convert(mode), "PNG"))
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == WHITE
    assert all(120 <= c <= 135 for c in px(out, (1, 0)))     # black over white at 50%
    expected_opaque = RED if mode == "RGBA" else (76, 76, 76)   # L of red is 76
    assert px(out, (2, 1)) == expected_opaque


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    out = load_image(encode(img, "PNG", transparency=0))
    assert px(out, (0, 0)) == WHITE and px(out, (3, 3)) == RED


def test_palette_gif_and_greyscale_and_bilevel():
    p = Image.new("RGB", (4, 4), RED).convert("P")
    assert px(load_image(encode(p, "GIF")), (1, 1)) == RED
    assert px(load_image(encode(Image.new("L", (4, 4), 200), "PNG")), (0, 0)) == (200, 200, 200)
    assert px(load_image(encode(Image.new("1", (4, 4), 1), "PNG")), (0, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    out = load_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt))   # C=0 M=Y=full: red
    assert out.mode == "RGB"
    r, g, b = px(out, (4, 4))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    a = np.full((4, 4), 32768, dtype=np.uint16)
    a[0, 0] = 65535
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = load_image(data)
    assert px(out, (0, 0)) == WHITE and px(out, (1, 1)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste(RED, (0, 0, 20, 20))                          # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                        # display rotated 90 degrees clockwise
    out = load_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)                             # upright: portrait
    top, bottom = px(out, (10, 5)), px(out, (10, 35))
    assert top[0] > 200 and top[2] < 60                     # the stored left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_path_and_bytes_agree(tmp_path):
    data = encode(Image.effect_mandelbrot((30, 20), (-2, -1.5, 1, 1.5), 20), "PNG")
    (tmp_path / "m.png").write_bytes(data)
    assert np.array_equal(np.asarray(load_image(tmp_path / "m.png")), np.asarray(load_image(data)))


def broken_files(tmp_path):
    jpeg = encode(Image.effect_mandelbrot((64, 64), (-2, -1.5, 1, 1.5), 20).convert("RGB"), "JPEG")
    files = {"zero.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 2], "text.jpg": b"hello, not an image\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


@pytest.mark.parametrize("name,reason", [("zero.jpg", "zero-byte"), ("truncated.jpg", "truncated"),
                                         ("text.jpg", "not an image"), ("missing.jpg", "unreadable")])
def test_unusable_files_raise_image_error_naming_the_file(tmp_path, name, reason):
    broken_files(tmp_path)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / name)
    assert e.value.path.endswith(name) and reason in e.value.reason


def test_decompression_bomb_is_an_error(monkeypatch):
    data = encode(Image.new("L", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=5000, name="big.png")
    # PIL's own limit warns rather than fails; here it fails too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(ImageError, match="DecompressionBomb"):
        load_image(data)


# -- reading a user's path under a root ---------------------------------------------------------
@contextmanager
def must_not_hang(seconds=60):
    """A regression that blocks on a FIFO or streams /dev/zero fails here instead of hanging."""
    def fail(*_):
        raise TimeoutError(f"still reading after {seconds}s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def tree(tmp_path):
    """root/ with a file, a link to it inside the root, and links leading out of it."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(Image.new("RGB", (4, 4), RED), "PNG"))
    (tmp_path / "secret.png").write_bytes(b"not yours")
    (root / "sub" / "in.png").symlink_to(root / "a.png")
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "outdir").symlink_to(tmp_path)
    os.mkfifo(root / "fifo.png")
    return root


@pytest.mark.parametrize("ref", ["../secret.png", "sub/../../secret.png", "out.png",
                                 "outdir/secret.png", "/etc/passwd", "/dev/zero"])
def test_paths_leaving_the_root_are_refused_before_opening(tree, ref):
    with must_not_hang(), pytest.raises(ImageError, match="outside the image root") as e:
        read_under(tree, ref)
    assert e.value.path == ref


def test_a_link_inside_the_root_to_a_file_inside_it_is_read(tree):
    assert read_under(tree, "sub/in.png") == (tree / "a.png").read_bytes()
    assert resolve_under(tree, "sub/in.png") == (tree / "a.png").resolve()


def test_only_regular_files_up_to_the_byte_cap_are_read(tree):
    with must_not_hang():
        with pytest.raises(ImageError, match="not a regular file"):
            read_under(tree, "fifo.png")                 # no writer: a plain open() blocks forever
        with pytest.raises(ImageError, match="not a regular file"):
            read_under("/", "dev/zero", max_bytes=1 << 20)   # inside "/", endless
    size = (tree / "a.png").stat().st_size
    with pytest.raises(ImageError, match=f"too large: {size} bytes, over the limit of {size - 1}"):
        read_under(tree, "a.png", max_bytes=size - 1)
    assert len(read_under(tree, "a.png", max_bytes=size)) == size


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return Image.blend(coarse, Image.effect_mandelbrot((w, h), (-2, -1.5, 1, 1.5), 60).convert("RGB"), 0.5)


def test_jpeg_draft_decodes_large_photos_small_and_the_resize_stays_close():
    """draft_to=2x the encoder's side: the DCT-scaled decode keeps both sides >= draft_to, and
    after the encoder's bicubic resize the pixels stay within a few levels of a full decode."""
    data = encode(_photo(1600, 1200), "JPEG", quality=90)
    full, drafted = load_image(data), load_image(data, draft_to=256)
    assert full.size == (1600, 1200) and drafted.size == (400, 300)          # 1/4 scale, >= 256
    a = np.asarray(full.resize((128, 128), Image.BICUBIC), dtype=np.int16)
    b = np.asarray(drafted.resize((128, 128), Image.BICUBIC), dtype=np.int16)
    diff = np.abs(a - b)
    assert diff.max() <= 4 and diff.mean() <= 0.5


def test_jpeg_draft_leaves_small_jpegs_and_other_formats_alone():
    small = encode(_photo(500, 375), "JPEG", quality=90)                     # under 2 x draft_to
    assert np.array_equal(np.asarray(load_image(small, draft_to=256)), np.asarray(load_image(small)))
    png = encode(_photo(1600, 1200), "PNG")
    assert load_image(png, draft_to=256).size == (1600, 1200)


@pytest.mark.parametrize("name,reason", [("zero.jpg", "zero-byte"), ("text.jpg", "not an image"),
                                         ("missing.jpg", "unreadable")])
def test_read_image_file_names_an_unusable_file_before_any_decode(tmp_path, name, reason):
    """vlm-generate's early check (before the model loads): the header only, so a truncated file
    passes here and is caught by the decode itself."""
    files = broken_files(tmp_path)
    with pytest.raises(ImageError) as e:
        read_image_file(tmp_path / name)
    assert e.value.path.endswith(name) and reason in e.value.reason
    assert read_image_file(tmp_path / "truncated.jpg") == files["truncated.jpg"]
    with pytest.raises(ImageError, match="truncated"):
        load_image(read_image_file(tmp_path / "truncated.jpg"), name="truncated.jpg")
