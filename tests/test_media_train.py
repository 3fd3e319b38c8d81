"""Tiles and video on the training side: slot counts, packing, truncation, lengths, the sampler,
and one record of each kind through a real tiny cache and a real training step.

Records mix untiled images, AnyRes-tiled images (thumbnail + tiles) and videos (one view per
sampled frame). The one rule checked throughout: a block has N slots per view, the collator
hands the connector one feature row per view, in slot order.

    python -m pytest tests/test_media_train.py -q
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_dist.cache.reader import FeatureCache
from vlm_dist.fileio import sha256_file

from vlm_dist.contract.prompt import IGNORE, PromptEncoder
from vlm_dist.contract.tiling import TilingSpec, plan_tiling
from vlm_dist.contract.video import VideoLayout
from vlm_dist.data import collate
from vlm_dist.data.sampler import VIDEO, LengthGroupedSampler, modality_of
from vlm_dist.model.vlm import check_media_slots, media_pad_ids

REPO = Path(__file__).resolve().parents[1]
T, TF, P, DV = 4, 2, 16, 32        # slots per image view, per video frame; patches, vision width
SPEC = TilingSpec(tile_size=32, tokens_per_tile=T, grids=((1, 2), (2, 2)))
WIDE = plan_tiling(64, 30, SPEC)     # 1 x 2 grid: thumbnail + 2 tiles
BIG = plan_tiling(64, 64, SPEC)      # 2 x 2 grid: thumbnail + 4 tiles
SMALL = plan_tiling(20, 20, SPEC)    # fits one tile: 1x1, the plain block (1 view)
CLIP = VideoLayout((0.1, 0.5, 0.9), 5, 1.0, (64, 48))   # 3 sampled frames


def layout_dict(layout):
    d = layout.to_dict()
    return d if "kind" in d else {"kind": "image", **d}


def views_of(layout) -> int:
    return 1 if layout is None else layout.num_views


def record(rid, images=(), videos=(), prompt="", answer="It is a thing.", extra=""):
    return {"id": rid, "images": list(images), "videos": list(videos),
            "conversations": [{"role": "user", "content": prompt + extra},
                              {"role": "assistant", "content": answer}]}


# Four records: untiled + tiled images with a video; tiled only; a video only; text only.
RECORDS = [
    (record("mixed", ["a.png", "w.png"], ["v.mp4"], "<image> and <image> then <video> what?"),
     {"image": [None, WIDE], "video": [CLIP]}),
    (record("tiled", ["b.png"], (), "Look: <image> small text?", "Yes."), {"image": [BIG]}),
    (record("clip", (), ["u.mp4"], "<video> when?", "At 0.5s."), {"video": [CLIP]}),
    (record("text", (), (), "No media here.", "Fine."), {}),
]


def features(key: str, views: int) -> torch.Tensor:
    """Distinct features per (key, view): view v of key k is filled with hash-derived values."""
    g = torch.Generator().manual_seed(sum(map(ord, key)))
    base = torch.randn(1, P, DV, generator=g)
    return base + torch.arange(views).view(-1, 1, 1) * 0.1      # (V, P, D)


@pytest.fixture(scope="module")
def encoded(tokenizer):
    enc = PromptEncoder(tokenizer, "chatml", {"image": T, "video": TF})
    samples, views = [], {}
    for rec, lay in RECORDS:
        s = enc.encode(rec, layouts=lay)
        for kind, field in (("image", "images"), ("video", "videos")):
            for k, ref in enumerate(rec[field]):
                views[ref] = views_of(lay[kind][k])
        samples.append(s)
    # an untiled image's lookup gives (P, D) (view 0), every other (V, P, D)
    lookup = {ref: (features(ref, 1)[0] if n == 1 and ref.endswith(".png") else features(ref, n))
              for ref, n in views.items()}
    return dict(enc=enc, samples=samples, views=views, lookup=lookup)


def test_slot_counts_equal_the_encoders_and_the_collators(tokenizer, encoded):
    enc, samples, views = encoded["enc"], encoded["samples"], encoded["views"]
    pads = media_pad_ids(tokenizer)
    for s in samples:
        want = {"image": sum(views[r] for r in s.image_keys), "video": sum(views[r] for r in s.video_keys)}
        assert enc.count_slots(s.input_ids) == want, s.id
    assert enc.count_slots(samples[0].input_ids) == {"image": 1 + 3, "video": 3}
    assert enc.count_slots(samples[1].input_ids) == {"image": 5, "video": 0}
    lookup = encoded["lookup"].__getitem__
    batch = collate([[samples[0], samples[3]], [samples[1]], [samples[2]]], {"image": lookup, "video": lookup},
                    tokenizer.pad_token_id, 512, feature_shape=(P, DV), pad_ids=pads)
    media = batch["media"]
    assert media["image"]["counts"].tolist() == [4, 5, 0] and media["video"]["counts"].tolist() == [3, 0, 3]
    assert media["image"]["features"].shape == (9, P, DV) and media["video"]["features"].shape == (6, P, DV)
    for kind in ("image", "video"):
        n = T if kind == "image" else TF
        assert len(media[kind]["slots"]) == int(media[kind]["counts"].sum()) * n
        assert (batch["input_ids"].reshape(-1)[media[kind]["slots"]] == pads[kind]).all()
    # the model's own check: N slots per view of each kind, row by row
    check_media_slots(batch["input_ids"], media, pads, {"image": T, "video": TF}, batch["sample_ids"])
    # feature rows in slot order: a.png's one view, w.png's thumbnail + 2 tiles, then b.png's 5 views
    want = torch.cat([encoded["lookup"]["a.png"][None], encoded["lookup"]["w.png"], encoded["lookup"]["b.png"]])
    assert torch.equal(media["image"]["features"], want)
    assert torch.equal(media["video"]["features"], torch.cat([encoded["lookup"]["v.mp4"],
                                                              encoded["lookup"]["u.mp4"]]))
    # a video in a batch whose lookups know only images is named, not silently dropped
    with pytest.raises(ValueError, match="'clip' has video items but collate was given no video lookup"):
        collate([[samples[2]]], {"image": lookup}, 0, 512, feature_shape=(P, DV))


def test_one_view_more_or_less_is_caught_by_the_slot_check(tokenizer, encoded):
    samples, pads = encoded["samples"], media_pad_ids(tokenizer)
    short = dict(encoded["lookup"], **{"b.png": encoded["lookup"]["b.png"][:4]})   # a tile missing
    batch = collate([[samples[1]]], {"image": short.__getitem__}, 0, 512, feature_shape=(P, DV), pad_ids=pads)
    from vlm_dist.model.vlm import SpliceError
    with pytest.raises(SpliceError, match="sample\\(s\\) \\['tiled'\\]: 20 image slots"):
        check_media_slots(batch["input_ids"], batch["media"], pads, {"image": T, "video": TF},
                          batch["sample_ids"])


def test_truncation_never_splits_a_tiled_block_or_a_video(tokenizer):
    enc = PromptEncoder(tokenizer, "chatml", {"image": T, "video": TF})
    turns = ["hello", "hi there", "intro <image> middle", "an image", "then <video> outro", "a video"]
    rec = {"id": "long", "images": ["b.png"], "videos": ["v.mp4"],
           "conversations": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                             for i, t in enumerate(turns)]}
    lay = {"image": [BIG], "video": [CLIP]}
    full = enc.encode(rec, layouts=lay)
    starts = {enc.blocks["image"].start, enc.blocks["video"].start}
    ends = {enc.blocks["image"].end, enc.blocks["video"].end}
    seen_cut_inside = 0
    for max_len in range(1, len(full)):
        try:
            s = enc.encode(rec, max_len, truncate=True, layouts=lay)
        except Exception as e:          # cut before any supervised token: no sample
            assert getattr(e, "reason", None) == "no_supervision", e
            continue
        ids = s.input_ids
        assert len(ids) <= max_len and ids == full.input_ids[:len(ids)]
        n_start, n_end = sum(t in starts for t in ids), sum(t in ends for t in ids)
        assert n_start == n_end, f"max_len={max_len}: a block is split"
        kept = {"image": views_of(BIG) if s.image_keys else 0, "video": CLIP.num_views if s.video_keys else 0}
        assert enc.count_slots(ids) == kept, max_len
        seen_cut_inside += len(ids) < max_len
    assert seen_cut_inside >= len(enc.block("image", BIG)) + len(enc.block("video", CLIP)) - 2



def test_lengths_use_the_layouts_per_reference_and_drop_nothing_silently(tokenizer, tiny_models, tmp_path):
    """tokenize_records with layouts (as the cache stores them): each sample equals the encoder's
    own with those layouts; a video without a layout is a 1-frame placeholder; the layouts are
    part of the lengths-cache key; summarize reports videos and media tokens."""
    from vlm_dist.data import lengths as L
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in RECORDS))
    layouts = {"w.png": layout_dict(WIDE), "b.png": layout_dict(BIG), "v.mp4": CLIP.to_dict(),
               "u.mp4": CLIP.to_dict()}
    tokens = {"image": T, "video": TF}
    table = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", tokens, 512, num_workers=2,
                               layouts=layouts, progress=False)
    enc = PromptEncoder(tokenizer, "chatml", tokens)
    for i, (rec, lay) in enumerate(RECORDS):
        want, got = enc.encode(rec, layouts=lay), table.sample(i)
        assert (got.input_ids, got.labels, got.media) == (want.input_ids, want.labels, want.media), rec["id"]
    s = L.summarize(table)
    assert s["images"] == 3 and s["videos"] == 2 and s["text_only_records"] == 1
    slots = [len(x) and sum(t in (enc.blocks["image"].pad, enc.blocks["video"].pad) for t in x)
             for x in table.table.column("input_ids").to_pylist()]
    assert s["media_tokens"]["total"] == sum(slots) == (4 * T + 3 * TF) + 5 * T + 3 * TF
    assert s["media_tokens"]["max_per_sample"] == max(slots)
    assert "2 videos" in L.format_summary("r", s) and "media tokens per sample" in L.format_summary("r", s)
    # another layout for one reference is another lengths cache; no layout for a video: one frame
    other = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", tokens, 512, num_workers=1,
                               layouts={k: v for k, v in layouts.items() if k != "u.mp4"}, progress=False)
    assert other.cache_path != table.cache_path
    assert enc.count_slots(other.sample(2).input_ids)["video"] == 1
    untiled = L.tokenize_records(path, tiny_models["tokenizer"], "chatml", tokens, 512, num_workers=1,
                                 layouts={"v.mp4": CLIP.to_dict(), "u.mp4": CLIP.to_dict()}, progress=False)
    assert enc.count_slots(untiled.sample(1).input_ids)["image"] == 1


def test_truncation_that_would_cut_a_video_is_too_long(tiny_models, tmp_path):
    from vlm_dist.data import lengths as L
    turns = ["hello", "hi", "word " * 30 + "<video>", "Yes."]     # the cut keeps "hi" supervised
    rec = {"id": "vid-late", "videos": ["v.mp4"],
           "conversations": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                             for i, t in enumerate(turns)]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    table = L.tokenize_records(path, tiny_models["tokenizer"], "plain", {"image": T, "video": TF}, 40,
                               truncate=True, num_workers=1, layouts={"v.mp4": CLIP.to_dict()}, progress=False)
    (p,) = table.problems()
    assert p["reason"] == "too_long" and "1 video block(s)" in p["detail"]


def test_video_rows_group_together_in_the_sampler(encoded):
    samples = encoded["samples"] * 6
    assert [modality_of(len(s.image_keys), len(s.video_keys)) for s in encoded["samples"]] == [VIDEO, 1, VIDEO, 0]
    sampler = LengthGroupedSampler.from_samples(samples, world_size=1, rank=0, max_seq_len=256,
                                                rows_per_micro=1, packing=True, seed=0)
    mixed = 0
    for mb in sampler.micro_batches(0):
        kinds = {sampler.modalities[i] == VIDEO for i in mb.indices}
        mixed += len(kinds) > 1
    assert sampler.stats(0)["mixed_modality_steps"] == mixed <= 1   # only the epoch's tail may mix


# ------------------------------------------------------------------------------------ the model
def make_vlm(tiny_models, tokenizer):
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32, attn_implementation="sdpa")
    vlm = build_vlm(llm, tokenizer, DV, P, dict(num_latents=T, depth=1, heads=4), dtype=torch.float32,
                    video_tokens_per_frame=TF)
    set_trainable(vlm, "frozen")
    return vlm


def test_packed_loss_with_tiles_and_video_equals_each_sample_alone(tiny_models, tokenizer, encoded):
    """A packed batch of tiled, untiled, video and text samples: its loss and the connectors'
    gradients equal the sums over every sample on its own row (as test_attention shows for images)."""
    samples, pads = encoded["samples"], media_pad_ids(tokenizer)
    lookup = encoded["lookup"].__getitem__
    lookups = {"image": lookup, "video": lookup}

    def batch(rows, **kw):
        return collate(rows, lookups, tokenizer.pad_token_id, 512, feature_shape=(P, DV), pad_ids=pads, **kw)

    packed_vlm, ref = make_vlm(tiny_models, tokenizer), make_vlm(tiny_models, tokenizer)
    packed = packed_vlm(**batch([[samples[0], samples[2]], [samples[1], samples[3]]]))["loss_sum"]
    packed.backward()
    total = 0.0
    for s in samples:
        alone = batch([[s]], pad_to_multiple=1)
        del alone["cu_seqlens"], alone["max_seqlen"]         # plain causal attention: the reference
        loss = ref(**alone)["loss_sum"]
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(packed.detach(), total, atol=1e-4, rtol=1e-5)
    got = {n: p.grad for n, p in packed_vlm.connectors.named_parameters()}
    want = {n: p.grad for n, p in ref.connectors.named_parameters()}
    for kind in ("image", "video"):
        assert any(g.abs().sum() > 0 for n, g in want.items() if n.startswith(kind)), kind
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------- a real cache and a real step
def write_clip(path, n=10, fps=5):
    """A 2-second mpeg4 clip whose colour changes every frame (as tests/test_video.py writes them)."""
    import av
    import numpy as np
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            arr = np.empty((48, 64, 3), np.uint8)
            arr[...] = (20 * i, 255 - 20 * i, 128)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


TILING_JSON = json.dumps({"grids": [[1, 2], [2, 2]], "tokens_per_tile": T})
MODEL_FLAGS = ["--model.dtype=float32", f"--model.num_latents={T}", "--model.resampler_depth=1",
               "--model.resampler_heads=4", "--model.tiling={grids: [[1,2],[2,2]]}",
               f"--model.video={{num_frames: 3, max_fps: 4, tokens_per_frame: {TF}}}"]


@pytest.fixture(scope="module")
def media_cache(tiny_models, tmp_path_factory):
    """Records with a tiled (1x2) image, an untiled one, a video, and a broken video; their cache
    built by `vlm-cache build --tiling ... --frames 3 --max-fps 4`."""
    from PIL import Image
    root = tmp_path_factory.mktemp("media_train")
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (64, 30), (200, 10, 10)).save(data / "wide.png")     # 1 x 2 grid: 3 views
    Image.new("RGB", (20, 20), (10, 200, 10)).save(data / "small.png")    # fits one tile: 1 view
    write_clip(data / "clip.mp4")                                          # 3 frames sampled
    (data / "broken.mp4").write_bytes(b"")
    recs = [record("mix", ["wide.png", "small.png"], ["clip.mp4"], "<image> <image> then <video> what?",
                   "A red box, then colours."),
            record("tiled", ["wide.png"], (), "<image> what colour?", "Red."),
            record("clip", (), ["clip.mp4"], "<video> when does it turn blue?", "At 1.0s."),
            record("broken", (), ["broken.mp4"], "<video> what?", "Nothing.")]
    (data / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    subprocess.run([sys.executable, "-m", "preprocess.cache_cli", "build", "--records", str(data / "r.jsonl"),
                    "--image-root", str(data), "--vision-model", tiny_models["vision"], "--out", str(root / "cache"),
                    "--dtype", "fp32", "--workers", "0", "--no-progress", "--tiling", TILING_JSON,
                    "--frames", "3", "--max-fps", "4"], check=True, capture_output=True, cwd=REPO)
    return {"root": root, "records": data / "r.jsonl", "cache": root / "cache", **tiny_models}


def config_for(media_cache, out, tiled=True):
    from vlm_dist.config import load_config
    flags = MODEL_FLAGS if tiled else [f for f in MODEL_FLAGS if not f.startswith("--model.tiling")]
    return load_config(REPO / "launch" / "configs" / "stage1_align.yaml", [
        f"--model.llm={media_cache['llm']}", f"--model.vision={media_cache['vision']}", *flags,
        f"--data.cache={media_cache['cache']}", f"--data.records={media_cache['records']}",
        "--data.max_seq_len=160", "--data.num_workers=0", "--data.eval_fraction=0",
        f"--train.output_dir={out}", "--train.max_steps=1", "--train.epochs=null"])


def test_training_samples_have_a_slot_per_cached_view(media_cache, tokenizer, tmp_path):
    """The training set built from the real cache: each sample's slots are the views the cache
    holds for its keys; the loop's lookups feed exactly those rows; an untiled config reads
    view 0 of the same tiled cache and lays every image out as one view."""
    from vlm_dist.cache.reader import FeatureCache
    from vlm_dist.data.samples import load_training_set
    from vlm_dist.training.loop import feature_lookups

    cache = FeatureCache(media_cache["cache"])
    common = dict(tokenizer_path=media_cache["tokenizer"], template="plain", max_seq_len=160, truncate=False,
                  cache=cache, seed=0, log=lambda *_: None, num_workers=1)
    train, _, report = load_training_set(config_for(media_cache, tmp_path).data.records,
                                         num_tokens={"image": T, "video": TF}, tiled=True, video=True, **common)
    assert report.kept == 3 and dict(report.dropped) == {"video_failed": 1}
    enc = PromptEncoder(tokenizer, "plain", {"image": T, "video": TF})
    cfg = config_for(media_cache, tmp_path)
    lookups = feature_lookups(cfg, cache)
    pads = media_pad_ids(tokenizer)
    by_id = {train[i].id: train[i] for i in range(len(train))}
    assert enc.count_slots(by_id["mix"].input_ids) == {"image": 3 + 1, "video": 3}
    for s in by_id.values():
        want = {kind: sum(cache.views(k).shape[0] for k in s.media.get(kind, [])) for kind in ("image", "video")}
        assert enc.count_slots(s.input_ids) == want, s.id
        batch = collate([[s]], lookups, 0, 160, feature_shape=cache.feature_shape, pad_ids=pads)
        check_media_slots(batch["input_ids"], batch["media"], pads, {"image": T, "video": TF}, [[s.id]])
    # untiled config, same (tiled) cache: one view per image, its thumbnail
    untiled, _, _ = load_training_set(cfg.data.records, num_tokens={"image": T, "video": TF}, tiled=False,
                                      video=True, **common)
    s = next(untiled[i] for i in range(len(untiled)) if untiled[i].id == "mix")
    assert enc.count_slots(s.input_ids) == {"image": 2, "video": 3}
    cfg_untiled = config_for(media_cache, tmp_path, tiled=False)
    key = s.image_keys[0]
    assert torch.equal(feature_lookups(cfg_untiled, cache)["image"](key), cache.views(key)[0])
    # records with videos and no video connector: the run stops naming the fix
    from vlm_dist.data.lengths import SupervisionError
    with pytest.raises(SupervisionError, match="have videos .* set model.video"):
        load_training_set(cfg.data.records, num_tokens=T, tiled=True, video=False, **common)


def test_one_training_step_on_tiles_and_video(media_cache, tmp_path):
    """launch/train.py on the real cache (one rank, ZeRO-2 on the CPU): a finite loss, the
    broken video dropped and listed, and an export with both connectors and the layouts' settings."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    args = [f"--model.llm={media_cache['llm']}", f"--model.vision={media_cache['vision']}",
            f"--data.cache={media_cache['cache']}", f"--data.records={media_cache['records']}"]
    args += MODEL_FLAGS + ["--data.max_seq_len=160", "--data.num_workers=0", "--data.eval_fraction=0",
                           f"--train.output_dir={out}", "--train.max_steps=1", "--train.epochs=null",
                           "--train.micro_batch_size=2", "--train.log_every=1", "--checkpoint.every=0"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed",
                           str(REPO / "ds_configs" / "zero2.json"), "--config",
                           str(REPO / "launch" / "configs" / "stage1_align.yaml"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in rows if r["kind"] == "train"]
    assert step["step"] == 1 and torch.isfinite(torch.tensor(step["loss"])) and step["grad_norm"] > 0
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [(d["id"], d["reason"]) for d in dropped] == [("broken", "video_failed")]
    exported = json.loads((out / "export" / "vlm_config.json").read_text())
    assert exported["tiling"]["tokens_per_tile"] == T and exported["video"]["num_frames"] == 3
    weights = load_file(out / "export" / "connector.safetensors")
    assert any(k.startswith("video.") for k in weights) and any(k.startswith("image.") for k in weights)
    # the trained export generates from the same video, decoded online as the cache decoded it
    from vlm_dist.inference.export import load_export
    from vlm_dist.inference.generate import GenerationSettings, Generator
    vlm, tok, tower, ecfg = load_export(out / "export", "cpu", torch.float32)
    gen = Generator(vlm, tok, ecfg, tower)
    video = gen.decode_video(str(media_cache["root"] / "data" / "clip.mp4"))
    cache = FeatureCache(media_cache["cache"])
    key = sha256_file(media_cache["root"] / "data" / "clip.mp4")
    assert list(video.timestamps) == cache.layout(key)["timestamps"]
    media, layouts = gen.encode_media([], [video])
    torch.testing.assert_close(media["video"]["features"], cache.views(key).float(), rtol=0, atol=0)
    turns = [{"role": "user", "content": "<video> when does it turn blue?"}]
    text = gen.generate(turns, media, GenerationSettings(max_new_tokens=4), layouts=layouts)
    assert isinstance(text, str)
