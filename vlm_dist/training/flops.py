"""FLOPs of one training step, counted from the real per-sample lengths, and MFU.

    from vlm_dist.training.flops import SampleShape, step_flops, mfu
    f = step_flops(llm_config, vision_config, connector_config,
                   [SampleShape(length=110, supervised=32, image_views=1)] * 4096, llm_mode="frozen")
    print(f.total / f.tokens / 1e9, "GFLOP/token;", mfu(f.total, step_seconds, 989e12))

`python -m vlm_dist.training.flops` prints the breakdown for Qwen3-8B-Base + SigLIP-so400m at a
stage-1-like sample (launch/model_configs/), per mode.

The rules (the 6N-per-token accounting of Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", and PaLM's MFU, Chowdhery et al. 2022, appendix B). A matmul of an (n x k) activation by a
(k x m) weight costs 2nkm in the forward pass; backward costs 2nkm for the input
gradient and 2nkm for the weight gradient. Counted per linear layer and per token:

- LLM decoder linears (q, k, v, o, gate, up, down; N ~ 6.95B for Qwen3-8B):
  frozen 4N (forward + input gradient: the gradient must still flow back through
  every layer to reach the connector's image tokens), full 6N.
- LoRA / QLoRA: the base stays 4N, each adapter adds 6 x r x (in + out). QLoRA's
  dequantisation is not a matmul and is not counted (same FLOPs as LoRA).
- lm_head (H x V ~ 0.62B): only at supervised positions, because logits are only
  computed there (vlm.py). 4 x H x V when frozen (forward + input gradient; its
  weight gradient exists only when it trains), 6 x H x V in full mode.
  The GPU executes 2 x H x V more (6 x H x V when frozen), since vlm.py
  checkpoints each cross-entropy chunk and so runs the lm_head forward twice.
  The recomputation is counted in `recompute` (hardware FLOPs), not in the model
  FLOPs that MFU is defined on (PaLM's convention: recomputation is not useful work).
- Attention (scores and weighted values) per sample of L tokens and per layer,
  causal, each query attends to itself and the earlier tokens of ITS OWN sample
  (a packed row's samples do not attend to each other): forward
  2 x 2 x heads x head_dim x L(L+1)/2, backward twice that (Q, K and V are
  activations that need gradients in every mode). GQA shares K/V but not the work.
- Connector (trainable): 6 x the weights of each matmul per row it processes:
  per view the resampler's kv projection sees P patches + N latents, q/out/MLP see
  N latents, the projector sees N tokens (P with the MLP connector); plus the
  resampler's cross-attention N x (P + N) (non-causal), x3 for backward.
  The first matmul on the features skips its input gradient (4x) when no trainable
  LayerNorm precedes it. A frozen connector costs its forward only.
- Views (issue 18): the connector runs once per VIEW, one (P, D) feature row of the
  cache, not once per image. An untiled image is 1 view; an AnyRes-tiled image is
  1 + tiles views (the thumbnail, then rows x cols tiles: contract.tiling, `Tiling.num_views`),
  so a 2x2 grid costs the image connector 5x an untiled image; a video is one view per
  sampled frame (contract.video, `VideoLayout.num_views`) through the VIDEO connector
  (its own latents, Tf per frame: `video_connector_config`), so `SampleShape` counts
  `image_views` and `video_frames` separately. The views' extra pad slots, the tiled block's
  "\\n" separators and a video's timestamp text are ordinary tokens of `length`: the LLM
  side needs no special case. Untiled data (image_views = images, no frames) gives exactly
  the numbers it gave before views existed.
- Not counted: the vision tower (features are cached), embeddings (a lookup),
  norms, activations, softmax, RoPE, the optimizer; padding tokens (they are waste,
  so padding shows up as lower MFU, and packing efficiency says how much).
- Activation (gradient) checkpointing reruns each decoder layer's forward: counted
  in `recompute` (hardware FLOPs, for HFU), not in the model FLOPs.

The feature-cache builder's work is SigLIP's forward only, once per view:
`vision_flops_per_image` is one view (an untiled image, a thumbnail, a tile or a frame all
are tower-sized), and `cache_build_flops(vision_config, views)` multiplies it by the views
a cache holds (`vlm-cache info` shows views per image and frames per video).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from vlm_dist.config.schema import ADAPTER_MODES, ALL_PROJECTIONS, LLM_MODES

COMPONENTS = ("body", "lora", "lm_head", "attention", "connector", "connector_attention", "recompute")
MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "model_configs"

# Dense bf16 tensor-core peaks from the vendor data sheets (no sparsity), FLOP/s.
# Matched against torch.cuda.get_device_name() by the first key it contains.
GPU_PEAK_BF16 = {
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,      # SXM5 (HBM3)
    "H200": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def spec_peak(device_name: str) -> float | None:
    """The data-sheet bf16 dense peak for a GPU name, or None if the GPU is not in the table."""
    for key, peak in GPU_PEAK_BF16.items():
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s (both per GPU)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu needs positive seconds and peak, got seconds={seconds}, peak={peak_flops}")
    return flops / seconds / peak_flops


@dataclass(frozen=True)
class SampleShape:
    """One sample as the step sees it."""
    length: int            # tokens, text + media blocks (pad slots, separators, timestamps)
    supervised: int        # positions with a target (where logits are computed)
    image_views: int = 0   # image connector runs: 1 per untiled image, 1 + tiles per tiled image
    video_frames: int = 0  # video connector runs: one per sampled frame


@dataclass
class StepFlops:
    """Model FLOPs of one step by component; `recompute` are extra hardware FLOPs."""
    body: float = 0.0         # LLM decoder linear layers
    lora: float = 0.0         # LoRA adapters
    lm_head: float = 0.0      # at supervised positions only
    attention: float = 0.0    # LLM attention scores and weighted values
    connector: float = 0.0    # resampler + projector matmuls
    connector_attention: float = 0.0   # the resampler's cross-attention
    recompute: float = 0.0    # activation checkpointing + cross-entropy chunk recomputation
    tokens: int = 0
    supervised: int = 0
    samples: int = 0
    image_views: int = 0      # image connector runs (thumbnails + tiles)
    video_frames: int = 0     # video connector runs (sampled frames)

    @property
    def total(self) -> float:
        """Model FLOPs (what MFU is computed from)."""
        return (self.body + self.lora + self.lm_head + self.attention + self.connector
                + self.connector_attention)

    @property
    def hardware(self) -> float:
        """Model FLOPs plus recomputation (what HFU is computed from)."""
        return self.total + self.recompute

    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total, hardware=self.hardware, per_token=self.per_token())


# -- parameter counts -----------------------------------------------------------------------------

def llm_linears(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear in one Qwen3 decoder layer, by module name."""
    h, hd = config.hidden_size, config.head_dim
    q, kv, i = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def body_params(config) -> int:
    """N: weights of the decoder linear layers (embeddings, norms and lm_head excluded)."""
    return config.num_hidden_layers * sum(a * b for a, b in llm_linears(config).values())


