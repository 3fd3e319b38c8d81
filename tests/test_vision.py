"""VisionTower: the right layer of SigLIP / SigLIP2, frozen, fingerprinted, pooled."""
import pytest
import torch
from PIL import Image

from vlm_dist.model.vision import VisionTower, pool_patches

IMAGES = [Image.effect_mandelbrot((40, 30), (-2, -1.5, 1, 1.5), 20).convert("RGB"),
          Image.new("RGB", (20, 50), (200, 30, 10))]


def reference_hidden_states(model_cls, path, inputs):
    """hidden_states of the untouched Hugging Face model, loaded independently."""
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


def test_siglip_penultimate_layer_from_a_full_checkpoint(tiny_models):
    from transformers import SiglipModel

    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.float32)
    pixels = tower.preprocess(IMAGES)
    assert pixels.shape == (2, 3, 32, 32)
    full = SiglipModel.from_pretrained(tiny_models["vision"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = full.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(tower(pixels), want)
    assert (tower.num_patches, tower.hidden_size) == (16, 32)


def test_frozen_and_stays_in_eval(tiny_models):
    tower = VisionTower.from_pretrained(tiny_models["vision"])
    parent = torch.nn.ModuleDict({"vision": tower}).train()
    assert not parent["vision"].training and not tower.model.training
    assert not any(p.requires_grad for p in tower.parameters())
    assert tower.model.head is None and len(tower.model.encoder.layers) == 2   # 3 layers, -2 needs 2


def test_fingerprint_names_weights_not_dtype(tiny_models):
    bf16 = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.bfloat16).fingerprint()
    fp32 = VisionTower.from_pretrained(tiny_models["vision"], feature_layer=2,
                                       dtype=torch.float32).fingerprint()
    assert bf16["weights_sha256"] == fp32["weights_sha256"]
    assert bf16["feature_layer"] == fp32["feature_layer"] == 2
    assert (bf16["dtype"], fp32["dtype"]) == ("bfloat16", "float32")
    assert bf16["preprocessing"]["size"] == {"height": 32, "width": 32}


def test_feature_layer_out_of_range(tiny_models):
    with pytest.raises(ValueError, match="feature_layer=7 is out of range"):
        VisionTower.from_pretrained(tiny_models["vision"], feature_layer=7)


def test_pooling_keeps_the_odd_edge():
    grid = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1)       # a 3x3 grid, one channel
    pooled = pool_patches(grid, 2)[0, :, 0]
    assert pooled.tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8.0]


def test_siglip2_naflex(tmp_path):
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model, Siglip2VisionModel

    torch.manual_seed(0)
    config = Siglip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, patch_size=8, num_patches=16),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16))
    Siglip2Model(config).save_pretrained(tmp_path)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16).save_pretrained(tmp_path)

    tower = VisionTower.from_pretrained(str(tmp_path), dtype=torch.float32)
    inputs = tower.preprocess(IMAGES)
    feats = tower(inputs)
    assert feats.shape == (2, 16, 32) and tower.feature_shape() == (16, 32)
    want = reference_hidden_states(Siglip2VisionModel, tmp_path, inputs)[-2]
    mask = inputs["pixel_attention_mask"].bool()
    assert not mask.all()                                   # the tall image pads its sequence
    assert torch.allclose(feats[mask], want[mask], atol=1e-6)
    assert feats[~mask].abs().sum() == 0                    # padding rows carry nothing
    with pytest.raises(ValueError, match="NaFlex"):
        tower.feature_shape(pool=2)
    assert tower.default_draft_to is None   # its input size follows the image: no JPEG draft
    from vlm_dist.contract.tiling import TilingError, TilingSpec
    with pytest.raises(TilingError, match="NaFlex.*no fixed input side"):
        tower.fingerprint(tiling=TilingSpec(tile_size=32, tokens_per_tile=4))
    with pytest.raises(TilingError, match="NaFlex"):
        tower.tiling_spec({"tokens_per_tile": 4})
    assert torch.equal(tower.encode_views(IMAGES), feats)       # the processor's float path


