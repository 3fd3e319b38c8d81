"""The run configuration's schema: typed dataclasses with a docstring under each field,
and the constants other modules share (LLM modes, LoRA target modules).

Only the standard library is imported here, so that the model builder and the FLOP
counter can use these names without pulling in YAML or the loader. Loading, overrides
and saving are in vlm_dist.config.overrides; range and combination checks in
vlm_dist.config.checks.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from vlm_dist.errors import UserError

LLM_MODES = ("frozen", "lora", "qlora", "full")
ADAPTER_MODES = ("lora", "qlora")   # the modes that train LoRA adapters
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Qwen3's attention and MLP projections: the default LoRA target modules."""


class ConfigError(UserError, ValueError):
    """A config problem. The message names the key or flag, and what to do."""


# --------------------------------------------------------------------------- the tree

@dataclass
class TilingConfig:
    token_budget: Optional[int] = None
    """Most tokens one image's block may take (thumbnail, tiles, row separators): caps the grid; null: no cap."""
    grids: list[list[int]] = field(default_factory=lambda: [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]])
    """Candidate grids [rows, cols] in tiles (1x1 is always a candidate); default: LLaVA-NeXT's pinpoints."""
    tokens_per_tile: Optional[int] = None
    """Slots per view (thumbnail or tile); null: the image connector's tokens (model.num_latents, or the patch count with connector mlp), which it must equal."""
    tile_size: Optional[int] = None
    """Tile and thumbnail side in pixels; null: the vision tower's input side, which it must equal."""
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bicubic"
    """PIL filter resizing the image onto the tile grid and into the thumbnail."""
    fill: list[int] = field(default_factory=lambda: [0, 0, 0])
    """RGB levels of the padding around the resized image (LLaVA-NeXT pads black)."""


@dataclass
class VideoConfig:
    num_frames: int = 8
    """Frames sampled per video at most (uniformly, at the centres of equal segments)."""
    max_fps: Optional[float] = 2.0
    """Sampled frames per second of video at most (a 2 s clip gives at most 4 at 2.0); null: no cap."""
    tokens_per_frame: int = 16
    """<|video_pad|> slots per frame: the video connector's latents (the patch count with connector mlp)."""
    token_budget: Optional[int] = None
    """Most tokens one video's block may take, checked at load against num_frames x (tokens_per_frame + timestamp and separator tokens); null: no check."""


@dataclass
class ModelConfig:
    llm: str = "Qwen/Qwen3-8B-Base"
    """The language model: a local Hugging Face directory or a hub id already in the HF cache."""
    vision: str = "google/siglip-so400m-patch14-384"
    """The vision tower (SigLIP) whose features the cache holds: local directory or cached hub id."""
    feature_layer: int = -2
    """Vision hidden layer the cached features come from (-2: the penultimate, LLaVA's choice)."""
    connector: Literal["resampler", "mlp"] = "resampler"
    """resampler: LN -> Perceiver resampler -> MLP, num_latents tokens per image; mlp: LN -> MLP, one token per patch."""
    num_latents: Optional[int] = 64
    """Resampler latent queries = visual tokens per image (resampler only; null with connector: mlp)."""
    resampler_depth: int = 3
    """Perceiver resampler layers (cross-attention + MLP each)."""
    resampler_heads: int = 16
    """Attention heads in the resampler; must divide its width."""
    use_layernorm: bool = True
    """LayerNorm on the vision features before the resampler (trainable; on by default)."""
    llm_mode: Literal[LLM_MODES] = "frozen"
    """How the LLM trains: frozen, lora (PEFT adapters), qlora (4-bit NF4 base + adapters) or full."""
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = "sdpa"
    """Attention backend; packed samples reach it as explicit boundaries (vlm_dist/model/attention.py). varlen: torch's varlen flash kernel (CUDA; fastest); auto: varlen on CUDA, sdpa elsewhere; sdpa/eager: dense mask (CPU)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and compute dtype; also sets DeepSpeed's bf16/fp16 section."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward (less memory, ~30% more compute)."""
    checkpoint_fraction: float = 1.0
    """With gradient_checkpointing: the fraction of decoder layers that recompute, spread evenly (0.5: every other)."""
    kernels: Literal["auto", "liger", "none"] = "auto"
    """Fused Qwen3 kernels (RMSNorm, RoPE, SwiGLU): liger (liger-kernel, CUDA; pip install .[gpu]); auto: liger when CUDA and liger-kernel are there, else none."""
    init_from: Optional[str] = None
    """A previous stage's export directory (connector.safetensors, adapter/) to start from; null: fresh connector."""
    tiling: Optional[TilingConfig] = None
    """AnyRes tiles: each image is a thumbnail plus a grid of tower-sized tiles (needs a cache built with --tiling); null: one view per image."""
    video: Optional[VideoConfig] = None
    """Videos (<video> in records): frame sampling (as the cache was built with --frames/--max-fps) and a video connector; null: no videos."""


