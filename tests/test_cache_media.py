"""Feature cache with AnyRes tiles and video frames, on the tiny SigLIP (32 px) and real files.

Images are made with PIL, videos with PyAV (as tests/test_video.py writes them: frame i is a flat
colour whose red level is 20 * i). One tiled build with videos is the reference; a second one
through the CLI must be byte-identical; an untiled build of the same records is the other side
of "view 0 of a tiled image is the untiled image".
"""
import hashlib
import json
import shutil

import av
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from vlm_dist.cache import cli as cache_cli
from vlm_dist.cache.build import BuildConfig, build
from vlm_dist.cache.reader import (CacheError, FeatureCache, check_cache_for_training, read_layouts,
                                   read_manifest, write_verified_stamp)
from vlm_dist.contract.records import write_records
from vlm_dist.contract.tiling import Tiling, TilingError
from vlm_dist.contract.video import FrameSampling, VideoLayout
from vlm_dist.model.vision import VisionTower, image_views

TILING = {"grids": [[1, 2], [2, 1], [2, 2]], "tokens_per_tile": 4}
SAMPLING = FrameSampling(num_frames=4, max_fps=2.0)
IMAGES = ["wide.png", "big.png", "small.png", "photo.jpg"]
VIDEOS = ["clip.mp4", "clip.mkv"]
BAD_VIDEOS = {"zero.mp4": "zero-byte file", "cut.mp4": "truncated", "text.mp4": "not a video"}


