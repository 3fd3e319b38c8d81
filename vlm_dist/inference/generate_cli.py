"""vlm-generate: talk to a trained export about any number of images and videos, with streamed output.

    vlm-generate --model runs/sft/export --image a.png --image b.png \\
        --prompt "Which image shows the red circle?"
    vlm-generate --model merged/sft --chat chat.json --image a.png --sample --temperature 0.7
    vlm-generate --model runs/video/export --video clip.mp4 --prompt "<video>\\nWhen does the square appear?"

--model is an export directory (base LLM + connector + adapter/) or a merged
one (vlm_dist.inference.export.merge_export); either loads in one call. Features are
computed online by the export's vision tower with the cache's decoding (JPEG draft),
preprocessing, dtype and pooling; a tiled export's images are tiled and a video's frames
sampled as its training cache did (Generator.encode_media). The k-th `<image>` in the prompt is
the k-th --image, the k-th `<video>` the k-th --video; a --prompt without any placeholder of a
kind gets one line per item of that kind in front ("Image 1: <image>" ... for several; videos
first). --chat is a JSON list of {role, content}
turns (or a record with "conversations"); the reply to the last user turn is
generated. Output streams to stdout as it is produced.
"""
from __future__ import annotations

import argparse
import json
import sys

from vlm_dist.contract.media import VIDEO
from vlm_dist.contract.records import IMAGE_PLACEHOLDER


def _head(placeholder: str, label: str, n: int) -> str:
    return placeholder if n == 1 else "\n".join(f"{label} {i + 1}: {placeholder}" for i in range(n))


def build_conversation(prompt: str | None, chat: list[dict] | None, n_images: int,
                       system: str | None = None, n_videos: int = 0) -> list[dict]:
    """The turns to answer: a --chat file's, or one user turn from --prompt."""
    if (prompt is None) == (chat is None):
        raise ValueError("give exactly one of --prompt and --chat")
    if chat is not None:
        turns = [dict(t) for t in chat]
        for i, t in enumerate(turns):
            if set(t) != {"role", "content"} or t["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"--chat turn {i} must be {{role: system|user|assistant, content}}, got {t}")
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("--chat must end with a user turn (the reply to it is generated)")
    else:
        text = prompt
        if IMAGE_PLACEHOLDER not in text and n_images:
            text = f"{_head(IMAGE_PLACEHOLDER, 'Image', n_images)}\n{text}"
        if VIDEO.placeholder not in text and n_videos:
            text = f"{_head(VIDEO.placeholder, 'Video', n_videos)}\n{text}"
        turns = [{"role": "user", "content": text}]
    if system:
        if turns[0]["role"] == "system":
            raise ValueError("--system given but the chat already starts with a system turn")
        turns.insert(0, {"role": "system", "content": system})
    n = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n != n_images:
        raise ValueError(f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} --image "
                         f"file(s) were given; every {IMAGE_PLACEHOLDER} needs exactly one --image, in order")
    n = sum(t["content"].count(VIDEO.placeholder) for t in turns)
    if n != n_videos:
        raise ValueError(f"the prompt has {n} {VIDEO.placeholder} placeholder(s) but {n_videos} --video "
                         f"file(s) were given; every {VIDEO.placeholder} needs exactly one --video, in order")
    return turns


def read_chat(path: str) -> list[dict]:
    from vlm_dist.contract.records import read_text
    try:
        data = json.loads(read_text(path))   # a missing file or bad byte: RecordError naming it
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat {path}: cannot read a JSON chat ({e})") from e
    if isinstance(data, dict) and "conversations" in data:
        data = data["conversations"]
    if not isinstance(data, list):
        raise ValueError(f"--chat {path}: expected a list of {{role, content}} turns or a record")
    return data


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vlm-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export directory (or a merged export)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several, in order")
    p.add_argument("--video", action="append", default=[], help="a video file (a model trained with video); "
                   "repeat for several, in order")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message; <image> / <video> mark where each image / video goes")
    src.add_argument("--chat", help="JSON file: [{role, content}, ...] ending with a user turn")
    p.add_argument("--system", help="a system message put first")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--sample", action="store_true", help="sample with --temperature and --top-p")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="LLM/connector dtype: bf16, fp16, fp32 "
                   "(default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-stream", action="store_true", help="print the reply once it is complete")
    args = p.parse_args(argv)
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        p.error(f"--sample needs --temperature > 0 and 0 < --top-p <= 1 (got {args.temperature}, {args.top_p})")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from vlm_dist.errors import run_cli
    return run_cli("vlm-generate", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import TextStreamer

    from vlm_dist.inference.export import load_export, read_export_config
    from vlm_dist.contract.images import ImageError, read_image_file
    from vlm_dist.contract.video import VideoError
    from vlm_dist.inference.generate import GenerationSettings, Generator, MediaUnsupported

    try:   # before the model loads: a missing, empty or non-image file is named at once
        chat = read_chat(args.chat) if args.chat else None
        turns = build_conversation(args.prompt, chat, len(args.image), args.system, n_videos=len(args.video))
        files = [read_image_file(path) for path in args.image]
        if args.video and read_export_config(args.model).video is None:
            raise MediaUnsupported(f"--video: {args.model} has no video connector (it was not trained "
                                   "with model.video); it takes images only")
    except (ValueError, ImageError) as e:
        print(f"vlm-generate: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vlm, tokenizer, tower, cfg = load_export(args.model, device=device, dtype=args.dtype)
    gen = Generator(vlm, tokenizer, cfg, tower)
    try:   # decoded as the training cache decoded (the export's JPEG draft setting, frame sampling)
        images = [tower.decode(data, name=path) for data, path in zip(files, args.image)]
        videos = [gen.decode_video(path, name=path) for path in args.video]
    except (ImageError, VideoError) as e:
        print(f"vlm-generate: {e}", file=sys.stderr)
        return 2
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    media, layouts = gen.encode_media(images, videos)
    text = gen.generate(turns, media, settings, streamer=streamer, layouts=layouts)
    if args.no_stream:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
