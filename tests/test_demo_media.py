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
from vlm_dist.demo.data import COLOURS

SMALL = dict(train_detail=16, heldout_detail=8, train_clips=16, heldout_clips=8)


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
        assert set(counts) == set(COLOURS) and len(set(counts.values())) == 1, counts
    for name in ("when_train.jsonl", "when_heldout.jsonl"):
        counts = Counter(r["answer"] for r in read_records(out / name))
        assert set(counts) == set(range(1, 9)) and len(set(counts.values())) == 1, counts
    assert summary["answers"]["when_heldout.jsonl"] == {str(k): 1 for k in range(1, 9)}
    with pytest.raises(ValueError, match="train_clips=12: must be a positive multiple of 8"):
        mt.MediaTaskConfig(train_clips=12)


def test_the_dot_is_where_the_record_says_and_its_colour(media):
    out, _ = media
    for r in read_records(out / "detail_heldout.jsonl"):
        a = np.asarray(load_image(out / r["images"][0]))
        x0, y0, x1, y1 = r["dot"]["box"]
        assert (x1 - x0, y1 - y0) == (3, 3)
        assert (a[y0:y1, x0:x1] == COLOURS[r["answer"]]).all()
        cell = 128 // 4                                     # wholly inside one cell of the 4x4 grid
        assert x0 // cell == (x1 - 1) // cell and y0 // cell == (y1 - 1) // cell
        assert r["conversations"][-1]["content"] == f"{r['answer'].capitalize()}."


def _decode_colour(pixel: np.ndarray) -> str:
    """The demo colour whose direction away from grey the pixel's is closest to."""
    p = pixel.astype(float) - pixel.mean()
    score = {c: float(p @ ((np.array(v) - np.mean(v)) / np.linalg.norm(np.array(v) - np.mean(v))))
             for c, v in COLOURS.items()}
    return max(score, key=score.get)


def _most_saturated(views: np.ndarray) -> np.ndarray:
    """The pixel of (V, H, W, 3) uint8 views whose channels differ most."""
    sat = views.astype(int).max(-1) - views.astype(int).min(-1)
    return views[np.unravel_index(sat.argmax(), sat.shape)]


def test_the_untiled_view_loses_the_dot_and_the_tiles_keep_it(tower, tmp_path):
    """Pixels through the tower's own resize: the untiled view's most saturated pixel names the dot's
    colour about as often as chance (1/4); the 4x4 tiles' always. Without coloured clutter it would
    not be lost: the thumbnail then still names it (why the clutter is coloured)."""
    import random
    from vlm_dist.model.vision import image_views
    spec = TilingSpec(tile_size=32, tokens_per_tile=8, grids=grids_up_to(16))
    n = 120
    for chroma, thumb_range in ((64, (0.1, 0.45)), (0, (0.9, 1.0))):
        cfg, rng = mt.MediaTaskConfig(chroma=chroma), random.Random(0)
        thumb = tiles = 0
        for i in range(n):
            colour = list(COLOURS)[i % 4]
            img, _ = mt.draw_detail(colour, rng, cfg)
            tiling, views = image_views(img, spec)
            assert (tiling.rows, tiling.cols) == (4, 4)
            px = tower.pixels_uint8(views).permute(0, 2, 3, 1).numpy()      # (17, 32, 32, 3)
            thumb += _decode_colour(_most_saturated(px[:1])) == colour
            tiles += _decode_colour(_most_saturated(px[1:])) == colour
        assert thumb_range[0] <= thumb / n <= thumb_range[1], (chroma, thumb / n)
        assert tiles == n, (chroma, tiles)


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


def test_reading_examples_write_each_views_colour_into_its_run(media, tower, tmp_path):
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
        x0, y0 = r["dot"]["box"][:2]
        tile = 1 + (y0 // 32) * 4 + x0 // 32
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
        said = "Red." if r["task"] == "detail" else "At 0.0s."
        rows.append({"id": r["id"], "reference": r["conversations"][-1]["content"], "prediction": said,
                     "exact": said == r["conversations"][-1]["content"]})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = media_stage.score(tmp_path / "captions.jsonl", heldout)
    assert res["detail"]["per_answer"] == {"blue": 0.0, "green": 0.0, "red": 1.0, "yellow": 0.0}
    assert res["detail"]["accuracy"] == 0.25 and res["detail"]["n"] == SMALL["heldout_detail"]
    assert res["when"]["per_answer"] == {str(k): float(k == 1) for k in range(1, 9)}
    assert res["when"]["answered_position"]["1"] == 1.0 and res["when"]["unparsed"] == 0.0
    results = {"steps": 1, "chance": {"detail": 0.25, "when": 0.125}, "tiles": res, "untiled": res}
    rows = media_stage.table(results)
    assert "| when, red square in frame 1 | 1.000 | 1.000 |" in rows