def lm_head_params(config) -> int:
    return config.hidden_size * config.vocab_size


def lora_params(config, r: int, target_modules: Sequence[str] = ALL_PROJECTIONS) -> int:
    """Adapter weights: r x (in + out) per targeted linear per layer."""
    shapes = llm_linears(config)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not Qwen3 decoder linears {sorted(shapes)}")
    return config.num_hidden_layers * sum(r * sum(shapes[m]) for m in target_modules)


def num_patches(vision_config, pool: int = 1) -> int:
    """Patches per image of a fixed-size SigLIP config, after `pool` x `pool` average pooling."""
    side = vision_config.image_size // vision_config.patch_size
    side = -(-side // pool)
    return side * side


# -- the connector ---------------------------------------------------------------------------------

def connector_flops_per_image(connector_config: dict, patches: int, trainable: bool = True) -> dict[str, float]:
    """FLOPs one image costs the connector (forward, and backward when it trains):
    {"linear": its matmuls with weights, "attention": the resampler's cross-attention}.

    `connector_config` is Connector.config (vision_dim, llm_dim, kind, num_latents,
    depth, heads, resampler_dim, use_layernorm); mirrors vlm_dist/model/connector.py.
    """
    c = connector_config
    dv, h = c["vision_dim"], c["llm_dim"]
    mult = 6 if trainable else 2
    # the first matmul on the features needs an input gradient only behind a trainable LayerNorm
    # (without proj_in, the resampler's kv sees norm_media's output: always trainable)
    first_factor = (6 if c["use_layernorm"] else 4) if trainable else 2
    linear = attention = 0.0
    if c["kind"] == "resampler":
        w, n = c["resampler_dim"] or dv, c["num_latents"]
        if w != dv:                                     # proj_in: (P, dv) x (dv, w), on the features
            linear += first_factor * patches * dv * w
        for _ in range(c["depth"]):
            linear += mult * n * w * w                  # q
            linear += mult * (patches + n) * w * 2 * w  # kv over [patches; latents]
            linear += mult * n * w * w                  # out
            linear += mult * n * 2 * (w * 4 * w)        # ff: w -> 4w -> w
            attention += (3 if trainable else 1) * 2 * 2 * n * (patches + n) * w   # scores + values
        tokens = n
        linear += mult * tokens * w * h                 # projector fc1 (input: the resampler's output)
    elif c["kind"] == "mlp":
        tokens = patches
        linear += first_factor * tokens * dv * h        # projector fc1 directly on the (normed) features
    else:
        raise ValueError(f"connector kind must be 'resampler' or 'mlp', got {c['kind']!r}")
    linear += mult * tokens * h * h                     # projector fc2
    return {"linear": linear, "attention": attention}


# -- the vision tower (the feature-cache builder, forward only) --------------------------------------

def cache_build_flops(vision_config, views: int, feature_layer: int = -2) -> float:
    """Forward FLOPs of building the cache rows of `views` views (untiled images count 1 each,
    tiled ones 1 + tiles, videos their sampled frames): each view is one tower-sized image."""
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    return views * vision_flops_per_image(vision_config, feature_layer)


def vision_flops_per_image(vision_config, feature_layer: int = -2) -> float:
    """Forward FLOPs of one image (one view) through SigLIP up to `feature_layer` (layers above it are dropped).

    Patch embedding (a conv = a matmul over 3 x p x p pixels per patch), then per layer
    q, k, v, o (4 D^2) and the MLP (2 D I) per patch, and full (non-causal) attention
    2 x 2 x P^2 x D. The pooling head is dropped by VisionTower and not counted.
    """
    c = vision_config
    p, d, i = num_patches(c), c.hidden_size, c.intermediate_size
    layers = feature_layer if feature_layer >= 0 else c.num_hidden_layers + 1 + feature_layer
    patch_embed = 2 * p * (c.num_channels * c.patch_size ** 2) * d
    per_layer = 2 * p * (4 * d * d + 2 * d * i) + 4 * p * p * d
    return patch_embed + layers * per_layer


# -- one step --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraShape:
    r: int = 128
    target_modules: tuple[str, ...] = field(default=ALL_PROJECTIONS)


def step_flops(llm_config, vision_config, connector_config: dict, samples: Iterable[SampleShape],
               llm_mode: str = "frozen", lora: LoraShape | None = None,
               gradient_checkpointing: bool = False, train_connector: bool = True,
               patches: int | None = None, video_connector_config: dict | None = None) -> StepFlops:
    """FLOPs of one optimizer step (one rank) over `samples`, by the rules in the module docstring.

    `connector_config` is the image connector's (it runs once per image view);
    `video_connector_config` the video connector's (once per frame), needed when a sample
    has frames. `patches` overrides the per-view patch count derived from `vision_config`
    (e.g. a cache built with pooling).
    """
    if llm_mode not in LLM_MODES:
        raise ValueError(f"llm_mode must be one of {LLM_MODES}, got {llm_mode!r}")
    n_body, n_head = body_params(llm_config), lm_head_params(llm_config)
    n_lora = lora_params(llm_config, (lora or LoraShape()).r, (lora or LoraShape()).target_modules) \
        if llm_mode in ADAPTER_MODES else 0
    body_factor = 6 if llm_mode == "full" else 4
    head_factor = 6 if llm_mode == "full" else 4
    attn_width = llm_config.num_attention_heads * llm_config.head_dim
    layers = llm_config.num_hidden_layers
    patches = num_patches(vision_config) if patches is None else patches
    per_view = connector_flops_per_image(connector_config, patches, train_connector)

    f = StepFlops()
    attn_pairs = 0      # sum over samples of L(L+1)/2 (causal query-key pairs)
    for s in samples:
        if s.length <= 0 or not 0 <= s.supervised <= s.length or s.image_views < 0 or s.video_frames < 0:
            raise ValueError(f"bad sample shape {s}: need length > 0, 0 <= supervised <= length, "
                             "image_views >= 0, video_frames >= 0")
        f.tokens += s.length
        f.supervised += s.supervised
        f.image_views += s.image_views
        f.video_frames += s.video_frames
        f.samples += 1
        attn_pairs += s.length * (s.length + 1) // 2
    per_frame = {"linear": 0.0, "attention": 0.0}
    if f.video_frames:
        if video_connector_config is None:
            raise ValueError(f"{f.video_frames} video frame(s) in the samples but no video_connector_config "
                             "(the video connector's Connector.config)")
        per_frame = connector_flops_per_image(video_connector_config, patches, train_connector)
    attn_forward = layers * 2 * 2 * attn_width * attn_pairs     # QK^T and PV, 2 FLOPs per MAC
    f.body = body_factor * n_body * f.tokens
    f.lora = 6 * n_lora * f.tokens
    f.lm_head = head_factor * n_head * f.supervised
    f.attention = 3 * attn_forward
    f.connector = per_view["linear"] * f.image_views + per_frame["linear"] * f.video_frames
    f.connector_attention = per_view["attention"] * f.image_views + per_frame["attention"] * f.video_frames
    f.recompute = 2 * n_head * f.supervised                       # vlm.py checkpoints each CE chunk
    if gradient_checkpointing:                                    # each decoder layer's forward again
        f.recompute += 2 * (n_body + n_lora) * f.tokens + attn_forward
    return f


# -- the command line: the breakdown for Qwen3-8B-Base + SigLIP-so400m ------------------------------

def load_configs(llm_json: str | Path = MODEL_CONFIGS / "qwen3-8b-base.json",
                 vision_json: str | Path = MODEL_CONFIGS / "siglip-so400m-patch14-384.json"):
    """(Qwen3Config, SiglipVisionConfig) from config.json files (the shipped ones by default)."""
    from transformers import AutoConfig
    llm = AutoConfig.from_pretrained(str(llm_json))
    vision = AutoConfig.from_pretrained(str(vision_json))
    return llm, getattr(vision, "vision_config", vision)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=110, help="tokens per sample")
    ap.add_argument("--supervised", type=int, default=32, help="supervised positions per sample")
    ap.add_argument("--images", type=int, default=1, help="images per sample")
    ap.add_argument("--tiles", type=int, default=0,
                    help="AnyRes tiles per image (0: untiled; a 2x2 grid: 4, so 5 views per image)")
    ap.add_argument("--frames", type=int, default=0, help="sampled video frames per sample")
    ap.add_argument("--frame-tokens", type=int, default=16, help="video connector tokens per frame")
    ap.add_argument("--num-latents", type=int, default=64)
    ap.add_argument("--resampler-depth", type=int, default=3)
    ap.add_argument("--resampler-heads", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=128)
    args = ap.parse_args(argv)
    llm, vision = load_configs()
    conn = dict(vision_dim=vision.hidden_size, llm_dim=llm.hidden_size, kind="resampler",
                num_latents=args.num_latents, depth=args.resampler_depth, heads=args.resampler_heads,
                resampler_dim=None, use_layernorm=True)
    # the video connector is the image connector with frame-token latents (model/build.py)
    video_conn = dict(conn, num_latents=args.frame_tokens)
    sample = SampleShape(args.length, args.supervised, args.images * (1 + args.tiles), args.frames)
    print(f"N (decoder linears) = {body_params(llm) / 1e9:.3f}B, lm_head = {lm_head_params(llm) / 1e9:.3f}B, "
          f"LoRA r={args.lora_r}: {lora_params(llm, args.lora_r) / 1e6:.1f}M")
    print(f"sample: {sample}; cache build: "
          f"{cache_build_flops(vision, sample.image_views + sample.video_frames) / 1e12:.3f} TFLOP")
    for mode in LLM_MODES:
        f = step_flops(llm, vision, conn, [sample], mode, LoraShape(args.lora_r),
                       video_connector_config=video_conn)
        parts = {k: round(v / f.tokens / 1e9, 3) for k, v in f.as_dict().items()
                 if k in COMPONENTS}
        print(f"{mode:>6}: {f.per_token() / 1e9:6.2f} GFLOP/token  {json.dumps(parts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
