"""Training throughput and MFU on the real architecture, with synthetic features.

    python launch/benchmark.py                                       # stage 1, ZeRO-2, 1 GPU
    python launch/benchmark.py --config launch/configs/stage3_multi.yaml --model.llm_mode=qlora
    deepspeed launch/benchmark.py --deepspeed ds_configs/zero3.json  # many GPUs
    python launch/benchmark.py --mode cache                          # the feature-cache builder
    python launch/benchmark.py --tiny --out bench.json               # CPU pipeline check (automatic without CUDA)
    vlm-benchmark ...                                                # the same, as an installed command

Builds Qwen3-8B-Base and SigLIP-so400m-patch14-384 at full size from the configs in
launch/model_configs/ with random weights made directly on the GPU (the model is laid out on
the meta device; nothing is downloaded, and only the cache builder's SigLIP weights are written,
once, to --work-dir), then runs what training runs: vlm_dist.training.loop's build_model and train_step,
vlm_dist.training.optim's AdamW, vlm_dist.training.ds_config's DeepSpeed config, the LengthGroupedSampler's
packed (or padded) micro-batches and vlm_dist.data.loader's DataLoader. Only the samples
are synthetic: token ids with the layout of real ones (image blocks, prompt, supervised
answer) and random (P, D) features standing in for the cache. Without CUDA (and with the
default model configs), or with --tiny, the tiny models of vlm_dist.testing.tiny are used.

Sample lengths come from a built-in model (stage1: one 66-token image block + prompt +
caption, ~110 tokens; multi: a multi-image SFT shape; tiled: one AnyRes image on a 2x2 grid,
5 views; video: one clip's sampled frames with their timestamps) or, exactly, from a records
file (--records FILE.jsonl --tokenizer DIR, encoded as training encodes them). FLOPs count the
connector once per view (thumbnail, tile or frame).

    python launch/benchmark.py --lengths tiled --config launch/configs/stage2_sft.yaml
    python launch/benchmark.py --lengths video --model.video.num_frames=8 --model.video.tokens_per_frame=16

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
import json
import os
import sys
from pathlib import Path

import torch

from vlm_dist.benchmark.measure import (add_utilisation, environment, measure_cache_pipeline, measure_loader,
                                        run_cache, run_train, write_random_cache)
from vlm_dist.benchmark.workload import LENGTHS
from vlm_dist.config import DEFAULT_CONFIG, REPO_ROOT
from vlm_dist.training.flops import MODEL_CONFIGS


def _loader_over_disk(work: Path) -> dict:
    """Training's loader over a random so400m-shaped cache (1024 images in 64 shards, 1.7 GB) written to
    disk first, so its reads are real I/O."""
    import shutil
    import tempfile

    work.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))   # ours alone, removed after
    try:
        write_random_cache(cache, num_images=1024, shard_size=16)
        return measure_loader(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


HOST_MODES = {"cache-pipeline": measure_cache_pipeline, "loader": _loader_over_disk}


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
    ap.add_argument("--mode", choices=("train", "cache", "cache-pipeline", "loader"), default="train",
                    help="train; cache: the cache builder with SigLIP; cache-pipeline: the builder's decode/"
                         "write/hash/fsync path with a stand-in encoder (is the writer the limit?); loader: "
                         "training's BatchStream over a random cache on disk in --work-dir")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="stage config (YAML) whose model/data/train sections the benchmark runs")
    ap.add_argument("--deepspeed", default=str(REPO_ROOT / "ds_configs" / "zero2.json"),
                    help="DeepSpeed JSON (ZeRO stage etc.); batch and precision come from the config")
    ap.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                    help="torch: plain forward/backward/AdamW on one process, no DeepSpeed")
    ap.add_argument("--tiny", action="store_true", help="tiny models (automatic without CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    ap.add_argument("--lengths", choices=LENGTHS, default=None,
                    help="built-in length model (default: stage1 for the plain template, multi for chatml); "
                         "tiled: one image on a 2x2 AnyRes grid (5 views); video: one clip's frames "
                         "(model.video's sampling and tokens_per_frame; its defaults when null)")
    ap.add_argument("--records", default=None, help="take sample lengths from this records JSONL instead")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (needed with --records)")
    ap.add_argument("--max-records", type=int, default=20000, help="records read with --records")
    ap.add_argument("--llm-config", default=str(MODEL_CONFIGS / "qwen3-8b-base.json"))
    ap.add_argument("--vision-config", default=str(MODEL_CONFIGS / "siglip-so400m-patch14-384.json"))
    ap.add_argument("--feature-layer", type=int, default=-2, help="--mode cache: SigLIP layer the cache keeps")
    ap.add_argument("--cache-batch", type=int, default=None, help="--mode cache: images per forward")
    ap.add_argument("--work-dir", default=os.path.expanduser("~/.cache/vlm_dist/bench"),
                    help="where the models' config.json files (and the cache builder's random SigLIP) are written")
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


def prepare(argv: list[str]):
    """Flags -> (args, run config, device), with the process group up where the run needs one: the
    set-up that the benchmark and the packed-vs-alone check (vlm_dist.benchmark.correctness) share."""
    from vlm_dist import dist
    from vlm_dist.config import load_config

    args, overrides = parse_args(argv)
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
    if device.type == "cpu" and cfg.model.attn_implementation not in ("sdpa", "eager", "auto", "varlen"):
        raise ValueError(f"--model.attn_implementation={cfg.model.attn_implementation} cannot train on the CPU "
                         "(no backward there); use sdpa, eager, auto or varlen (its CPU reference) for the CPU "
                         "pipeline check")
    torch.manual_seed(args.seed)
    return args, cfg, device


def main(argv: list[str] | None = None) -> int:
    from vlm_dist import dist

    args, cfg, device = prepare(sys.argv[1:] if argv is None else argv)
    if args.mode in HOST_MODES:   # no model, no FLOPs: the host side of the pipeline only
        result = HOST_MODES[args.mode](Path(args.work_dir) / args.mode)
        result.update(name=args.name or args.mode, mode=args.mode, environment=environment(device))
        if dist.is_main():
            print(json.dumps(result, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return 0
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
