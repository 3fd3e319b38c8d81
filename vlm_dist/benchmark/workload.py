"""The benchmark's workload: synthetic samples with real layouts, and the models they run on.

Sample lengths come from a built-in model (stage1: one 66-token image block + prompt +
caption, ~110 tokens; multi: a multi-image SFT shape; tiled: one AnyRes image on a 2x2 grid,
5 views; video: one clip's sampled frames) or, exactly, from a records file (encoded as
training encodes them). Token ids are random but laid out like real ones (media blocks,
prompt, supervised answer): a tiled image's block is contract.tiling.tile_block_ids (thumbnail
and tiles, "\\n" after each line) and a video's is contract.video.video_block_ids (timestamp
text and Tf slots per frame), so lengths, slots and views are the real ones. Features are
random (P, D) maps standing in for the cache, one per view (`FeatureBank.views`). Models are
the tiny ones of vlm_dist.testing.tiny, or full-size random-weight checkpoints written once
from a config.json (nothing is downloaded).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_dist.contract.media import IMAGE, VIDEO, block_ids
from vlm_dist.contract.prompt import IGNORE, EncodedSample
from vlm_dist.contract.tiling import tile_block_ids
from vlm_dist.contract.video import FrameSampling, video_block_ids
from vlm_dist.testing.tiny import QWEN3_SPECIAL_TOKENS

QWEN3_FIRST_SPECIAL_ID = 151_643   # <|endoftext|>; Qwen3's added tokens follow in QWEN3_SPECIAL_TOKENS order


# ----------------------------------------------------------------------------- sample lengths

LENGTHS = ("stage1", "multi", "tiled", "video")
TILED_GRID = (2, 2)        # the tiled workload's grid: thumbnail + 4 tiles = 5 views per image
VIDEO_FPS = 30             # the video workload's clips: frames available = duration x 30


@dataclass(frozen=True)
class Shape:
    """What the benchmark needs of a sample: its token layout, not its text."""
    prompt: int        # unsupervised text tokens (after the media blocks)
    answer: int        # supervised tokens at the end (caption + <|endoftext|>, or assistant turns)
    images: int
    grid: tuple[int, int] = (1, 1)          # every image's tile grid (rows, cols); (1, 1): untiled
    frame_times: tuple[float, ...] = ()     # one video's sampled frames (seconds); (): no video

    @property
    def image_views(self) -> int:
        """Image connector runs: 1 per untiled image, thumbnail + rows x cols tiles per tiled one."""
        rows, cols = self.grid
        return self.images * (1 if rows * cols == 1 else 1 + rows * cols)

    @property
    def video_frames(self) -> int:
        return len(self.frame_times)


def builtin_shapes(kind: str, n: int, rng: random.Random,
                   video_sampling: FrameSampling | None = None) -> list[Shape]:
    """Built-in length models (not measured from the datasets: use --records for that).

    stage1: LLaVA-Pretrain-like, one image; prompt 6-14 tokens + "\\n"; caption lognormal
            (median 28 tokens) + <|endoftext|>: with a 66-token image block ~110 tokens/sample,
            the figure `python -m vlm_dist.training.flops` uses by default.
    multi:  Mantis-like multi-image SFT: 2-6 images, chatml prompt 40-400 tokens, answer
            lognormal (median 60 tokens).
    tiled:  LLaVA-NeXT-like SFT: one image on a 2x2 grid (5 views of T slots and 3 "\\n"),
            chatml prompt 20-120 tokens, answer lognormal (median 40 tokens).
    video:  LLaVA-Video-like QA: one clip of 3-60 s at 30 fps, frames picked by `video_sampling`
            (model.video's; default 8 frames at most 2 per second) as the cache picks them,
            chatml prompt 20-80 tokens, answer lognormal (median 30 tokens).
    """
    out = []
    sampling = video_sampling or FrameSampling()
    for _ in range(n):
        if kind == "stage1":
            cap = min(200, max(4, round(rng.lognormvariate(math.log(28), 0.45))))
            out.append(Shape(prompt=rng.randint(6, 14) + 1, answer=cap + 1, images=1))
        elif kind == "multi":
            ans = min(1000, max(4, round(rng.lognormvariate(math.log(60), 0.8))))
            out.append(Shape(prompt=rng.randint(40, 400), answer=ans + 1, images=rng.randint(2, 6)))
        elif kind == "tiled":
            ans = min(300, max(4, round(rng.lognormvariate(math.log(40), 0.7))))
            out.append(Shape(prompt=rng.randint(20, 120), answer=ans + 1, images=1, grid=TILED_GRID))
        elif kind == "video":
            ans = min(300, max(4, round(rng.lognormvariate(math.log(30), 0.7))))
            duration = rng.uniform(3.0, 60.0)
            available = max(1, round(duration * VIDEO_FPS))
            times = tuple(round(i / VIDEO_FPS, 6) for i in sampling.indices(available, duration))
            out.append(Shape(prompt=rng.randint(20, 80), answer=ans + 1, images=0, frame_times=times))
        else:
            raise ValueError(f"--lengths must be one of {', '.join(LENGTHS)}, got {kind!r}")
    return out


def shapes_from_records(path: str, tokenizer_dir: str, template: str, image_tokens: int,
                        max_seq_len: int, limit: int) -> list[Shape]:
    """Exact lengths of the first `limit` records, encoded as training encodes untiled images.

    Records with videos are refused (a video's block needs its cached frame layout: use
    `--lengths video`); tiled data is measured untiled here (`--lengths tiled` for AnyRes)."""
    from transformers import AutoTokenizer

    from vlm_dist.contract.prompt import PromptEncoder, SampleError
    from vlm_dist.contract.records import RecordError, read_records

    enc = PromptEncoder(AutoTokenizer.from_pretrained(tokenizer_dir), template, image_tokens)
    out, skipped = [], 0
    for rec in read_records(path):
        if rec.get("videos"):
            raise RecordError(f"--records {path}: record {rec['id']!r} has videos; their lengths need the "
                              "cache's frame layouts, which the benchmark does not read: use --lengths video")
        try:
            s = enc.encode(rec, max_seq_len, truncate=True, validate=False)
        except SampleError:
            skipped += 1
            continue
        answer = sum(1 for x in s.labels[1:] if x != IGNORE)
        out.append(Shape(prompt=len(s) - answer - len(s.image_keys) * (image_tokens + 2),
                         answer=answer, images=len(s.image_keys)))
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"--records {path}: no usable sample ({skipped} skipped)")
    return out


class Qwen3SpecialIds:
    """Qwen3's special-token ids (<|endoftext|> = 151643, the others after it in order), standing in
    for the tokenizer of a full-size run: the splice only needs these ids; text ids are random.

    It also tokenizes the only text media blocks hold: the "\\n" line separator of tiled and video
    blocks and frame timestamps such as "12.5s". Qwen's pre-tokenizer splits digits one by one and
    "." and "s" stand alone there, so these strings are one byte-level token per character; the ids
    are the byte tokens' (GPT-2's byte order, which Qwen's vocabulary starts with: "\\n" = 198)."""
    name_or_path = "qwen3-special-ids"
    unk_token_id = None
    pad_token_id = QWEN3_FIRST_SPECIAL_ID     # <|endoftext|>, Qwen3's pad token
    TEXT_IDS = {"\n": 198, ".": 13, "s": 82, **{str(d): 15 + d for d in range(10)}}

    def __init__(self):
        self.ids = {t: QWEN3_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS)}
        self.tokens = {i: t for t, i in self.ids.items()}

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = True) -> dict:
        unknown = sorted(set(text) - set(self.TEXT_IDS))
        if unknown:
            raise ValueError(f"Qwen3SpecialIds tokenizes only media-block text ({sorted(self.TEXT_IDS)}), "
                             f"not {unknown}")
        return {"input_ids": [self.TEXT_IDS[c] for c in text]}

    def convert_tokens_to_ids(self, token):
        return self.ids.get(token)

    def convert_ids_to_tokens(self, i):
        return self.tokens.get(i)


