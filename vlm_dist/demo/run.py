"""The embedded demo: the whole system on synthetic data, on this machine, downloading nothing.

    python launch/demo.py [--out demo_out]

1. writes a synthetic dataset (coloured shapes; captions, "describe each image in
   order", "which image shows X?" over 2 and 3 images; train and held-out splits);
2. builds tiny models locally (SigLIP, Qwen3, tokenizer) with save_pretrained and
   pretrains them briefly, as the real ones arrive pretrained (SigLIP: its own sigmoid
   loss; Qwen3: see reading_corpus);
3. builds the feature cache with `vlm-cache build`;
4. trains stage 1 (connector only) and then a LoRA SFT stage with the real
   `deepspeed launch/train.py` on the devices present (2 CPU ranks on a CPU machine);
5. evaluates before and after with `vlm-eval` (POPE included);
6. trains and evaluates what only the new media kinds can show (vlm_dist.demo.media_stage):
   a small detail with and without AnyRes tiles, "when does X appear" on short clips;
7. writes results.json and report/ (`vlm-eval report`: report.md, which_image.png, pope.png,
   loss.png, captions.png, and the media table) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlm_dist.config import REPO_ROOT

# The demo's model sizes and schedules: small enough for 2 CPU cores in minutes.
LLM_HIDDEN, LLM_LAYERS = 128, 4
NUM_LATENTS = 8
PRETRAIN_STEPS = {"vision": 1000, "llm": 600}
STAGE1 = dict(steps=240, lr=3e-3)
STAGE2 = dict(steps=400, lr_connector=1e-3, lr_adapters=2e-3, lora_r=32)


def caption_pairs(data: Path, name: str = "stage1_train.jsonl") -> tuple[list[Path], list[str]]:
    """(image file, caption) of every single-image caption record in `name`."""
    from vlm_dist.contract.records import read_records
    recs = list(read_records(data / name))
    return [data / r["images"][0] for r in recs], [r["conversations"][-1]["content"] for r in recs]


def reading_corpus(data: Path, llm_dir: str) -> list[tuple[list[int], list[int]]]:
    """The training records with each image block holding its scene in words: the tiny LLM's corpus.

    A real LLM arrives able to read what its context says and copy it into an
    answer; a tiny LLM trained on the captions alone learns only how often each
    colour occurs, never to look back. So its pretraining text is the training
    records (stage 1 and SFT: the same questions and answers) exactly as the VLM sees
    them (same template, same block of NUM_LATENTS slots), with the scene the
    generator drew written as words in each block's first slots ("red circle left").
    Only the replies are supervised. The LLM so learns the tasks from those words
    and never sees a pixel; what stages 1 and 2 then show is grounding: making the
    connector produce, from SigLIP features alone, what the LLM reads there.
    """
    from transformers import AutoTokenizer

    from vlm_dist.contract.media import IMAGE, block_ids
    from vlm_dist.contract.prompt import PromptEncoder
    from vlm_dist.contract.records import read_records
    tok = AutoTokenizer.from_pretrained(llm_dir)
    start = block_ids(tok, IMAGE, NUM_LATENTS).start
    examples = []
    for name, template in (("stage1_train.jsonl", "plain"), ("sft_train.jsonl", "chatml")):
        enc = PromptEncoder(tok, template, NUM_LATENTS)
        for rec in read_records(data / name):
            scenes = rec.get("scenes") or ([rec["scene"]] if "scene" in rec else [])
            sample = enc.encode(rec)
            ids = list(sample.input_ids)
            firsts = [i + 1 for i, t in enumerate(ids) if t == start]          # first slot of each block
            if len(firsts) != len(scenes):
                raise ValueError(f"record {rec['id']} in {name}: {len(firsts)} image blocks but "
                                 f"{len(scenes)} scenes ('scene' or 'scenes')")
            for first, s in zip(firsts, scenes):
                words = tok(f" {s['colour']} {s['shape']} {s['position']}",
                            add_special_tokens=False)["input_ids"]
                if len(words) > NUM_LATENTS:
                    raise ValueError(f"record {rec['id']} in {name}: {len(words)} scene tokens exceed "
                                     f"the {NUM_LATENTS}-slot image block")
                ids[first:first + len(words)] = words
            examples.append((ids, sample.labels))
    return examples


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run a step, its output to a log file; on failure show the log's tail and stop."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        sys.exit(f"demo step failed ({' '.join(map(str, cmd[:4]))} ...), rc={proc.returncode}; "
                 f"log {log}:\n" + "\n".join(tail))
    print(f"  done in {time.perf_counter() - t0:.0f}s (log: {log})", flush=True)


def launcher() -> tuple[list[str], dict]:
    """`deepspeed` on the GPUs present, else 2 CPU ranks (gloo)."""
    import torch
    if torch.cuda.is_available():
        return ["deepspeed", "--num_gpus", str(torch.cuda.device_count())], {}
    return ["deepspeed", "--num_gpus", "2"], {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def train(stage: str, out: Path, models: dict, data: Path, cache: Path, extra: dict, logs: Path,
          log_name: str | None = None) -> Path:
    """One `deepspeed launch/train.py` run of launch/configs/{stage}.yaml with the demo's settings
    and `extra` overrides; its log is logs/{log_name or stage}.log. Returns its export."""
    cmd, env = launcher()
    cfg = {
        "model.llm": models["llm"], "model.vision": models["vision"], "model.dtype": "float32",
        "model.num_latents": NUM_LATENTS, "model.resampler_depth": 2, "model.resampler_heads": 4,
        "data.cache": cache, "data.max_seq_len": 512, "data.num_workers": 1,
        "train.output_dir": out, "train.epochs": "null", "train.micro_batch_size": 1,
        "train.warmup_ratio": 0.05, "train.log_every": 10, "train.eval_every": 0,
        "checkpoint.every": 0, "checkpoint.keep_last": 1, **extra,
    }
    args = ["--master_port", str(29400 + (os.getpid() % 500)), REPO_ROOT / "launch" / "train.py",
            "--deepspeed", REPO_ROOT / "ds_configs" / "zero2.json",
            "--config", REPO_ROOT / "launch" / "configs" / f"{stage}.yaml"] + [f"--{k}={v}" for k, v in cfg.items()]
    run(cmd + args, logs / f"{log_name or stage}.log", env)
    return out / "export"


def pretrained_models(out: Path, data: Path, data_config: dict) -> dict[str, str]:
    """The tiny models under out/models, pretrained; reused only when built by this recipe."""
    from vlm_dist.testing.tiny import build_tiny_models, pretrain_tiny_llm, pretrain_tiny_siglip, siglip_zero_shot
    # What the tiny models were built with; a directory built otherwise (older code,
    # other schedules, or an interrupted build) starts over.
    recipe = {"version": 2, "llm_hidden": LLM_HIDDEN, "llm_layers": LLM_LAYERS, "num_latents": NUM_LATENTS,
              "pretrain_steps": PRETRAIN_STEPS, "data": data_config}
    pretrained = out / "models" / "PRETRAINED.json"   # written only once both pretrainings finished
    if not pretrained.exists() or json.loads(pretrained.read_text()).get("recipe") != recipe:
        for derived in ("models", "cache"):           # the cache holds the old tower's features
            shutil.rmtree(out / derived, ignore_errors=True)
    models = build_tiny_models(out / "models", llm_hidden=LLM_HIDDEN, llm_layers=LLM_LAYERS)
    if not pretrained.exists():
        # Real SigLIP and Qwen3 arrive pretrained; random tiny ones know nothing. SigLIP gets
        # its own sigmoid image-caption loss on the training images; Qwen3 gets the training
        # records with each image block written out in words (see reading_corpus).
        t0 = time.perf_counter()
        paths, captions = caption_pairs(data)
        v = pretrain_tiny_siglip(models["vision"], paths, captions, steps=PRETRAIN_STEPS["vision"])
        zero_shot = siglip_zero_shot(models["vision"], *caption_pairs(data, "heldout_captions.jsonl"),
                                     words=captions)
        t1 = time.perf_counter()
        l = pretrain_tiny_llm(models["llm"], reading_corpus(data, models["llm"]), steps=PRETRAIN_STEPS["llm"])
        print(f"  tiny SigLIP (sigmoid loss {v[0]:.1f} -> {v[-1]:.1f}, held-out zero-shot caption accuracy "
              f"{zero_shot:.2f}, {t1 - t0:.0f}s), tiny Qwen3 (LM loss {l[0]:.2f} -> {l[-1]:.2f}, "
              f"{time.perf_counter() - t1:.0f}s)", flush=True)
        pretrained.write_text(json.dumps({"recipe": recipe, "vision_loss": [v[0], v[-1]],
                                          "vision_zero_shot_heldout": zero_shot, "llm_loss": [l[0], l[-1]]}))
    return models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--skip-media", action="store_true",
                   help="leave out stage 7 (tiles and video, vlm_dist.demo.media_stage)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    print("[1/7] synthetic dataset", flush=True)
    from vlm_dist.demo.data import generate
    data = out / "data"
    summary = generate(data)
    print(f"  {summary['files']}", flush=True)

    print("[2/7] tiny models (SigLIP, Qwen3, tokenizer)", flush=True)
    models = pretrained_models(out, data, summary["config"])

    print("[3/7] feature cache (vlm-cache build)", flush=True)
    cache = out / "cache"
    run([sys.executable, "-m", "preprocess.cache_cli", "build", "--records", data / "stage1_train.jsonl",
         data / "sft_train.jsonl", data / "heldout_loss.jsonl", "--image-root", data,
         "--vision-model", models["vision"], "--out", cache, "--dtype", "fp32", "--no-progress"],
        logs / "cache.log")

    for stage in ("stage1", "stage2"):                # every run trains afresh (no resume)
        shutil.rmtree(out / stage, ignore_errors=True)
    print("[4/7] stage 1: connector alignment (LLM frozen)", flush=True)
    s1 = train("stage1_align", out / "stage1", models, data, cache, {
        "data.records": data / "stage1_train.jsonl", "train.max_steps": STAGE1["steps"],
        "train.lr_connector": STAGE1["lr"]}, logs)

    print("[5/7] stage 2: LoRA SFT (captions, describe-in-order, which-image, POPE yes/no)", flush=True)
    s2 = train("stage2_sft", out / "stage2", models, data, cache, {
        "data.records": data / "sft_train.jsonl", "model.init_from": s1, "model.llm_mode": "lora",
        "lora.r": STAGE2["lora_r"], "lora.alpha": 2 * STAGE2["lora_r"], "lora.dropout": 0.0,
        "train.max_steps": STAGE2["steps"], "train.lr_connector": STAGE2["lr_connector"],
        "train.lr_adapters": STAGE2["lr_adapters"]}, logs)

    print("[6/7] evaluation before / after (vlm-eval)", flush=True)
    from vlm_dist.demo.report import before_export, evaluate, write_report
    before = before_export(out / "before", models, s1)
    results = {name: evaluate(export, data, cache, out / f"eval_{name}", logs, run)
               for name, export in (("before", before), ("after", s2))}

    if not args.skip_media:
        print("[7/7] media: a small detail with and without AnyRes tiles; 'when' on short clips", flush=True)
        from vlm_dist.demo.media_stage import media_stage
        t_media = time.perf_counter()
        results["media"] = media_stage(out, models, s1, NUM_LATENTS, train, run, logs)
        results["media"]["seconds"] = round(time.perf_counter() - t_media, 1)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(out, results, [out / "stage1", out / "stage2"], data)
    return 0
