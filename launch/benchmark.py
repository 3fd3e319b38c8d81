"""Training throughput and MFU on the real architecture, with synthetic features.

    python launch/benchmark.py                                       # stage 1, ZeRO-2, 1 GPU
    python launch/benchmark.py --config launch/configs/stage3_multi.yaml --model.llm_mode=qlora
    deepspeed launch/benchmark.py --deepspeed ds_configs/zero3.json  # many GPUs
    python launch/benchmark.py --mode cache                          # the feature-cache builder
    python launch/benchmark.py --tiny --out bench.json               # CPU pipeline check (auto without CUDA)

Builds Qwen3-8B-Base and SigLIP-so400m-patch14-384 at full size from the configs in
launch/model_configs/ with random weights (written once to --work-dir, then loaded through
the same load_llm / build_vlm path as training; nothing is downloaded). Without CUDA, or
with --tiny, it uses the tiny models of vlm_dist.tiny instead.

Sample lengths come from a built-in distribution (stage-1 "plain": one 66-token image block +
prompt + caption ~ 110 tokens; chatml: a multi-image SFT shape) or, exactly, from a records
file (--records FILE.jsonl --tokenizer DIR). Samples are packed into rows (--data.pack) or
padded one per row, collated by vlm_dist.data.pack in DataLoader workers, features are
random (P, D) tensors standing in for the cache.

Variants are the run config's own flags (any --section.key=value of vlm_dist.config) plus:
--deepspeed ds_configs/zero{2,3}.json, --engine torch (no DeepSpeed), --steps, --warmup.
Everything else: `python launch/benchmark.py --help`.

Reports a table and JSON (--out): tokens_per_s_per_gpu, samples/s, step time, MFU against
the GPU's data-sheet bf16 peak (mfu) and against a bf16 matmul peak measured here
(mfu_measured), HFU (recomputation included), peak memory, data-loader stall %, packing
efficiency (real tokens / row capacity). FLOPs are counted by vlm_dist.flops from the real
per-sample lengths of the batches that ran (see BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlm_dist import flops as F  # noqa: E402
from vlm_dist.data.pack import collate, pack_rows  # noqa: E402
from vlm_dist.media import IMAGE, block_ids  # noqa: E402
from vlm_dist.prompt import IGNORE, EncodedSample  # noqa: E402
from vlm_dist.tiny import QWEN3_SPECIAL_TOKENS  # noqa: E402

MODEL_CONFIGS = REPO / "launch" / "model_configs"
LLAVA_PRETRAIN_SAMPLES = 558_128
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
            the figure DESIGN.md's accounting uses.
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

    from vlm_dist.prompt import PromptEncoder, SampleError
    from vlm_dist.records import read_records

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

class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch i = rows[i]; collated in the DataLoader workers like training's collator."""

    def __init__(self, rows, pad_id, max_seq_len, feature_shape, dtype, pad_ids, num_tokens):
        self.rows, self.pad_id, self.max_seq_len = rows, pad_id, max_seq_len
        self.feature_shape, self.dtype, self.pad_ids, self.num_tokens = feature_shape, dtype, pad_ids, num_tokens
        self.bank = None

    def __len__(self):
        return len(self.rows)

    def _features(self, key: str) -> torch.Tensor:
        if self.bank is None:   # a few random feature maps, made in the worker, reused like cache pages
            g = torch.Generator().manual_seed(0)
            self.bank = [torch.randn(self.feature_shape, generator=g).to(self.dtype) for _ in range(8)]
        return self.bank[hash(key) % len(self.bank)]

    def __getitem__(self, i):
        from vlm_dist.model.vlm import check_media_slots
        batch = collate(self.rows[i], self._features, self.pad_id, self.max_seq_len,
                        feature_shape=self.feature_shape, feature_dtype=self.dtype)
        check_media_slots(batch["input_ids"], batch["media"], self.pad_ids, self.num_tokens,
                          batch["sample_ids"])         # here, on the CPU: the step needs no host sync
        batch["supervised_index"] = (batch["targets"].reshape(-1) != IGNORE).nonzero().squeeze(1)
        batch["capacity"] = batch["input_ids"].numel()
        return batch