@dataclass(frozen=True)
class MediaBlocks:
    """The real block builders for tiled images and videos in one tokenizer."""
    tokenizer: object
    image_tokens: int                # slots per image view (the image connector's tokens)
    video_tokens: int | None = None  # slots per frame (the video connector's), None: no video

    def image(self, grid: tuple[int, int]) -> list[int]:
        return tile_block_ids(self.tokenizer, grid[0], grid[1], self.image_tokens)

    def video(self, frame_times) -> list[int]:
        if self.video_tokens is None:
            raise ValueError("a video sample needs a video connector (model.video: tokens_per_frame)")
        return video_block_ids(self.tokenizer, frame_times, self.video_tokens)


def make_samples(shapes: list[Shape], block, eos: int, text_vocab: int, seed: int,
                 media: MediaBlocks | None = None) -> list[EncodedSample]:
    """Token sequences with the shapes' layout: image blocks, the video block, prompt, then the
    supervised answer. `block` (BlockIds) makes untiled image blocks; tiled images and videos
    need `media`. Keys: img{i}-{k} per image, vid{i}-0 for the video."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        if (s.grid != (1, 1) or s.frame_times) and media is None:
            raise ValueError(f"shape {s}: tiled images and videos need make_samples(..., media=MediaBlocks(...))")
        ids = (media.image(s.grid) if s.grid != (1, 1) else block.block()) * s.images
        keys = {IMAGE.name: [f"img{i}-{k}" for k in range(s.images)]}
        if s.frame_times:
            ids = ids + media.video(s.frame_times)
            keys[VIDEO.name] = [f"vid{i}-0"]
        text = torch.randint(0, text_vocab, (s.prompt + s.answer,), generator=g).tolist()
        ids = ids + text[:-1] + [eos]
        labels = [IGNORE] * (len(ids) - s.answer) + ids[len(ids) - s.answer:]
        out.append(EncodedSample(f"synthetic-{i}", ids, labels, keys))
    return out


def views_of(shapes: list[Shape]) -> dict[str, int]:
    """{key: views} of make_samples' keys: feature rows per image (1 + tiles) and per video (frames)."""
    views = {}
    for i, s in enumerate(shapes):
        per_image = s.image_views // max(s.images, 1)
        views.update({f"img{i}-{k}": per_image for k in range(s.images)})
        if s.frame_times:
            views[f"vid{i}-0"] = s.video_frames
    return views


