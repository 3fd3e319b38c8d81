"""Dataset formats `vlm-convert` reads, by name. Each module only parses its native rows.

A `Format` says how to read rows from one input file, how to parse one row into
a `RawRecord`, and where relative image paths in that format point by default.
The shared rules (roles, placeholders, images, drops) live in common.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlm_dist.convert.formats import jsonl, llava, mantis
from vlm_dist.convert.formats.common import json_rows


@dataclass(frozen=True)
class Format:
    name: str
    rows: Callable            # Path -> Iterator[(source, row)]
    make_parse: Callable      # key_map text -> (row -> RawRecord)
    images_from_input_dir: bool  # relative image paths start at the input file's folder
    require_image: bool = False
    help: str = ""


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("llava-pretrain", json_rows, lambda _k: llava.parse, False, require_image=True,
           help="LLaVA-Pretrain blip_laion_cc_sbu_558k.json (image-caption pairs)"),
    Format("llava-instruct", json_rows, lambda _k: llava.parse, False,
           help="LLaVA-Instruct-150K / llava_v1_5_mix665k.json (multi-turn, text-only records kept)"),
    Format("mantis", mantis.rows, lambda _k: mantis.parse, True,
           help="Mantis-Instruct JSON or parquet subset (embedded image bytes written out by content)"),
    Format("jsonl", json_rows, lambda k: jsonl.make_parser(jsonl.parse_key_map(k)), False,
           help="any JSON/JSONL of the contract's shape, with --key-map for other key names"),
]}
