"""The benchmark's measurements: training steps (throughput, FLOPs), the cache builder's forward,
its pipeline around a stand-in encoder, and the training loader over a cache on disk.

The training measurement runs what training runs: vlm_dist.training.loop's build_model
and train_step, vlm_dist.training.optim's AdamW, vlm_dist.training.ds_config's DeepSpeed
config, the LengthGroupedSampler's micro-batches and vlm_dist.data.loader's DataLoader,
on the synthetic workload of vlm_dist.benchmark.workload. FLOPs are counted by
vlm_dist.training.flops from the samples that ran in the timed window.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from vlm_dist.benchmark.workload import FeatureBank, model_paths, plan_samples, workload_lengths
from vlm_dist.config.schema import ADAPTER_MODES
from vlm_dist.contract.prompt import IGNORE
from vlm_dist.training import flops as F
from vlm_dist.training.loop import build_model, train_step

LLAVA_PRETRAIN_SAMPLES = 558_128


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
    """The slice of DeepSpeed's engine that train_step uses, over plain torch (--engine torch):
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


def run_train(cfg, args, device) -> dict:
    from vlm_dist import dist
    from vlm_dist.data.loader import build_loader
    from vlm_dist.training.ds_config import build_ds_config
    from vlm_dist.training.optim import build_optimizer

    world, rank = dist.world_size(), dist.rank()
    m, d, t = cfg.model, cfg.data, cfg.train
    models = model_paths(args, device)
    tokenizer = models.tokenizer
    from transformers import AutoConfig
    vcfg = AutoConfig.from_pretrained(models.vision)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    feature_shape = (F.num_patches(vcfg), vcfg.hidden_size)
    m.llm, m.init_from = models.llm, None           # random weights; a fresh connector
    if workload_lengths(cfg, args) == "video" and m.video is None:
        from vlm_dist.config.schema import VideoConfig
        m.video = VideoConfig()     # the video workload needs a video connector: model.video's defaults
        if dist.is_main():
            print(f"[benchmark] --lengths video: model.video was null, using {m.video}")
    ds_config = None if args.engine == "torch" else build_ds_config(args.deepspeed, cfg, world)
    zero_stage = None if ds_config is None else ds_config["zero_optimization"]["stage"]
    # the ZeRO stage decides whether Liger's fused cross-entropy may take lm_head.weight (not under ZeRO-3)
    vlm = build_model(cfg, tokenizer, feature_shape, dist.is_main(), llm_weights=models.llm_weights,
                      zero_stage=0 if zero_stage is None else zero_stage)
    del models

    if args.engine == "torch":
        if world > 1:
            raise ValueError("--engine torch runs one process; use the deepspeed engine for several ranks")
        engine = TorchEngine(vlm, build_optimizer(vlm, cfg), t.grad_accum, t.max_grad_norm, device)
    else:
        engine = dist.ds_initialize(vlm, None, ds_config, optimizer=build_optimizer(vlm, cfg, ds_config))[0]
    vlm.train()

    image_tokens, video_tokens = vlm.num_tokens["image"], vlm.num_tokens.get("video")
    n_micro = (args.warmup + args.steps) * t.grad_accum
    samples, micro, pad_id, lengths, views = plan_samples(cfg, args, tokenizer, image_tokens, n_micro, world,
                                                          rank, video_tokens)
    workers = min(d.num_workers, 1) if device.type == "cpu" else d.num_workers
    bank = FeatureBank(feature_shape, getattr(torch, m.dtype), num_views=views)
    # as training's feature_lookups: every view of a tiled image and of a video, else view 0
    lookups = {"image": bank.views if any(views[k] > 1 for s in samples for k in s.image_keys) else bank}
    if "video" in vlm.connectors:
        lookups["video"] = bank.views
    loader = build_loader(micro, samples, lookups, pad_id=pad_id,
                          max_seq_len=d.max_seq_len, feature_shape=feature_shape, num_workers=workers,
                          pin_memory=device.type == "cuda", pad_ids={k: vlm.pad_ids[k] for k in lookups})

    # -- warm up, then time whole optimizer steps; host syncs only at the window's ends
    it = iter(loader)
    for _ in range(args.warmup):
        train_step(engine, [next(it) for _ in range(t.grad_accum)], world)
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
        train_step(engine, batches, world)
        tokens += sum(b["num_tokens"] for b in batches)
        capacity += sum(b["input_ids"].numel() for b in batches)
    sync(device)
    elapsed = time.perf_counter() - start
    del it

    # FLOPs of exactly the samples that ran in the timed window (filler rows carry no work worth counting)
    timed = [samples[i] for mb in micro[args.warmup * t.grad_accum:] for i in mb.indices]
    shapes = [F.SampleShape(len(s), sum(1 for x in s.labels[1:] if x != IGNORE),
                            image_views=sum(views[k] for k in s.image_keys),
                            video_frames=sum(views[k] for k in s.video_keys)) for s in timed]
    assert sum(s.length for s in shapes) == tokens, "timed tokens and planned samples disagree"
    llm_config = vlm.llm.get_base_model().config if hasattr(vlm.llm, "get_base_model") else vlm.llm.config
    video_connector = vlm.connectors["video"].config if "video" in vlm.connectors else None
    fl = F.step_flops(llm_config, vcfg, vlm.connectors["image"].config, shapes, m.llm_mode,
                      F.LoraShape(cfg.lora.r, tuple(cfg.lora.target_modules)), m.gradient_checkpointing,
                      video_connector_config=video_connector)
    images = sum(len(s.image_keys) for s in timed)

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
        images_per_sample=images / max(fl.samples, 1),
        image_views_per_sample=fl.image_views / max(fl.samples, 1),     # thumbnails + tiles
        video_frames_per_sample=fl.video_frames / max(fl.samples, 1),
        mean_sample_tokens=fl.tokens / max(fl.samples, 1),
        loader_stall_pct=100 * wait / elapsed,
        packing_efficiency=tokens_all / capacity_all,
        gpu_hours_558k=LLAVA_PRETRAIN_SAMPLES / (samples_all / world / elapsed) / 3600,
        setup=dict(engine=args.engine, zero_stage=zero_stage, llm_mode=m.llm_mode, pack=d.pack,
                   max_seq_len=d.max_seq_len, micro_batch_size=t.micro_batch_size,
                   micro_batch_tokens=t.micro_batch_tokens, grad_accum=t.grad_accum,
                   gradient_checkpointing=m.gradient_checkpointing, attn_implementation=m.attn_implementation,
                   dtype=m.dtype, template=d.template, lengths=lengths, connector=vlm.connectors["image"].config,
                   lora_r=cfg.lora.r if m.llm_mode in ADAPTER_MODES else None, image_tokens=image_tokens,
                   video_tokens=video_tokens, video_connector=video_connector,
                   num_workers=workers, world_size=world, warmup_steps=args.warmup, timed_steps=args.steps),
    )


