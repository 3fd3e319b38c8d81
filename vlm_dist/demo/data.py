"""The demo's synthetic dataset: coloured shapes at positions, captions and multi-image questions.

    python launch/demo_data.py --out /tmp/demo/data [--seed 0] [--scale 1.0]

Every image is one shape (circle, square, triangle) in one colour (red, green,
blue, yellow) on one side (left, right) of a white canvas, with a little jitter
in size and placement; its caption names all three: "a red circle on the left."
From these images it writes, in the sample contract (image keys are paths
relative to --out, which is the image root for `vlm-cache build`):

    stage1_train.jsonl        single-image captions, plain template ("<image>" -> caption)
    sft_train.jsonl           chatml mix: captions, "describe each image in order" over 2-3
                              images, "which image shows X?" over 2 and 3 images, POPE yes/no
    heldout_captions.jsonl    held-out caption prompts (the reference is the assistant turn)
    heldout_describe.jsonl    held-out describe-in-order records
    heldout_which.jsonl       held-out which-image questions, "answer": 1-based image position
    heldout_pope.jsonl        held-out POPE yes/no questions, "answer": "yes"|"no", "pope_setting"
    heldout_text.jsonl        text-only sentences (language regression set, no images)
    heldout_loss.jsonl        captions + describe + which, for held-out loss / perplexity
    dataset.json              counts, per-position answer counts, seed, vocabulary

In every which-image set the answer image sits in each position exactly equally
often (n // k per position), so a model that only looks at the last image scores
1/k. Distractors differ from the asked shape in both colour and shape, so the
question is about finding the right image, not about fine attribute binding.
POPE on these scenes: an object is a colour+shape pair ("red circle", 12 in all), and
each image shows exactly one. Per image and setting POPE asks about the object it shows
("yes") and one it does not show ("no"), the absent one drawn as POPE's settings say:
random (any of the 11 absent objects), popular (the absent object drawn most often in the
training images) and adversarial (POPE takes the objects that co-occur most with the
image's; a one-object image has no co-occurrence, so here it is the absent objects that
share the most with the shown one: same colour or same shape, the ones a model that half
looked would claim). The held-out POPE set asks about the held-out caption images; the
training mix holds one yes and one no question (setting drawn at random) per image for
`train_pope` training caption images.
Held-out images are drawn separately from training images (new jitter, own files).
Same seed and scale -> byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlm_dist.contract.records import write_records
from vlm_dist.inference import evaluation as ev

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")
ORDINALS = ("first", "second", "third")

CAPTION_PROMPT = "Describe the image."
DESCRIBE_PROMPT = "Describe each image in order."
WHICH_PROMPT = "Which image shows the {colour} {shape}?"

TEXT_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle is a shape and a blue square is a shape.",
    "Hello world. Yes. No. True. False.",
    "one two three four five six seven eight nine ten",
    "The first image. The second image. The third image.",
    "Question answer user assistant system.",
    "A green triangle in the center. A yellow star near the bottom.",
    "color shape position left right top bottom center middle large small",
]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on the {self.position}."


@dataclass
class DemoDataConfig:
    seed: int = 0
    image_size: int = 64            # pixels per side (the vision processor resizes)
    train_captions: int = 480
    train_describe: int = 160
    train_which: int = 480          # per image count (2 and 3); a multiple of 6 keeps positions exact
    heldout_captions: int = 48
    heldout_describe: int = 24
    heldout_which: int = 48         # per image count (2 and 3)
    train_pope: int = 120           # training caption images asked a yes and a no POPE question

    def scaled(self, scale: float) -> "DemoDataConfig":
        """Counts times `scale`, which-image counts kept multiples of 6 (balanced over 2 and 3)."""
        def n(x, mult=1):
            return max(mult, int(round(x * scale / mult)) * mult)
        return DemoDataConfig(self.seed, self.image_size, n(self.train_captions), n(self.train_describe),
                              n(self.train_which, 6), n(self.heldout_captions), n(self.heldout_describe),
                              n(self.heldout_which, 6), n(self.train_pope))


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]


def draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """One shape on a white canvas: half the canvas wide, jittered a little."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    half = size / 2
    r = half * rng.uniform(0.30, 0.40)                      # radius / half side
    cx = (half / 2 if scene.position == "left" else half * 1.5) + rng.uniform(-0.08, 0.08) * half
    cy = half + rng.uniform(-0.25, 0.25) * half
    box = [cx - r, cy - r, cx + r, cy + r]
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        d.ellipse(box, fill=colour)
    elif scene.shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


