"""The benchmark's workload: synthetic samples with real layouts, and the models they run on.

Sample lengths come from a built-in model (stage1: one 66-token image block + prompt +
caption, ~110 tokens; multi: a multi-image SFT shape) or, exactly, from a records file
(encoded as training encodes them). Token ids are random but laid out like real ones
(image blocks, prompt, supervised answer); features are random (P, D) maps standing in
for the cache. Models are the tiny ones of vlm_dist.testing.tiny, or full-size random-weight
checkpoints written once from a config.json (nothing is downloaded).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_dist.contract.media import IMAGE, block_ids
from vlm_dist.contract.prompt import IGNORE, EncodedSample
from vlm_dist.testing.tiny import QWEN3_SPECIAL_TOKENS

QWEN3_FIRST_SPECIAL_ID = 151_643   # <|endoftext|>; Qwen3's added tokens follow in QWEN3_SPECIAL_TOKENS order


# ----------------------------------------------------------------------------- sample lengths

@dataclass(frozen=True)
class Shape:
    """What the benchmark needs of a sample: its token layout, not its text."""
    prompt: int        # unsupervised text tokens (after the image blocks)
    answer: int        # supervised tokens at the end (caption + <|endoftext|>, or assistant turns)
    images: int


def builtin_shapes(kind: str, n: int, rng: random.Random) -> list[Shape]:
    """Built-in length models (not measured from the datasets: use --records for that).

    stage1: LLaVA-Pretrain-like, one image; prompt 6-14 tokens + "\\n"; caption lognormal
            (median 28 tokens) + <|endoftext|>: with a 66-token image block ~110 tokens/sample,
            the figure `python -m vlm_dist.training.flops` uses by default.
    multi:  Mantis-like multi-image SFT: 2-6 images, chatml prompt 40-400 tokens, answer
            lognormal (median 60 tokens).
    """
    out = []
    for _ in range(n):
        if kind == "stage1":
            cap = min(200, max(4, round(rng.lognormvariate(math.log(28), 0.45))))
            out.append(Shape(prompt=rng.randint(6, 14) + 1, answer=cap + 1, images=1))
        elif kind == "multi":
            ans = min(1000, max(4, round(rng.lognormvariate(math.log(60), 0.8))))
            out.append(Shape(prompt=rng.randint(40, 400), answer=ans + 1, images=rng.randint(2, 6)))
        else:
            raise ValueError(f"--lengths must be stage1 or multi, got {kind!r}")
    return out


def shapes_from_records(path: str, tokenizer_dir: str, template: str, image_tokens: int,
                        max_seq_len: int, limit: int) -> list[Shape]:
    """Exact lengths of the first `limit` records, encoded as training encodes them."""
    from transformers import AutoTokenizer

    from vlm_dist.contract.prompt import PromptEncoder, SampleError
    from vlm_dist.contract.records import read_records

    enc = PromptEncoder(AutoTokenizer.from_pretrained(tokenizer_dir), template, image_tokens)
    out, skipped = [], 0
    for rec in read_records(path):
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
    for the tokenizer of a full-size run: the splice only needs these ids; text ids are random."""
    name_or_path = "qwen3-special-ids"
    unk_token_id = None
    pad_token_id = QWEN3_FIRST_SPECIAL_ID     # <|endoftext|>, Qwen3's pad token

    def __init__(self):
        self.ids = {t: QWEN3_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS)}
        self.tokens = {i: t for t, i in self.ids.items()}

    def convert_tokens_to_ids(self, token):
        return self.ids.get(token)

    def convert_ids_to_tokens(self, i):
        return self.tokens.get(i)


def make_samples(shapes: list[Shape], block, eos: int, text_vocab: int, seed: int) -> list[EncodedSample]:
    """Token sequences with the shapes' layout: image blocks, prompt, then the supervised answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        ids = block.block() * s.images
        text = torch.randint(0, text_vocab, (s.prompt + s.answer,), generator=g).tolist()
        ids = ids + text[:-1] + [eos]
        labels = [IGNORE] * (len(ids) - s.answer) + ids[len(ids) - s.answer:]
        out.append(EncodedSample(f"synthetic-{i}", ids, labels, {"image": [f"img{i}-{k}" for k in range(s.images)]}))
    return out


# ----------------------------------------------------------------------------- batches

class FeatureBank:
    """features_lookup for the loader: a few random (P, D) maps made once per worker, reused
    like cache pages, so the workers cost what collating real cached features costs."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, n: int = 8):
        self.shape, self.dtype, self.n, self.bank = shape, dtype, n, None

    def __call__(self, key: str) -> torch.Tensor:
        if self.bank is None:
            g = torch.Generator().manual_seed(0)
            self.bank = [torch.randn(self.shape, generator=g).to(self.dtype) for _ in range(self.n)]
        return self.bank[hash(key) % self.n]


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


def plan_samples(cfg, args, tokenizer, image_tokens: int, n_micro: int, world: int, rank: int):
    """Synthetic samples and this rank's first n_micro micro-batches, planned by training's sampler."""
    from vlm_dist.data.sampler import LengthGroupedSampler

    d = cfg.data
    block = block_ids(tokenizer, IMAGE, image_tokens)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rng = random.Random(args.seed)       # the same samples on every rank: the sampler plans globally
    if args.records:
        pool = shapes_from_records(args.records, args.tokenizer, d.template, image_tokens, d.max_seq_len,
                                   limit=args.max_records)
        lengths = args.records
    else:
        lengths = args.lengths or ("stage1" if d.template == "plain" else "multi")
        pool = None
    n = 64 * world * n_micro
    while True:
        shapes = [rng.choice(pool) for _ in range(n)] if pool else builtin_shapes(lengths, n, rng)
        too_long = [s for s in shapes if s.prompt + s.answer + s.images * (image_tokens + 2) > d.max_seq_len]
        if too_long:
            raise ValueError(f"{len(too_long)} of {n} sampled lengths exceed --data.max_seq_len={d.max_seq_len}; "
                             "raise it or use shorter samples")
        samples = make_samples(shapes, block, eos, min(block.start, block.pad, block.end, eos), args.seed)
        sampler = LengthGroupedSampler.from_samples(
            samples, world_size=world, rank=rank, max_seq_len=d.max_seq_len,
            rows_per_micro=cfg.train.micro_batch_size, packing=d.pack,
            max_tokens_per_micro=cfg.train.micro_batch_tokens, seed=args.seed)   # as the training loop does
        micro = sampler.micro_batches(0)
        if len(micro) >= n_micro:
            return samples, micro[:n_micro], eos, lengths
        n *= 2
