"""Tiny stand-ins for Qwen3, SigLIP and the Qwen3 tokenizer, built locally.

Tests and the demo use them so nothing is downloaded. Each is written with
`save_pretrained` and read back through the same `from_pretrained` path as the
real checkpoints, so the code under test cannot tell the difference.

    from vlm_dist.testing.tiny import build_tiny_models
    paths = build_tiny_models("/tmp/tiny")   # {"llm": ..., "vision": ..., "tokenizer": ...}
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from vlm_dist.contract.prompt import IGNORE

# Qwen3's added tokens, in Qwen3's order. The real ids start at 151643; ours
# follow the tiny vocabulary. Code must look tokens up by string, never by id.
QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN3_NORMAL_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

_CORPUS = """\
A photo of a red circle on the left. A blue square at the top right of the image.
A green triangle in the center. A yellow star near the bottom. Describe the image in one sentence.
Describe each image in order. Image 1: a small purple circle. Image 2: an orange square.
Which image shows the red square? The first image. The second image. The third image.
Question answer user assistant system the a an of in on at to is are and with what where
color shape position left right top bottom center middle large small big tiny picture
The quick brown fox jumps over the lazy dog. Hello world. Yes. No. True. False.
0 1 2 3 4 5 6 7 8 9 one two three four five six seven eight nine ten
"""


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512):
    """A byte-level BPE tokenizer carrying Qwen3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN3_SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    hf.add_tokens(QWEN3_NORMAL_ADDED)
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_qwen3(out_dir: str | os.PathLike, vocab_size: int, hidden_size: int = 64,
                     num_layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM with Qwen3-8B's shape ratios."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden_size // 4, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_theta=1_000_000.0,
    )
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def build_tiny_siglip(out_dir: str | os.PathLike, image_size: int = 32, patch_size: int = 8,
                      hidden_size: int = 32, num_layers: int = 3, seed: int = 0):
    """A full SiglipModel (vision + text, as the hub checkpoints are) with its image processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        vision_config=dict(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
            intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
            num_attention_heads=2,
        ),
        text_config=dict(
            vocab_size=64, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
            pad_token_id=1, bos_token_id=2, eos_token_id=3,
        ),
    )
    model = SiglipModel(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(str(out_dir))
    return model


def build_tiny_models(root: str | os.PathLike, llm_hidden: int = 64, llm_layers: int = 2,
                      seed: int = 0) -> dict[str, str]:
    """Build tokenizer + tiny Qwen3 (in one directory, like a hub repo) and tiny SigLIP.

    Idempotent: an existing complete build is reused.
    """
    root = Path(root)
    llm_dir, vision_dir = root / "qwen3-tiny", root / "siglip-tiny"
    done = root / "BUILT.json"
    if not done.exists():
        tok = build_tiny_tokenizer(llm_dir)
        build_tiny_qwen3(llm_dir, vocab_size=len(tok), hidden_size=llm_hidden,
                         num_layers=llm_layers, seed=seed)
        build_tiny_siglip(vision_dir, seed=seed)
        done.write_text(json.dumps({"llm": str(llm_dir), "vision": str(vision_dir)}))
    return {"llm": str(llm_dir), "vision": str(vision_dir), "tokenizer": str(llm_dir)}


def pretrain_tiny_llm(llm_dir: str | os.PathLike, examples: list[tuple[list[int], list[int]]],
                      steps: int = 300, lr: float = 3e-3, batch_size: int = 32,
                      seed: int = 0) -> list[float]:
    """Causal-LM training of a tiny random Qwen3 on (input_ids, labels) pairs, in place.

    `labels` holds the token where the loss applies and IGNORE (-100) elsewhere (the
    PromptEncoder's convention). A real base LLM already speaks English; a random
    tiny one does not. The demo uses this to give its tiny Qwen3 the language of its
    own templates, so the VLM stages only have to learn grounding. Returns the losses.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for n, (ids, labels) in enumerate(examples):
        if len(ids) != len(labels):
            raise ValueError(f"example {n}: {len(ids)} input ids but {len(labels)} labels")
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    model.train()
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), IGNORE)
        for row, i in enumerate(idx):
            ids[row, :len(examples[i][0])] = torch.tensor(examples[i][0])
            labels[row, :len(examples[i][1])] = torch.tensor(examples[i][1])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(str(llm_dir), safe_serialization=True)
    return losses


