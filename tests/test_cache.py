"""Feature cache end to end on the tiny SigLIP: build, read back, verify, resume, split, refuse."""
import errno
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlm_dist.cache import cli as cache_cli
from vlm_dist.cache.build import BuildConfig, BuildError, build, finalize
from vlm_dist.cache.writer import build_lock
from vlm_dist.cache.reader import (CacheError, FeatureCache, check_cache_for_training, read_manifest,
                            verify_cache)
from vlm_dist.contract.images import load_image
from vlm_dist.model.vision import VisionTower
from vlm_dist.contract.records import write_records

REPO = Path(__file__).resolve().parents[1]
GOOD = [f"a{i}.png" for i in range(6)] + ["rgba.png", "cmyk.jpg", "grey/l.png"]
FINAL_FILES = ["manifest.json", "index.arrow", "keys.arrow", "failures.jsonl"]


def record(rid, images):
    return {"id": rid, "images": images, "conversations": [
        {"role": "user", "content": "<image>" * len(images) + " describe"},
        {"role": "assistant", "content": "shapes"}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Nine distinct images of several modes, a duplicate, a corrupt, a zero-byte and a missing file."""
    root = tmp_path_factory.mktemp("data")
    img = root / "images"
    (img / "grey").mkdir(parents=True)
    for i in range(6):
        Image.effect_mandelbrot((40 + 7 * i, 30 + 5 * i), (-2, -1.5, 1, 1.5), 10 + 5 * i) \
            .convert("RGB").save(img / f"a{i}.png")
    Image.new("RGBA", (24, 24), (0, 128, 255, 100)).save(img / "rgba.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(img / "cmyk.jpg")
    Image.linear_gradient("L").resize((50, 50)).save(img / "grey/l.png")
    shutil.copy(img / "a1.png", img / "dup.png")
    jpeg = io.BytesIO()
    Image.effect_mandelbrot((64, 64), (-2, -1.5, 1, 1.5), 30).convert("RGB").save(jpeg, "JPEG")
    (img / "corrupt.jpg").write_bytes(jpeg.getvalue()[:300])
    (img / "zero.jpg").write_bytes(b"")
    records = [record(f"r{i}", [name]) for i, name in enumerate(GOOD)]
    records += [record("dup", ["a1.png", "dup.png"]), record("bad", ["corrupt.jpg", "a0.png"]),
                record("zero", ["zero.jpg"]), record("gone", ["missing.jpg"])]
    write_records(root / "records.jsonl", records)
    return {"root": root, "images": img, "records": root / "records.jsonl"}


def config(data, vision, out, **kw):
    kw = {"shard_size": 3, "batch_size": 2, "workers": 0, "progress": False, **kw}
    return BuildConfig(out=str(out), records=[str(data["records"])], image_root=str(data["images"]),
                       vision_model=vision, **kw)


@pytest.fixture(scope="module")
def built(data, tiny_models, tmp_path_factory):
    """The reference: one process, decoding in two DataLoader workers."""
    out = tmp_path_factory.mktemp("cache") / "one"
    build(config(data, tiny_models["vision"], out, workers=2))
    return out


@pytest.fixture(scope="module")
def tower(tiny_models):
    """The encoder as `vlm-cache build` sets it up by default: JPEG draft decoding on."""
    tower = VisionTower.from_pretrained(tiny_models["vision"], feature_layer=-2, dtype=torch.bfloat16)
    tower.draft_to = tower.default_draft_to
    return tower


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "preprocess.cache_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, **kw)


def same_files(a: Path, b: Path):
    """The published files of two caches are byte-identical."""
    names = FINAL_FILES + sorted(p.name for p in (a / "shards").glob("*.arrow"))
    assert names == FINAL_FILES + sorted(p.name for p in (b / "shards").glob("*.arrow"))
    for name in names:
        rel = name if name in FINAL_FILES else f"shards/{name}"
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# -- reading back -------------------------------------------------------------------------------
def test_round_trip_equals_the_encoder_output(built, data, tower):
    cache = check_cache_for_training(built, tower.fingerprint(pool=1))
    assert cache.feature_shape == (tower.num_patches, tower.hidden_size) == (16, 32)
    for ref in GOOD:
        got = cache.features_for(ref)
        want = tower(tower.preprocess([tower.decode(data["images"] / ref)]))[0]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), ref
    key = cache.resolve("a2.png")
    assert cache[key].data_ptr() == cache[key].data_ptr()       # a view of the mapping, not a copy


def test_duplicates_are_encoded_once(built):
    cache = FeatureCache(built)
    assert cache.resolve("dup.png") == cache.resolve("a1.png")
    counts = read_manifest(built)["counts"]
    assert counts["unique_images"] == 11                        # 9 good + corrupt + zero-byte
    assert counts["encoded"] == len(cache) == len(set(cache.keys())) == 9
    assert sum(s["rows"] for s in read_manifest(built)["shards"]) == 9


def test_bad_files_are_listed_and_the_rest_succeed(built):
    cache = FeatureCache(built)
    by_name = {(f.get("paths") or [f.get("path")])[0]: f for f in cache.failures}
    assert set(by_name) == {"corrupt.jpg", "zero.jpg", "missing.jpg"}
    assert "truncated" in by_name["corrupt.jpg"]["reason"].lower() and by_name["corrupt.jpg"]["records"] == ["bad"]
    assert by_name["zero.jpg"]["reason"] == "zero-byte file" and by_name["zero.jpg"]["records"] == ["zero"]
    assert by_name["missing.jpg"]["records"] == ["gone"]
    assert read_manifest(built)["counts"]["records_with_failed_images"] == 3
    with pytest.raises(KeyError, match="zero-byte"):
        cache.features_for("zero.jpg")
    assert all(cache.resolve(r) in cache for r in GOOD + ["dup.png"])


class _Refs(Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(GOOD)

    def __getitem__(self, i):
        return self.cache.features_for(GOOD[i])


def test_reader_in_forked_workers_with_bounded_open_shards(built):
    cache = FeatureCache(built, max_open_shards=1)
    direct = torch.stack([cache.features_for(r) for r in GOOD])
    assert len(cache._open) == 1                                 # nine keys over three shards
    loaded = torch.cat(list(DataLoader(_Refs(cache), batch_size=4, num_workers=2)))
    assert torch.equal(loaded, direct)


@pytest.mark.parametrize("dtype,pool,shape", [("fp32", 2, (4, 32)), ("fp16", 1, (16, 32))])
def test_other_dtypes_and_pooling(data, tiny_models, tmp_path, dtype, pool, shape):
    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=dtype)      # full JPEG decode
    build(config(data, tiny_models["vision"], tmp_path / "c", pool=pool, dtype=dtype, jpeg_draft=False))
    cache = check_cache_for_training(tmp_path / "c", tower.fingerprint(pool=pool))
    assert cache.feature_shape == shape and read_manifest(tmp_path / "c")["pool"] == pool
    want = tower(tower.preprocess([load_image(data["images"] / "a3.png")]), pool=pool)[0]
    got = cache.features_for("a3.png")
    assert got.dtype == tower.dtype and torch.equal(got, want)


# -- refusing -----------------------------------------------------------------------------------
def test_fingerprint_mismatch_is_refused(built, tiny_models, tmp_path):
    from vlm_dist.testing.tiny import build_tiny_siglip

    other_layer = VisionTower.from_pretrained(tiny_models["vision"], feature_layer=-1)
    with pytest.raises(CacheError, match="feature_layer: cache 2, configured 3"):
        check_cache_for_training(built, other_layer.fingerprint())
    build_tiny_siglip(tmp_path / "other", seed=1)
    other_weights = VisionTower.from_pretrained(str(tmp_path / "other"))
    with pytest.raises(CacheError, match="weights_sha256") as e:
        check_cache_for_training(built, other_weights.fingerprint())
    assert "feature_layer" not in str(e.value) and "Rebuild the cache" in str(e.value)
    fp32 = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.float32)
    with pytest.raises(CacheError, match="dtype: cache \"bfloat16\", configured \"float32\""):
        check_cache_for_training(built, fp32.fingerprint())
    # what training asks for: this encoder, any dtype and pooling
    check_cache_for_training(built, VisionTower.expected_fingerprint(tiny_models["vision"], -2))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_broken_shard_fails_verify_and_training(built, tower, tmp_path, capsys, damage):
    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    assert verify_cache(cache) == []
    check_cache_for_training(cache, tower.fingerprint())            # the copy kept its stamp
    shard = cache / "shards" / "shard-000001.arrow"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":                   # one bit inside the feature values, not the metadata
        data = bytearray(shard.read_bytes())
        reader = FeatureCache(cache)
        row = reader[next(k for k in reader.keys() if reader._locate(k)[0] == 1)]
        at = data.find(row.view(torch.uint16).numpy().tobytes())
        assert at > 0
        data[at + 10] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    assert cache_cli.main(["verify", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "shard-000001.arrow" in err and "shard-000000.arrow" not in err, err
    with pytest.raises(CacheError, match="shard-000001.arrow"):
        check_cache_for_training(cache, tower.fingerprint())
    if damage == "flip":                     # same size: a re-run's finalize must not bless it
        finalize(cache)
        with pytest.raises(CacheError, match="shard-000001.arrow: modified"):
            check_cache_for_training(cache, tower.fingerprint())


def test_verify_command_exit_status_and_info(built, tmp_path, capsys):
    result = cli("verify", built)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    (cache / "shards" / "shard-000002.arrow").unlink()
    result = cli("verify", cache, "--quick")
    assert result.returncode == 1 and "shard-000002.arrow: missing" in result.stderr, result.stderr
    assert cache_cli.main(["info", str(built)]) == 0
    out = capsys.readouterr().out
    assert "16 patches x 32 dims" in out and "9 encoded" in out


def test_rerun_with_other_inputs_is_refused(built, data, tiny_models, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    with pytest.raises(BuildError, match="differs in: fingerprint"):
        build(config(data, tiny_models["vision"], cache, feature_layer=-1))


# -- resuming and splitting ---------------------------------------------------------------------
def test_kill_during_build_then_rerun_gives_the_same_cache(data, tiny_models, tmp_path):
    # bigger, slower-to-decode images so the kill lands mid-build
    rng = np.random.default_rng(0)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(48):
        Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(big / f"{i}.jpg")
    (tmp_path / "list.txt").write_text("".join(f"{i}.jpg\n" for i in range(48)))
    args = ["build", "--image-list", tmp_path / "list.txt", "--image-root", big,
            "--vision-model", tiny_models["vision"], "--shard-size", 4, "--batch-size", 4,
            "--workers", 0, "--no-progress"]
    ref = BuildConfig(out=str(tmp_path / "ref"), image_lists=[str(tmp_path / "list.txt")],
                      image_root=str(big), vision_model=tiny_models["vision"], shard_size=4,
                      batch_size=4, workers=0, progress=False)
    build(ref)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "preprocess.cache_cli", *map(str, args), "--out", out],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "shards" / "shard-000000.arrow"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (out / "manifest.json").exists(), "the build ended before the kill"
    assert len(list((out / "shards").glob("*.arrow"))) < 12

    assert cache_cli.main([*map(str, args), "--out", str(out)]) == 0      # the same command again
    assert read_manifest(out) == read_manifest(tmp_path / "ref")
    same_files(out, tmp_path / "ref")
    assert not list((out / "shards").glob("*.tmp.*"))


def test_two_processes_with_shard_index_equal_one_process(built, data, tiny_models, tmp_path):
    out = tmp_path / "split"
    common = ["build", "--records", data["records"], "--image-root", data["images"],
              "--vision-model", tiny_models["vision"], "--out", out, "--shard-size", 3,
              "--batch-size", 2, "--workers", 0, "--num-shards", 2, "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-m", "preprocess.cache_cli", *map(str, common),
                               "--shard-index", str(i)], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    assert not (out / "manifest.json").exists()
    assert cache_cli.main(["finalize", str(out)]) == 0
    same_files(out, built)


def test_launched_ranks_equal_one_process_and_rank0_finalizes(built, data, tiny_models, tmp_path,
                                                             monkeypatch):
    import vlm_dist.cache.build as cache_build

    out = tmp_path / "ranks"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")     # a torchrun-style launch (dist.discover reads it)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BuildError, match="waiting for 2 shard"):   # rank 1's part is missing
        build(config(data, tiny_models["vision"], out, wait_timeout=0))
    assert not (out / "manifest.json").exists()
    monkeypatch.setenv("RANK", "1")
    with monkeypatch.context() as m:        # rank 1 reads rank 0's plan: no file is hashed twice
        m.setattr(cache_build, "hash_ref", lambda *a: pytest.fail("rank 1 hashed an image"))
        build(config(data, tiny_models["vision"], out))
    assert not (out / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    build(config(data, tiny_models["vision"], out, wait_timeout=60))
    same_files(out, built)


# -- paths outside the image root, special files, huge files -----------------------------------
def test_paths_outside_the_root_and_special_files_are_listed_failures(data, tiny_models, tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    shutil.copy(data["images"] / "a0.png", root / "a0.png")
    secret = tmp_path / "secret.png"
    shutil.copy(data["images"] / "a1.png", secret)              # a real image, outside the root
    (root / "out.png").symlink_to(secret)
    (root / "sub" / "in.png").symlink_to(root / "a0.png")       # inside -> inside: fine
    os.mkfifo(root / "fifo.png")
    (root / "big.png").write_bytes(b"\0" * 200_001)
    write_records(tmp_path / "records.jsonl", [
        record("abs", [str(secret)]), record("up", ["../secret.png"]), record("link", ["out.png"]),
        record("zero", ["/dev/zero"]), record("fifo", ["fifo.png"]), record("big", ["big.png"]),
        record("ok", ["a0.png", "sub/in.png"])])
    (tmp_path / "list.txt").write_text("/etc/passwd\n../secret.png\n")
    out = tmp_path / "c"
    result = cli("build", "--records", tmp_path / "records.jsonl", "--image-list", tmp_path / "list.txt",
                 "--image-root", root, "--vision-model", tiny_models["vision"], "--out", out,
                 "--max-bytes", 200_000, "--workers", 0, "--no-progress",
                 timeout=600)                           # a build blocked on the FIFO fails here
    assert result.returncode == 0, result.stderr
    failures = {f["path"]: f for f in FeatureCache(out).failures}
    outside = "outside the image root"
    want = {str(secret): outside, "../secret.png": outside, "out.png": outside,
            "/dev/zero": outside, "/etc/passwd": outside, "fifo.png": "not a regular file",
            "big.png": "too large: 200001 bytes, over the limit of 200000"}
    assert set(failures) == set(want)
    assert all(failures[p]["reason"].startswith(r) for p, r in want.items()), failures
    assert failures["out.png"]["records"] == ["link"] and failures["/etc/passwd"]["records"] == []
    cache = FeatureCache(out)
    assert len(cache) == 1 and cache.resolve("sub/in.png") == cache.resolve("a0.png")
    assert read_manifest(out)["counts"]["unreadable_files"] == 7


# -- concurrent builds, a full disk -------------------------------------------------------------
def test_a_second_build_of_the_same_slice_is_refused_naming_the_holder(data, tiny_models, tmp_path):
    out = tmp_path / "c"
    with build_lock(out, 0, 1):                   # "another build" of the one slice
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        result = cli("build", "--records", data["records"], "--image-root", data["images"],
                     "--vision-model", tiny_models["vision"], "--out", out, "--no-progress")
        assert result.returncode == 1, result.stderr
        assert f"pid {os.getpid()} on {socket.gethostname()} since" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        # a build cut into two slices overlaps it: refused too, and nothing was written
        with pytest.raises(BuildError, match="different number of slices.*lock-00000-of-00001"):
            build(config(data, tiny_models["vision"], out, shard_index=1, num_shards=2))
        assert sorted(p.relative_to(out) for p in out.rglob("*")
                      if not p.name.startswith("lock-")) == [q for q in before
                                                             if not q.name.startswith("lock-")]
    build(config(data, tiny_models["vision"], out))   # once it is released, the build runs
    assert (out / "manifest.json").exists()


def test_disk_full_names_the_shard_and_the_free_space(data, tiny_models, tmp_path, monkeypatch):
    import vlm_dist.cache.writer as cache_io

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache_io._HashingFile, "write", full)
    out = tmp_path / "c"
    with pytest.raises(BuildError, match=r"shards/shard-000000\.arrow: no space left on device "
                                         r"\(\d+ bytes free on "):
        build(config(data, tiny_models["vision"], out))
    assert not list((out / "shards").glob("*"))        # no shard, no temporary file left
    monkeypatch.setattr(os, "fsync", lambda fd: full(None, b""))
    with pytest.raises(BuildError, match="x.json: no space left on device"):
        cache_io.write_bytes_atomic(tmp_path / "x.json", b"{}")
    assert not list(tmp_path.glob("x.json*"))


# -- what the quick check trusts ----------------------------------------------------------------
def test_quick_check_trusts_size_and_mtime_and_a_full_verify_does_not(built, tower, tmp_path, capsys):
    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    assert cache_cli.main(["info", str(cache)]) == 0
    info = capsys.readouterr().out
    assert "full SHA-256 check 20" in info and "checks only size and mtime" in info, info
    shard = cache / "shards" / "shard-000001.arrow"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    reader = FeatureCache(cache)
    row = reader[next(k for k in reader.keys() if reader._locate(k)[0] == 1)]
    data[data.find(row.view(torch.uint16).numpy().tobytes()) + 10] ^= 0x01   # a feature value
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))        # a flip that hides its tracks
    check_cache_for_training(cache, tower.fingerprint())          # the documented blind spot
    assert cache_cli.main(["verify", str(cache)]) == 1
    assert "shard-000001.arrow: SHA-256 differs" in capsys.readouterr().err


def test_an_image_list_with_bad_bytes_or_missing_is_named_by_file_and_line(tmp_path):
    import pytest

    from vlm_dist.cache.build import BuildConfig, collect_references
    from vlm_dist.contract.records import RecordError
    good = tmp_path / "list.txt"
    good.write_bytes(b"\xef\xbb\xbfa.png\n# a comment\nb.png\n")   # a BOM is read, not an error
    refs, _, n = collect_references(BuildConfig(out=str(tmp_path / "c"), image_lists=[str(good)]))
    assert sorted(refs) == ["a.png", "b.png"] and n == 2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a.png\nb.png\n\xff\xfe.png\n")
    with pytest.raises(RecordError, match=r"bad.txt:3: not UTF-8"):
        collect_references(BuildConfig(out=str(tmp_path / "c"), image_lists=[str(bad)]))
    with pytest.raises(RecordError, match=r"nope.txt: cannot read"):
        collect_references(BuildConfig(out=str(tmp_path / "c"), image_lists=[str(tmp_path / "nope.txt")]))


# -- open shards --------------------------------------------------------------------------------
def test_more_shards_than_the_old_bound_are_read_without_reopening(tmp_path):
    """Uniform access over 20 shards (how length-grouped batches draw): all stay mapped by default;
    the old fixed bound of 16 re-opened shards over and over."""
    from vlm_dist.benchmark.measure import write_random_cache
    keys = write_random_cache(tmp_path / "c", num_images=40, shard_size=2, feature_shape=(4, 8))
    order = keys * 3
    np.random.default_rng(0).shuffle(order)
    cache = check_cache_for_training(tmp_path / "c", {"feature_shape": [4, 8], "dtype": "bfloat16"})
    assert len(cache.manifest["shards"]) == 20 and cache.max_open_shards == 20
    first = {k: cache[k].clone() for k in keys}
    assert all(torch.equal(cache[k], first[k]) for k in order)
    assert cache.shard_opens == 20                              # each shard mapped once
    bounded = FeatureCache(tmp_path / "c", max_open_shards=16)
    for k in order:
        bounded[k]
    assert bounded.shard_opens > 20                             # re-opened again and again


def test_open_shard_budget_follows_the_descriptor_limit(monkeypatch):
    from vlm_dist.cache import reader
    limits = {"now": (1024, 1024)}
    monkeypatch.setattr(reader.resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(reader.resource, "setrlimit", lambda _, v: limits.update(now=v))
    assert reader.open_shard_budget(545) == 512                 # a hard limit of 1024: half of it
    assert reader.open_shard_budget(100) == 100
    limits["now"] = (1024, 1 << 20)
    assert reader.open_shard_budget(545) == 545                 # the soft limit is raised to fit
    assert limits["now"] == (545 + reader.FD_HEADROOM, 1 << 20)


# -- JPEG draft decoding: the cache, exports and online decoding agree ----------------------------
def large_jpeg(real_photos, path):
    """A real photo at 1600x1200 (JPEG, quality 90): far above 2x the tiny tower's 32 px input."""
    Image.open(real_photos[0]).convert("RGB").resize((1600, 1200), Image.BICUBIC).save(path, "JPEG", quality=90)


def export_with(tiny_export, out, **fields):
    """A copy of the tiny export whose vlm_config.json also has `fields` (as the trainer writes them)."""
    import json
    shutil.copytree(tiny_export, out)
    cfg = json.loads((out / "vlm_config.json").read_text())
    (out / "vlm_config.json").write_text(json.dumps(dict(cfg, **fields)))
    return out


def test_large_jpeg_features_through_the_cache_equal_an_export_towers_decode(tiny_models, tiny_export,
                                                                            real_photos, tmp_path):
    """Draft on by default: the cache records jpeg_draft_to, an export carrying it (what training writes:
    `cache.jpeg_draft_to`) decodes online exactly so, bit for bit; an export from before the field
    decodes in full, which gives other features, and its fingerprint check names the field."""
    from vlm_dist.cache.reader import fingerprint_differences
    from vlm_dist.inference.export import load_export
    from vlm_dist.inference.generate import Generator

    images = tmp_path / "images"
    images.mkdir()
    large_jpeg(real_photos, images / "big.jpg")
    (tmp_path / "list.txt").write_text("big.jpg\n")
    common = dict(image_lists=[str(tmp_path / "list.txt")], image_root=str(images),
                  vision_model=tiny_models["vision"], dtype="fp32", workers=0, progress=False)   # export: fp32
    build(BuildConfig(out=str(tmp_path / "draft"), **common))
    build(BuildConfig(out=str(tmp_path / "full"), jpeg_draft=False, **common))
    draft, full = FeatureCache(tmp_path / "draft"), FeatureCache(tmp_path / "full")
    assert draft.fingerprint["jpeg_draft_to"] == draft.jpeg_draft_to == 64      # 2 x 32 px
    assert full.fingerprint["jpeg_draft_to"] is full.jpeg_draft_to is None

    new = export_with(tiny_export, tmp_path / "export", jpeg_draft_to=draft.jpeg_draft_to)
    for export, cache in ((new, draft), (tiny_export, full)):     # tiny_export: no jpeg_draft_to field
        vlm, tokenizer, tower, cfg = load_export(export)
        assert cfg.jpeg_draft_to == tower.draft_to == cache.jpeg_draft_to
        gen = Generator(vlm, tokenizer, cfg, tower)
        online = gen.encode_images([tower.decode(images / "big.jpg", name="big.jpg")])[0]
        assert torch.equal(online, cache.features_for("big.jpg")), export
        assert fingerprint_differences(cache.fingerprint, tower.fingerprint(cfg.pool)) == []
    # the old export's full decode differs from the draft cache, and the check says why
    assert not torch.equal(online, draft.features_for("big.jpg"))
    assert fingerprint_differences(draft.fingerprint, tower.fingerprint(cfg.pool)) == [
        "jpeg_draft_to: cache 64, configured null"]


def test_a_cache_from_before_jpeg_draft_is_a_full_decode_cache(built, tower, tiny_models, tmp_path):
    """Rule: a fingerprint without jpeg_draft_to means a full decode. Training (which reads features
    only) takes any decode; a check against a tower compares the decode: a draft cache is refused for
    a full-decode tower and an old cache for a drafting one."""
    import json

    from vlm_dist.cache.reader import write_verified_stamp

    cache = tmp_path / "old"
    shutil.copytree(built, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["fingerprint"]["jpeg_draft_to"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    write_verified_stamp(cache)                                   # as `vlm-cache verify` left it
    assert FeatureCache(cache, max_open_shards=2).jpeg_draft_to is None

    full = VisionTower.from_pretrained(tiny_models["vision"], feature_layer=-2, dtype=torch.bfloat16)
    check_cache_for_training(cache, full.fingerprint())          # old cache = full-decode tower
    check_cache_for_training(cache, VisionTower.expected_fingerprint(tiny_models["vision"], -2))
    check_cache_for_training(built, VisionTower.expected_fingerprint(tiny_models["vision"], -2))
    with pytest.raises(CacheError, match="jpeg_draft_to: cache null, configured 64"):
        check_cache_for_training(cache, tower.fingerprint())
    with pytest.raises(CacheError, match="jpeg_draft_to: cache 64, configured null"):
        check_cache_for_training(built, full.fingerprint())


def test_resuming_a_build_with_another_jpeg_decode_is_refused_naming_the_flag(built, data, tiny_models,
                                                                              tmp_path):
    import json

    cache = tmp_path / "c"
    shutil.copytree(built, cache)
    with pytest.raises(BuildError, match="drop --no-jpeg-draft to resume it"):
        build(config(data, tiny_models["vision"], cache, jpeg_draft=False))
    # a build planned before the field existed was a full decode: it resumes with --no-jpeg-draft only
    plan_file = cache / "build" / "plan.json"
    plan = json.loads(plan_file.read_text())
    del plan["fingerprint"]["jpeg_draft_to"]
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(BuildError, match="add --no-jpeg-draft to resume it"):
        build(config(data, tiny_models["vision"], cache))
    assert cache_cli.main(["build", "--records", str(data["records"]), "--image-root", str(data["images"]),
                           "--vision-model", tiny_models["vision"], "--out", str(cache), "--shard-size", "3",
                           "--batch-size", "2", "--workers", "0", "--no-progress", "--no-jpeg-draft"]) == 0


def test_vlm_generate_decodes_with_the_export_towers_draft_and_names_a_bad_file_first(tiny_export, real_photos,
                                                                                      tmp_path, monkeypatch,
                                                                                      capsys):
    from vlm_dist.inference import export as export_mod
    from vlm_dist.inference.generate_cli import main as generate_main

    large_jpeg(real_photos, tmp_path / "big.jpg")
    export = export_with(tiny_export, tmp_path / "export", jpeg_draft_to=64)
    decoded = []
    real_decode = VisionTower.decode

    def decode(self, source, name=None, max_pixels=None):
        image = real_decode(self, source, name, max_pixels)
        decoded.append((self.draft_to, name, image.size))
        return image

    monkeypatch.setattr(VisionTower, "decode", decode)
    args = ["--model", str(export), "--prompt", "What is it?", "--max-new-tokens", "2", "--no-stream"]
    assert generate_main([*args, "--image", str(tmp_path / "big.jpg")]) == 0
    assert decoded == [(64, str(tmp_path / "big.jpg"), (200, 150))]     # the cache's 1/8-scale decode
    # an unusable file is named before the model loads
    (tmp_path / "text.jpg").write_text("not an image")
    monkeypatch.setattr(export_mod, "load_export", lambda *a, **k: pytest.fail("loaded the model"))
    capsys.readouterr()
    assert generate_main([*args, "--image", str(tmp_path / "text.jpg")]) == 2
    assert "text.jpg: not an image" in capsys.readouterr().err
