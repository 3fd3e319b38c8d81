"""The demo's media tasks: deterministic, balanced, and only tiles / video can answer them.

    python -m pytest tests/test_demo_media.py -q
"""
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlm_dist.contract.images import load_image
from vlm_dist.contract.prompt import PromptEncoder
from vlm_dist.contract.records import read_records
from vlm_dist.contract.tiling import TilingSpec, grids_up_to
from vlm_dist.contract.video import FrameSampling, VideoLayout, load_video
from vlm_dist.demo import media_tasks as mt
from vlm_dist.demo.data import COLOURS, SHAPES

SMALL = dict(train_detail=18, heldout_detail=9, train_clips=16, heldout_clips=8)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    out = tmp_path_factory.mktemp("media") / "data"
    return out, mt.generate_media(out, mt.MediaTaskConfig(seed=1, **SMALL))


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """The demo's tiny SigLIP: its processor's resize is what the untiled view goes through."""
    import torch

    from vlm_dist.model.vision import VisionTower
    from vlm_dist.testing.tiny import build_tiny_siglip
    path = tmp_path_factory.mktemp("siglip")
    build_tiny_siglip(path)
    return VisionTower.from_pretrained(str(path), feature_layer=-2, dtype=torch.float32)


def test_same_seed_same_bytes_and_answers_balanced(media, tmp_path):
    out, summary = media
    again = tmp_path / "again"
    mt.generate_media(again, mt.MediaTaskConfig(seed=1, **SMALL))
    assert _digest(out) == _digest(again)
    other = tmp_path / "other"
    mt.generate_media(other, mt.MediaTaskConfig(seed=2, **SMALL))
    assert _digest(other)["detail_train.jsonl"] != _digest(out)["detail_train.jsonl"]
    for name in ("detail_train.jsonl", "detail_heldout.jsonl"):
        counts = Counter(r["answer"] for r in read_records(out / name))
        assert set(counts) == set(SHAPES) and len(set(counts.values())) == 1, counts
    for name in ("when_train.jsonl", "when_heldout.jsonl"):
        counts = Counter(r["answer"] for r in read_records(out / name))
        assert set(counts) == set(range(1, 9)) and len(set(counts.values())) == 1, counts
    assert summary["answers"]["when_heldout.jsonl"] == {str(k): 1 for k in range(1, 9)}
    with pytest.raises(ValueError, match="train_clips=12: must be a positive multiple of 8"):
        mt.MediaTaskConfig(train_clips=12)
    with pytest.raises(ValueError, match="train_detail=10: must be a positive multiple of 3"):
        mt.MediaTaskConfig(train_detail=10)


def test_the_object_is_where_the_record_says_in_one_cell(media):
    out, _ = media
    for r in read_records(out / "detail_heldout.jsonl"):
        a = np.asarray(load_image(out / r["images"][0])).astype(int)
        x0, y0, x1, y1 = r["object"]["box"]
        assert 8.4 <= x1 - x0 <= 14.0 and x1 - x0 == pytest.approx(y1 - y0, abs=0.02)
        cell = 128 // 4                                     # wholly inside one cell of the 4x4 grid
        assert int(x0) // cell == int(x1) // cell and int(y0) // cell == int(y1) // cell
        ink = np.argwhere((a != 255).any(-1))
        assert (ink.min(0) >= [int(y0), int(x0)]).all() and (ink.max(0) <= [int(y1) + 1, int(x1) + 1]).all()
        centre = a[int((y0 + y1) / 2) + 1, int((x0 + x1) / 2)]           # every shape covers its centre
        assert tuple(centre) == COLOURS[r["object"]["colour"]]
        assert r["answer"] == r["object"]["shape"] in SHAPES
        assert r["conversations"][-1]["content"] == f"A {r['answer']}."


def _shape_by_fill(view: np.ndarray) -> str:
    """Shape from how much of its bounding box the ink fills: square 1, circle pi/4, triangle 1/2."""
    ink = view.astype(int).min(-1) < 200
    ys, xs = np.nonzero(ink)
    if not len(xs):
        return "none"
    fill = ink.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return "square" if fill > 0.9 else "triangle" if fill < 0.65 else "circle"


def test_the_untiled_view_shrinks_the_shape_away_and_the_tiles_keep_it(tower):
    """Pixels through the tower's own resize: the object's tile is the canvas at 1:1 (a shape 8-14 px
    across, as the demo's shapes are in the tower's view), and how much of its box the ink fills
    names its shape every time; the untiled view shrinks it 4x to a blob 2-5 px across, where the
    same rule is right for half the images (0.50 measured; chance 1/3)."""
    import random
    from vlm_dist.model.vision import image_views
    spec = TilingSpec(tile_size=32, tokens_per_tile=8, grids=grids_up_to(16))
    cfg, rng, n = mt.MediaTaskConfig(), random.Random(0), 120
    thumb = tiles = 0
    for i in range(n):
        shape = SHAPES[i % 3]
        img, box = mt.draw_detail(shape, list(COLOURS)[i % 4], rng, cfg)
        tiling, views = image_views(img, spec)
        assert (tiling.rows, tiling.cols) == (4, 4)
        view = mt.view_of_object({"id": str(i), "object": {"box": box}}, {"kind": "image", **tiling.to_dict()})
        px = tower.pixels_uint8(views).permute(0, 2, 3, 1).numpy()      # (17, 32, 32, 3)
        r, c = divmod(view - 1, 4)
        assert (px[view] == np.asarray(img)[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]).all()
        ink = np.nonzero((px[0].astype(int).min(-1) < 200).any(0))[0]
        assert 2 <= ink.max() - ink.min() + 1 <= 5
        thumb += _shape_by_fill(px[0]) == shape
        tiles += _shape_by_fill(px[view]) == shape
    assert tiles == n
    assert thumb / n <= 0.55, thumb / n                 # measured 0.50 (seed 0, 120 images)