def pretrain_tiny_siglip(vision_dir: str | os.PathLike, image_paths: list, captions: list[str],
                         steps: int = 200, lr: float = 2e-3, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Train the tiny SiglipModel on image-caption pairs with SigLIP's own sigmoid loss (in place).

    A real SigLIP has seen billions of pairs; a random tiny one has seen none, so its
    features barely separate colours or shapes. The demo gives it its own images first,
    as the real tower arrives pretrained. Captions use a word vocabulary (the tiny text
    tower has 64 ids and 16 positions). A batch holds each distinct caption at most once,
    so it has min(batch_size, distinct captions) pairs. Returns the losses.
    """
    from transformers import SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel.from_pretrained(str(vision_dir), dtype=torch.float32)
    text = _caption_ids(captions, model.config.text_config)
    pixels = _pixels(vision_dir, image_paths)
    # A batch holds each caption at most once: a repeated caption would be scored as a
    # negative of its own twin (web-scale data has no such twins; this synthetic set does).
    by_caption: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_caption.setdefault(c, []).append(i)
    groups = list(by_caption.values())
    # SigLIP's temperature and bias fixed at the paper's initial 10 and -10 (Zhai et al. 2023):
    # left free at this learning rate, the tiny towers collapse to one constant embedding.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.logit_scale.requires_grad_(False)
    model.logit_bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        picked = torch.randperm(len(groups), generator=g)[:batch_size].tolist()
        idx = torch.tensor([groups[k][int(torch.randint(len(groups[k]), (1,), generator=g))]
                            for k in picked])
        loss = model(input_ids=text[idx], pixel_values=pixels[idx], return_loss=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(str(vision_dir), safe_serialization=True)
    return losses


@torch.no_grad()
def siglip_zero_shot(vision_dir: str | os.PathLike, image_paths: list, captions: list[str],
                     words: list[str] | None = None) -> float:
    """Fraction of images whose own caption scores highest among all distinct captions.

    `words`: the captions pretrain_tiny_siglip was given (its word vocabulary); default
    `captions`. Pass held-out images and captions with the training captions as `words`.
    """
    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(str(vision_dir), dtype=torch.float32).eval()
    distinct = sorted(set(captions))
    text = _caption_ids(distinct, model.config.text_config, words or captions)
    logits = model(input_ids=text, pixel_values=_pixels(vision_dir, image_paths)).logits_per_image
    want = torch.tensor([distinct.index(c) for c in captions])
    return (logits.argmax(1) == want).float().mean().item()


def _caption_ids(captions: list[str], text_config, vocabulary_from: list[str] | None = None) -> torch.Tensor:
    """(len(captions), positions) ids in the sorted word vocabulary of `vocabulary_from`
    (default `captions`); 0 pads on the left (SigLIP's text tower pools the last position)."""
    words = sorted({w for c in (vocabulary_from or captions) for w in c.lower().split()})
    if len(words) + 1 > text_config.vocab_size:
        raise ValueError(f"{len(words)} caption words do not fit the tiny text tower's "
                         f"{text_config.vocab_size} ids")
    vocab = {w: i + 1 for i, w in enumerate(words)}
    width = text_config.max_position_embeddings
    text = torch.zeros(len(captions), width, dtype=torch.long)
    for row, c in enumerate(captions):
        unknown = [w for w in c.lower().split() if w not in vocab]
        if unknown:
            raise ValueError(f"caption {c!r}: words {unknown} are not in the tiny text tower's vocabulary")
        ids = [vocab[w] for w in c.lower().split()][-width:]
        text[row, width - len(ids):] = torch.tensor(ids)
    return text


def _pixels(vision_dir: str | os.PathLike, image_paths: list) -> torch.Tensor:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(vision_dir))
    return processor([Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt")["pixel_values"]


def build_tiny_export(out_dir: str | os.PathLike, models: dict[str, str], llm_mode: str = "lora",
                      connector: str = "resampler", use_layernorm: bool = True, template: str = "chatml",
                      num_latents: int = 4, seed: int = 0) -> str:
    """A trained-looking export of the tiny models (non-zero LoRA and connector weights), written by the
    trainer's own write_export: what vlm-generate, vlm-export, vlm-serve and the lmms-eval model load.

    connector "resampler" gives `num_latents` tokens per image; "mlp" one per patch (16 for the
    tiny SigLIP). Features are fp32, unpooled, from layer -2, as `vlm-cache build --dtype fp32` makes them.
    """
    from transformers import AutoTokenizer

    from vlm_dist.config.schema import LoraConfig
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable
    from vlm_dist.model.vision import VisionTower
    from vlm_dist.training.checkpoint import write_export

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(models["tokenizer"])
    tower = VisionTower.from_pretrained(models["vision"], feature_layer=-2, dtype=torch.float32)
    num_patches, vision_dim = tower.feature_shape(1)
    llm = load_llm(models["llm"], llm_mode if llm_mode != "qlora" else "lora", dtype=torch.float32,
                   lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    spec = dict(kind=connector, use_layernorm=use_layernorm)
    if connector == "resampler":
        spec.update(num_latents=num_latents, depth=1, heads=4)
    vlm = build_vlm(llm, tokenizer, vision_dim=vision_dim, num_patches=num_patches, connector=spec,
                    dtype=torch.float32)
    set_trainable(vlm, llm_mode)
    with torch.no_grad():   # LoRA B starts at zero, a LayerNorm at identity: give them a real effect
        for name, p in vlm.named_parameters():
            if "lora_B" in name or ("connectors" in name and "norm" in name):
                p.add_(torch.randn_like(p) * 0.3)
    vlm.eval()
    num_tokens = vlm.num_tokens["image"]
    config = {"llm": models["llm"], "vision": models["vision"], "feature_layer": -2, "pool": 1,
              "template": template, "num_media_tokens": num_tokens, "vision_dtype": "float32"}
    write_export(vlm, out_dir, config, llm_mode, is_main=True, tokenizer=tokenizer)
    return str(out_dir)