# ----------------------------------------------------------------------------- the cache builder

def run_cache(args, device) -> dict:
    """Images/s of the frozen SigLIP forward (what `vlm-cache build` spends its GPU time on). An image
    here is one view: a 2x2-tiled image takes 5 of them, an 8-frame video 8."""
    from PIL import Image

    from vlm_dist.model.vision import VisionTower

    vision_dir = model_paths(args, device, need_llm=False, need_vision_weights=True).vision
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
    # each forward row is one view: an untiled image, or a tiled image's thumbnail or tile, or a frame
    flops = F.cache_build_flops(tower.model.config, batch * args.steps, args.feature_layer)

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
    import importlib.metadata

    import transformers
    try:   # the cache builder and --engine torch run without DeepSpeed installed
        ds_version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds_version = None
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               transformers=transformers.__version__, deepspeed=ds_version,
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


# ----------------------------------------------------------------------------- the cache pipeline and loader, on disk

SO400M_FEATURES = (729, 1152)      # (patches, dim) of siglip-so400m-patch14-384's penultimate layer


class _StandInSiglip(torch.nn.Module):
    """In place of the SigLIP encoder: the config of the real one, random features at once.

    VisionTower runs around it as usual (normalising 8-bit pixels on the device included); its
    output is slices of one random bank, so what is timed is everything but the model.
    """

    def __init__(self, image_size: int, feature_shape: tuple[int, int], max_batch: int):
        from transformers import SiglipVisionConfig
        super().__init__()
        patches, dim = feature_shape
        side = math.isqrt(patches)
        self.config = SiglipVisionConfig(image_size=image_size, patch_size=image_size // side,
                                         hidden_size=dim, num_hidden_layers=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)   # gives the tower a device
        g = torch.Generator().manual_seed(0)
        self.register_buffer("bank", torch.randn(max_batch, patches, dim, generator=g).to(torch.bfloat16))

    def forward(self, pixel_values, output_hidden_states=True):
        feats = self.bank[:pixel_values.shape[0]]
        return SimpleNamespace(hidden_states=(feats, feats))