def plan_rows(samples: list[EncodedSample], pack: bool, rows_per_micro: int, max_seq_len: int,
              n_micro: int, rng: random.Random) -> list[list[list[EncodedSample]]]:
    """n_micro micro-batches of rows_per_micro rows: best-fit packed rows, or one sample per row."""
    if pack:
        rows = pack_rows([len(s) for s in samples], list(range(len(samples))), max_seq_len)
        rng.shuffle(rows)
        rows = [[samples[i] for i in r] for r in rows]
    else:
        rows = [[s] for s in samples]
    need = n_micro * rows_per_micro
    if len(rows) < need:
        raise AssertionError(f"planned {len(rows)} rows, need {need}")
    return [rows[k * rows_per_micro:(k + 1) * rows_per_micro] for k in range(n_micro)]


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    out = dict(batch)
    for k in ("input_ids", "targets", "position_ids", "supervised_index", "num_supervised"):
        out[k] = batch[k].to(device, non_blocking=nb)
    out["media"] = {name: {"features": m["features"].to(device, non_blocking=nb), "counts": m["counts"]}
                    for name, m in batch["media"].items()}
    return out


# ----------------------------------------------------------------------------- models

def random_checkpoint(config_json: Path, out_dir: Path, kind: str) -> Path:
    """Write a random-weight checkpoint for `config_json` once (idempotent); return its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipImageProcessor, SiglipVisionModel

    done = out_dir / "BUILT"
    if done.exists():
        return out_dir
    config = AutoConfig.from_pretrained(str(config_json))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):     # random init on the GPU takes seconds, on the CPU minutes
        if kind == "llm":
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        else:
            model = SiglipVisionModel._from_config(config.vision_config, dtype=torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if kind == "vision":
        vc = config.vision_config
        SiglipImageProcessor(size={"height": vc.image_size, "width": vc.image_size}, resample=3,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(out_dir))
    del model
    done.write_text(str(config_json))
    return out_dir


def model_paths(args) -> tuple[str, str, object]:
    """(llm dir, vision dir, tokenizer) for the tiny or the full-size run."""
    work = Path(args.work_dir)
    if args.tiny:
        from transformers import AutoTokenizer

        from vlm_dist.tiny import build_tiny_models
        paths = build_tiny_models(work / "tiny")
        return paths["llm"], paths["vision"], AutoTokenizer.from_pretrained(paths["tokenizer"])
    llm = random_checkpoint(Path(args.llm_config), work / (Path(args.llm_config).stem + "-random"), "llm")
    vision = random_checkpoint(Path(args.vision_config), work / (Path(args.vision_config).stem + "-random"),
                               "vision")
    return str(llm), str(vision), Qwen3SpecialIds()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the training dtype (what "100%" realistically means here)."""
    n, iters = (8192, 20) if device.type == "cuda" else (512, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the training benchmark

def build_model(cfg, llm_dir: str, vision_dir: str, tokenizer, device: torch.device):
    """The VLM exactly as training builds it: load_llm in the mode, build_vlm, set_trainable."""
    from transformers import AutoConfig

    from vlm_dist.model.build import LoraSettings, build_vlm, load_llm, set_trainable

    m, dtype = cfg.model, getattr(torch, cfg.model.dtype)
    llm = load_llm(llm_dir, m.llm_mode, dtype, m.attn_implementation,
                   lora=LoraSettings(r=cfg.lora.r, alpha=int(cfg.lora.alpha), dropout=cfg.lora.dropout,
                                     target_modules=list(cfg.lora.target_modules)),
                   gradient_checkpointing=m.gradient_checkpointing)
    vcfg = AutoConfig.from_pretrained(vision_dir)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    connector = dict(kind=m.connector, use_layernorm=m.use_layernorm)
    if m.connector == "resampler":
        connector.update(num_latents=m.num_latents, depth=m.resampler_depth, heads=m.resampler_heads)
    vlm = build_vlm(llm, tokenizer, vcfg.hidden_size, F.num_patches(vcfg), connector, dtype)
    set_trainable(vlm, m.llm_mode)
    vlm.train()
    if m.llm_mode != "qlora" or device.type == "cuda":   # bitsandbytes quantises when moved to the GPU
        vlm.to(device)
    return vlm, vcfg


def rows_per_micro_batch(cfg) -> int:
    """Packed: micro_batch_tokens (or micro_batch_size x max_seq_len) // max_seq_len rows; padded: micro_batch_size."""
    d, t = cfg.data, cfg.train
    if d.pack:
        return max(1, (t.micro_batch_tokens or t.micro_batch_size * d.max_seq_len) // d.max_seq_len)
    return t.micro_batch_size


def make_engine(cfg, args, vlm, device):
    """(step function, engine name, zero stage). The step is forward + backward + optimizer step."""
    params = [p for p in vlm.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps,
                            weight_decay=cfg.train.weight_decay, fused=fused)
    accum = cfg.train.grad_accum

    if args.engine == "torch":
        def step(micro_batches):
            for b in micro_batches:
                out = vlm(**b, validate=False)
                (out["loss_sum"] / b["num_supervised"] / accum).backward()
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, "torch", None

    from vlm_dist import dist
    ds = json.loads(Path(args.deepspeed).read_text())
    ds.update(train_micro_batch_size_per_gpu=rows_per_micro_batch(cfg), gradient_accumulation_steps=accum,
              gradient_clipping=cfg.train.max_grad_norm, zero_allow_untested_optimizer=True)
    ds["bf16" if cfg.model.dtype == "bfloat16" else "fp16"] = {"enabled": cfg.model.dtype != "float32"}
    engine, _, _, _ = dist.ds_initialize(vlm, params, ds, optimizer=opt)

    def step(micro_batches):
        for b in micro_batches:
            out = engine(**b, validate=False)
            engine.backward(out["loss_sum"] / b["num_supervised"])   # DeepSpeed divides by grad_accum
            engine.step()
    return step, "deepspeed", ds["zero_optimization"]["stage"]


def run_train(cfg, args, device) -> dict:
    from vlm_dist import dist

    world = dist.world_size()
    rank = dist.rank()
    llm_dir, vision_dir, tokenizer = model_paths(args)
    vlm, vcfg = build_model(cfg, llm_dir, vision_dir, tokenizer, device)
    step_fn, engine_name, zero_stage = make_engine(cfg, args, vlm, device)

    # -- the samples and their rows
    m, d, t = cfg.model, cfg.data, cfg.train
    image_tokens = vlm.num_tokens["image"]
    block = block_ids(tokenizer, IMAGE, image_tokens)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_vocab = min(block.start, block.pad, block.end, eos)
    rows_per_micro = rows_per_micro_batch(cfg)
    n_micro = (args.warmup + args.steps) * t.grad_accum
    rng = random.Random(args.seed + rank)
    if args.records:
        shapes = shapes_from_records(args.records, args.tokenizer, d.template, image_tokens, d.max_seq_len,
                                     limit=args.max_records)
        shapes = [rng.choice(shapes) for _ in range(len(shapes))]
    else:
        shapes = []
    lengths = args.lengths or ("stage1" if d.template == "plain" else "multi")
    mean_len = 120 if lengths == "stage1" else 700
    per_row = max(1, d.max_seq_len // mean_len) if d.pack else 1
    want = int(n_micro * rows_per_micro * per_row * 1.3) + 8
    pool = shapes or builtin_shapes(lengths, want, rng)
    shapes = [pool[i % len(pool)] for i in range(want)]
    too_long = [s for s in shapes if s.prompt + s.answer + s.images * (image_tokens + 2) > d.max_seq_len]
    if too_long:
        raise ValueError(f"{len(too_long)} sampled lengths exceed --data.max_seq_len={d.max_seq_len}; "
                         "raise it or use shorter samples")
    samples = make_samples(shapes, block, eos, text_vocab, args.seed + rank)
    plan = plan_rows(samples, d.pack, rows_per_micro, d.max_seq_len, n_micro, rng)

    feature_shape = (F.num_patches(vcfg), vcfg.hidden_size)
    dataset = MicroBatches(plan, eos, d.max_seq_len, feature_shape, getattr(torch, m.dtype),
                           vlm.pad_ids, vlm.num_tokens)
    workers = min(d.num_workers, 1) if args.tiny else d.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)

    # -- warm up, then time whole steps; the only host syncs are at the window's ends
    it = iter(loader)
    for _ in range(args.warmup):
        step_fn([to_device(next(it), device) for _ in range(t.grad_accum)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    tokens = n_samples = capacity = 0
    wait = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        micro = []
        for _ in range(t.grad_accum):
            w0 = time.perf_counter()
            b = next(it)
            wait += time.perf_counter() - w0
            micro.append(to_device(b, device))
            capacity += b["capacity"]
            tokens += b["num_tokens"]
            for row_ids in b["sample_ids"]:
                n_samples += len(row_ids)
        step_fn(micro)
    sync(device)
    elapsed = time.perf_counter() - start
    del it

    # FLOPs of exactly the samples that ran in the timed window
    timed = [s for mb in plan[args.warmup * t.grad_accum:] for row in mb for s in row]
    shapes_run = [F.SampleShape(len(s), sum(1 for x in s.labels[1:] if x != IGNORE), len(s.image_keys))
                  for s in timed]
    supervised = sum(s.supervised for s in shapes_run)
    n_images = sum(s.images for s in shapes_run)
    assert len(shapes_run) == n_samples and sum(s.length for s in shapes_run) == tokens
    llm_config = vlm.llm.config if not hasattr(vlm.llm, "get_base_model") else vlm.llm.get_base_model().config
    fl = F.step_flops(llm_config, vcfg, vlm.connectors["image"].config, shapes_run, m.llm_mode,
                      F.LoraShape(cfg.lora.r, tuple(cfg.lora.target_modules)), m.gradient_checkpointing)

    # one rank's view -> the job's: sums over ranks, the slowest rank's time
    elapsed = dist.all_reduce_max(elapsed)
    tokens_all = dist.all_reduce_sum(tokens)
    samples_all = dist.all_reduce_sum(n_samples)
    flops_all = dist.all_reduce_sum(fl.total)
    hw_all = dist.all_reduce_sum(fl.hardware)
    wait = dist.all_reduce_max(wait)
    capacity_all = dist.all_reduce_sum(capacity)

    step_time = elapsed / args.steps
    flops_per_step = flops_all / world / args.steps          # per GPU
    return dict(
        tokens_per_s_per_gpu=tokens_all / world / elapsed,
        samples_per_s_per_gpu=samples_all / world / elapsed,
        samples_per_s=samples_all / elapsed,
        step_time_s=step_time,
        flops_per_step=flops_per_step,
        hardware_flops_per_step=hw_all / world / args.steps,
        flops_per_token=flops_all / tokens_all,
        flops_breakdown_per_token={k: v / max(fl.tokens, 1) for k, v in asdict(fl).items()
                                   if k in F.COMPONENTS},
        tokens_per_step=tokens_all / world / args.steps,
        samples_per_step=samples_all / world / args.steps,
        supervised_fraction=supervised / max(tokens, 1),
        images_per_sample=n_images / max(n_samples, 1),
        mean_sample_tokens=tokens / max(n_samples, 1),
        loader_stall_pct=100 * wait / elapsed,
        packing_efficiency=tokens_all / capacity_all,
        gpu_hours_558k=LLAVA_PRETRAIN_SAMPLES / (samples_all / world / elapsed) / 3600,
        setup=dict(engine=engine_name, zero_stage=zero_stage, llm_mode=m.llm_mode, pack=d.pack,
                   max_seq_len=d.max_seq_len, rows_per_micro_batch=rows_per_micro, grad_accum=t.grad_accum,
                   micro_batch_tokens=rows_per_micro * d.max_seq_len if d.pack else None,
                   gradient_checkpointing=m.gradient_checkpointing, attn_implementation=m.attn_implementation,
                   dtype=m.dtype, template=d.template, lengths=args.records or lengths,
                   connector=vlm.connectors["image"].config, lora_r=cfg.lora.r if m.llm_mode in ("lora", "qlora")
                   else None, image_tokens=image_tokens, num_workers=workers, world_size=world,
                   warmup_steps=args.warmup, timed_steps=args.steps),
    )


# ----------------------------------------------------------------------------- the cache builder

def run_cache(args, device) -> dict:
    """Images/s of the frozen SigLIP forward (what `vlm-cache build` spends its GPU time on)."""
    from PIL import Image

    from vlm_dist.model.vision import VisionTower

    _, vision_dir, _ = model_paths(args)
    tower = VisionTower.from_pretrained(vision_dir, feature_layer=args.feature_layer, dtype=torch.bfloat16,
                                        device=device)
    side = tower.image_size
    batch = args.cache_batch or (256 if device.type == "cuda" else 4)
    pixels = torch.randn(batch, 3, side, side)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    for _ in range(args.warmup):
        tower(pixels)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        tower(pixels)
    sync(device)
    elapsed = time.perf_counter() - start
    images_per_s = batch * args.steps / elapsed
    flops = F.vision_flops_per_image(tower.model.config, args.feature_layer) * batch * args.steps

    # CPU preprocessing (resize + normalise) of LLaVA-Pretrain-sized photos, one process
    rgb = [Image.fromarray((torch.rand(375, 500, 3) * 255).byte().numpy()) for _ in range(4 if args.tiny else 32)]
    t0 = time.perf_counter()
    tower.preprocess(rgb)
    preprocess_per_s = len(rgb) / (time.perf_counter() - t0)
    return dict(
        images_per_s=images_per_s,
        step_time_s=elapsed / args.steps,
        flops_per_step=flops / args.steps,
        hours_558k=LLAVA_PRETRAIN_SAMPLES / images_per_s / 3600,
        preprocess_images_per_s_per_cpu_process=preprocess_per_s,
        setup=dict(batch=batch, image_size=side, patches=tower.num_patches, feature_layer=args.feature_layer,
                   layers_run=tower.layer_index, warmup_steps=args.warmup, timed_steps=args.steps),
    )


# ----------------------------------------------------------------------------- report

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import deepspeed
    import transformers
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               transformers=transformers.__version__, deepspeed=deepspeed.__version__,
               cpu=cpu_name(), cpu_count=os.cpu_count(), device=device.type)
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gb=torch.cuda.get_device_properties(device).total_memory / 2 ** 30)
        try:
            import flash_attn
            env["flash_attn"] = flash_attn.__version__
        except ImportError:
            env["flash_attn"] = None
    return env


def add_utilisation(result: dict, device: torch.device, dtype: torch.dtype) -> None:
    """MFU against the data-sheet peak and against the measured matmul peak; peak memory."""
    from vlm_dist import dist
    spec = F.spec_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    measured = measure_matmul_peak(device, dtype)
    measured = dist.all_reduce_sum(measured) / dist.world_size()
    flops, seconds = result["flops_per_step"], result["step_time_s"]
    result.update(peak_flops_spec=spec, peak_flops_measured=measured,
                  mfu=F.mfu(flops, seconds, spec) if spec else None,
                  mfu_measured=F.mfu(flops, seconds, measured))
    if "hardware_flops_per_step" in result:
        result["hfu_measured"] = F.mfu(result["hardware_flops_per_step"], seconds, measured)
    if device.type == "cuda":
        result["peak_memory_gb"] = dist.all_reduce_max(torch.cuda.max_memory_allocated(device) / 2 ** 30)
    else:   # ru_maxrss is KiB on Linux: the whole process, model build included
        result["peak_memory_gb"] = dist.all_reduce_max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    result["peak_memory_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "host max RSS"


def table(result: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    if result["mode"] == "cache":
        rows = [("images/s", fmt(result["images_per_s"], ",.1f")),
                ("step time (s)", fmt(result["step_time_s"], ".3f")),
                ("hours for 558K images", fmt(result["hours_558k"], ".2f")),
                ("preprocess images/s (1 CPU proc)", fmt(result["preprocess_images_per_s_per_cpu_process"], ".1f"))]
    else:
        rows = [("tokens/s/GPU", fmt(result["tokens_per_s_per_gpu"], ",.1f")),
                ("samples/s/GPU", fmt(result["samples_per_s_per_gpu"], ",.2f")),
                ("step time (s)", fmt(result["step_time_s"], ".3f")),
                ("GFLOP/token (model)", fmt(result["flops_per_token"] / 1e9, ".4g")),
                ("data-loader stall %", fmt(result["loader_stall_pct"], ".1f")),
                ("packing efficiency", fmt(result["packing_efficiency"], ".3f")),
                ("GPU-hours for 558K samples", fmt(result["gpu_hours_558k"], ".2f"))]
    rows += [("MFU vs data-sheet peak", fmt(result["mfu"], ".3f")),
             ("MFU vs measured matmul peak", fmt(result["mfu_measured"], ".3f")),
             ("measured matmul TFLOP/s", fmt(result["peak_flops_measured"] / 1e12, ".3g")),
             (f"peak memory GB ({result['peak_memory_kind']})", fmt(result["peak_memory_gb"], ".2f"))]
    width = max(len(k) for k, _ in rows)
    head = f"{result['name']}  [{result['environment'].get('gpu') or 'CPU'}]"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(
        description="Training throughput / MFU (and --mode cache: feature-cache builder images/s). "
                    "Also takes the run config's --section.key=value overrides (see launch/train.py --help).",
        epilog="example: python launch/benchmark.py --config launch/configs/stage3_multi.yaml "
               "--model.llm_mode=qlora --data.max_seq_len=4096 --out bench.json")
    ap.add_argument("--mode", choices=("train", "cache"), default="train")
    ap.add_argument("--config", default=str(REPO / "launch" / "configs" / "stage1_align.yaml"),
                    help="stage config (YAML) whose model/data/train sections the benchmark runs")
    ap.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero2.json"),
                    help="DeepSpeed JSON (ZeRO stage etc.); batch and precision come from the config")
    ap.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                    help="torch: plain forward/backward/AdamW on one process, no DeepSpeed")
    ap.add_argument("--tiny", action="store_true", help="tiny models (automatic without CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    ap.add_argument("--lengths", choices=("stage1", "multi"), default=None,
                    help="built-in length model (default: stage1 for the plain template, multi for chatml)")
    ap.add_argument("--records", default=None, help="take sample lengths from this records JSONL instead")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (needed with --records)")
    ap.add_argument("--max-records", type=int, default=20000, help="records read with --records")
    ap.add_argument("--llm-config", default=str(MODEL_CONFIGS / "qwen3-8b-base.json"))
    ap.add_argument("--vision-config", default=str(MODEL_CONFIGS / "siglip-so400m-patch14-384.json"))
    ap.add_argument("--feature-layer", type=int, default=-2, help="--mode cache: SigLIP layer the cache keeps")
    ap.add_argument("--cache-batch", type=int, default=None, help="--mode cache: images per forward")
    ap.add_argument("--work-dir", default=os.path.expanduser("~/.cache/vlm_dist/bench"),
                    help="where the random-weight checkpoints are written once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="label of this run in the table and JSON")
    ap.add_argument("--out", default=None, help="write the report here as JSON")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("--") and "." not in o.split("=")[0]]
    if bad:
        ap.error(f"unknown flag {bad[0]} (run-config overrides look like --section.key=value)")
    if args.records and not args.tokenizer:
        ap.error("--records needs --tokenizer DIR (the tokenizer the records are trained with)")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    from vlm_dist import dist
    from vlm_dist.config import load_config

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA device: running the tiny CPU configuration (a pipeline check, not a measurement)")
        args.tiny = True
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # small rows keep the CPU run in seconds; explicit overrides win
        defaults = {"data.max_seq_len": "512", "train.micro_batch_size": "2", "data.num_workers": "1"}
        given = {o[2:].split("=")[0] for o in overrides}
        overrides = [f"--{k}={v}" for k, v in defaults.items() if k not in given] + overrides
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    cfg = load_config(args.config, overrides)
    if args.tiny and "--model.dtype" not in " ".join(overrides) and cfg.model.llm_mode != "qlora":
        cfg.model.dtype = "float32"   # CPUs without bf16 units emulate it ~50x slower; QLoRA needs 16 bits
    if args.engine == "deepspeed" or dist.discover().world_size > 1:
        dist.init_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cpu" and cfg.model.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"--model.attn_implementation={cfg.model.attn_implementation} cannot train on the CPU "
                         "(no backward there); use sdpa or eager for the CPU pipeline check")
    torch.manual_seed(args.seed)

    if args.mode == "cache":
        result = run_cache(args, device)
        name = args.name or "cache builder (SigLIP forward)"
    else:
        result = run_train(cfg, args, device)
        s = result["setup"]
        name = args.name or (f"{Path(args.config).stem} {s['llm_mode']} {s['engine']}"
                             f"{'' if s['zero_stage'] is None else '-zero' + str(s['zero_stage'])} "
                             f"{'pack' if s['pack'] else 'pad'} {s['attn_implementation']}"
                             f"{' gc' if s['gradient_checkpointing'] else ''}")
    result.update(name=name, mode=args.mode, tiny=args.tiny, environment=environment(device),
                  command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)))
    add_utilisation(result, device, getattr(torch, cfg.model.dtype))
    if dist.is_main():
        print(table(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
