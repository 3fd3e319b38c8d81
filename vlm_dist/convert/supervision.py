"""vlm-convert check: the supervision check before any GPU time is spent.

Tokenizes every record of each file once (in parallel, cached next to the file;
see vlm_dist/data/lengths.py), prints the length distribution and the
supervised-token fraction per file, writes `<stem>.supervision.json` (the
summary) and `<stem>.problems.jsonl` (every record that cannot be trained on,
with its reason), and exits 1 when there are any. Records repeating an earlier
record's id are a warning, not a failure (training keeps them too): counted and
listed in `<stem>.duplicates.jsonl`.

    vlm-convert check --records stage1.jsonl --tokenizer Qwen3-8B-Base --template plain --image-tokens 64 \\
        --max-seq-len 2048 [--truncate] [--workers 16]
    vlm-convert check --records video.jsonl --tokenizer Qwen3-8B-Base --template chatml --image-tokens 64 \\
        --video-tokens 16 --feature-cache data/cache/video [--tiled] --max-seq-len 4096

Tiled images and videos: a block's length depends on the image's grid and the video's sampled
frames, which the feature cache records per key. With --feature-cache the records are laid out
from its layouts as training lays them out (vlm_dist.data.samples.reference_layouts; --tiled
when model.tiling is set); without it every image is one view and every video counts as one
frame, so video lengths are a lower bound.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlm_dist.contract.prompt import TEMPLATES
from vlm_dist.convert.side_files import side_path


def add_parser(sub):
    p = sub.add_parser("check", help="tokenize records once, report lengths and supervision, fail on bad records",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--records", nargs="+", required=True, type=Path, help="records JSONL file(s)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (AutoTokenizer.from_pretrained)")
    p.add_argument("--template", required=True, choices=TEMPLATES, help="plain (stage 1) or chatml (SFT)")
    p.add_argument("--image-tokens", type=int, default=64, help="pad slots per image (the resampler's N)")
    p.add_argument("--video-tokens", type=int, default=None,
                   help="pad slots per video frame (model.video.tokens_per_frame); default: --image-tokens")
    p.add_argument("--feature-cache", type=Path, default=None,
                   help="a built feature cache: lay out tiled images and videos' frames from its layouts")
    p.add_argument("--tiled", action="store_true",
                   help="with --feature-cache: images take the cache's tiling (a run with model.tiling set)")
    p.add_argument("--max-seq-len", type=int, required=True)
    p.add_argument("--truncate", action="store_true",
                   help="cut over-long records at max_seq_len instead of failing (never inside an image block)")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: next to each records file")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: min(8, CPUs))")
    return p


def run_cli(args) -> int:
    from vlm_dist.data.lengths import (check_supervision, duplicate_ids, format_summary, summarize,
                                       tokenize_records)

    from vlm_dist.convert.formats.common import ConvertError

    if args.tiled and args.feature_cache is None:
        raise ConvertError("--tiled takes the tilings from a feature cache: add --feature-cache DIR")
    tokens = args.image_tokens if args.video_tokens is None else \
        {"image": args.image_tokens, "video": args.video_tokens}
    layouts = None
    if args.feature_cache is not None:
        from vlm_dist.data.samples import read_index, reference_layouts
        if not Path(args.feature_cache).is_dir():
            raise ConvertError(f"--feature-cache {args.feature_cache}: no such directory")
        layouts = reference_layouts(args.feature_cache, read_index(args.feature_cache), args.tiled)
    failed = 0
    for path in args.records:
        table = tokenize_records(path, args.tokenizer, args.template, tokens, args.max_seq_len,
                                 args.truncate, args.cache_dir, args.workers, layouts=layouts)
        summary = summarize(table)
        problems = table.problems()
        side_path(path, "supervision.json").write_text(
            json.dumps({**summary, "cache": table.cache_path, "key": table.key}, indent=2, sort_keys=True) + "\n")
        for suffix, rows in (("problems.jsonl", problems), ("duplicates.jsonl", duplicate_ids([table]))):
            with open(side_path(path, suffix), "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        print(format_summary(path.name, summary))
        if summary["duplicate_ids"]:
            print(f"WARN {path}: {summary['duplicate_ids']} record(s) repeat an earlier record's id (kept; "
                  f"a held-out split keeps all records of one id on one side); listed in "
                  f"{side_path(path, 'duplicates.jsonl')}")
        try:
            check_supervision(table)
        except ValueError as e:
            print(f"FAIL {e}\n  full list: {side_path(path, 'problems.jsonl')}")
            failed += 1
    return 1 if failed else 0
