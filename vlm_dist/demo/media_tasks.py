"""The demo's tasks that only the new media kinds can pass: a small detail (tiles) and "when" (video).

    from vlm_dist.demo.media_tasks import MediaTaskConfig, generate_media
    summary = generate_media("demo_out/media_data", MediaTaskConfig())

Small detail ("What shape is the small object?" -> "A circle." / "A square." / "A triangle."):
a 128 x 128 white canvas with one circle, square or triangle of a random demo colour, drawn as
data.draw draws the demo's shapes (radius 4.2-7.0 px: the 4.8-6.4 the tiny tower was pretrained
on in its 32 px view, +-25% so the amount of colour does not give the shape away) wholly inside
one cell of the 4 x 4 grid, where data.draw puts a shape in a 32 px view (left or right half,
near the middle). A 4 x 4 grid of 32 px tiles shows that cell at 1:1, i.e. the tower's
pretraining distribution; the untiled view squeezes 128 px into 32 and the shape into a blob
2-5 px across. Measured 2026-11-27 (2-core CPU box; the demo's pretrained tiny SigLIP, frozen
features of layer -2; probe = shared per-patch MLP, max over patches, 336 training / 150 held-out
images, chance 1/3): thumbnail 0.59 held out, 4 x 4 tiles 0.89 (circle 0.76, square 0.98,
triangle 0.92). The same shape placed anywhere in its cell (not the pretraining's spots): 0.51
vs 0.73. A 64 px canvas with 2 x 2 tiles (the thumbnail only halves the shape) does not separate
them: 0.84 vs 0.89 (0.47 vs 0.75 placed anywhere). On pixels (tests/test_demo_media.py), how much
of its box the ink fills names the shape in every tile and in half the thumbnails (0.50).
The first version of this task (a 3 px dot's colour in coloured clutter) stayed at chance with
tiles and without: the tiny tower does not encode a 3 px dot (media_stage).

When ("When does the red square appear?"): clips of `clip_frames` frames at `clip_fps`
(8 at 2 fps: 4 s, every frame sampled by FrameSampling(8, 2.0)), 32 x 32 px, mpeg4 in MP4
written with PyAV. Every frame shows one square on a light background; exactly one frame,
position k, shows a red one, the others a green, blue or yellow one. The reply names the
time the video block shows before that frame ("At 1.5s.", contract.video.TIMESTAMP_FORMAT),
so the model must find the frame and read its timestamp. Answer positions are exactly
balanced (n // frames each), so a model that always names one time scores 1 / frames.

Files under `out` (keys are paths relative to `out`, the image root for `vlm-cache build`):

    detail_train.jsonl, detail_heldout.jsonl   "answer": shape, "object": {shape, colour, box}
    when_train.jsonl, when_heldout.jsonl       "answer": 1-based frame position, "frames": colours
    media.json                                  counts, answers per colour / position, config

Same seed -> byte-identical files (the PNGs and the MP4s: PyAV's mpeg4 encoder is
deterministic for the same frames and settings).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_dist.contract.records import write_records
from vlm_dist.contract.video import TIMESTAMP_FORMAT
from vlm_dist.demo.data import COLOURS, SHAPES

DETAIL_PROMPT = "What shape is the small object?"
WHEN_PROMPT = "When does the red square appear?"
TARGET = "red"
DISTRACTORS = tuple(c for c in COLOURS if c != TARGET)


@dataclass
class MediaTaskConfig:
    seed: int = 0
    detail_size: int = 128          # canvas side in px: 4x the tiny tower's 32 px input
    detail_grid: int = 4            # the object lies wholly inside one cell of this grid (the tiles)
    radius: tuple[float, float] = (4.2, 7.0)   # px: the pretraining's 4.8-6.4 in the tower's view, +-25%
    train_detail: int = 336         # multiples of 3: every shape equally often
    heldout_detail: int = 72
    clip_frames: int = 8
    clip_fps: int = 2
    clip_size: int = 32
    train_clips: int = 320          # multiples of clip_frames: every position equally often
    heldout_clips: int = 64

    def __post_init__(self):
        for key, mult in (("train_detail", len(SHAPES)), ("heldout_detail", len(SHAPES)),
                          ("train_clips", self.clip_frames), ("heldout_clips", self.clip_frames)):
            n = getattr(self, key)
            if n < mult or n % mult:
                raise ValueError(f"{key}={n}: must be a positive multiple of {mult} so every answer "
                                 "occurs equally often")
        if self.detail_size % self.detail_grid or self.detail_size // self.detail_grid < 2 * self.radius[1] + 2:
            raise ValueError(f"detail_size={self.detail_size} must split into {self.detail_grid} cells "
                             f"wider than the object (radius up to {self.radius[1]} px)")


def _balanced(values: list, n: int, rng: random.Random) -> list:
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


# -- small detail ---------------------------------------------------------------------------------
def draw_detail(shape: str, colour: str, rng: random.Random, cfg: MediaTaskConfig) -> tuple[Image.Image, list[float]]:
    """A white canvas with one small `shape` of `colour`, drawn as data.draw draws the demo's shapes
    (box of half side r around the centre), wholly inside one grid cell; returns (image, box)."""
    size = cfg.detail_size
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    cell = size // cfg.detail_grid
    r = rng.uniform(*cfg.radius)
    # inside the cell where data.draw puts a shape in the tower's 32 px view: left or right half,
    # vertically near the middle (the pretraining's layout), never across a tile edge
    cx = rng.randrange(cfg.detail_grid) * cell + rng.choice((0.25, 0.75)) * cell + rng.uniform(-0.04, 0.04) * cell
    cy = rng.randrange(cfg.detail_grid) * cell + cell / 2 + rng.uniform(-0.125, 0.125) * cell
    cx = min(max(cx, (cx // cell) * cell + r + 1), (cx // cell + 1) * cell - r - 1)
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img, [round(v, 2) for v in box]


def detail_answer_text(shape: str) -> str:
    return f"A {shape}."


def detail_record(rid: str, key: str, shape: str, colour: str, box: list[float]) -> dict:
    return {"id": rid, "images": [key], "task": "detail", "answer": shape,
            "object": {"shape": shape, "colour": colour, "box": box},
            # the question first, as in the demo's other probes: the LLM reads the views knowing what to find
            "conversations": [{"role": "user", "content": f"{DETAIL_PROMPT}\n<image>"},
                              {"role": "assistant", "content": detail_answer_text(shape)}]}


def _detail_split(out: Path, split: str, n: int, rng: random.Random, cfg: MediaTaskConfig) -> list[dict]:
    (out / "detail").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, shape in enumerate(_balanced(list(SHAPES), n, rng)):
        colour = rng.choice(list(COLOURS))
        img, box = draw_detail(shape, colour, rng, cfg)
        key = f"detail/{split}_{i:05d}.png"
        img.save(out / key, format="PNG", optimize=False)
        recs.append(detail_record(f"detail-{split}-{i:05d}", key, shape, colour, box))
    return recs


# -- when does it appear --------------------------------------------------------------------------
def clip_frames(position: int, rng: random.Random, cfg: MediaTaskConfig) -> tuple[list[Image.Image], list[str]]:
    """The frames of one clip (red square at 0-based `position`) and each frame's square colour."""
    colours = [TARGET if i == position else rng.choice(DISTRACTORS) for i in range(cfg.clip_frames)]
    frames = []
    s = cfg.clip_size
    for colour in colours:
        img = Image.new("RGB", (s, s), (235, 235, 235))
        side = rng.randint(s // 3, s // 2)
        x, y = rng.randint(0, s - side), rng.randint(0, s - side)
        ImageDraw.Draw(img).rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
        frames.append(img)
    return frames, colours


def write_clip(path: Path, frames: list[Image.Image], fps: int) -> None:
    """Frames -> an MP4 (mpeg4 at the best quantiser, yuv420p) written with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="mp4") as c:
        stream = c.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def frame_time(position: int, fps: int) -> float:
    """Seconds from the first frame to the 0-based frame `position` (what load_video reports)."""
    return position / fps


def when_answer_text(seconds: float) -> str:
    """The reply: the time as the video block writes it ("At 1.5s.")."""
    return f"At {TIMESTAMP_FORMAT.format(seconds)}."


def when_record(rid: str, key: str, position: int, colours: list[str], fps: int) -> dict:
    seconds = frame_time(position, fps)
    # "images": [] as well: tools that list a record's images (vlm-eval's captions rows) find none
    return {"id": rid, "images": [], "videos": [key], "task": "when", "answer": position + 1, "answer_time": seconds,
            "frames": colours,
            "conversations": [{"role": "user", "content": f"{WHEN_PROMPT}\n<video>"},
                              {"role": "assistant", "content": when_answer_text(seconds)}]}


def _when_split(out: Path, split: str, n: int, rng: random.Random, cfg: MediaTaskConfig) -> list[dict]:
    (out / "clips").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, position in enumerate(_balanced(list(range(cfg.clip_frames)), n, rng)):
        frames, colours = clip_frames(position, rng, cfg)
        key = f"clips/{split}_{i:05d}.mp4"
        write_clip(out / key, frames, cfg.clip_fps)
        recs.append(when_record(f"when-{split}-{i:05d}", key, position, colours, cfg.clip_fps))
    return recs


def generate_media(out: str | Path, cfg: MediaTaskConfig | None = None) -> dict:
    """Write both tasks' records, images and clips under `out`; returns the summary (media.json)."""
    cfg = cfg or MediaTaskConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    files = {
        "detail_train.jsonl": _detail_split(out, "train", cfg.train_detail, rng, cfg),
        "detail_heldout.jsonl": _detail_split(out, "heldout", cfg.heldout_detail, rng, cfg),
        "when_train.jsonl": _when_split(out, "train", cfg.train_clips, rng, cfg),
        "when_heldout.jsonl": _when_split(out, "heldout", cfg.heldout_clips, rng, cfg),
    }
    for name, recs in files.items():
        write_records(out / name, recs)
    summary = {
        "config": asdict(cfg),
        "files": {name: len(recs) for name, recs in files.items()},
        "answers": {name: _counts(recs) for name, recs in files.items()},
    }
    (out / "media.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _counts(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r["answer"])] = counts.get(str(r["answer"]), 0) + 1
    return dict(sorted(counts.items()))


# -- the tiny LLM's reading corpus for these tasks -------------------------------------------------
def view_of_object(record: dict, layout: dict | None) -> int:
    """Which view of a detail record's image holds the object's centre: 0 (the thumbnail, untiled),
    else 1 + the tile index (row-major) under the image's Tiling (a cache's `layout(key)`)."""
    from vlm_dist.contract.tiling import Tiling
    if layout is None:
        return 0
    t = Tiling.from_dict({k: v for k, v in layout.items() if k != "kind"})
    if not t.num_tiles:
        return 0
    x0, y0, x1, y1 = record["object"]["box"]
    w, h = t.image_size
    cx = t.offset[0] + (x0 + x1) / 2 * t.resized_size[0] / w
    cy = t.offset[1] + (y0 + y1) / 2 * t.resized_size[1] / h
    for i, (left, top, right, bottom) in enumerate(t.tile_boxes()):
        if left <= cx < right and top <= cy < bottom:
            return 1 + i
    raise ValueError(f"record {record['id']}: the object's centre ({cx:.1f}, {cy:.1f}) is on no tile")


def reading_example(record: dict, encoder, tokenizer, layouts: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one media record with what its views show written as words into the
    first slots of those views' runs: the object's shape in the view holding it (a detail
    record), each frame's square colour in that frame's run (a when record). As the demo's
    reading_corpus does for its images: a stand-in for an LLM that arrives able to read its
    context; what training then shows is whether the connector can put those words there from
    the tower's features alone. `layouts`: {"image": [...], "video": [...]} as for encode()."""
    from vlm_dist.contract.media import IMAGE, VIDEO, token_id
    sample = encoder.encode(record, layouts=layouts)
    ids = list(sample.input_ids)
    if record["task"] == "detail":
        kind, runs = IMAGE, {view_of_object(record, layouts["image"][0]): record["object"]["shape"]}
    else:
        kind, runs = VIDEO, dict(enumerate(record["frames"]))
    per_view = encoder.blocks[kind.name].num_tokens
    pad = token_id(tokenizer, kind.pad_token)
    slots = [i for i, t in enumerate(ids) if t == pad]
    for view, word in runs.items():
        words = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
        if len(words) > per_view:
            raise ValueError(f"record {record['id']}: {word!r} is {len(words)} tokens, over the "
                             f"{per_view} slots of one view")
        for j, w in enumerate(words):
            ids[slots[view * per_view + j]] = w
    return ids, sample.labels
