"""Data of the local lmms-eval tasks: coloured shapes drawn with PIL and real photographs.

    python tests/lmms_tasks/make_data.py OUT_DIR PHOTO.jpg PHOTO.jpg ...

Writes vlm_dist_pope.parquet, vlm_dist_pairs.parquet and vlm_dist_choice.parquet into OUT_DIR
(the task YAMLs name them relative to the working directory, so lmms-eval runs there), with
images stored as `datasets` Image features so lmms-eval's doc_to_visual gets PIL images.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from vlm_dist.demo.data import COLOURS, SHAPES, Scene, draw

# what each known photo shows, and an object it does not show (POPE's truth for real photos)
PHOTO_OBJECTS = {"grace_hopper.jpg": ("person", "dog"), "china.jpg": ("building", "person"),
                 "flower.jpg": ("flower", "car")}
TASKS = ("vlm_dist_pope", "vlm_dist_pairs", "vlm_dist_choice")


def _photos(paths) -> list[tuple[str, str, str]]:
    """(path, present object, absent object) of the photos we know the content of."""
    known = [(str(p), *PHOTO_OBJECTS[Path(p).name]) for p in paths if Path(p).name in PHOTO_OBJECTS]
    if len(known) < 2:
        raise ValueError(f"need at least two of {sorted(PHOTO_OBJECTS)} among the photos, got {paths}")
    return known


def _png(img) -> dict:
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _jpeg(path: str) -> dict:
    return {"bytes": Path(path).read_bytes(), "path": None}


def pope_rows(scenes: list[Scene], photos, rng: random.Random) -> list[dict]:
    """Per image: one present object ("yes") and one absent ("no"): a random other shape for even
    scenes, the same shape in another colour (adversarial) for odd ones."""
    rows = []
    def add(image, obj, answer, category):
        rows.append({"question_id": str(len(rows)), "question": f"Is there a {obj} in the image?",
                     "answer": answer, "category": category, "image": image})
    for i, s in enumerate(scenes):
        image = _png(draw(s, 64, rng))
        add(image, f"{s.colour} {s.shape}", "yes", "random" if i % 2 == 0 else "adversarial")
        if i % 2 == 0:
            other = rng.choice([(c, sh) for c in COLOURS for sh in SHAPES if sh != s.shape])
            add(image, f"{other[0]} {other[1]}", "no", "random")
        else:
            add(image, f"{rng.choice([c for c in COLOURS if c != s.colour])} {s.shape}", "no", "adversarial")
    for path, present, absent in photos:
        add(_jpeg(path), present, "yes", "random")
        add(_jpeg(path), absent, "no", "random")
    return rows


def pair_rows(scenes: list[Scene], photos, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(0, len(scenes) - 1, 2):
        a, b = scenes[i], scenes[i + 1]
        true = i % 4 == 0
        named = b if true else Scene(rng.choice([c for c in COLOURS if c != b.colour]), b.shape, b.position)
        rows.append({"id": str(len(rows)), "image_0": _png(draw(a, 64, rng)), "image_1": _png(draw(b, 64, rng)),
                     "statement": f"The first image shows a {a.colour} {a.shape} and the second "
                                  f"a {named.colour} {named.shape}.", "answer": "yes" if true else "no"})
    (p0, o0, _), (p1, o1, x1) = photos[:2]
    for true in (True, False):
        rows.append({"id": str(len(rows)), "image_0": _jpeg(p0), "image_1": _jpeg(p1),
                     "statement": f"The first image shows a {o0} and the second a {o1 if true else x1}.",
                     "answer": "yes" if true else "no"})
    return rows


def choice_rows(scenes: list[Scene], photos, rng: random.Random) -> list[dict]:
    colours = list(COLOURS)
    rows = [{"id": str(i), "image": _png(draw(s, 64, rng)), "question": "What colour is the shape?",
             "choices": colours, "answer": colours.index(s.colour)} for i, s in enumerate(scenes)]
    subjects = sorted({o for _, present, absent in photos for o in (present, absent)})
    for path, present, _ in photos:
        rows.append({"id": str(len(rows)), "image": _jpeg(path), "question": "What does the photo show?",
                     "choices": subjects, "answer": subjects.index(present)})
    return rows


def build(out_dir: str | Path, photo_paths, n_scenes: int = 6, seed: int = 0) -> dict[str, int]:
    """Write the three tasks' parquet files; returns the number of documents of each task."""
    from datasets import Dataset, Features, Image, Sequence, Value

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = [Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(("left", "right")))
              for _ in range(n_scenes)]
    photos = _photos(photo_paths)
    text = Value("string")
    tables = {
        "vlm_dist_pope": (pope_rows(scenes, photos, rng), Features(
            question_id=text, question=text, answer=text, category=text, image=Image())),
        "vlm_dist_pairs": (pair_rows(scenes, photos, rng), Features(
            id=text, image_0=Image(), image_1=Image(), statement=text, answer=text)),
        "vlm_dist_choice": (choice_rows(scenes, photos, rng), Features(
            id=text, image=Image(), question=text, choices=Sequence(text), answer=Value("int64"))),
    }
    for name, (rows, features) in tables.items():
        Dataset.from_list(rows, features=features).to_parquet(str(out_dir / f"{name}.parquet"))
    return {name: len(rows) for name, (rows, _) in tables.items()}


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2:]))
