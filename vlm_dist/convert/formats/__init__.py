"""Dataset formats `vlm-convert` reads, by name. Each module only parses its native rows.

A `Format` says how to read rows from one input file, how to parse one row into
a `RawRecord`, where relative image (and video) paths in that format point by default,
and, where the format has one, how to read its own stage-mixture file (LLaVA-NeXT's
data YAML for llava-video).
The shared rules (roles, placeholders, images, drops) live in common.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlm_dist.convert.formats import jsonl, llava, llava_video, mantis
from vlm_dist.convert.formats.common import json_rows


@dataclass(frozen=True)
class Format:
    name: str
    rows: Callable            # Path -> Iterator[(source, row)]
    make_parse: Callable      # key_map text -> (row -> RawRecord)
    images_from_input_dir: bool  # relative image paths start at the input file's folder
    require_image: bool = False
    help: str = ""
    videos: bool = False      # rows may carry videos (RawRecord.videos)
    # the format's own stage-mixture file: (is_mixture(path), parts(path, seed) -> [(json file, rows)])
    mixture: tuple[Callable, Callable] | None = None


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("llava-pretrain", json_rows, lambda _k: llava.parse, False, require_image=True,
           help="LLaVA-Pretrain blip_laion_cc_sbu_558k.json (image-caption pairs)"),
    Format("llava-instruct", json_rows, lambda _k: llava.parse, False,
           help="LLaVA-Instruct-150K / llava_v1_5_mix665k.json (multi-turn, text-only records kept)"),
    Format("mantis", mantis.rows, lambda _k: mantis.parse, True,
           help="Mantis-Instruct JSON or parquet subset (embedded image bytes written out by content)"),
    Format("llava-video", json_rows, lambda _k: llava_video.parse, True, videos=True,
           mixture=(llava_video.is_mixture, llava_video.mixture_parts),
           help="LLaVA-Video-178K subset JSON (video + LLaVA turns, <image> = the video), or a LLaVA-NeXT "
                "data YAML listing them"),
    Format("jsonl", json_rows, lambda k: jsonl.make_parser(jsonl.parse_key_map(k)), False, videos=True,
           help="any JSON/JSONL of the contract's shape (images and videos), with --key-map for other key names"),
]}
