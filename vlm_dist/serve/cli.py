"""vlm-serve: serve a trained export behind an OpenAI-compatible API (chat completions with images
and, for a model trained with video, videos).

    vlm-serve --model runs/sft/export [--host 127.0.0.1 --port 8000] [--api-key KEY] \\
        [--limit-mm-per-prompt '{"image": 8, "video": 1}'] [--max-video-bytes N] \\
        [--allowed-local-media-path /data/images] [--served-model-name NAME]

Videos come as vLLM's `{"type": "video_url", "video_url": {"url": ...}}` parts (data:, http(s),
file:// as images); a tiled model's images are tiled as in training.

--model is an export directory or a merged one (vlm-export merge). Then, e.g.:
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model":
      "runs/sft/export", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
      {"url": "data:image/jpeg;base64,..."}}, {"type": "text", "text": "What is in this image?"}]}]}'
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlm_dist.errors import UserError, run_cli


def mm_limit(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt as {kind: N}: a number (images), `image=N,video=M` or vLLM's JSON
    `{"image": N, "video": M}`."""
    import json

    value = text.strip()
    try:
        if value.startswith("{"):
            spec = json.loads(value)
            if not isinstance(spec, dict) or not spec or not set(spec) <= {"image", "video"}:
                raise ValueError
        elif "=" in value:
            spec = dict(item.split("=", 1) for item in value.split(","))
            if not set(spec) <= {"image", "video"}:
                raise ValueError
        else:
            spec = {"image": value}
        out = {}
        for k, v in spec.items():
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            out[k] = int(v)
        return out
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected N, image=N[,video=M] or '{{\"image\": N, \"video\": M}}', "
                                         f"got {text!r}") from None


def parse_args(argv):
    from vlm_dist.serve.engine import ServeConfig

    d = ServeConfig()
    p = argparse.ArgumentParser(prog="vlm-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export directory (or a merged export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients use in `model` (default: --model as given)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: no key)")
    p.add_argument("--limit-mm-per-prompt", type=mm_limit, default={},
                   help=f"most images (and videos) in one request, all turns together: N, image=N,video=M or "
                        f"vLLM's '{{\"image\": N, \"video\": M}}' (defaults: {d.limit_mm_per_prompt} images, "
                        f"{d.limit_video_per_prompt} video)")
    p.add_argument("--allowed-local-media-path", help="directory file:// image URLs may read under "
                   "(symlinks resolved; default: file:// refused)")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="largest image in bytes")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="largest image (or video frame) in pixels")
    p.add_argument("--max-video-bytes", type=int, default=d.max_video_bytes, help="largest video in bytes")
    p.add_argument("--fetch-timeout", type=float, default=d.fetch_timeout, help="seconds for an http(s) image")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests admitted at once (waiting + generating); more get 503 + Retry-After")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most greedy requests batched together")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + reply tokens at most (default: the LLM's max_position_embeddings)")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="reply length when a request gives no max_tokens")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="LLM/connector dtype: bf16, fp16, fp32 "
                   "(default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    limits = args.limit_mm_per_prompt
    args.limit_mm_per_prompt = limits.get("image", d.limit_mm_per_prompt)
    args.limit_video_per_prompt = limits.get("video", d.limit_video_per_prompt)
    if args.limit_mm_per_prompt < 1 or args.limit_video_per_prompt < 0:
        p.error("--limit-mm-per-prompt: at least 1 image (videos: 0 or more)")
    for flag in ("max_image_bytes", "max_video_bytes", "max_image_pixels", "max_queue", "max_batch",
                 "default_max_tokens", "port"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        p.error("--max-model-len must be at least 2")
    if args.fetch_timeout <= 0:
        p.error("--fetch-timeout must be positive")
    return args


def config_from_args(args):
    from vlm_dist.serve.engine import ServeConfig

    root = args.allowed_local_media_path
    if root is not None and not Path(root).is_dir():
        raise UserError(f"--allowed-local-media-path {root}: not a directory")
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such export directory")
    return ServeConfig(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                       limit_mm_per_prompt=args.limit_mm_per_prompt,
                       limit_video_per_prompt=args.limit_video_per_prompt, max_video_bytes=args.max_video_bytes,
                       max_image_bytes=args.max_image_bytes,
                       max_image_pixels=args.max_image_pixels, allowed_local_media_path=root,
                       fetch_timeout=args.fetch_timeout, max_queue=args.max_queue, max_batch=args.max_batch,
                       max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens)


def main(argv: list[str] | None = None) -> int:
    return run_cli("vlm-serve", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from vlm_dist.serve.api import serve

    serve(args.model, args.host, args.port, config, device=args.device, dtype=args.dtype,
          log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
