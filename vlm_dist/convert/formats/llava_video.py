"""LLaVA-Video-178K (lmms-lab/LLaVA-Video-178K): LLaVA-style video instruction records.

The layout, as documented and as the code that trains on it reads it:
- Dataset card (huggingface.co/datasets/lmms-lab/LLaVA-Video-178K, README.md `configs`): one
  folder per subset, named by duration bucket and video source (0_30_s_academic_v0_1,
  0_30_s_youtube_v0_1, 0_30_s_activitynet, 0_30_s_perceptiontest, 0_30_s_nextqa, then
  30_60_s_*, 1_2_m_*, 2_3_m_*), with splits caption / open_ended / multi_choice read from
  `*cap*.json`, `*oe*.json`, `*mc*.json` (e.g. 0_30_s_youtube_v0_1/0_30_s_youtube_oe_v0_1_qa_processed.json)
  and the videos as `<subset>_videos_<k>.tar.gz` in the same folder.
- Each JSON file is a list of {"id", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": ...}, ...], "data_source": "0_30_s_nextqa", "video":
  "NextQA/NExTVideo/1006/8968804598.mp4"}; other video paths look like
  "academic_source/Charades/RW587.mp4" or "liwei_youtube_videos/videos/youtube_video_2024/ytb_<id>.mp4".
  (This row shape is quoted from public loaders of the dataset, e.g. prepare_mcq.py-style
  converters; no raw row was readable from here, so the tests write rows of exactly this shape.)
- LLaVA-NeXT's trainer (LLaVA-VL/LLaVA-NeXT, llava/train/train.py, LazySupervisedDataset._get_item):
  a row with a "video" key (and no "image") is a video sample, its file at
  os.path.join(--video_folder, row["video"]), frames sampled with decord; the `<image>` token
  (DEFAULT_IMAGE_TOKEN) in the conversation stands for the whole video (with
  add_time_instruction the first human turn becomes "<image>\\n{time instruction}\\n{question}").
  Its data YAML (scripts/video/train/exp.yaml) declares a stage's mixture of these files:
  `datasets: [{json_path: ..., sampling_strategy: all | first:N | end:N | random:N}]`, N a count or "P%".

Mapping to the contract: `video` -> `videos: [path]`, and in a row with a video and no image
each `<image>` becomes `<video>` (a row whose text already says `<video>` is kept as it is; a
row with both an image and a video is dropped, "ambiguous placeholder", since its `<image>`
could be either). A row with a video and no placeholder gets `<video>\\n` at the start of its
first user turn (a counted repair, where LLaVA's preprocess puts the token too).
`data_source` is counted per kept record (stats `kept_by_source`); ids repeat across files
(the same video has caption and QA rows), so repeats get "#2", "#3"... (counted), or pass
--id-prefix per subset.

Relative video paths start at the JSON file's folder (where that subset's tarballs unpack,
e.g. 0_30_s_academic_v0_1/academic_source/...); --images-from names one shared folder instead
(LLaVA-NeXT's single --video_folder). --image-root is the feature cache's media root: it must
contain the videos.

An input ending in .yaml/.yml is a LLaVA-NeXT data YAML: its json_paths (relative ones from the
YAML's folder) are converted in order, each with its sampling_strategy applied before conversion:
first:N / end:N as LLaVA-NeXT does; random:N draws N rows with a permutation seeded by --seed
and the file's path (LLaVA-NeXT's draw is unseeded), kept in file order. For weighting
converted sets against each other, prefer the stage config's own mixture (data.records with
weight/count, vlm_dist.data.mixture): a converter-side draw is fixed once written.

    vlm-convert llava-video --input LLaVA-Video-178K/0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json \\
        --out academic_oe.jsonl --image-root LLaVA-Video-178K
    vlm-convert llava-video --input exp.yaml --out video_mix.jsonl --image-root LLaVA-Video-178K --seed 0
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Iterator

from vlm_dist.contract.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vlm_dist.convert.formats import llava
from vlm_dist.convert.formats.common import ConvertError, Drop, RawRecord, json_rows

STRATEGIES = ("all", "first", "end", "random")


def parse(row) -> RawRecord:
    """A LLaVA row (llava.parse: id, images, turns) plus its video(s) and data_source."""
    rec = llava.parse(row)
    videos = _video_list(row.get("video", row.get("videos")))
    images, turns = rec.images, rec.turns
    if videos:
        has_image_ph = any(isinstance(text, str) and IMAGE_PLACEHOLDER in text for _, text in turns)
        if images and has_image_ph:
            raise Drop("ambiguous placeholder",
                       f"{IMAGE_PLACEHOLDER} in a row with {len(images)} image(s) and {len(videos)} video(s)")
        if not images:      # LLaVA-Video's <image> is the video
            turns = [(role, text.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) if isinstance(text, str) else text)
                     for role, text in turns]
    source = row.get("data_source")
    return RawRecord(id=rec.id, images=images, turns=turns, videos=videos,
                     source=None if source is None else str(source))


def _video_list(value) -> list[str]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in items):
        raise Drop("malformed video reference", f"video entry {value!r} is not a path")
    return list(items)


# -- LLaVA-NeXT's data YAML: a stage's mixture of JSON files -----------------------------------------

def is_mixture(path: Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def mixture_parts(path: Path, seed: int = 0) -> list[tuple[Path, Iterator[tuple[str, Any]]]]:
    """(json file, its selected (source, row) pairs) for each entry of a LLaVA-NeXT data YAML."""
    import yaml

    from vlm_dist.contract.records import read_text

    path = Path(path)
    try:
        doc = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise ConvertError(f"{path}: not valid YAML ({e})") from None
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConvertError(f"{path}: expected a 'datasets' list of {{json_path, sampling_strategy}} entries")
    parts = []
    for i, entry in enumerate(entries):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise ConvertError(f"{where}: needs a json_path")
        json_path = Path(entry["json_path"])
        json_path = json_path if json_path.is_absolute() else path.parent / json_path
        if not json_path.is_file():
            raise ConvertError(f"{where}: json_path {json_path} is not a file")
        take = _strategy(str(entry.get("sampling_strategy", "all")), where)
        parts.append((json_path, _select(json_path, take, seed)))
    return parts


def _strategy(text: str, where: str) -> tuple[str, str | None]:
    name, _, number = text.partition(":")
    if name not in STRATEGIES or (name == "all") != (not number):
        raise ConvertError(f"{where}: sampling_strategy {text!r}: expected all, first:N, end:N or random:N "
                           "(N a count or a percentage like 10%)")
    return name, number or None


def _select(json_path: Path, take: tuple[str, str | None], seed: int) -> Iterator[tuple[str, Any]]:
    name, number = take
    rows = list(json_rows(json_path))
    if name == "all":
        yield from rows
        return
    try:
        n = math.ceil(int(number[:-1]) * len(rows) / 100) if number.endswith("%") else int(number)
    except ValueError:
        raise ConvertError(f"{json_path}: sampling_strategy {name}:{number}: N must be an integer or a "
                           "percentage") from None
    n = max(0, min(n, len(rows)))
    if name == "first":
        yield from rows[:n]
    elif name == "end":
        yield from rows[len(rows) - n:]
    else:
        pick = sorted(random.Random(f"{seed}:{json_path.name}").sample(range(len(rows)), n))
        yield from (rows[i] for i in pick)