def write_clip(path, n=10, fps=5, size=(48, 40), options=None) -> bytes:
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.options = {"qscale": "1"}
        for i in range(n):
            arr = np.empty((size[1], size[0], 3), np.uint8)
            arr[...] = (20 * i, 255 - 20 * i, 128)
            arr[: size[1] // 2, : size[0] // 3] = 0                # some structure for the tower
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def conv(text):
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_photos):
    root = tmp_path_factory.mktemp("media")
    m = root / "media"
    m.mkdir()
    Image.effect_mandelbrot((100, 40), (-2, -1.5, 1, 1.5), 20).convert("RGB").save(m / "wide.png")
    Image.effect_mandelbrot((80, 80), (-2, -1.5, 1, 1.5), 30).convert("RGB").save(m / "big.png")
    Image.new("RGB", (20, 20), (10, 200, 30)).save(m / "small.png")
    Image.open(real_photos[0]).convert("RGB").resize((120, 90)).save(m / "photo.jpg", quality=90)
    write_clip(m / "clip.mp4", options={"movflags": "faststart"})
    write_clip(m / "clip.mkv", n=3, fps=3, size=(40, 64))       # 1 s: 2 frames at 2 fps
    write_clip(m / "both.mkv", n=4)
    (m / "zero.mp4").write_bytes(b"")
    fast = write_clip(m / "full.mp4", options={"movflags": "faststart"})
    (m / "full.mp4").unlink()
    (m / "cut.mp4").write_bytes(fast[: len(fast) * 3 // 4])
    (m / "text.mp4").write_bytes(b"this is a text file, not a video\n" * 20)
    records = [
        {"id": "pics", "images": ["wide.png", "small.png"], "conversations": conv("<image><image> what")},
        {"id": "mixed", "images": ["big.png", "photo.jpg"], "videos": ["clip.mp4"],
         "conversations": conv("<image> then <video> then <image>")},
        {"id": "vid", "videos": ["clip.mkv", "clip.mp4"], "conversations": conv("<video><video> when")},
        *({"id": f"bad-{name}", "videos": [name], "conversations": conv("<video> when")}
          for name in BAD_VIDEOS),
        {"id": "both-video", "videos": ["both.mkv"], "conversations": conv("<video> x")},
        {"id": "both-image", "images": ["both.mkv"], "conversations": conv("<image> x")},
    ]
    write_records(root / "records.jsonl", records)
    return {"root": root, "media": m, "records": root / "records.jsonl"}


def config(data, vision, out, **kw):
    kw = {"shard_size": 3, "batch_size": 2, "workers": 0, "progress": False,
          "video_sampling": SAMPLING, **kw}
    return BuildConfig(out=str(out), records=[str(data["records"])], image_root=str(data["media"]),
                       vision_model=vision, **kw)


@pytest.fixture(scope="module")
def tiled(data, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled") / "cache"
    build(config(data, tiny_models["vision"], out, tiling=dict(TILING)))
    return out


@pytest.fixture(scope="module")
def untiled(data, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("untiled") / "cache"
    build(config(data, tiny_models["vision"], out))
    return out


@pytest.fixture(scope="module")
def tower(tiny_models):
    """The encoder as `vlm-cache build` sets it up (bf16, JPEG draft decoding on)."""
    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.bfloat16)
    tower.draft_to = tower.default_draft_to
    return tower


def published(cache):
    names = ["manifest.json", "keys.arrow", "index.arrow", "failures.jsonl"]
    return names + sorted(f"shards/{p.name}" for p in (cache / "shards").glob("*.arrow"))


def test_a_tiled_build_is_deterministic_and_the_cli_makes_the_same(tiled, data, tiny_models, tmp_path):
    out = tmp_path / "again"
    assert cache_cli.main(["build", "--records", str(data["records"]), "--image-root", str(data["media"]),
                           "--vision-model", tiny_models["vision"], "--out", str(out),
                           "--tiling", json.dumps(TILING), "--frames", "4", "--max-fps", "2",
                           "--shard-size", "3", "--batch-size", "2", "--workers", "1",
                           "--no-progress"]) == 0
    assert published(out) == published(tiled)
    for rel in published(tiled):
        assert (out / rel).read_bytes() == (tiled / rel).read_bytes(), rel
    spec = FeatureCache(tiled, max_open_shards=2).tiling
    assert spec.tile_size == 32 and spec.grids == ((1, 2), (2, 1), (2, 2))      # the tower's side


def test_tile_features_equal_the_tower_on_each_crop_and_view0_is_the_untiled_image(tiled, untiled,
                                                                                    data, tower):
    cache, plain = FeatureCache(tiled, max_open_shards=2), FeatureCache(untiled, max_open_shards=2)
    spec = cache.tiling
    grids = set()
    for ref in IMAGES:
        key = cache.resolve(ref)
        assert key == hashlib.sha256((data["media"] / ref).read_bytes()).hexdigest()
        tiling, views = image_views(tower.decode(data["media"] / ref, name=ref), spec)
        assert Tiling.from_dict(cache.layout(key)) == tiling and cache.layout(key)["kind"] == "image"
        got = cache.views(key)
        assert got.shape == (tiling.num_views, 16, 32) == (len(views), 16, 32)
        assert cache.num_views(key) == tiling.num_views
        assert torch.equal(got, tower.encode_views(views))
        for crop, row in zip(views, got):                         # each tile alone through the tower
            assert torch.equal(row, tower(tower.preprocess([crop]))[0])
        assert torch.equal(cache[key], got[0]) and cache[key].data_ptr() == got.data_ptr()   # zero-copy
        assert plain.layout(key) is None and plain.views(key).shape == (1, 16, 32)
        assert torch.equal(plain[key], got[0])                    # untiled image == tiled thumbnail
        grids.add((tiling.rows, tiling.cols))
    assert {(1, 1), (1, 2), (2, 2)} <= grids                    # untiled, wide and square grids seen


def test_video_frames_and_timestamps_equal_decode_video(tiled, untiled, data, tower):
    for path in (tiled, untiled):
        cache = FeatureCache(path, max_open_shards=2)
        assert cache.video_sampling == SAMPLING
        for ref in VIDEOS:
            key = cache.resolve(ref)
            video = tower.decode_video(data["media"] / ref, SAMPLING, name=ref)
            layout = cache.layout(key)
            assert layout == VideoLayout.of(video).to_dict() and layout["kind"] == "video"
            assert layout["timestamps"] == pytest.approx(video.timestamps, abs=1e-6)
            assert cache.views(key).shape == (len(video.frames), 16, 32)
            assert torch.equal(cache.views(key), tower.encode_views(video.frames))
    clip = FeatureCache(tiled, max_open_shards=2).layout(FeatureCache(tiled).resolve("clip.mp4"))
    assert len(clip["timestamps"]) == 4 and clip["num_available"] == 10   # 2 s at 2 fps: 4 frames


def test_layouts_round_trip_through_shards_and_keys(tiled, untiled):
    cache = FeatureCache(tiled, max_open_shards=2)
    layouts = read_layouts(tiled)
    assert set(layouts) == set(cache.keys())                 # tiled: every image has one, 1x1 too
    for key, layout in layouts.items():
        assert cache.layout(key) == layout
        if layout["kind"] == "video":
            assert VideoLayout.from_dict(layout).to_dict() == layout
            assert VideoLayout.from_dict(layout).num_views == cache.num_views(key)
        else:
            assert Tiling.from_dict({k: v for k, v in layout.items() if k != "kind"}).num_views == \
                cache.num_views(key)
    # the shards: one row per view, a key's rows consecutive, the layout on view 0 only
    rows = 0
    for entry in read_manifest(tiled)["shards"]:
        t = pa.ipc.open_file(pa.memory_map(str(tiled / entry["file"]))).read_all()
        assert t.schema.field("view").type == pa.int16() and entry["rows"] == t.num_rows
        keys, views, texts = (t.column(c).to_pylist() for c in ("key", "view", "layout"))
        for r, (key, view, text) in enumerate(zip(keys, views, texts)):
            assert view == (0 if r == 0 or keys[r - 1] != key else views[r - 1] + 1)
            assert (text is not None) == (view == 0) and (view or json.loads(text) == layouts[key])
        rows += t.num_rows
    counts = read_manifest(tiled)["counts"]
    assert rows == counts["views"] == sum(cache.num_views(k) for k in cache.keys())
    plain = read_layouts(untiled)
    assert {layout["kind"] for layout in plain.values()} == {"video"} and len(plain) == len(VIDEOS)


def test_bad_videos_and_a_file_used_as_both_kinds_are_listed_failures(tiled, data):
    cache = FeatureCache(tiled, max_open_shards=2)
    by_path = {(f.get("paths") or [f.get("path")])[0]: f for f in cache.failures}
    assert set(by_path) == set(BAD_VIDEOS) | {"both.mkv"}
    for name, reason in BAD_VIDEOS.items():
        f = by_path[name]
        assert reason in f["reason"] and f["records"] == [f"bad-{name}"] and f["kind"] == "video", f
        with pytest.raises(KeyError, match="failed to encode"):
            cache[f["key"]]
    both = by_path["both.mkv"]
    assert "referenced both as an image and as a video" in both["reason"]
    assert both["records"] == ["both-image", "both-video"]
    c = read_manifest(tiled)["counts"]
    assert (c["unique_images"], c["unique_videos"], c["encoded"], c["encoded_videos"]) == (4, 5, 6, 2)
    assert (c["failed_videos"], c["unreadable_files"], c["records_with_failed_images"]) == (3, 1, 5)
    assert all(cache.resolve(r) in cache for r in IMAGES + VIDEOS)


def test_a_tiled_or_video_config_against_a_cache_without_them_is_refused(tiled, untiled, tower,
                                                                        data, tiny_models, tmp_path):
    spec = FeatureCache(tiled, max_open_shards=1).tiling
    with pytest.raises(CacheError, match="built without tiles") as e:
        check_cache_for_training(untiled, tower.fingerprint(tiling=spec, video_sampling=SAMPLING))
    assert str(untiled) in str(e.value) and "vlm-cache build --tiling" in str(e.value)
    assert "model.tiling: null" in str(e.value)
    with pytest.raises(CacheError, match="built without tiles"):        # what training computes
        check_cache_for_training(untiled, VisionTower.expected_fingerprint(tiny_models["vision"],
                                                                           tiling=spec))
    check_cache_for_training(tiled, tower.fingerprint(tiling=spec, video_sampling=SAMPLING))
    check_cache_for_training(tiled, tower.fingerprint(video_sampling=SAMPLING))   # untiled: view 0
    other = tower.tiling_spec({**TILING, "token_budget": 20})        # rules out 2x2 (25 tokens)
    with pytest.raises(CacheError, match="tiling: cache"):
        check_cache_for_training(tiled, tower.fingerprint(tiling=other))
    with pytest.raises(CacheError, match="video_sampling: cache"):
        check_cache_for_training(tiled, tower.fingerprint(video_sampling=FrameSampling(8, 2.0)))
    # images only: no videos in the records, none in the cache
    (tmp_path / "list.txt").write_text("wide.png\nsmall.png\n")
    build(BuildConfig(out=str(tmp_path / "img"), image_lists=[str(tmp_path / "list.txt")],
                      image_root=str(data["media"]), vision_model=tiny_models["vision"], workers=0,
                      progress=False))
    assert "video_sampling" not in read_manifest(tmp_path / "img")["fingerprint"]
    with pytest.raises(CacheError, match="built without videos") as e:
        check_cache_for_training(tmp_path / "img", tower.fingerprint(video_sampling=SAMPLING))
    assert "model.video: null" in str(e.value)
    # a tile size that is not the tower's input side is refused before anything is encoded
    with pytest.raises(TilingError, match="tile_size: 64 is not the input side"):
        build(config(data, tiny_models["vision"], tmp_path / "t64", tiling={**TILING, "tile_size": 64}))
    assert cache_cli.main(["build", "--image-list", str(tmp_path / "list.txt"), "--image-root",
                           str(data["media"]), "--vision-model", tiny_models["vision"],
                           "--out", str(tmp_path / "bad"), "--tiling", "[2, 2]"]) == 2


def test_info_shows_grids_views_frames_and_durations(tiled, untiled, capsys):
    cache = FeatureCache(tiled, max_open_shards=1)
    grids, views, frames = {}, [], []
    for key, layout in read_layouts(tiled).items():
        if layout["kind"] == "image":
            g = f"{layout['rows']}x{layout['cols']}"
            grids[g] = grids.get(g, 0) + 1
            views.append(cache.num_views(key))
        else:
            frames.append(cache.num_views(key))
    assert cache_cli.main(["info", str(tiled)]) == 0
    out = capsys.readouterr().out
    by_grid = ", ".join(f"{g}: {n}" for g, n in sorted(grids.items()))
    assert f"images by grid {by_grid}; views per image mean {sum(views) / len(views):g}" in out, out
    assert f"max {max(views)}" in out and "32 px tiles, 4 tokens per view" in out
    assert f"videos         {len(frames)} encoded (4 frames at most, 2 fps at most); frames per video " \
           f"mean {sum(frames) / len(frames):g}" in out, out
    assert "duration mean" in out and "failed to decode" in out
    assert cache_cli.main(["info", str(untiled)]) == 0
    out = capsys.readouterr().out
    assert "tiles " not in out and "frames per video" in out


def test_a_format_1_cache_still_reads(tiny_models, data, tower, tmp_path):
    """A cache from before views (format /1): shards of key + features only, keys.arrow of key,
    shard, row. Made here by stripping a fresh image-only cache back to that layout."""
    (tmp_path / "list.txt").write_text("".join(f"{r}\n" for r in IMAGES))
    new, old = tmp_path / "new", tmp_path / "old"
    build(BuildConfig(out=str(new), image_lists=[str(tmp_path / "list.txt")], shard_size=2,
                      image_root=str(data["media"]), vision_model=tiny_models["vision"], workers=0,
                      progress=False))
    shutil.copytree(new, old)
    manifest = json.loads((old / "manifest.json").read_text())

    def rewrite(rel, columns):
        t = pa.ipc.open_file(pa.memory_map(str(new / rel))).read_all()
        t = t.select(columns).replace_schema_metadata(t.schema.metadata)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, t.schema) as w:
            w.write_table(t)
        data_ = sink.getvalue().to_pybytes()
        (old / rel).write_bytes(data_)
        return {"bytes": len(data_), "sha256": hashlib.sha256(data_).hexdigest()}

    for entry in manifest["shards"]:
        entry.update(rewrite(entry["file"], ["key", "features"]))
    manifest["files"]["keys.arrow"] = rewrite("keys.arrow", ["key", "shard", "row"])
    manifest["files"]["index.arrow"] = rewrite("index.arrow", ["ref", "key"])
    manifest["format"] = "vlm_dist-feature-cache/1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    write_verified_stamp(old)
    cache = check_cache_for_training(old, tower.fingerprint(), max_open_shards=1)
    fresh = FeatureCache(new, max_open_shards=1)
    assert read_layouts(old) == {} and cache.tiling is None and cache.video_sampling is None
    for ref in IMAGES:
        key = cache.resolve(ref)
        assert cache.views(key).shape == (1, 16, 32) and cache.layout(key) is None
        assert torch.equal(cache[key], fresh[key]) and torch.equal(cache.views(key)[0], cache[key])
    with pytest.raises(CacheError, match="built without tiles"):
        check_cache_for_training(old, tower.fingerprint(tiling=tower.tiling_spec(TILING)))


def test_launched_ranks_with_tiles_and_videos_equal_one_process(tiled, data, tiny_models, tmp_path,
                                                                monkeypatch):
    """Rank 1 reads rank 0's plan (which recorded the video sampling) and checks it against its own
    arguments; the two slices make the one-process cache. A resume with other tiling is refused."""
    from vlm_dist.cache.build import BuildError

    out = tmp_path / "ranks"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BuildError, match="waiting for 1 shard"):
        build(config(data, tiny_models["vision"], out, tiling=dict(TILING), wait_timeout=0))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(BuildError, match="planned for another encoder"):      # other --frames
        build(config(data, tiny_models["vision"], out, tiling=dict(TILING),
                     video_sampling=FrameSampling(8, 2.0)))
    build(config(data, tiny_models["vision"], out, tiling=dict(TILING)))
    monkeypatch.setenv("RANK", "0")
    build(config(data, tiny_models["vision"], out, tiling=dict(TILING), wait_timeout=60))
    for rel in published(tiled):
        assert (out / rel).read_bytes() == (tiled / rel).read_bytes(), rel
    with pytest.raises(BuildError, match=r"differs in: fingerprint \(tiling\)"):
        build(config(data, tiny_models["vision"], out, tiling={**TILING, "tokens_per_tile": 8}))


def test_jpeg_draft_keeps_two_tiles_and_warns_for_larger_grids(tower):
    """The draft keeps both sides of a large JPEG >= 2x the input side: grids with more tiles than
    that across both sides are named (the build prints it), LLaVA-NeXT's default grids are not."""
    from vlm_dist.cache.build import draft_warning
    from vlm_dist.contract.tiling import grids_up_to

    assert tower.draft_to == 2 * tower.image_size
    assert draft_warning(tower, tower.tiling_spec(TILING)) is None
    assert draft_warning(tower, tower.tiling_spec({"tokens_per_tile": 4})) is None    # LLaVA-NeXT's
    many = tower.tiling_spec({"tokens_per_tile": 4, "grids": grids_up_to(16)})
    warning = draft_warning(tower, many)
    assert "grids 3x3, 3x4, 3x5, 4x3, 4x4, 5x3 span more than 2 tiles" in warning
    assert "--no-jpeg-draft" in warning


def test_view0_is_the_untiled_view_whatever_the_tiling_filter(data, tower):
    """The thumbnail view is made by the tower's own resize, not spec.resample: with a filter
    the processor does not use, view 0 still equals the untiled image's features."""
    from vlm_dist.contract.tiling import TilingSpec
    spec = TilingSpec(tile_size=tower.image_size, tokens_per_tile=4, grids=((1, 2), (2, 2)), resample="nearest")
    for ref in IMAGES:
        img = tower.decode(data["media"] / ref, name=ref)
        tiling, views = image_views(img, spec)
        assert torch.equal(tower.encode_views(views)[0], tower.encode_views([img])[0])
        assert all(v.size == (tower.image_size,) * 2 for v in views[1:])