def stand_in_tower(image_size: int = 384, feature_shape: tuple[int, int] = SO400M_FEATURES,
                   max_batch: int = 256, device: str | torch.device = "cpu"):
    """A VisionTower with the real preprocessing (SigLIP's processor at `image_size`) around
    _StandInSiglip: the cache builder's pipeline at full data size, without the model's cost."""
    from transformers import SiglipImageProcessor

    from vlm_dist.model.vision import VisionTower
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=3,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model = _StandInSiglip(image_size, feature_shape, max_batch)
    return VisionTower(model, processor, "stand-in", -2, 1, torch.bfloat16, "stand-in").to(device)


def write_photos(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[str]:
    """n distinct JPEGs of a LLaVA-Pretrain-like size (smooth content, quality 90); their names."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    bases = []
    for b in range(8):
        small = (torch.rand(3, size[1] // 16, size[0] // 16, generator=g) * 255).byte()
        img = Image.fromarray(small.permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC)
        bases.append(Image.blend(img, Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 10 + b).convert("RGB"), 0.4))
    names = []
    for i in range(n):
        img = bases[i % len(bases)].copy()
        ImageDraw.Draw(img).text((8, 8), f"{i:08d}", fill=(255, 255, 255))   # a unique file, a unique key
        names.append(f"{i:08d}.jpg")
        img.save(folder / names[-1], quality=90)
    return names


def measure_cache_pipeline(work_dir: str | os.PathLike, num_images: int = 1024, shard_size: int = 256,
                           batch_size: int = 32, workers: int = 2, image_size: int = 384,
                           photo_size: tuple[int, int] = (500, 375),
                           feature_shape: tuple[int, int] = SO400M_FEATURES, encode=None) -> dict:
    """Images/s of `vlm-cache build`'s encode step (decode workers, 8-bit pixels, the writer thread,
    SHA-256, Arrow, fsync, publish) with a stand-in encoder that costs nothing (`stand_in_tower`).

    A small `image_size` (e.g. 32) makes decoding cheap too, leaving the writer as the only work:
    its ceiling. `encode` is the encode_shards to time (default vlm_dist.cache.encode's; another
    version of it to compare). input/output_wait_seconds say which side the device loop waited for.
    """
    import shutil

    from vlm_dist.cache import encode as E
    from vlm_dist.cache.build import make_plan, set_jpeg_draft
    from vlm_dist.cache.plan import BuildConfig

    work = Path(work_dir)
    photos = work / f"photos-{photo_size[0]}x{photo_size[1]}-{num_images}"
    if not (photos / "list.txt").exists():
        names = write_photos(photos, num_images, photo_size)
        (photos / "list.txt").write_text("\n".join(names) + "\n")
    out = work / "cache-pipeline"
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(out=str(out), image_lists=[str(photos / "list.txt")], image_root=str(photos),
                      batch_size=batch_size, workers=workers, shard_size=shard_size, progress=False)
    tower = stand_in_tower(image_size, feature_shape, max_batch=batch_size)
    set_jpeg_draft(tower, cfg)
    plan = make_plan(cfg, tower.fingerprint(pool=1), threads=max(4, workers))
    start = time.perf_counter()
    stats = (encode or E.encode_shards)(cfg, tower, plan, list(range(plan.num_shard_files)), out, False)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return dict(images_per_s=stats["encoded"] / elapsed, seconds=elapsed, mb_per_s=stats["bytes"] / elapsed / 1e6,
                input_wait_seconds=stats["input_wait_seconds"],
                output_wait_seconds=stats.get("output_wait_seconds"),
                setup=dict(images=num_images, shard_size=shard_size, batch_size=batch_size, workers=workers,
                           image_size=image_size, photo_size=list(photo_size), feature_shape=list(feature_shape),
                           encoded=stats["encoded"], failed=stats["failed"], bytes=stats["bytes"]))


def write_random_cache(out: str | os.PathLike, num_images: int, shard_size: int,
                       feature_shape: tuple[int, int] = SO400M_FEATURES, dtype: str = "bfloat16") -> list[str]:
    """A finished, verified feature cache of random features on disk (what `vlm-cache build`
    writes: shards, keys.arrow, index.arrow, manifest); returns its keys. Reference i is `img-i`."""
    import hashlib

    from vlm_dist.cache.build import ShardContents, publish_index
    from vlm_dist.cache.reader import FORMAT, STORAGE, shard_name
    from vlm_dist.cache.writer import ShardWriter

    out = Path(out)
    refs = [f"img-{i}" for i in range(num_images)]
    key_of = {r: hashlib.sha256(r.encode()).hexdigest() for r in refs}
    keys = sorted(key_of.values())
    np_dtype = STORAGE[dtype][1]
    g = torch.Generator().manual_seed(0)
    width = feature_shape[0] * feature_shape[1]
    shards = ShardContents()
    for j, s in enumerate(range(0, num_images, shard_size)):
        chunk = keys[s:s + shard_size]
        writer = ShardWriter(out / shard_name(j), dtype, feature_shape)
        for b in range(0, len(chunk), 64):
            bits = torch.randint(0, 1 << 14, (len(chunk[b:b + 64]), width), generator=g, dtype=torch.int32)
            writer.write(chunk[b:b + 64], bits.numpy().astype(np_dtype))
        shards.add(j, writer.finish(), chunk)
        writer.publish()
    fingerprint = {"model": "random", "dtype": dtype, "pool": 1, "feature_shape": list(feature_shape)}
    info = {"format": FORMAT, "fingerprint": fingerprint, "shard_size": shard_size, "num_records": num_images,
            "num_references": num_images, "num_unique_references": num_images, "num_keys": num_images,
            "sources": {"records": [], "image_lists": [], "image_root": str(out)}}
    publish_index(out, info, shards, [{"ref": r, "key": key_of[r]} for r in sorted(refs)], [],
                  {"failed_images": 0, "unreadable_files": 0, "records_with_failed_images": 0})
    return keys


def measure_loader(cache_dir: str | os.PathLike, batches: int = 50, max_open_shards: int | None = None,
                   micro_batch_size: int = 16, num_workers: int = 2, seed: int = 0) -> dict:
    """Samples/s of training's BatchStream over a cache on disk (stage-1 shaped samples, one image
    each, every cached image once, planned by the LengthGroupedSampler): the loader alone, on the host.
    `max_open_shards` as FeatureCache takes it (None: sized from the data)."""
    import random

    from vlm_dist.cache.reader import FeatureCache
    from vlm_dist.contract.prompt import EncodedSample
    from vlm_dist.data.loader import BatchStream
    from vlm_dist.data.sampler import LengthGroupedSampler
    from vlm_dist.benchmark.workload import builtin_shapes

    cache = FeatureCache(cache_dir, max_open_shards=max_open_shards)
    keys = cache.keys()
    image_tokens = cache.feature_shape[0]
    rng = random.Random(seed)
    samples = []
    for i, (key, s) in enumerate(zip(keys, builtin_shapes("stage1", len(keys), rng))):
        ids = [1] * image_tokens + [rng.randrange(2, 1000) for _ in range(s.prompt + s.answer)]
        labels = [IGNORE] * (len(ids) - s.answer) + ids[len(ids) - s.answer:]
        samples.append(EncodedSample(f"s{i}", ids, labels, {"image": [key]}))
    max_seq_len = image_tokens + 256
    sampler = LengthGroupedSampler.from_samples(samples, world_size=1, rank=0, max_seq_len=max_seq_len,
                                                rows_per_micro=micro_batch_size, packing=False, seed=seed)
    stream = iter(BatchStream(sampler, samples, cache.__getitem__, pad_id=0, max_seq_len=max_seq_len,
                              feature_shape=cache.feature_shape, num_workers=num_workers, pin_memory=False))
    next(stream)                                # workers started, first batch in
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        n += next(stream)["media"]["image"]["features"].shape[0]      # one image per sample
    elapsed = time.perf_counter() - start
    return dict(samples_per_s=n / elapsed, batches_per_s=batches / elapsed,
                setup=dict(shards=len(cache.manifest["shards"]), images=len(keys),
                           max_open_shards=cache.max_open_shards, micro_batch_size=micro_batch_size,
                           num_workers=num_workers, batches=batches, feature_shape=list(cache.feature_shape)))