# ----------------------------------------------------------------------------- batches

class FeatureBank:
    """features_lookup for the loader: a few random (P, D) maps made once per worker, reused
    like cache pages, so the workers cost what collating real cached features costs.

    Like the feature cache: `bank[key]`/`bank(key)` -> (P, D), the key's view 0; `bank.views(key)`
    -> (V, P, D), its `num_views[key]` views (1 for a key not listed)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, n: int = 8,
                 num_views: dict[str, int] | None = None):
        self.shape, self.dtype, self.n, self.bank = shape, dtype, n, None
        self.num_views = num_views or {}

    def __call__(self, key: str) -> torch.Tensor:
        if self.bank is None:
            g = torch.Generator().manual_seed(0)
            self.bank = [torch.randn(self.shape, generator=g).to(self.dtype) for _ in range(self.n)]
        return self.bank[hash(key) % self.n]

    __getitem__ = __call__

    def views(self, key: str) -> torch.Tensor:
        first = self(key)
        v = self.num_views.get(key, 1)
        return torch.stack([self.bank[(hash(key) + j) % self.n] for j in range(v)]) if v > 1 else first[None]


# ----------------------------------------------------------------------------- models

def init_random_(name: str, w: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """The cheap stand-in for a model's own init: norm gains 1, biases 0, everything else N(0, std)."""
    module, _, kind = name.rpartition(".")
    if kind == "weight" and "norm" in module.rpartition(".")[2]:   # RMSNorm/LayerNorm: norm, q_norm, layer_norm1
        return w.fill_(1)
    if name.endswith(".bias"):
        return w.zero_()
    return w.normal_(0.0, std, generator=g)