def test_only_rank0_loads_the_tower_for_the_fingerprint(tiny_models, monkeypatch):
    """launch/train.py: rank 0 fingerprints the encoder (fp32 load + weight hash), the others receive it."""
    from torch import distributed as tdist

    from vlm_dist import dist

    fp = VisionTower.expected_fingerprint(tiny_models["vision"], -2)
    loads = []
    monkeypatch.setattr(VisionTower, "from_pretrained", classmethod(lambda *a, **k: loads.append(a)))
    sent = []

    def broadcast(box, src, group):              # rank 0's object arrives on every rank
        if tdist.get_rank() == 0:
            sent.append(box[0])
        else:
            box[0] = sent[0]
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(tdist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(tdist, "get_rank", lambda: 0)
    assert dist.compute_on_rank0(lambda: fp) == fp
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    assert dist.compute_on_rank0(lambda: VisionTower.expected_fingerprint("x", -2)) == fp
    assert loads == []                           # rank 1 never loaded a tower
    # an error on rank 0 is raised on every rank (none waits for a fingerprint that never comes)
    sent[:] = [(None, ValueError("vision model 'x' has model_type 'bert'"))]
    with pytest.raises(ValueError, match="model_type 'bert'"):
        dist.compute_on_rank0(lambda: 1 / 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_pixels_normalised_on_the_device_equal_the_processor(tiny_models, dtype):
    """The cache builder sends resized 8-bit pixels and normalises in forward: bit for bit the
    processor's own float pixels, so cached and online features stay equal."""
    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=dtype)
    photo = Image.fromarray(torch.randint(0, 256, (45, 61, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    images = IMAGES + [photo]
    u8 = tower.pixels_uint8(images)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 3, 32, 32)
    want = tower.preprocess(images)
    assert torch.equal(tower.pixel_table[u8.to(torch.int32) + tower.channel_offset], want)
    assert torch.equal(tower(u8), tower(want))


def test_draft_size_is_twice_the_input_side_and_the_fingerprint_records_the_decode(tiny_models, tmp_path):
    """The cache builder decodes JPEGs with default_draft_to; the fingerprint says which decode made
    the features, and training's expected fingerprint leaves it out (it reads features only)."""
    import io

    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.float32)
    assert tower.draft_to is None and tower.fingerprint()["jpeg_draft_to"] is None   # full decode
    assert tower.default_draft_to == 2 * tower.image_size == 64
    tower.draft_to = tower.default_draft_to
    assert tower.fingerprint()["jpeg_draft_to"] == 64
    assert "jpeg_draft_to" not in VisionTower.expected_fingerprint(tiny_models["vision"])
    buf = io.BytesIO()
    Image.effect_mandelbrot((1600, 1200), (-2, -1.5, 1, 1.5), 30).convert("RGB").save(buf, "JPEG")
    assert tower.decode(buf.getvalue()).size == (200, 150)            # 1/8 scale, both sides >= 64
    full = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.float32)   # draft_to: None
    assert full.decode(buf.getvalue()).size == (1600, 1200)


def test_views_fingerprint_and_tiling_checks(tiny_models):
    """image_views: untiled is the image itself; tiled is the image (the tower's resize makes its
    thumbnail view) + tiles, encoded as the cache encodes them; the fingerprint names tiling /
    video sampling only when given."""
    from vlm_dist.contract.tiling import TilingError, TilingSpec, tile_image
    from vlm_dist.contract.video import FrameSampling
    from vlm_dist.model.vision import image_views

    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.float32)
    img = Image.effect_mandelbrot((70, 33), (-2, -1.5, 1, 1.5), 20).convert("RGB")
    assert image_views(img, None) == (None, [img])
    spec = tower.tiling_spec({"grids": [[1, 2], [2, 2]], "tokens_per_tile": 4})
    assert spec.tile_size == 32
    tiling, views = image_views(img, spec)
    want_tiling, _, tiles = tile_image(img, spec)
    assert tiling == want_tiling and (tiling.rows, tiling.cols) == (1, 2) and len(views) == 3
    assert views[0] is img and [v.tobytes() for v in views[1:]] == [t.tobytes() for t in tiles]
    feats = tower.encode_views(views)
    assert torch.equal(feats[0], tower.encode_views([img])[0])                 # the untiled view
    assert feats.shape == (3, 16, 32)
    assert torch.equal(feats, tower(tower.pixels_uint8(views)))
    assert torch.equal(feats[1], tower(tower.preprocess([tiles[0]]))[0])     # one crop alone
    assert tower.encode_views([], pool=2).shape == (0, 4, 32)

    plain = tower.fingerprint()
    assert "tiling" not in plain and "video_sampling" not in plain
    fp = tower.fingerprint(tiling=spec, video_sampling=FrameSampling(4, 1.0))
    assert fp["tiling"] == spec.fingerprint() and fp["video_sampling"]["num_frames"] == 4
    assert {k: v for k, v in fp.items() if k not in ("tiling", "video_sampling")} == plain
    with pytest.raises(TilingError, match=r"tile_size: 64 is not the input side .*\(32 px\)"):
        tower.fingerprint(tiling=TilingSpec(tile_size=64, tokens_per_tile=4))
    with pytest.raises(TilingError, match="tile_size: 16"):
        tower.tiling_spec({"tile_size": 16})


def test_decode_video_is_load_video(tiny_models, tmp_path):
    import av
    import numpy as np

    from vlm_dist.contract.video import FrameSampling, VideoError, load_video

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    tower = VisionTower.from_pretrained(tiny_models["vision"], dtype=torch.float32)
    sampling = FrameSampling(num_frames=3, max_fps=2.0)
    video, want = tower.decode_video(str(path), sampling), load_video(str(path), sampling)
    assert video.timestamps == want.timestamps and len(video.frames) == 3
    assert [f.tobytes() for f in video.frames] == [f.tobytes() for f in want.frames]
    assert tower.encode_views(video.frames).shape == (3, 16, 32)
    with pytest.raises(VideoError, match="clip.mp4: too large"):
        tower.decode_video(str(path), sampling, max_bytes=10)