class _Writer:
    """Draws and saves images with unique sequential names under out/images."""

    def __init__(self, out: Path, split: str, size: int, rng: random.Random):
        self.dir, self.split, self.size, self.rng, self.n = out / "images", split, size, rng, 0
        self.dir.mkdir(parents=True, exist_ok=True)

    def image(self, scene: Scene) -> str:
        name = f"{self.split}_{self.n:05d}.png"
        self.n += 1
        draw(scene, self.size, self.rng).save(self.dir / name, format="PNG", optimize=False)
        return f"images/{name}"


def _numbered(n: int) -> str:
    return "\n".join(f"Image {i + 1}: <image>" for i in range(n))


def caption_record(rid: str, key: str, scene: Scene, template: str) -> dict:
    user = "<image>" if template == "plain" else f"<image>\n{CAPTION_PROMPT}"
    return {"id": rid, "images": [key], "task": "caption", "scene": asdict(scene),
            "conversations": [{"role": "user", "content": user},
                              {"role": "assistant", "content": scene.caption()}]}


def describe_record(rid: str, keys: list[str], scenes: list[Scene]) -> dict:
    answer = " ".join(f"Image {i + 1}: {s.caption()}" for i, s in enumerate(scenes))
    return {"id": rid, "images": keys, "task": "describe", "scenes": [asdict(s) for s in scenes],
            "conversations": [{"role": "user", "content": f"{_numbered(len(keys))}\n{DESCRIBE_PROMPT}"},
                              {"role": "assistant", "content": answer}]}


def which_answer_text(position: int) -> str:
    """The reference answer for a 1-based image position."""
    return f"Image {position}."


def which_record(rid: str, keys: list[str], scenes: list[Scene], answer: int) -> dict:
    target = scenes[answer - 1]
    question = WHICH_PROMPT.format(colour=target.colour, shape=target.shape)
    return {"id": rid, "images": keys, "task": "which_image", "answer": answer,
            "target": {"colour": target.colour, "shape": target.shape},
            "scenes": [asdict(s) for s in scenes],
            # the question comes first, so a causal LM reads each image already knowing what to look for
            "conversations": [{"role": "user", "content": f"{question}\n{_numbered(len(keys))}"},
                              {"role": "assistant", "content": which_answer_text(answer)}]}


def scene_object(scene: Scene | dict) -> str:
    """The POPE object an image shows: its colour and shape ("red circle"); position is not an object."""
    s = scene if isinstance(scene, dict) else asdict(scene)
    return f"{s['colour']} {s['shape']}"


def pope_objects() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def shared_attributes(a: str, b: str) -> int:
    """How many of colour and shape two objects share: the demo's stand-in for co-occurrence."""
    return sum(x == y for x, y in zip(a.split(), b.split()))


def pope_record(rid: str, key: str, scene: dict, obj: str, answer: str, setting: str) -> dict:
    question = ev.POPE_QUESTION.format(object=obj)
    return {"id": rid, "images": [key], "task": "pope", "answer": answer, "pope_setting": setting,
            "object": obj, "scene": scene,
            # the question comes first, as in which-image: a causal LM reads the image knowing what to look for
            "conversations": [{"role": "user", "content": f"{question}\n<image>"},
                              {"role": "assistant", "content": f"{answer.capitalize()}."}]}


def pope_records(captions: list[dict], frequency: dict[str, float], rng: random.Random,
                 settings: tuple[str, ...] | None = None) -> list[dict]:
    """A yes and a no question per caption record's image: in every setting (settings=None: one at random)."""
    out = []
    for r in captions:
        present = scene_object(r["scene"])
        for setting in settings or (rng.choice(ev.POPE_SETTINGS),):
            [absent] = ev.pope_negatives({present}, pope_objects(), setting, 1, rng, frequency, shared_attributes)
            base = r["id"].replace("-cap-", "-pope-") + f"-{setting}"
            out.append(pope_record(base + "-yes", r["images"][0], r["scene"], present, "yes", setting))
            out.append(pope_record(base + "-no", r["images"][0], r["scene"], absent, "no", setting))
    return out


def object_frequency(records: list[dict]) -> dict[str, int]:
    """How many images show each object, over records' "scene"/"scenes" (POPE's popular ranking)."""
    counts = {o: 0 for o in pope_objects()}
    for r in records:
        for s in r.get("scenes") or [r["scene"]]:
            counts[scene_object(s)] += 1
    return counts


def _which_scenes(k: int, answer: int, rng: random.Random) -> list[Scene]:
    """k scenes; scene[answer-1] is the target, every other one differs from it in colour AND shape."""
    scenes = all_scenes()
    target = rng.choice(scenes)
    others = [s for s in scenes if s.colour != target.colour and s.shape != target.shape]
    picked: list[Scene] = []
    while len(picked) < k - 1:   # distractors also differ from each other in their colour+shape pair
        s = rng.choice(others)
        if all((s.colour, s.shape) != (p.colour, p.shape) for p in picked):
            picked.append(s)
    picked.insert(answer - 1, target)
    return picked