def random_llm_weights(config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every persistent tensor of the causal LM `config` describes, made directly on
    `device`. The model is built on the meta device for its names and shapes only (no memory); the
    weights then go through from_pretrained(state_dict=...) like a checkpoint's, so QLoRA is quantised
    by transformers as it would be from disk, and no 16 GB checkpoint is written and read back."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    g = torch.Generator(device).manual_seed(seed)
    return {name: init_random_(name, torch.empty(t.shape, dtype=dtype, device=device), config.initializer_range, g)
            for name, t in shapes.items()}


def random_vision_checkpoint(config_json: Path, out_dir: Path, device: torch.device) -> Path:
    """A random-weight SigLIP tower for `config_json` (~0.8 GB for so400m), written once (idempotent): the
    cache builder loads it through VisionTower.from_pretrained as it loads a real one. Built on the meta
    device, then materialised on `device` (to_empty) and initialised there: seconds, not CPU minutes."""
    from transformers import AutoConfig, SiglipImageProcessor, SiglipVisionModel

    done = out_dir / "BUILT"
    if done.exists():
        return out_dir
    vc = AutoConfig.from_pretrained(str(config_json)).vision_config
    with torch.device("meta"):
        model = SiglipVisionModel._from_config(vc, dtype=torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            init_random_(name, p, vc.hidden_size ** -0.5, g)
    # (its one buffer, position_ids, is not persistent: from_pretrained rebuilds it)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    SiglipImageProcessor(size={"height": vc.image_size, "width": vc.image_size}, resample=3,
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(out_dir))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    done.write_text(str(config_json))
    return out_dir


@dataclass
class Models:
    """What a benchmark run loads: the LLM directory (for the full-size run, config.json only) and,
    for the full-size run, its random weights already on the device; the vision directory (config.json,
    and weights only where the run needs the tower); the tokenizer."""
    llm: str | None
    vision: str
    tokenizer: object
    llm_weights: dict | None = None


def model_paths(args, device: torch.device, need_llm: bool = True, need_vision_weights: bool = False) -> Models:
    """The tiny or the full-size models. The first process on each node writes what goes to disk (the
    tiny models; the full-size configs; the vision tower's weights if needed); the others wait for it.
    Each process makes the full-size LLM's random weights on its own device."""
    from vlm_dist import dist
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        _write_models(args, device, need_llm, need_vision_weights)
    dist.barrier()
    models = _write_models(args, device, need_llm, need_vision_weights)
    if need_llm and not args.tiny:
        from transformers import AutoConfig
        models.llm_weights = random_llm_weights(AutoConfig.from_pretrained(models.llm), torch.bfloat16, device,
                                                args.seed)
    return models


def _write_models(args, device: torch.device, need_llm: bool, need_vision_weights: bool) -> Models:
    work = Path(args.work_dir)
    if args.tiny:
        from transformers import AutoTokenizer

        from vlm_dist.testing.tiny import build_tiny_models
        paths = build_tiny_models(work / "tiny")
        return Models(paths["llm"], paths["vision"], AutoTokenizer.from_pretrained(paths["tokenizer"]))
    vision_config = Path(args.vision_config)
    if need_vision_weights:
        vision = random_vision_checkpoint(vision_config, work / (vision_config.stem + "-random"), device)
    else:   # training reads features from the cache: only the tower's config (patches, width) is needed
        vision = _config_only(vision_config, work / (vision_config.stem + "-config"))
    llm = _config_only(Path(args.llm_config), work / (Path(args.llm_config).stem + "-config")) if need_llm else None
    return Models(str(llm) if llm else None, str(vision), Qwen3SpecialIds())


def _config_only(config_json: Path, out_dir: Path) -> Path:
    """A model directory holding just config.json (written atomically, so a reader never sees half)."""
    from vlm_dist.fileio import write_text_atomic
    target = out_dir / "config.json"
    text = config_json.read_text()
    if not target.exists() or target.read_text() != text:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
    return out_dir


def workload_lengths(cfg, args) -> str:
    """The length model a run uses: --records, --lengths, or stage1 (plain template) / multi (chatml)."""
    return args.records or args.lengths or ("stage1" if cfg.data.template == "plain" else "multi")


def plan_samples(cfg, args, tokenizer, image_tokens: int, n_micro: int, world: int, rank: int,
                 video_tokens: int | None = None):
    """Synthetic samples and this rank's first n_micro micro-batches, planned by training's sampler.

    Returns (samples, micro-batches, eos id, the length model's name, {key: views})."""
    from vlm_dist.config.media import frame_sampling
    from vlm_dist.data.sampler import LengthGroupedSampler

    d = cfg.data
    block = block_ids(tokenizer, IMAGE, image_tokens)
    media = MediaBlocks(tokenizer, image_tokens, video_tokens)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rng = random.Random(args.seed)       # the same samples on every rank: the sampler plans globally
    lengths = workload_lengths(cfg, args)
    if args.records:
        pool = shapes_from_records(args.records, args.tokenizer, d.template, image_tokens, d.max_seq_len,
                                   limit=args.max_records)
    else:
        pool = None
    n = 64 * world * n_micro
    while True:
        shapes = [rng.choice(pool) for _ in range(n)] if pool else \
            builtin_shapes(lengths, n, rng, video_sampling=frame_sampling(cfg.model))
        samples = make_samples(shapes, block, eos, min(block.start, block.pad, block.end, eos), args.seed, media)
        too_long = [s for s in samples if len(s) > d.max_seq_len]
        if too_long:
            raise ValueError(f"{len(too_long)} of {n} sampled lengths exceed --data.max_seq_len={d.max_seq_len} "
                             f"(the longest has {max(len(s) for s in too_long)} tokens); raise it or use "
                             "shorter samples")
        sampler = LengthGroupedSampler.from_samples(
            samples, world_size=world, rank=rank, max_seq_len=d.max_seq_len,
            rows_per_micro=cfg.train.micro_batch_size, packing=d.pack,
            max_tokens_per_micro=cfg.train.micro_batch_tokens, seed=args.seed)   # as the training loop does
        micro = sampler.micro_batches(0)
        if len(micro) >= n_micro:
            return samples, micro[:n_micro], eos, lengths, views_of(shapes)
        n *= 2