def test_clips_decode_to_the_red_square_at_the_answer_time(media):
    out, _ = media
    for r in read_records(out / "when_heldout.jsonl"):
        video = load_video(out / r["videos"][0], FrameSampling(num_frames=8, max_fps=2.0))
        assert video.timestamps == pytest.approx([i / 2 for i in range(8)])
        red = [int(((a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)).sum())
               for a in (np.asarray(f).astype(int) for f in video.frames)]
        assert [i for i, n in enumerate(red) if n > 50] == [r["answer"] - 1], (r["id"], red)
        assert r["frames"][r["answer"] - 1] == "red" and r["frames"].count("red") == 1
        assert r["conversations"][-1]["content"] == f"At {video.timestamps[r['answer'] - 1]:.1f}s."


def test_reading_examples_write_each_views_word_into_its_run(media, tower, tmp_path):
    from transformers import AutoTokenizer

    from vlm_dist.contract.media import IMAGE, VIDEO, token_id
    from vlm_dist.model.vision import image_views
    from vlm_dist.testing.tiny import build_tiny_tokenizer
    out, _ = media
    build_tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    enc = PromptEncoder(tok, "chatml", {"image": 8, "video": 4})
    spec = TilingSpec(tile_size=32, tokens_per_tile=8, grids=grids_up_to(16))
    image_pad, video_pad = token_id(tok, IMAGE.pad_token), token_id(tok, VIDEO.pad_token)
    for r in list(read_records(out / "detail_heldout.jsonl"))[:4]:
        tiling, _ = image_views(load_image(out / r["images"][0]), spec)
        x0, y0 = r["object"]["box"][:2]
        tile = 1 + int(y0 // 32) * 4 + int(x0 // 32)
        for layout, view in (({"kind": "image", **tiling.to_dict()}, tile), (None, 0)):
            ids, labels = mt.reading_example(r, enc, tok, {"image": [layout]})
            sample = enc.encode(r, layouts={"image": [layout]})
            assert labels == sample.labels and len(ids) == len(sample.input_ids)
            slots = [i for i, t in enumerate(sample.input_ids) if t == image_pad]
            assert len(slots) == 8 * (17 if layout else 1)
            written = [i for i in slots if ids[i] != image_pad]
            assert written and all(view * 8 <= slots.index(i) < view * 8 + 8 for i in written)
            assert tok.decode([ids[i] for i in written]).strip() == r["answer"]
    r = next(iter(read_records(out / "when_heldout.jsonl")))
    layout = VideoLayout.of(load_video(out / r["videos"][0], FrameSampling(8, 2.0))).to_dict()
    ids, _ = mt.reading_example(r, enc, tok, {"video": [layout]})
    slots = [i for i, t in enumerate(enc.encode(r, layouts={"video": [layout]}).input_ids) if t == video_pad]
    runs = [tok.decode([ids[i] for i in slots[f * 4:(f + 1) * 4] if ids[i] != video_pad]).strip()
            for f in range(8)]
    assert runs == r["frames"]


def test_score_reads_vlm_eval_rows_per_task_and_position(media, tmp_path):
    """media_stage.score on captions.jsonl rows shaped as vlm-eval writes them: a model that always
    answers the first frame's time is right only at position 1, and the table shows it."""
    import json

    from vlm_dist.demo import media_stage
    out, _ = media
    heldout = media_stage.heldout_records(out, "media_heldout.jsonl")
    rows = []
    for r in read_records(heldout):
        said = "A circle." if r["task"] == "detail" else "At 0.0s."
        rows.append({"id": r["id"], "reference": r["conversations"][-1]["content"], "prediction": said,
                     "exact": said == r["conversations"][-1]["content"]})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = media_stage.score(tmp_path / "captions.jsonl", heldout)
    assert res["detail"]["per_answer"] == {"circle": 1.0, "square": 0.0, "triangle": 0.0}
    assert res["detail"]["accuracy"] == pytest.approx(1 / 3) and res["detail"]["n"] == SMALL["heldout_detail"]
    assert res["when"]["per_answer"] == {str(k): float(k == 1) for k in range(1, 9)}
    assert res["when"]["answered_position"]["1"] == 1.0 and res["when"]["unparsed"] == 0.0
    results = {"steps": 1, "chance": {"detail": 1 / 3, "when": 0.125}, "tiles": res, "untiled": res}
    rows = media_stage.table(results)
    assert "| when, red square in frame 1 | 1.000 | 1.000 |" in rows