@dataclass
class LoraConfig:
    r: Optional[int] = 128
    """LoRA rank (128: LLaVA-1.5's LoRA recipe, scripts/v1_5/finetune_lora.sh)."""
    alpha: Optional[int] = 256
    """LoRA alpha; the update is scaled by alpha / r (256 in LLaVA-1.5's LoRA recipe)."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0: a nonzero rate keeps a dropped copy of each adapted input for backward; LLaVA-1.5: 0.05)."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """LLM linear layers that get adapters (default: every attention and MLP projection)."""


@dataclass
class RecordSource:
    path: str
    """A JSONL file of records (vlm_dist.contract.records)."""
    weight: Optional[float] = None
    """Relative sampling weight in a mixture (use weights or counts, not both)."""
    count: Optional[int] = None
    """Samples drawn from this file per epoch (fewer: subsample, more: repeat)."""


@dataclass
class DataConfig:
    records: list[RecordSource] = field(default_factory=list)
    """Training records: a path, a list of paths, or a mixture list [{path, weight} | {path, count}]."""
    cache: Optional[str] = None
    """Feature cache directory built by `vlm-cache build`."""
    template: Literal["plain", "chatml"] = "plain"
    """Prompt template: plain (stage 1 captions) or chatml (SFT turns with <|im_start|>/<|im_end|>)."""
    max_seq_len: int = 2048
    """Longest sample and, with packing, the length of one packed row (tokens)."""
    truncate: bool = False
    """Over-long samples: false stops the run, listing them; true cuts their text (never inside an image block)."""
    pack: bool = True
    """Pack several samples into each row (position ids restart, no attention across samples)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    eval_records: list[RecordSource] = field(default_factory=list)
    """Held-out records for the periodic eval loss; empty: hold out data.eval_fraction of data.records."""
    eval_fraction: float = 0.0
    """Fraction of data.records held out for eval when data.eval_records is empty (e.g. 0.01-0.02)."""
    seed: int = 0
    """Seed of the sampler's shuffles and of the eval split."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/vlm"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, export/."""
    max_steps: Optional[int] = None
    """Optimizer steps to run (exclusive with train.epochs)."""
    epochs: Optional[int] = None
    """Passes over the records (exclusive with train.max_steps)."""
    micro_batch_size: int = 1
    """Rows per micro-batch per GPU (a row is one sample, or one packed row of up to max_seq_len tokens)."""
    micro_batch_tokens: Optional[int] = None
    """With packing: token budget of one micro-batch per GPU (null: micro_batch_size x data.max_seq_len)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = micro_batch_size x grad_accum x world size)."""
    lr_connector: float = 1e-4
    """Peak learning rate of the connector (LN, resampler, projector)."""
    lr_adapters: float = 2e-4
    """Peak learning rate of the LoRA adapters (lora and qlora modes)."""
    lr_llm: float = 2e-5
    """Peak learning rate of the LLM weights (full mode)."""
    weight_decay: float = 0.01
    """AdamW weight decay of matrices; norms, biases and other 1-D parameters get none."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    seed: int = 42
    """Seed of the weight init and dropout."""
    log_every: int = 10
    """Steps between log lines and metrics.jsonl rows."""
    eval_every: int = 500
    """Steps between held-out eval losses (0: only at the end)."""
    nan_patience: int = 5
    """Non-finite losses in a row before the run saves and exits non-zero (each such step is skipped)."""
    preempt_check_every: int = 10
    """Steps between the ranks' preemption and health check (a CPU barrier + all-reduce): a signal is acted on, and a hung rank named, within this many steps (plus the collective timeout)."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Steps between DeepSpeed checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept under <output_dir>/checkpoints/; older ones are deleted."""
    resume: Optional[str] = None
    """null: fresh run; auto: the newest complete checkpoint if any; a path: that checkpoint (must exist)."""
    export: bool = True
    """Export the trainable weights (connector.safetensors, adapter/) with each checkpoint and at the end."""
    allow_changed: list[str] = field(default_factory=list)
    """Keys a resume may change although they change the run's mathematics, e.g. train.lr_connector,data.records."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The LLM, the vision tower, the connector and how each trains."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapter settings (used by llm_mode lora and qlora)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Records, the feature cache, templates and packing."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batch, optimizer and schedule, logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints, resume and export."""


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# --------------------------------------------------------------------------- names, types and docs

def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (litgpt style), read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def type_name(tp) -> str:
    """A field's type as `config_help` and errors show it: `int | null`, `plain|chatml`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(type_name(a) for a in inner) + " | null"
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if tp is RecordSource:
        return "path | {path, weight} | {path, count}"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp))


SUB_CONFIGS = (TilingConfig, VideoConfig)


def sub_config(section: str, key: str) -> type | None:
    """The dataclass of a nested field (model.tiling -> TilingConfig), or None for a plain field."""
    tp = typing.get_type_hints(SECTIONS[section]).get(key)
    inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return inner[0] if len(inner) == 1 and inner[0] in SUB_CONFIGS else None


def valid_keys() -> list[str]:
    """Every key as `section.key`."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def suggest(section: str, key: str) -> str:
    """' (did you mean ...?)' for a mistyped key: close matches in the section, the same key elsewhere."""
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    close = [n for n in names if n.startswith(key + "_") or key.startswith(n + "_")]
    close += [n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if n not in close]
    hits = [f"{section}.{n}" for n in close]
    hits += [k for k in valid_keys() if k.split(".")[1] == key and k not in hits]
    return f" (did you mean {', '.join(hits)}?)" if hits else ""

