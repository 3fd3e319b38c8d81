"""Training throughput and MFU on the real architecture, with synthetic features.

    python launch/benchmark.py                                       # stage 1, ZeRO-2, 1 GPU
    python launch/benchmark.py --config launch/configs/stage3_multi.yaml --model.llm_mode=qlora
    deepspeed launch/benchmark.py --deepspeed ds_configs/zero3.json  # many GPUs
    python launch/benchmark.py --mode cache                          # the feature-cache builder
    python launch/benchmark.py --tiny --out bench.json               # CPU pipeline check (automatic without CUDA)

Builds Qwen3-8B-Base and SigLIP-so400m-patch14-384 at full size from the configs in
launch/model_configs/ with random weights (written once to --work-dir; nothing is
downloaded), then runs what training runs: launch/train.py's build_model and train_step,
vlm_dist.training.optim's AdamW, vlm_dist.training.ds_config's DeepSpeed config, the LengthGroupedSampler's
packed (or padded) micro-batches and vlm_dist.data.loader's DataLoader. Only the samples
are synthetic: token ids with the layout of real ones (image blocks, prompt, supervised
answer) and random (P, D) features standing in for the cache. Without CUDA (and with the
default model configs), or with --tiny, the tiny models of vlm_dist.testing.tiny are used.

Sample lengths come from a built-in model (stage1: one 66-token image block + prompt +
caption, ~110 tokens; multi: a multi-image SFT shape) or, exactly, from a records file
(--records FILE.jsonl --tokenizer DIR, encoded as training encodes them).

Variants are the run config's own flags (any --section.key=value of vlm_dist.config:
--data.pack, --model.llm_mode, --train.micro_batch_size, --train.micro_batch_tokens,
--model.gradient_checkpointing, --model.attn_implementation, --lora.r, ...) plus
--deepspeed ds_configs/zero{2,3}.json and --engine torch (no DeepSpeed, one process).

Reports a table and JSON (--out): tokens_per_s_per_gpu, samples/s, step time, MFU against
the GPU's data-sheet bf16 peak (mfu) and against a bf16 matmul peak measured here
(mfu_measured), HFU (recomputation included), peak memory, data-loader stall %, packing
efficiency (real tokens / row capacity). FLOPs are counted by vlm_dist.training.flops from the
lengths of the samples that ran in the timed window (see BENCHMARKS.md).
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
sys.path.insert(0, str(REPO / "launch"))      # launch/train.py's loop pieces

from vlm_dist.training import flops as F  # noqa: E402
from vlm_dist.contract.media import IMAGE, block_ids  # noqa: E402
from vlm_dist.contract.prompt import IGNORE, EncodedSample  # noqa: E402
from vlm_dist.testing.tiny import QWEN3_SPECIAL_TOKENS  # noqa: E402

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
    if device == "cuda":
        torch.cuda.empty_cache()
    done.write_text(str(config_json))
    return out_dir


def model_paths(args, need_llm: bool = True) -> tuple[str | None, str, object]:
    """(llm dir, vision dir, tokenizer) for the tiny or the full-size run. The first process on each
    node writes the checkpoints; the others wait for it, then find them built."""
    from vlm_dist import dist
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        _build_models(args, need_llm)
    dist.barrier()
    return _build_models(args, need_llm)


def _build_models(args, need_llm: bool) -> tuple[str | None, str, object]:
    work = Path(args.work_dir)
    if args.tiny:
        from transformers import AutoTokenizer

        from vlm_dist.testing.tiny import build_tiny_models
        paths = build_tiny_models(work / "tiny")
        return paths["llm"], paths["vision"], AutoTokenizer.from_pretrained(paths["tokenizer"])
    vision = random_checkpoint(Path(args.vision_config), work / (Path(args.vision_config).stem + "-random"),
                               "vision")
    llm = random_checkpoint(Path(args.llm_config), work / (Path(args.llm_config).stem + "-random"), "llm") \
        if need_llm else None
    return (str(llm) if llm else None), str(vision), Qwen3SpecialIds()


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

class TorchEngine:
    """The slice of DeepSpeed's engine that train.train_step uses, over plain torch (--engine torch):
    the baseline that shows what DeepSpeed costs or saves."""

    def __init__(self, module, optimizer, accum: int, max_grad_norm: float, device: torch.device):
        self.module, self.optimizer, self.accum, self.max_grad_norm = module.to(device), optimizer, accum, max_grad_norm
        self.device, self.micro = device, 0
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss):
        (loss / self.accum).backward()      # DeepSpeed averages over accumulation steps the same way

    def step(self):
        self.micro += 1
        if self.micro % self.accum:
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


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
            max_tokens_per_micro=cfg.train.micro_batch_tokens, seed=args.seed)   # as launch/train.py does
        micro = sampler.micro_batches(0)
        if len(micro) >= n_micro:
            return samples, micro[:n_micro], eos, lengths
        n *= 2


def run_train(cfg, args, device) -> dict:
    import train   # launch/train.py: the benchmark runs training's own model build, optimizer and step

    from vlm_dist import dist
    from vlm_dist.data.loader import build_loader
    from vlm_dist.training.ds_config import build_ds_config
    from vlm_dist.training.optim import build_optimizer

    world, rank = dist.world_size(), dist.rank()
    m, d, t = cfg.model, cfg.data, cfg.train
    llm_dir, vision_dir, tokenizer = model_paths(args)
    from transformers import AutoConfig
    vcfg = AutoConfig.from_pretrained(vision_dir)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    feature_shape = (F.num_patches(vcfg), vcfg.hidden_size)
    m.llm, m.init_from = llm_dir, None           # random weights; a fresh connector
    vlm = train.build_model(cfg, tokenizer, feature_shape, dist.is_main())

    if args.engine == "torch":
        if world > 1:
            raise ValueError("--engine torch runs one process; use the deepspeed engine for several ranks")
        engine = TorchEngine(vlm, build_optimizer(vlm, cfg), t.grad_accum, t.max_grad_norm, device)
        zero_stage = None
    else:
        ds_config = build_ds_config(args.deepspeed, cfg, world)
        engine = dist.ds_initialize(vlm, None, ds_config, optimizer=build_optimizer(vlm, cfg, ds_config))[0]
        zero_stage = ds_config["zero_optimization"]["stage"]
    vlm.train()

    image_tokens = vlm.num_tokens["image"]
    n_micro = (args.warmup + args.steps) * t.grad_accum
    samples, micro, pad_id, lengths = plan_samples(cfg, args, tokenizer, image_tokens, n_micro, world, rank)
    workers = min(d.num_workers, 1) if device.type == "cpu" else d.num_workers
    loader = build_loader(micro, samples, FeatureBank(feature_shape, getattr(torch, m.dtype)), pad_id=pad_id,
                          max_seq_len=d.max_seq_len, feature_shape=feature_shape, num_workers=workers,
                          pin_memory=device.type == "cuda")

    # -- warm up, then time whole optimizer steps; host syncs only at the window's ends
    it = iter(loader)
    for _ in range(args.warmup):
        train.train_step(engine, [next(it) for _ in range(t.grad_accum)], world)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    tokens = capacity = 0
    wait = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        batches = []
        for _ in range(t.grad_accum):
            w0 = time.perf_counter()
            batches.append(next(it))
            wait += time.perf_counter() - w0
        train.train_step(engine, batches, world)
        tokens += sum(b["num_tokens"] for b in batches)
        capacity += sum(b["input_ids"].numel() for b in batches)
    sync(device)
    elapsed = time.perf_counter() - start
    del it

    # FLOPs of exactly the samples that ran in the timed window (filler rows carry no work worth counting)
    timed = [samples[i] for mb in micro[args.warmup * t.grad_accum:] for i in mb.indices]
    shapes = [F.SampleShape(len(s), sum(1 for x in s.labels[1:] if x != IGNORE), len(s.image_keys)) for s in timed]
    assert sum(s.length for s in shapes) == tokens, "timed tokens and planned samples disagree"
    llm_config = vlm.llm.get_base_model().config if hasattr(vlm.llm, "get_base_model") else vlm.llm.config
    fl = F.step_flops(llm_config, vcfg, vlm.connectors["image"].config, shapes, m.llm_mode,
                      F.LoraShape(cfg.lora.r, tuple(cfg.lora.target_modules)), m.gradient_checkpointing)

    # one rank's view -> the job's: sums over ranks, the slowest rank's time
    elapsed = dist.all_reduce_max(elapsed)
    wait = dist.all_reduce_max(wait)
    tokens_all, samples_all = dist.all_reduce_sum(tokens), dist.all_reduce_sum(len(shapes))
    flops_all, hw_all = dist.all_reduce_sum(fl.total), dist.all_reduce_sum(fl.hardware)
    capacity_all = dist.all_reduce_sum(capacity)
    return dict(
        tokens_per_s_per_gpu=tokens_all / world / elapsed,
        samples_per_s_per_gpu=samples_all / world / elapsed,
        samples_per_s=samples_all / elapsed,
        step_time_s=elapsed / args.steps,
        flops_per_step=flops_all / world / args.steps,                  # per GPU
        hardware_flops_per_step=hw_all / world / args.steps,
        flops_per_token=flops_all / tokens_all,
        flops_breakdown_per_token={k: v / max(fl.tokens, 1) for k, v in asdict(fl).items() if k in F.COMPONENTS},
        tokens_per_step=tokens_all / world / args.steps,
        samples_per_step=samples_all / world / args.steps,
        supervised_fraction=fl.supervised / max(fl.tokens, 1),
        images_per_sample=fl.images / max(fl.samples, 1),
        mean_sample_tokens=fl.tokens / max(fl.samples, 1),
        loader_stall_pct=100 * wait / elapsed,
        packing_efficiency=tokens_all / capacity_all,
        gpu_hours_558k=LLAVA_PRETRAIN_SAMPLES / (samples_all / world / elapsed) / 3600,
        setup=dict(engine=args.engine, zero_stage=zero_stage, llm_mode=m.llm_mode, pack=d.pack,
                   max_seq_len=d.max_seq_len, micro_batch_size=t.micro_batch_size,
                   micro_batch_tokens=t.micro_batch_tokens, grad_accum=t.grad_accum,
                   gradient_checkpointing=m.gradient_checkpointing, attn_implementation=m.attn_implementation,
                   dtype=m.dtype, template=d.template, lengths=lengths, connector=vlm.connectors["image"].config,
                   lora_r=cfg.lora.r if m.llm_mode in ("lora", "qlora") else None, image_tokens=image_tokens,
                   num_workers=workers, world_size=world, warmup_steps=args.warmup, timed_steps=args.steps),
    )


# ----------------------------------------------------------------------------- the cache builder

def run_cache(args, device) -> dict:
    """Images/s of the frozen SigLIP forward (what `vlm-cache build` spends its GPU time on)."""
    from PIL import Image

    from vlm_dist.model.vision import VisionTower

    _, vision_dir, _ = model_paths(args, need_llm=False)
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
    on_cpu = not torch.cuda.is_available()
    default_models = (Path(args.llm_config) == MODEL_CONFIGS / "qwen3-8b-base.json"
                      and Path(args.vision_config) == MODEL_CONFIGS / "siglip-so400m-patch14-384.json")
    if on_cpu and not args.tiny and default_models:
        print("no CUDA device: running the tiny models on the CPU (a pipeline check, not a measurement)")
        args.tiny = True
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # small rows keep a CPU run in seconds; explicit overrides win
        defaults = {"data.max_seq_len": "512", "train.micro_batch_size": "2", "data.num_workers": "1"}
        given = {o[2:].split("=")[0] for o in overrides}
        overrides = [f"--{k}={v}" for k, v in defaults.items() if k not in given] + overrides
    args.steps = args.steps or (2 if on_cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cpu else 3)
    cfg = load_config(args.config, overrides)
    if on_cpu and "--model.dtype" not in " ".join(overrides) and cfg.model.llm_mode != "qlora":
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
