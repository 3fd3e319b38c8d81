"""Tiles and video after training: export, vlm-generate, vlm-serve, the lmms-eval model, vlm-export hf.

A tiny export trained-looking with AnyRes tiling (32 px tiles, 4 tokens each) and a video connector
(3 tokens per frame, 4 frames) is written by the trainer's own write_export. The evidence: the
prompt block and features a tiled image or a video gets at generation equal what training builds
for the same record from the feature cache (PromptEncoder.encode with the cache's layouts,
the cache's rows); a video goes through generation and vlm-serve (official openai client) and a
truncated one is a 400 naming the part; vlm-export hf refuses these models, saying what carries them.
"""
import base64
import json

import av
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from vlm_dist.contract.prompt import PromptEncoder
from vlm_dist.contract.tiling import TilingSpec, tile_image
from vlm_dist.contract.video import FrameSampling, VideoLayout
from vlm_dist.inference.export import ExportError, load_export, media_fields, read_export_config
from vlm_dist.inference.generate import GenerationSettings, Generator

from test_serve import start   # uvicorn serving an app on a free port in a thread

SPEC = TilingSpec(tile_size=32, tokens_per_tile=4, grids=((1, 2), (2, 1), (2, 2)))
SAMPLING = FrameSampling(num_frames=4, max_fps=8.0)
TPF = 3           # video tokens per frame
MODEL = "tiny-media"


def build_media_export(out_dir, models: dict, seed: int = 0) -> str:
    """build_tiny_export's recipe plus a video connector and the tiling/video entries of vlm_config.json."""
    from transformers import AutoTokenizer

    from vlm_dist.config.schema import LoraConfig
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable
    from vlm_dist.model.vision import VisionTower
    from vlm_dist.training.checkpoint import write_export

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(models["tokenizer"])
    tower = VisionTower.from_pretrained(models["vision"], feature_layer=-2, dtype=torch.float32)
    num_patches, vision_dim = tower.feature_shape(1)
    llm = load_llm(models["llm"], "lora", dtype=torch.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    vlm = build_vlm(llm, tokenizer, vision_dim=vision_dim, num_patches=num_patches, dtype=torch.float32,
                    connector=dict(kind="resampler", use_layernorm=True, num_latents=SPEC.tokens_per_tile,
                                   depth=1, heads=4), video_tokens_per_frame=TPF)
    set_trainable(vlm, "lora")
    with torch.no_grad():   # give LoRA B, the LayerNorms and the video connector a real, distinct effect
        for name, p in vlm.named_parameters():
            if "lora_B" in name or ("connectors" in name and "norm" in name) or "connectors.video" in name:
                p.add_(torch.randn_like(p) * 0.3)
    vlm.eval()
    config = {"llm": models["llm"], "vision": models["vision"], "feature_layer": -2, "pool": 1,
              "template": "chatml", "num_media_tokens": vlm.num_tokens["image"], "vision_dtype": "float32",
              **media_fields(SPEC, SAMPLING, TPF)}
    write_export(vlm, out_dir, config, "lora", is_main=True, tokenizer=tokenizer)
    return str(out_dir)


def write_clip(path, n: int = 8, fps: int = 4, size=(48, 40)) -> bytes:
    """An mpeg4 clip whose frame i is a flat colour with red level 25 * i (as tests/test_video.py)."""
    w, h = size
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "1"}
        for i in range(n):
            arr = np.empty((h, w, 3), np.uint8)
            arr[...] = (25 * i, 255 - 25 * i, 90)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def wide_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def media_export(tiny_models, tmp_path_factory):
    return build_media_export(tmp_path_factory.mktemp("media_export") / "export", tiny_models)


@pytest.fixture(scope="module")
def gen(media_export):
    vlm, tokenizer, tower, cfg = load_export(media_export, device="cpu")
    return Generator(vlm, tokenizer, cfg, tower)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_clip(path)
    return path


def test_export_records_tiling_and_video_and_old_exports_load_as_before(media_export, gen, tiny_export):
    cfg = read_export_config(media_export)
    assert cfg.tiling_spec == SPEC and cfg.video_sampling == SAMPLING and cfg.video_tokens_per_frame == TPF
    assert gen.vlm.num_tokens == {"image": 4, "video": TPF}
    # the video connector is the trained one, not re-initialised from the image connector
    from safetensors.torch import load_file
    saved = load_file(f"{media_export}/connector.safetensors")
    for name, t in gen.vlm.connectors.state_dict().items():
        assert torch.equal(t, saved[name]), name
    assert any(k.startswith("video.") for k in saved)
    old = read_export_config(tiny_export)
    assert old.tiling is None and old.video is None and old.tiling_spec is None and old.video_sampling is None
    vlm, tok, tower, cfg = load_export(tiny_export, device="cpu", with_vision=False)
    assert set(vlm.connectors) == {"image"}


