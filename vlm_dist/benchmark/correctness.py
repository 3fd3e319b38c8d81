"""Packed rows against each sample alone, on the run's own model, attention backend and kernels.

    python -m vlm_dist.benchmark.correctness --tiny --model.attn_implementation=sdpa --out packed.json
    python -m vlm_dist.benchmark.correctness --model.attn_implementation=varlen   # full size, on a GPU

A packed sample that attends to its neighbours, or whose positions do not restart, changes its loss
and the gradients that reach the connector. So: the summed loss of two packed rows of three samples
each must equal the sum of the six samples' losses run one per row, and so must the connector's
gradients. Takes the benchmark's flags (vlm_dist.benchmark.cli); exits 1, naming the gap, if they differ.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from vlm_dist.benchmark.cli import prepare
from vlm_dist.benchmark.measure import environment
from vlm_dist.benchmark.workload import FeatureBank, MediaBlocks, builtin_shapes, make_samples, model_paths, views_of
from vlm_dist.contract.media import IMAGE, block_ids
from vlm_dist.data.pack import collate
from vlm_dist.training import flops as F
from vlm_dist.training.loop import build_model, to_device

# relative gap allowed: float32 sums in a different order; bf16 rounds each partial sum to 8 bits
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def loss_and_grads(vlm, batch: dict, device: torch.device) -> tuple[float, list[torch.Tensor]]:
    """Summed loss of one batch and the connector's gradients it produces (fp32 copies)."""
    params = [p for p in vlm.connectors.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = vlm(**to_device(batch, device), validate=False)
    out["loss_sum"].backward()
    return out["loss_sum"].item(), [p.grad.float().clone() for p in params]


def check(argv: list[str]) -> tuple[dict, object]:
    """(the report, the parsed flags)."""
    args, cfg, device = prepare(argv)
    models = model_paths(args, device)
    from transformers import AutoConfig
    vcfg = AutoConfig.from_pretrained(models.vision)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    feature_shape = (F.num_patches(vcfg), vcfg.hidden_size)
    cfg.model.llm, cfg.model.init_from = models.llm, None
    lengths = args.lengths or "stage1"
    if lengths == "video" and cfg.model.video is None:
        from vlm_dist.config.schema import VideoConfig
        cfg.model.video = VideoConfig()       # a video connector, with model.video's defaults
    vlm = build_model(cfg, models.tokenizer, feature_shape, False, llm_weights=models.llm_weights).to(device)
    models.llm_weights = None         # the model holds the tensors now
    vlm.eval()          # no dropout (LoRA's): both sides must see the same function; gradients still flow

    image_tokens = vlm.num_tokens["image"]
    tokenizer = models.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    block = block_ids(tokenizer, IMAGE, image_tokens)
    from vlm_dist.config.media import frame_sampling
    shapes = builtin_shapes(lengths, 6, random.Random(args.seed), video_sampling=frame_sampling(cfg.model))
    samples = make_samples(shapes, block, eos, min(block.start, block.pad, block.end, eos), args.seed,
                           MediaBlocks(tokenizer, image_tokens, vlm.num_tokens.get("video")))
    bank = FeatureBank(feature_shape, getattr(torch, cfg.model.dtype), num_views=views_of(shapes))
    # every view of a tiled image and of a video (tiled blocks and frames are what packing must keep apart)
    lookups = {kind: bank.views for kind in vlm.connectors}
    pads = {kind: vlm.pad_ids[kind] for kind in lookups}
    rows = [samples[:3], samples[3:]]
    width = max(sum(len(s.input_ids) for s in row) for row in rows)

    loss_packed, grads_packed = loss_and_grads(
        vlm, collate(rows, lookups, eos, width, feature_shape=feature_shape, pad_ids=pads), device)
    loss_alone, grads_alone = 0.0, [torch.zeros_like(g) for g in grads_packed]
    for s in samples:
        loss, grads = loss_and_grads(vlm, collate([[s]], lookups, eos, width, feature_shape=feature_shape,
                                                  pad_to_multiple=1, pad_ids=pads), device)
        loss_alone += loss
        grads_alone = [a + g for a, g in zip(grads_alone, grads)]
    diff = torch.cat([(p - a).flatten() for p, a in zip(grads_packed, grads_alone)])
    ref = torch.cat([a.flatten() for a in grads_alone])
    tolerance = TOLERANCE[cfg.model.dtype]
    result = dict(
        loss_packed=loss_packed, loss_alone=loss_alone,
        loss_rel_err=abs(loss_packed - loss_alone) / abs(loss_alone),
        grad_rel_err=(diff.norm() / ref.norm()).item(), tolerance=tolerance,
        setup=dict(attn_implementation=cfg.model.attn_implementation, llm_mode=cfg.model.llm_mode,
                   dtype=cfg.model.dtype, samples=len(samples), rows=len(rows), row_width=width,
                   image_tokens=image_tokens, lengths=lengths,
                   views=sum(v for s in samples for k in s.image_keys + s.video_keys
                             for v in [bank.num_views.get(k, 1)])),
        tiny=args.tiny, environment=environment(device))
    result["ok"] = result["loss_rel_err"] <= tolerance and result["grad_rel_err"] <= tolerance
    return result, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    result, args = check(argv)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"packed vs alone [{result['setup']['attn_implementation']}, {result['setup']['dtype']}]: "
          f"loss {result['loss_packed']:.6g} vs {result['loss_alone']:.6g} (rel {result['loss_rel_err']:.2e}), "
          f"connector gradients rel {result['grad_rel_err']:.2e}, tolerance {result['tolerance']:.0e}", flush=True)
    if not result["ok"]:
        print(f"error: packed rows differ from their samples alone beyond {result['tolerance']:.0e} "
              f"with --model.attn_implementation={result['setup']['attn_implementation']}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