def _balanced_answers(n: int, k: int, rng: random.Random) -> list[int]:
    """n answers in 1..k, each exactly n // k times (n must be a multiple of k), shuffled."""
    if n % k:
        raise ValueError(f"{n} which-image questions over {k} images cannot balance the answer "
                         f"position; use a multiple of {k}")
    answers = [1 + i % k for i in range(n)]
    rng.shuffle(answers)
    return answers


def build_split(out: Path, split: str, n_captions: int, n_describe: int, n_which: int, size: int,
                rng: random.Random, caption_template: str) -> dict[str, list[dict]]:
    w = _Writer(out, split, size, rng)
    scenes = all_scenes()
    caps = []
    for i in range(n_captions):
        s = scenes[i % len(scenes)]          # every scene equally often (up to the remainder)
        caps.append(caption_record(f"{split}-cap-{i:05d}", w.image(s), s, caption_template))
    desc = []
    for i in range(n_describe):
        ss = [rng.choice(scenes) for _ in range(2 + i % 2)]
        desc.append(describe_record(f"{split}-desc-{i:05d}", [w.image(s) for s in ss], ss))
    which = []
    for k in (2, 3):
        for i, answer in enumerate(_balanced_answers(n_which, k, rng)):
            ss = _which_scenes(k, answer, rng)
            which.append(which_record(f"{split}-which{k}-{i:05d}", [w.image(s) for s in ss], ss, answer))
    rng.shuffle(caps)
    return {"captions": caps, "describe": desc, "which": which}


def position_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """{"2": {"1": n, "2": n}, "3": {...}}: which-image answers per image count and position."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        k = out.setdefault(str(len(r["images"])), {})
        k[str(r["answer"])] = k.get(str(r["answer"]), 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def generate(out: str | Path, cfg: DemoDataConfig | None = None) -> dict:
    """Write the whole dataset under `out`; returns the summary also written to dataset.json."""
    cfg = cfg or DemoDataConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    train = build_split(out, "train", cfg.train_captions, cfg.train_describe, cfg.train_which,
                        cfg.image_size, rng, caption_template="chatml")
    held = build_split(out, "heldout", cfg.heldout_captions, cfg.heldout_describe, cfg.heldout_which,
                       cfg.image_size, rng, caption_template="chatml")
    # stage 1 sees the same training images with the plain "<image> -> caption" prompt
    stage1 = [caption_record(r["id"].replace("-cap-", "-s1-"), r["images"][0], Scene(**r["scene"]), "plain")
              for r in train["captions"]]
    frequency = object_frequency(train["captions"] + train["describe"] + train["which"])
    train_pope = pope_records(sorted(train["captions"], key=lambda r: r["id"])[:cfg.train_pope], frequency, rng)
    held_pope = pope_records(sorted(held["captions"], key=lambda r: r["id"]), frequency, rng,
                             settings=ev.POPE_SETTINGS)
    sft = train["captions"] + train["describe"] + train["which"] + train_pope
    rng.shuffle(sft)
    text = [{"id": f"text-{i:03d}", "images": [], "task": "text",
             "conversations": [{"role": "user", "content": "Repeat:"},
                               {"role": "assistant", "content": s}]}
            for i, s in enumerate(TEXT_SENTENCES)]
    files = {
        "stage1_train.jsonl": stage1,
        "sft_train.jsonl": sft,
        "heldout_captions.jsonl": held["captions"],
        "heldout_describe.jsonl": held["describe"],
        "heldout_which.jsonl": held["which"],
        "heldout_pope.jsonl": held_pope,
        "heldout_text.jsonl": text,
        "heldout_loss.jsonl": held["captions"] + held["describe"] + held["which"],
    }
    for name, recs in files.items():
        write_records(out / name, recs)
    summary = {
        "config": asdict(cfg),
        "colours": list(COLOURS), "shapes": list(SHAPES), "positions": list(POSITIONS),
        "files": {name: len(recs) for name, recs in files.items()},
        "images": sum(1 for _ in (out / "images").iterdir()),
        "object_frequency": frequency,
        "which_answer_positions": {"train": position_counts(train["which"]),
                                   "heldout": position_counts(held["which"])},
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (records, images/, dataset.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every record count (CI: 0.1)")
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args(argv)
    cfg = DemoDataConfig(seed=args.seed, image_size=args.image_size).scaled(args.scale)
    summary = generate(args.out, cfg)
    print(json.dumps({"out": args.out, **{k: summary[k] for k in ("files", "images",
                                                                     "which_answer_positions")}}))
    return 0