def test_export_config_mistakes_name_the_file(media_export, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(media_export, bad)
    d = json.loads((bad / "vlm_config.json").read_text())
    for change, words in [({"tiling": {**d["tiling"], "tokens_per_tile": 9}}, "tokens_per_tile=9"),
                          ({"tiling": {**d["tiling"], "rule": "internvl"}}, "tiling.rule"),
                          ({"video": {**d["video"], "frames": 3}}, "unknown key"),
                          ({"video": None}, "video connector of 3 tokens per frame")]:
        (bad / "vlm_config.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(ExportError) as e:
            load_export(bad, device="cpu", with_vision=False)
        assert words in str(e.value) and "bad" in str(e.value), (change, str(e.value))


def test_tiled_image_and_video_generation_equal_training(gen, clip):
    """Block and features at generation == PromptEncoder.encode of the record with the cache's layouts
    and the tower's features on tile_image's crops / the sampled frames (the cache's encode_views)."""
    img = wide_image()
    video = gen.decode_video(str(clip), name="clip.mp4")
    assert len(video.frames) == 4 and video.num_available == 8
    media, layouts = gen.encode_media([img], [video])
    tiling = layouts["image"][0]
    assert (tiling.rows, tiling.cols) == (1, 2) and tiling.num_views == 3
    # features: thumbnail then tiles, exactly the tower on tile_image's crops; frames in time order
    _, thumb, tiles = tile_image(img, SPEC)
    assert torch.equal(media["image"]["features"], gen.tower.encode_views([thumb] + tiles))
    assert torch.equal(media["video"]["features"], gen.tower.encode_views(video.frames))
    assert media["image"]["counts"].tolist() == [3] and media["video"]["counts"].tolist() == [4]
    # the untiled view of the same image is the thumbnail: what an untiled export reads
    assert torch.equal(gen.encode_images([img])[0], media["image"]["features"][0])
    # the prompt: training's ids for the same record, layouts given as the cache stores them
    turns = [{"role": "user", "content": "<image>\nand <video>\nWhat changes?"}]
    record = {"id": "r", "images": ["a.png"], "videos": ["clip.mp4"],
              "conversations": turns + [{"role": "assistant", "content": "The colour."}]}
    cache_layouts = {"image": [{"kind": "image", **tiling.to_dict()}], "video": [VideoLayout.of(video).to_dict()]}
    train = PromptEncoder(gen.tokenizer, "chatml", {"image": 4, "video": TPF}).encode(record, layouts=cache_layouts)
    ids, n_images = gen.prompt_ids(turns, layouts)
    assert n_images == 1 and ids == train.input_ids[:len(ids)]
    pads = gen.encoder.count_slots(ids)
    assert pads == {"image": 3, "video": 4}
    # generation runs with them, greedy twice the same; the untiled path is refused for a tiled export
    settings = GenerationSettings(max_new_tokens=6)
    out = gen.generate_ids(turns, media, settings, layouts=layouts)
    assert out == gen.generate_ids(turns, media, settings, layouts=layouts) and len(out) > 0
    with pytest.raises(ValueError, match="tiled"):
        gen.generate_ids([{"role": "user", "content": "<image>\nHi"}], gen.encode_images([img]), settings)
    with pytest.raises(ValueError, match="1 <video> placeholder"):
        gen.generate_ids(turns, media, settings, layouts={"image": layouts["image"], "video": []})


@pytest.fixture(scope="module")
def built_cache(tiny_models, clip, tmp_path_factory):
    """(image root, records file, cache dir): a record with the wide image and the clip, its cache
    built by vlm-cache with the export's tiling and frame sampling."""
    from vlm_dist.cache.cli import main as cache_main

    tmp = tmp_path_factory.mktemp("media_cache")
    root = tmp / "data"
    root.mkdir()
    wide_image().save(root / "a.png")
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    records = tmp / "r.jsonl"
    records.write_text(json.dumps({
        "id": "r", "images": ["a.png"], "videos": ["clip.mp4"], "conversations": [
            {"role": "user", "content": "<image>\n<video>\nWhat changes?"},
            {"role": "assistant", "content": "The colour."}]}) + "\n")
    fields = {k: v for k, v in SPEC.fingerprint().items() if k in ("grids", "tokens_per_tile", "token_budget")}
    assert cache_main(["build", "--records", str(records), "--image-root", str(root),
                       "--vision-model", tiny_models["vision"], "--out", str(tmp / "cache"),
                       "--dtype", "fp32", "--workers", "0", "--no-progress", "--tiling", json.dumps(fields),
                       "--frames", str(SAMPLING.num_frames), "--max-fps", str(SAMPLING.max_fps)]) == 0
    return root, records, tmp / "cache"


def test_cached_tiles_and_frames_equal_online(gen, built_cache):
    """The feature cache built with the export's tiling and sampling holds exactly the rows and
    layouts generation computes online."""
    from vlm_dist.cache.reader import FeatureCache, read_layouts

    root, _, cache_dir = built_cache
    cache = FeatureCache(cache_dir)
    img = gen.tower.decode(root / "a.png")
    media, layouts = gen.encode_media([img], [gen.decode_video(str(root / "clip.mp4"))])
    keys = {lay["kind"]: k for k, lay in read_layouts(cache_dir).items()}
    assert torch.equal(cache.views(keys["image"]), media["image"]["features"])
    assert torch.equal(cache.views(keys["video"]), media["video"]["features"])
    assert cache.layout(keys["image"]) == {"kind": "image", **layouts["image"][0].to_dict()}
    assert VideoLayout.from_dict(cache.layout(keys["video"])) == layouts["video"][0]


def test_vlm_eval_reads_tiles_and_frames_from_the_cache_as_online(media_export, built_cache, tmp_path):
    """vlm-eval's loss and caption sets on a tiled + video record: the cache's views and layouts and
    the online ones (files under --image-root) give the same loss and the same replies."""
    from vlm_dist.inference.eval_cli import main
    root, records, cache_dir = built_cache
    results = {}
    for name, source in (("cache", ["--cache", str(cache_dir)]), ("online", ["--image-root", str(root)])):
        out = tmp_path / name
        assert main(["--model", media_export, "--out", str(out), *source, "--loss", str(records),
                     "--captions", str(records), "--max-new-tokens", "4"]) == 0
        results[name] = json.loads((out / "eval.json").read_text())
        rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
        results[name]["replies"] = [r["prediction"] for r in rows]
    cache, online = results["cache"], results["online"]
    assert cache["loss"]["tokens"] == online["loss"]["tokens"] > 0
    assert cache["loss"]["loss"] == pytest.approx(online["loss"]["loss"], rel=1e-6)
    assert cache["replies"] == online["replies"]


def test_vlm_generate_cli_with_a_tiled_image_and_a_video(media_export, gen, clip, capsys, tmp_path):
    from vlm_dist.inference.generate_cli import main
    wide_image().save(tmp_path / "a.png")
    assert main(["--model", media_export, "--image", str(tmp_path / "a.png"), "--video", str(clip),
                 "--prompt", "What changes?", "--max-new-tokens", "5", "--no-stream"]) == 0
    # the CLI puts the video, then the image, in front of the prompt; its reply is the Generator's
    media, layouts = gen.encode_media([gen.tower.decode(tmp_path / "a.png")], [gen.decode_video(str(clip))])
    turns = [{"role": "user", "content": "<video>\n<image>\nWhat changes?"}]
    want = gen.generate(turns, media, GenerationSettings(max_new_tokens=5), layouts=layouts)
    assert capsys.readouterr().out.strip() == want
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size * 2 // 3])
    assert main(["--model", media_export, "--video", str(cut), "--prompt", "<video>\nWhat?"]) == 2
    assert "cut.mp4" in capsys.readouterr().err
    assert main(["--model", media_export, "--video", str(clip), "--prompt", "<video><video>"]) == 2
    assert "2 <video> placeholder(s) but 1 --video" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(gen):
    from vlm_dist.serve.api import create_app
    from vlm_dist.serve.engine import Engine, ServeConfig

    engine = Engine(gen, ServeConfig(served_model_name=MODEL, max_model_len=512, limit_video_per_prompt=1,
                                     max_video_bytes=200_000), MODEL)
    server, thread, url = start(create_app(engine))
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60), engine
    server.should_exit = True
    thread.join(10)
    engine.close()


def _video_part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


def _image_part(img: Image.Image) -> dict:
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def test_serve_takes_video_and_tiled_images_as_generation_does(served, gen, clip):
    from vlm_dist.serve.ui import image_part   # vlm-ui's part for a dropped file: a video goes as video_url
    client, engine = served
    data = clip.read_bytes()
    img = wide_image()
    part = image_part(str(clip))
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/mp4;base64,")
    messages = [{"role": "user", "content": [_image_part(img), {"type": "text", "text": "and"},
                                             part, {"type": "text", "text": "What changes?"}]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    # the same request through the Generator: same prompt (usage), same text
    media, layouts = gen.encode_media([gen.tower.decode(_png_bytes(img))], [gen.decode_video(data)])
    turns = [{"role": "user", "content": "<image>and<video>What changes?"}]
    ids, _ = gen.prompt_ids(turns, layouts)
    assert reply.usage.prompt_tokens == len(ids)
    want = gen.tokenizer.decode(gen.generate_ids(turns, media, GenerationSettings(max_new_tokens=6),
                                                 layouts=layouts), skip_special_tokens=True)
    assert reply.choices[0].message.content == want
    # a truncated video: 400 naming the part; two videos: over the per-prompt limit; too big: 413
    for content, status, words in [
            ([_video_part(data[: len(data) * 2 // 3])], 400, "messages[0].content[0].video_url: cannot use this video"),
            ([_video_part(data), _video_part(data)], 400, "2 videos in this request; at most 1"),
            ([_video_part(data + b"\0" * 200_000)], 413, "video too large")]:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_tokens=2)
        assert e.value.status_code == status and words in e.value.response.json()["error"]["message"], \
            e.value.response.json()


def _png_bytes(img: Image.Image) -> bytes:
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_serve_refuses_video_for_a_model_without_video(tiny_export, clip):
    from fastapi.testclient import TestClient

    from vlm_dist.serve.api import create_app
    from vlm_dist.serve.engine import ServeConfig

    app = create_app(tiny_export, ServeConfig(served_model_name=MODEL), device="cpu")
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": [_video_part(clip.read_bytes())]}]})
    assert r.status_code == 400 and "no video connector" in r.json()["error"]["message"]


def test_lmms_model_takes_video_paths(media_export, clip):
    pytest.importorskip("lmms_eval", reason="lmms-eval is the [eval] extra: pip install -e '.[eval]'")
    from vlm_dist.inference.lmms import VlmDistLmms   # the class lmms-eval loads (its base mixed in)

    m = VlmDistLmms(pretrained=media_export, device="cpu")
    m.task_dict = {"t": {"test": [{"video": str(clip)}]}}   # what lmms-eval sets before requests
    ids, media = m._prompt("What changes?", lambda doc: [doc["video"]], 0, "t", "test")
    video = m.gen.decode_video(str(clip))
    want_media, layouts = m.gen.encode_media([], [video])
    assert torch.equal(media["video"]["features"], want_media["video"]["features"])
    assert ids == m.gen.prompt_ids([{"role": "user", "content": "<video>\nWhat changes?"}], layouts)[0]
    assert len(m._generate_batch([(ids, media)], 3)) == 1


def test_hf_export_refuses_tiled_and_video_models(media_export, tmp_path):
    from vlm_dist.inference.export_hf import export_hf
    for kind in (None, "native", "remote-code"):
        with pytest.raises(ExportError) as e:
            export_hf(media_export, tmp_path / "hf", kind=kind)
        msg = str(e.value)
        assert "tiled images" in msg and "video" in msg and "vlm-serve" in msg and "vlm_config.json" in msg
    assert not (tmp_path / "hf").exists()


def test_serve_cli_takes_a_video_limit_and_byte_cap():
    from vlm_dist.serve.cli import config_from_args, parse_args

    for text in ('{"image": 2, "video": 3}', "image=2,video=3"):
        args = parse_args(["--model", ".", "--limit-mm-per-prompt", text, "--max-video-bytes", "5000"])
        config = config_from_args(args)
        assert (config.limit_mm_per_prompt, config.limit_video_per_prompt, config.max_video_bytes) == (2, 3, 5000)
    args = parse_args(["--model", "."])
    assert (args.limit_mm_per_prompt, args.limit_video_per_prompt) == (8, 1)
    with pytest.raises(SystemExit):
        parse_args(["--model", ".", "--limit-mm-per-prompt", '{"audio": 1}'])
