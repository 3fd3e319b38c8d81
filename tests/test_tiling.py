"""AnyRes tiling: grids by LLaVA-NeXT's rule, tiles that cover the image, the budget, the block."""
import json

import numpy as np
import pytest
from PIL import Image

from vlm_dist.contract.media import IMAGE, block_ids
from vlm_dist.contract.tiling import (LLAVA_NEXT_GRIDS, Tiling, TilingError, TilingSpec, block_length,
                                      choose_grid, grids_up_to, plan_tiling, row_separator_id,
                                      tile_block_ids, tile_image)

T = 32   # the tiny SigLIP's input side


def noise(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# (width, height) -> (rows, cols) with LLaVA-NeXT's default grids at 32 px tiles
GRID_TABLE = [
    ((20, 20), (1, 1)),      # smaller than a tile: thumbnail only, never upscaled onto tiles
    ((32, 32), (1, 1)),      # exactly one tile
    ((64, 64), (2, 2)),
    ((300, 300), (2, 2)),    # large square: the largest square grid
    ((64, 32), (1, 2)),      # 2:1 wide -> one row, two columns
    ((32, 64), (2, 1)),
    ((96, 32), (1, 3)),
    ((32, 96), (3, 1)),
    ((400, 100), (1, 3)),    # 4:1: the widest grid available
    ((100, 400), (3, 1)),
    ((160, 100), (2, 2)),    # 1.6:1 and large: 2x2 uses more pixels than 1x2
]


@pytest.mark.parametrize("size,grid", GRID_TABLE)
def test_aspect_ratios_map_to_expected_grids(size, grid):
    spec = TilingSpec(tile_size=T, tokens_per_tile=4)
    assert choose_grid(*size, spec) == grid
    tiling = plan_tiling(*size, spec)
    assert (tiling.rows, tiling.cols) == grid
    assert tiling.num_tiles == (0 if grid == (1, 1) else grid[0] * grid[1])


def test_tiles_equal_transformers_llava_next_patches():
    """Grid choice, resize (ceil), centred black padding and row-major order are LLaVA-NeXT's own."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    spec = TilingSpec(tile_size=T, tokens_per_tile=4)
    proc = LlavaNextImageProcessorPil()
    pinpoints = [[r * T, c * T] for r, c in spec.candidates()]
    for i, (w, h) in enumerate([(200, 50), (70, 45), (45, 70), (100, 100), (130, 40), (33, 90)]):
        img = noise(w, h, seed=i)
        tiling, thumb, tiles = tile_image(img, spec)
        ref = proc.get_image_patches(np.asarray(img).transpose(2, 0, 1), pinpoints, size=(T, T),
                                     patch_size=T, resample=Image.Resampling.BICUBIC)
        ref = [r.transpose(1, 2, 0) for r in ref]            # [thumbnail] + tiles, CHW -> HWC
        assert tiling.num_tiles == len(tiles) == len(ref) - 1 > 1
        assert np.array_equal(np.asarray(thumb), ref[0])
        for ours, theirs in zip(tiles, ref[1:]):
            assert np.array_equal(np.asarray(ours), theirs)


@pytest.mark.parametrize("size", [(200, 50), (70, 45), (45, 70), (100, 100), (33, 33), (97, 61)])
def test_tiles_cover_the_image(size):
    spec = TilingSpec(tile_size=T, tokens_per_tile=4, fill=(7, 8, 9))
    img = noise(*size, seed=size[0])
    tiling, thumb, tiles = tile_image(img, spec)
    assert all(t.size == (T, T) and t.mode == "RGB" for t in tiles + [thumb])
    # reassemble the canvas from the tiles at their boxes, in tile order
    canvas = Image.new("RGB", tiling.canvas_size, (255, 0, 255))
    boxes = tiling.tile_boxes()
    assert boxes == sorted(boxes, key=lambda b: (b[1], b[0]))            # row-major
    for tile, box in zip(tiles, boxes):
        canvas.paste(tile, box[:2])
    arr = np.asarray(canvas)
    covered = np.zeros(arr.shape[:2], bool)
    for l, t, r, b in boxes:
        assert not covered[t:b, l:r].any()                                # tiles do not overlap
        covered[t:b, l:r] = True
    assert covered.all()                                                  # ... and tile the canvas
    x, y = tiling.offset
    rw, rh = tiling.resized_size
    assert 0 <= x and x + rw <= arr.shape[1] and 0 <= y and y + rh <= arr.shape[0]
    # the resized image is inside the canvas whole: every source pixel lands in some tile
    assert np.array_equal(arr[y:y + rh, x:x + rw], np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC)))
    # the limiting side fills the canvas, the aspect ratio is kept (to the rounding of one pixel)
    assert rw == arr.shape[1] or rh == arr.shape[0]
    assert abs(rw / rh - size[0] / size[1]) <= max(1 / rh, rw / (rh * (rh - 1))) + 1e-9
    pad = np.ones(arr.shape[:2], bool)
    pad[y:y + rh, x:x + rw] = False
    assert (arr[pad] == (7, 8, 9)).all()                                  # the rest is padding


def test_tiling_is_deterministic():
    spec = TilingSpec(tile_size=T, tokens_per_tile=4)
    img = noise(150, 70, seed=3)
    a, b = tile_image(img, spec), tile_image(img.copy(), spec)
    assert a[0] == b[0]
    assert [t.tobytes() for t in [a[1]] + a[2]] == [t.tobytes() for t in [b[1]] + b[2]]


def test_tower_preprocessing_keeps_tiles_and_makes_the_thumbnail(tiny_models):
    """Through the tower's own resize a tile is unchanged and the original becomes the thumbnail:
    the thumbnail's features are the untiled image's."""
    from transformers import AutoImageProcessor

    from vlm_dist.model.vision import resize_uint8

    processor = AutoImageProcessor.from_pretrained(tiny_models["vision"])
    assert processor.size["height"] == T
    img = noise(200, 50, seed=5)
    _, thumb, tiles = tile_image(img, TilingSpec(tile_size=T, tokens_per_tile=4))
    px = resize_uint8(processor, [img] + tiles).numpy().transpose(0, 2, 3, 1)     # (B, H, W, 3)
    assert np.array_equal(px[0], np.asarray(thumb))
    for i, tile in enumerate(tiles):
        assert np.array_equal(px[i + 1], np.asarray(tile))


def test_budget_caps_the_grid():
    tpt = 4
    lengths = {g: block_length(tpt, *g) for g in [(1, 1), (1, 2), (1, 3), (2, 2)]}
    big = (300, 300)
    assert choose_grid(*big, TilingSpec(tile_size=T, tokens_per_tile=tpt)) == (2, 2)
    assert choose_grid(160, 100, TilingSpec(tile_size=T, tokens_per_tile=tpt)) == (2, 2)
    # one token short of 2x2: the best remaining grid
    capped = TilingSpec(tile_size=T, tokens_per_tile=tpt, token_budget=lengths[(2, 2)] - 1)
    assert (2, 2) not in capped.candidates() and (1, 3) in capped.candidates()
    assert choose_grid(160, 100, capped) == (1, 2)         # 1.6:1 -> the wide 2-tile grid
    assert choose_grid(*big, capped) == (1, 1)             # no 1xN grid shows more of a square
    assert choose_grid(400, 100, capped) == (1, 3)         # 3 tiles in a row still fit
    # only the untiled block fits: every image degrades to the plain image
    tight = TilingSpec(tile_size=T, tokens_per_tile=tpt, token_budget=lengths[(1, 1)])
    assert tight.candidates() == [(1, 1)] and choose_grid(*big, tight) == (1, 1)
    with pytest.raises(TilingError, match="token_budget"):
        TilingSpec(tile_size=T, tokens_per_tile=tpt, token_budget=lengths[(1, 1)] - 1)
    rng = np.random.default_rng(0)
    for budget in range(lengths[(1, 1)], lengths[(2, 2)] + 2):
        spec = TilingSpec(tile_size=T, tokens_per_tile=tpt, token_budget=budget)
        assert spec.max_block_length() <= budget
        for w, h in rng.integers(8, 400, size=(20, 2)):
            assert plan_tiling(int(w), int(h), spec).block_length(tpt) <= budget


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (2, 3)])
@pytest.mark.parametrize("tpt", [1, 4, 9])
def test_block_layout(tokenizer, grid, tpt):
    rows, cols = grid
    ids = tile_block_ids(tokenizer, rows, cols, tpt)
    plain = block_ids(tokenizer, IMAGE, tpt)
    nl = row_separator_id(tokenizer)
    assert nl == tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(nl) == "Ċ"          # byte-level "\n", as in Qwen3
    assert len(ids) == block_length(tpt, rows, cols)
    assert ids[0] == plain.start and ids[-1] == plain.end
    tiles = 0 if rows * cols == 1 else rows * cols
    assert ids.count(plain.pad) == tpt * (1 + tiles)
    if tiles == 0:
        assert ids == plain.block()            # untiled: exactly today's image block
        assert len(ids) == 2 + tpt
        return
    assert len(ids) == 2 + tpt * (1 + rows * cols) + 1 + rows
    # lines: the thumbnail, then one line of `cols` tiles per row, each closed by "\n"
    lines, cur = [], []
    for t in ids[1:-1]:
        if t == nl:
            lines.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [] and [len(l) for l in lines] == [tpt] + [tpt * cols] * rows
    assert set(ids[1:-1]) == {plain.pad, nl}


def test_spec_json_round_trip_and_errors():
    spec = TilingSpec(tile_size=T, tokens_per_tile=4, token_budget=40, grids=grids_up_to(6),
                      resample="bilinear", fill=(1, 2, 3))
    text = spec.to_json()
    assert TilingSpec.from_json(text) == spec
    assert TilingSpec.from_json(json.dumps(json.loads(text))).fingerprint() == spec.fingerprint()
    d = json.loads(text)
    assert d["version"] == 1 and d["rule"] == "llava-next-anyres" and d["order"] == "row-major"
    assert TilingSpec(grids=[[2, 1], (1, 2), [2, 1]]).grids == ((1, 2), (2, 1))   # canonical
    for bad, key in [({**d, "rule": "internvl"}, "rule"), ({**d, "tile_size": 0}, "tile_size"),
                     ({**d, "grids": [[0, 2]]}, "grids"), ({**d, "resample": "box"}, "resample"),
                     ({**d, "version": 2}, "version"), ({**d, "extra": 1}, "extra"),
                     ({**d, "fill": [1, 2]}, "fill")]:
        with pytest.raises(TilingError, match=key):
            TilingSpec.from_dict(bad)


def test_tiling_record_round_trip():
    spec = TilingSpec(tile_size=T, tokens_per_tile=4)
    for size in [(200, 50), (20, 20), (97, 61)]:
        tiling = plan_tiling(*size, spec)
        back = Tiling.from_dict(json.loads(json.dumps(tiling.to_dict())))
        assert back == tiling and back.tile_boxes() == tiling.tile_boxes()
    with pytest.raises(TilingError, match="missing"):
        Tiling.from_dict({"version": 1, "order": "row-major"})


def test_grid_sets():
    """grids_up_to is InternVL's / GOT-OCR2's candidate set; the default is LLaVA-NeXT's pinpoints."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_all_supported_aspect_ratios

    for lo, hi in [(1, 4), (1, 12), (2, 6)]:
        ours = {(c, r) for r, c in grids_up_to(hi, lo)}                   # theirs is (cols, rows)
        assert ours == set(get_all_supported_aspect_ratios(lo, hi))
    from transformers import LlavaNextImageProcessor
    default = LlavaNextImageProcessor.image_grid_pinpoints
    assert {(h // 336, w // 336) for h, w in default} == set(LLAVA_NEXT_GRIDS)
