"""Does the real-size model learn? Memorise a small repeated set, then reload the export and compare.

    python -m vlm_dist.benchmark.learning --config launch/configs/stage3_multi.yaml \\
        --model.llm_mode=lora --model.init_from=null --out lora.json          # full size, one GPU
    python -m vlm_dist.benchmark.learning --config launch/configs/stage1_align.yaml --out stage1.json
    python -m vlm_dist.benchmark.learning --tiny ...                         # the CPU pipeline check

The weights are random (the benchmark's: built on the device, nothing downloaded), so memorisation is
the test: the same `--samples` synthetic samples (the benchmark's layout: image blocks, prompt,
supervised answer) packed into one batch, `--steps` AdamW steps on the trainable set of the run's
llm_mode, through the trainer's own build_model and the VLM's forward. The run passes when the mean
loss per supervised token falls by `--target-ratio` (default 5 with adapters or a full LLM, 2 with a
frozen LLM, where only the connector can move it) within the steps, and, with adapters, when the
export (vlm_dist.training.checkpoint.write_export) reloaded onto the same base weights through
`--model.init_from`, as the next stage would load it, gives the same loss (relative gap within the
dtype's tolerance). Takes the benchmark's flags (vlm_dist.benchmark.cli); exits 1 naming what failed.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlm_dist.benchmark.cli import prepare
from vlm_dist.benchmark.correctness import TOLERANCE
from vlm_dist.benchmark.measure import environment
from vlm_dist.benchmark.workload import FeatureBank, builtin_shapes, make_samples, model_paths, random_llm_weights
from vlm_dist.config.schema import ADAPTER_MODES
from vlm_dist.contract.media import IMAGE, block_ids
from vlm_dist.data.pack import collate
from vlm_dist.training.loop import build_model, to_device


def _own_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """This module's flags (--samples, --lr, --target-ratio) out of argv; the rest is the benchmark's."""
    own, rest, it = {}, [], iter(argv)
    names = {"--samples": int, "--lr": float, "--target-ratio": float}
    for a in it:
        key, _, value = a.partition("=")
        if key in names:
            own[key[2:].replace("-", "_")] = names[key](value or next(it))
        else:
            rest.append(a)
    return own, rest


def batch_loss(vlm, batch: dict, device: torch.device) -> torch.Tensor:
    """Mean loss per supervised token of one batch (the quantity training logs)."""
    out = vlm(**to_device(batch, device), validate=False)
    return out["loss_sum"] / max(out["num_supervised"], 1)


def check(argv: list[str]) -> tuple[dict, object]:
    own, rest = _own_flags(argv)
    if not any(a == "--engine" or a.startswith("--engine=") for a in rest):
        rest = ["--engine", "torch"] + rest      # one process: no DeepSpeed needed for a learning check
    args, cfg, device = prepare(rest)
    mode = cfg.model.llm_mode
    steps = args.steps if "--steps" in " ".join(rest) else 60
    n_samples = own.get("samples", 8)
    lr = own.get("lr", 1e-3)
    ratio = own.get("target_ratio", 2.0 if mode == "frozen" else 5.0)

    models = model_paths(args, device)
    from transformers import AutoConfig
    vcfg = AutoConfig.from_pretrained(models.vision)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    from vlm_dist.training import flops as F
    feature_shape = (F.num_patches(vcfg), vcfg.hidden_size)
    cfg.model.llm, cfg.model.init_from = models.llm, None
    cfg.lora.dropout = 0.0                       # the same function in training and in the reload
    vlm = build_model(cfg, models.tokenizer, feature_shape, False, llm_weights=models.llm_weights).to(device)
    models.llm_weights = None

    tokenizer = models.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    block = block_ids(tokenizer, IMAGE, vlm.num_tokens["image"])
    lengths = args.lengths or ("stage1" if cfg.data.template == "plain" else "multi")
    shapes = builtin_shapes(lengths, n_samples, random.Random(args.seed))
    samples = make_samples(shapes, block, eos, min(block.start, block.pad, block.end, eos), args.seed)
    bank = FeatureBank(feature_shape, getattr(torch, cfg.model.dtype))
    width = cfg.data.max_seq_len
    rows, row = [], []
    for s in samples:                            # first fit into rows of max_seq_len, as packing does
        if row and sum(len(x) for x in row) + len(s) > width:
            rows.append(row)
            row = []
        row.append(s)
    rows.append(row)
    width = max(width, max(sum(len(x) for x in r) for r in rows))
    batch = collate(rows, bank, eos, width, feature_shape=feature_shape)

    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vlm.train()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        loss = batch_loss(vlm, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    vlm.eval()
    with torch.no_grad():
        final = batch_loss(vlm, batch, device).item()
    reached = next((i + 1 for i, x in enumerate(losses + [final]) if x <= losses[0] / ratio), None)
    result = dict(initial_loss=losses[0], final_loss=final, loss_ratio=losses[0] / max(final, 1e-12),
                  target_ratio=ratio, steps=steps, steps_to_target=reached, losses=losses,
                  train_s=train_s, learned=reached is not None)

    result["reload"] = None
    if mode in ADAPTER_MODES:
        result["reload"] = _reload(vlm, cfg, args, models, feature_shape, batch, device, final)
    tolerance = TOLERANCE[cfg.model.dtype]
    result.update(
        tolerance=tolerance,
        setup=dict(llm_mode=mode, attn_implementation=cfg.model.attn_implementation, dtype=cfg.model.dtype,
                   kernels=cfg.model.kernels, lr=lr, samples=n_samples, rows=len(rows), row_width=width,
                   supervised_tokens=int(batch["supervised_index"].numel()),
                   trainable_parameters=sum(p.numel() for p in params)),
        tiny=args.tiny, environment=environment(device))
    result["ok"] = result["learned"] and (result["reload"] is None or result["reload"]["rel_err"] <= tolerance)
    return result, args


def _reload(vlm, cfg, args, models, feature_shape, batch, device, trained_loss: float) -> dict:
    """Export the trained adapter + connector, rebuild on the same base weights from the export
    (--model.init_from, the next stage's path), and compare the loss on the same batch."""
    from vlm_dist.training.checkpoint import write_export

    work = Path(tempfile.mkdtemp(prefix="learning-export-", dir=args.work_dir))
    try:
        export = work / "export"
        vlm_config = {"llm": cfg.model.llm, "vision": models.vision, "feature_layer": cfg.model.feature_layer,
                      "pool": 1, "template": cfg.data.template, "num_media_tokens": vlm.num_tokens["image"],
                      "vision_dtype": cfg.model.dtype}
        write_export(vlm, export, vlm_config, cfg.model.llm_mode, is_main=True)
        vlm.to("cpu")                            # make room: the rebuilt model needs the base weights again
        del vlm
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cfg2 = copy.deepcopy(cfg)
        cfg2.model.init_from = str(export)
        weights = None
        if not args.tiny:                        # the same seed makes the same base weights
            from transformers import AutoConfig
            weights = random_llm_weights(AutoConfig.from_pretrained(models.llm), torch.bfloat16, device, args.seed)
        again = build_model(cfg2, models.tokenizer, feature_shape, False, llm_weights=weights).to(device)
        again.eval()
        with torch.no_grad():
            reloaded = batch_loss(again, batch, device).item()
        return dict(trained_loss=trained_loss, reloaded_loss=reloaded,
                    rel_err=abs(reloaded - trained_loss) / max(abs(trained_loss), 1e-12),
                    export_files=sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    result, args = check(argv)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    s = result["setup"]
    print(f"learning [{s['llm_mode']}, {s['attn_implementation']}, {s['dtype']}]: loss {result['initial_loss']:.4g} "
          f"-> {result['final_loss']:.4g} in {result['steps']} steps (x{result['loss_ratio']:.2f}; target "
          f"x{result['target_ratio']:g}, reached at step {result['steps_to_target']})", flush=True)
    if result["reload"] is not None:
        r = result["reload"]
        print(f"export reload: loss {r['reloaded_loss']:.6g} vs {r['trained_loss']:.6g} (rel {r['rel_err']:.2e}, "
              f"tolerance {result['tolerance']:.0e})", flush=True)
    if not result["learned"]:
        print(f"error: the loss fell only x{result['loss_ratio']:.2f} in {result['steps']} steps "
              f"(target x{result['target_ratio']:g})", file=sys.stderr)
    elif not result["ok"]:
        print(f"error: the reloaded export's loss differs from the trained model's beyond {result['tolerance']:.0e}",
              file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
