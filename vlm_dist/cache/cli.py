"""`vlm-cache`: build, finalize, verify and describe the feature cache.

    vlm-cache build --records train.jsonl --image-root images/ --vision-model google/siglip-so400m-patch14-384 --out cache/
    vlm-cache build ... --tiling '{"grids": [[1,2],[2,1],[2,2]], "tokens_per_tile": 64}' --frames 8 --max-fps 2
    torchrun --nproc-per-node 8 -m preprocess.cache_cli build ...        # one slice per rank
    vlm-cache build ... --shard-index $SLURM_ARRAY_TASK_ID --num-shards 16 && vlm-cache finalize cache/
    vlm-cache verify cache/ [--quick]
    vlm-cache info cache/

Exit status: 0 when the command completed (a build with failed images
included: they are listed in failures.jsonl), 1 when it could not, 2 for bad
arguments.
"""
from __future__ import annotations

import argparse
import json
import sys

from vlm_dist.cache.reader import (CacheError, fingerprint_field, last_verified, read_manifest,
                                   verify_cache, write_verified_stamp)
from vlm_dist.contract.records import RecordError


def _build_parser() -> argparse.ArgumentParser:
    from vlm_dist.cache.build import BuildConfig
    from vlm_dist.contract.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from vlm_dist.model.vision import DEFAULT_VISION_MODEL

    d = BuildConfig(out="")
    p = argparse.ArgumentParser(prog="vlm-cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="encode images into a feature cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--records", nargs="+", default=[], metavar="JSONL",
                   help="record files (sample contract); their image references are encoded")
    b.add_argument("--image-list", nargs="+", default=[], dest="image_lists", metavar="TXT",
                   help="plain lists of image files, one path per line (instead of or besides records)")
    b.add_argument("--video-list", nargs="+", default=[], dest="video_lists", metavar="TXT",
                   help="plain lists of video files, one path per line")
    b.add_argument("--image-root", default=".",
                   help="image and video references are relative to this directory; a reference "
                        "that leaves it (absolute, .., a symlink out) is a listed failure, never read")
    b.add_argument("--vision-model", default=DEFAULT_VISION_MODEL, help="hub id or local directory")
    b.add_argument("--out", required=True, help="cache directory")
    b.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images or videos decoded per batch; views (tiles, frames) per forward at most")
    b.add_argument("--workers", type=int, default=None,
                   help="decode/resize worker processes per build process (default: this node's CPUs "
                        f"shared among its build processes, {d.workers} to {MAX_AUTO_WORKERS}; one "
                        "worker decodes ~100-250 photos/s, a GPU encodes far more)")
    b.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    b.add_argument("--dtype", default=d.dtype, choices=["bf16", "fp16", "fp32"])
    b.add_argument("--feature-layer", type=int, default=d.feature_layer,
                   help="hidden_states index of the features (-2: penultimate layer)")
    b.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="images or videos per Arrow shard (a key's views never cross a shard)")
    b.add_argument("--pool", type=int, default=d.pool, choices=[1, 2],
                   help="2: average-pool the patch grid 2x2 (4x less storage)")
    b.add_argument("--shard-index", type=int, default=None,
                   help="this process's slice (Slurm job array task, separate processes)")
    b.add_argument("--num-shards", type=int, default=None, help="number of slices")
    b.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are failures (decompression bombs)")
    b.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="image files larger than this are failures (never read past it)")
    b.add_argument("--wait-timeout", type=float, default=d.wait_timeout,
                   help="seconds rank 0 waits for the other ranks before finalizing")
    b.add_argument("--no-jpeg-draft", action="store_true",
                   help="decode every JPEG in full (advised with tiling grids of 3+ tiles on both sides: "
                        "the build warns). By default a JPEG whose sides are both at least 4x "
                        "the encoder's input side is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL "
                        "draft), never below 2x the input side: faster on large photos, pixels within a "
                        "few levels after the resize. Recorded in the cache fingerprint (jpeg_draft_to); "
                        "training exports carry it, so online decoding matches the cache")
    b.add_argument("--tiling", default=None, metavar="JSON",
                   help="AnyRes tiling: the TilingSpec fields as JSON (model.tiling), e.g. "
                        "'{\"grids\": [[2,2]], \"tokens_per_tile\": 16, \"token_budget\": 400}'; "
                        "tile_size defaults to (and must equal) the encoder's input side. Each image "
                        "is stored as its thumbnail plus its tiles (default: one view per image)")
    b.add_argument("--frames", type=int, default=d.video_sampling.num_frames,
                   help="frames sampled per video at most (uniformly, segment centres)")
    b.add_argument("--max-fps", type=float, default=d.video_sampling.max_fps,
                   help="sampled frames per second of video at most (0: no cap)")
    b.add_argument("--max-video-bytes", type=int, default=d.max_video_bytes,
                   help="video files larger than this are failures (never read past it)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = sub.add_parser("finalize", help="write the index and manifest once every slice is built")
    f.add_argument("cache_dir")
    v = sub.add_parser("verify", help="check every shard against the manifest")
    v.add_argument("cache_dir")
    v.add_argument("--quick", action="store_true", help="skip SHA-256 (size, footer, rows only)")
    i = sub.add_parser("info", help="describe a cache")
    i.add_argument("cache_dir")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return p


MAX_AUTO_WORKERS = 16


def default_workers(minimum: int) -> int:
    """Decode workers for one build process: the node's CPUs over its build processes, bounded."""
    import os

    from vlm_dist.dist import discover
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(minimum, min(MAX_AUTO_WORKERS, cpus // max(1, discover().local_world_size) - 1))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def describe_trust(cache_dir) -> str:
    """The last full check, and what training's own check trusts since then."""
    when = last_verified(cache_dir)
    if when is None:
        return ("verified       never (no verified.json): training refuses the cache until "
                f"`vlm-cache verify {cache_dir}` passes")
    return (f"verified       full SHA-256 check {when}; since then training checks only size and "
            "mtime per file, so a byte altered with its mtime restored is caught only by the next "
            f"`vlm-cache verify {cache_dir}` (the Slurm stage templates run it first unless "
            "VERIFY_CACHE=0)")


def _spread(s: dict | None, unit: str = "") -> str:
    return "-" if not s else f"mean {s['mean']:g}{unit}, min {s['min']:g}{unit}, max {s['max']:g}{unit}"


def describe_media(manifest: dict) -> list[str]:
    """Lines on tiles and videos: images by grid, views per image, frames and durations."""
    fp, m = manifest["fingerprint"], manifest.get("media")
    lines = []
    tiling = fingerprint_field(fp, "tiling")
    if tiling is not None:
        grids = ", ".join(f"{r}x{c}" for r, c in tiling["grids"])
        budget = tiling["token_budget"]
        lines.append(f"tiling         {tiling['tile_size']} px tiles, {tiling['tokens_per_tile']} tokens "
                     f"per view, grids {grids}, token budget {budget if budget is not None else 'none'}")
    if m is not None and (tiling is not None or m["images_by_grid"]):
        by_grid = ", ".join(f"{g}: {n}" for g, n in m["images_by_grid"].items()) or "-"
        lines.append(f"tiles          images by grid {by_grid}; views per image "
                     f"{_spread(m['views_per_image'])}")
    sampling = fingerprint_field(fp, "video_sampling")
    if sampling is not None or (m is not None and m["videos"]):
        how = (f"{sampling['num_frames']} frames at most, "
               + (f"{sampling['max_fps']:g} fps at most" if sampling.get("max_fps") else "no fps cap")
               if sampling else "?")
        lines.append(f"videos         {m['videos'] if m else '?'} encoded ({how}); frames per video "
                     f"{_spread(m and m['frames_per_video'])}; duration "
                     f"{_spread(m and m['video_seconds'], ' s')}")
    if m is not None:
        lines.append(f"views          {m['views']} feature rows ({m['images']} images, {m['videos']} videos)")
    return lines


def describe(manifest: dict) -> str:
    fp, c = manifest["fingerprint"], manifest["counts"]
    p, d = manifest["feature_shape"]
    per_image = p * d * {"bfloat16": 2, "float16": 2, "float32": 4}[fp["dtype"]]
    return "\n".join([
        f"encoder        {fp['model']} ({fp['model_type']}), weights sha256 {fp['weights_sha256'][:16]}...",
        f"features       hidden_states[{fp['feature_layer']}], {p} patches x {d} dims, {fp['dtype']}"
        + (f", {fp['pool']}x{fp['pool']} pooled" if fp["pool"] != 1 else "")
        + f" = {_human_bytes(per_image)} per view",
        f"input          image size {fp['image_size']}, patch {fp['patch_size']}, "
        f"{fp['preprocessing'].get('processor_class', '?')}, JPEG "
        + (f"draft to {draft}" if (draft := fingerprint_field(fp, 'jpeg_draft_to')) else "full decode"),
        f"records        {c['records']} with {c['references']} "
        + ("image and video references " if c.get("unique_videos") else "image references ")
        + f"({c['unique_references']} distinct paths)",
        f"images         {c['unique_images']} unique, {c['encoded'] - c.get('encoded_videos', 0)} encoded, "
        f"{c['failed_images']} failed to decode, {c['unreadable_files']} unreadable files, "
        f"{c['records_with_failed_images']} records affected (failures.jsonl)",
        *([f"video files    {c['unique_videos']} unique, {c['encoded_videos']} encoded, "
           f"{c['failed_videos']} failed to decode"] if c.get("unique_videos") else []),
        *describe_media(manifest),
        f"storage        {len(manifest['shards'])} shards of up to {manifest['shard_size']} images/videos, "
        f"{_human_bytes(c['shard_bytes'])}",
        f"sources        {manifest['sources']['image_root']} <- "
        + ", ".join(manifest["sources"]["records"] + manifest["sources"]["image_lists"]
                    + manifest["sources"].get("video_lists", [])),
    ])


def main(argv: list[str] | None = None) -> int:
    from vlm_dist.errors import run_cli
    return run_cli("vlm-cache", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "build":
            from vlm_dist.cache.build import BuildConfig, BuildError, build
            from vlm_dist.contract.video import FrameSampling
            if not args.records and not args.image_lists and not args.video_lists:
                print("vlm-cache build: give --records and/or --image-list / --video-list",
                      file=sys.stderr)
                return 2
            tiling = None
            if args.tiling is not None:
                try:
                    tiling = json.loads(args.tiling)
                except json.JSONDecodeError as e:
                    print(f"vlm-cache build: --tiling is not valid JSON ({e.msg}): {args.tiling!r}",
                          file=sys.stderr)
                    return 2
                if not isinstance(tiling, dict):
                    print(f"vlm-cache build: --tiling must be a JSON object of TilingSpec fields, "
                          f"got {args.tiling!r}", file=sys.stderr)
                    return 2
            sampling = FrameSampling(num_frames=args.frames, max_fps=args.max_fps or None)
            cfg = BuildConfig(
                out=args.out, records=args.records, image_lists=args.image_lists,
                video_lists=args.video_lists, tiling=tiling, video_sampling=sampling,
                max_video_bytes=args.max_video_bytes,
                image_root=args.image_root, vision_model=args.vision_model,
                feature_layer=args.feature_layer, dtype=args.dtype, pool=args.pool,
                batch_size=args.batch_size, device=args.device,
                workers=default_workers(BuildConfig.workers) if args.workers is None else args.workers,
                shard_size=args.shard_size, shard_index=args.shard_index,
                num_shards=args.num_shards, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
                wait_timeout=args.wait_timeout, progress=not args.no_progress,
                jpeg_draft=not args.no_jpeg_draft)
            try:
                build(cfg)
            except (BuildError, RecordError) as e:
                print(f"vlm-cache build: {e}", file=sys.stderr)
                return 1
        elif args.command == "finalize":
            from vlm_dist.cache.build import BuildError, finalize
            try:
                manifest = finalize(args.cache_dir)
            except BuildError as e:
                print(f"vlm-cache finalize: {e}", file=sys.stderr)
                return 1
            print(describe(manifest))
        elif args.command == "verify":
            problems = verify_cache(args.cache_dir, quick=args.quick)
            for line in problems:
                print(f"BROKEN {line}", file=sys.stderr)
            if problems:
                print(f"vlm-cache verify: {args.cache_dir}: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            if not args.quick:
                try:
                    write_verified_stamp(args.cache_dir)   # lets training skip re-hashing
                except OSError as e:
                    print(f"vlm-cache verify: could not record the result ({e}); training will "
                          "ask for a verify again", file=sys.stderr)
            n = len(read_manifest(args.cache_dir)["shards"])
            print(f"{args.cache_dir}: OK ({n} shards{', quick' if args.quick else ', SHA-256 checked'})")
        elif args.command == "info":
            manifest = read_manifest(args.cache_dir)
            print(json.dumps(manifest, indent=1) if args.json
                  else describe(manifest) + "\n" + describe_trust(args.cache_dir))
    except CacheError as e:
        print(f"vlm-cache {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
