"""vlm-convert: public datasets -> the sample contract (JSONL), plus stage-1 hygiene and the
supervision check.

    vlm-convert llava-pretrain --input blip_laion_cc_sbu_558k.json --out stage1.jsonl --image-root LLaVA-Pretrain
    vlm-convert llava-instruct --input llava_v1_5_mix665k.json --out mix665k.jsonl --image-root playground/data
    vlm-convert mantis --input nlvr2/train-*.parquet --out nlvr2.jsonl --image-root mantis_images
    vlm-convert llava-video --input LLaVA-Video-178K/0_30_s_academic_v0_1/*_qa_processed.json --out video.jsonl \
        --image-root LLaVA-Video-178K
    vlm-convert jsonl --input mine.jsonl --out mine.records.jsonl --image-root imgs --key-map conversations=messages
    vlm-convert stage1 --input stage1.jsonl --out stage1.clean.jsonl --tokenizer Qwen3-8B-Base --dedup near \\
        --multi-image-fraction 0.05
    vlm-convert check --records stage1.clean.jsonl --tokenizer Qwen3-8B-Base --template plain --max-seq-len 2048

Every command writes, next to --out, `<stem>.dropped.jsonl` (each skipped record
with its reason) and `<stem>.stats.json` (read / kept / dropped by reason), and
prints the counts. Output is deterministic: same inputs and flags, same bytes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_dist.convert.formats import FORMATS
from vlm_dist.convert.formats.common import (ConvertError, ConvertOptions, ConvertStats, Drop,
                                       ImageResolver, normalize, unique_ids)
from vlm_dist.contract.records import write_records
from vlm_dist.convert import hygiene, supervision
from vlm_dist.convert.side_files import write_side_files


def convert(fmt_name: str, inputs: list[Path], out: Path, opts: ConvertOptions,
            key_map: str | None = None, limit: int | None = None,
            seed: int = 0) -> tuple[ConvertStats, list[dict]]:
    """Convert input files of one format into `out`; return the counts and the dropped list.

    Records keep input order (inputs in the order given; a mixture file's entries in its
    order, `seed` fixing its random draws). A record that breaks a rule is dropped and
    listed, never fatal; a broken flag or unreadable file is.
    """
    from tqdm import tqdm

    fmt = FORMATS[fmt_name]
    if fmt.name != "jsonl" and key_map:
        raise ConvertError("--key-map only applies to the jsonl format")
    parse = fmt.make_parse(key_map)
    opts.require_image = fmt.require_image
    stats, dropped = ConvertStats(fmt_name), []
    for path in inputs:
        if not Path(path).is_file():
            raise ConvertError(f"--input {path}: no such file")

    def parts():
        """(file, its (source, row) pairs): each input, or each file a mixture input lists."""
        for path in map(Path, inputs):
            if fmt.mixture is not None and fmt.mixture[0](path):
                yield from fmt.mixture[1](path, seed)
            else:
                yield path, fmt.rows(path)

    def records():
        index = 0
        for path, rows in parts():
            src = opts.images_from or (path.parent if fmt.images_from_input_dir else opts.image_root)
            resolve = ImageResolver(opts.image_root, src, stats)
            resolve_video = ImageResolver(opts.image_root, src, stats, kind="video") if fmt.videos else None
            for source, row in tqdm(rows, desc=path.name, unit=" rec", disable=None):
                if limit is not None and stats.read >= limit:
                    return
                stats.read += 1
                try:
                    if isinstance(row, Drop):
                        raise row
                    record = normalize(parse(row), index, opts, resolve, stats, resolve_video)
                except Drop as d:
                    stats.dropped[d.reason] += 1
                    rid = row.get("id") if isinstance(row, dict) else None
                    dropped.append({"index": index, "source": source, "id": None if rid is None else str(rid),
                                    "reason": d.reason, "detail": d.detail})
                else:
                    yield record
                index += 1

    out.parent.mkdir(parents=True, exist_ok=True)
    stats.kept = write_records(out, unique_ids(records(), stats))   # an error leaves no partial file
    return stats, dropped


def _add_convert_parser(sub, name: str, help: str):
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--input", nargs="+", required=True, type=Path,
                   help="input file(s), converted in the order given")
    p.add_argument("--out", required=True, type=Path, help="output records JSONL")
    p.add_argument("--image-root", type=Path, default=None,
                   help="folder the output image paths are relative to (the feature cache's image root); "
                        "default: the first input file's folder")
    p.add_argument("--images-from", type=Path, default=None,
                   help="folder relative image (and video) paths in the input start from; default: the input "
                        "file's folder for mantis and llava-video, --image-root for the others")
    p.add_argument("--id-prefix", default="", help="prepended to every record id (e.g. 'nlvr2/')")
    p.add_argument("--limit", type=int, default=None, help="read only the first N input records")
    if FORMATS[name].mixture is not None:
        p.add_argument("--seed", type=int, default=0,
                       help="seed of a mixture file's random:N draws (same seed, same records)")
    if name == "jsonl":
        p.add_argument("--key-map", default=None,
                       help="FIELD=KEY,... for fields id, images, videos, conversations, role, content")
    p.add_argument("--role-map", default="",
                   help="extra RAW=ROLE,... role names (ROLE one of system, user, assistant)")
    return p


def _role_map(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, text.split(",")):
        raw, sep, role = item.partition("=")
        if not sep or role.strip() not in ("system", "user", "assistant"):
            raise ConvertError(f"--role-map entry {item!r}: expected RAW=ROLE with ROLE system|user|assistant")
        out[raw.strip()] = role.strip()
    return out


def run_convert(args) -> int:
    image_root = args.image_root or args.input[0].parent
    opts = ConvertOptions(image_root=image_root, images_from=args.images_from,
                          id_prefix=args.id_prefix, role_map=_role_map(args.role_map))
    stats, dropped = convert(args.format, args.input, args.out, opts,
                             key_map=getattr(args, "key_map", None), limit=args.limit,
                             seed=getattr(args, "seed", 0))
    summary = {**stats.to_dict(), "inputs": [str(p) for p in args.input], "out": str(args.out),
               "image_root": str(Path(image_root).resolve())}
    dropped_path, stats_path = write_side_files(args.out, summary, dropped)
    print(stats.line())
    print(f"wrote {args.out} ({stats.kept} records); dropped list {dropped_path}; counts {stats_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True, metavar="<format|stage1|check>")
    for name, fmt in FORMATS.items():
        _add_convert_parser(sub, name, fmt.help).set_defaults(run=run_convert)
    hygiene.add_parser(sub).set_defaults(run=hygiene.run_cli)
    supervision.add_parser(sub).set_defaults(run=supervision.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlm_dist.errors import run_cli
    return run_cli("vlm-convert", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConvertError as e:
        print(f"vlm-convert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
