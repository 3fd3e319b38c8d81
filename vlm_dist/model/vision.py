"""The frozen vision tower: SigLIP / SigLIP2 patch features of one hidden layer.

    tower = VisionTower.from_pretrained("google/siglip-so400m-patch14-384")   # or a local dir
    feats = tower(tower.preprocess([img1, img2]))                              # (B, P, D)

Loads only the vision half of a full SiglipModel / Siglip2Model checkpoint
(a vision-only checkpoint loads too), frozen and in eval mode. The output is
`hidden_states[feature_layer]` (default -2, the penultimate layer, as LLaVA
does); the pooling head and the layers above the chosen one are dropped, so
they cost nothing. Preprocessing is the checkpoint's own image processor; the
cache builder splits it in two (`pixels_uint8`: resize on the CPU, 8-bit;
`forward`: rescale + normalise on the device, by a table the processor itself
computed), which moves 4x fewer bytes and gives bit for bit the same pixels.

The feature cache (`vlm-cache build`) encodes with this class, and generation
encodes online with it: the same preprocessing, dtype and pooling give the
same features, and `fingerprint()` is what a cache is checked against.

Tiles and video frames are more views of the same path: `image_views` turns an image into
its views (the image itself, or an AnyRes thumbnail + tiles, contract.tiling),
`decode_video` samples a video's frames (contract.video), and `encode_views` encodes a
list of views exactly as the cache does, so online tiles and frames equal cached ones.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlm_dist.contract.tiling import Tiling, TilingError, TilingSpec, tile_image
from vlm_dist.contract.video import DEFAULT_MAX_VIDEO_BYTES, FrameSampling

DEFAULT_VISION_MODEL = "google/siglip-so400m-patch14-384"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, raw bytes), by name.

    VisionTower hashes the float32 weights, so the hash names the checkpoint
    whatever dtype the features are computed in.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{dtype_name(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pool_patches(features: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool a square patch grid `pool` x `pool`: (B, S*S, D) -> (B, ceil(S/pool)^2, D).

    An odd grid keeps its last row and column (27x27 -> 14x14), averaged over
    the patches that exist.
    """
    if pool == 1:
        return features
    b, p, d = features.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"pooling needs a square patch grid, got {p} patches")
    grid = features.float().transpose(1, 2).reshape(b, d, side, side)           # (B, D, S, S)
    pooled = F.avg_pool2d(grid, pool, stride=pool, ceil_mode=True)              # (B, D, S', S')
    return pooled.flatten(2).transpose(1, 2).to(features.dtype)                 # (B, S'^2, D)


def pooled_side(side: int, pool: int) -> int:
    return -(-side // pool)


def resize_uint8(processor, images: Sequence) -> torch.Tensor:
    """RGB PIL images -> (B, 3, H, W) uint8: the processor's resize, not rescaled or normalised."""
    pixels = processor(images=list(images), do_rescale=False, do_normalize=False,
                       return_tensors="pt")["pixel_values"]
    if pixels.dtype != torch.uint8:
        raise ValueError(f"{type(processor).__name__} resized to {pixels.dtype}, not 8-bit pixels; "
                         "its resize cannot be split from its normalisation")
    return pixels


def normalisation_table(processor) -> torch.Tensor:
    """(3, 256) float32: the processor's rescaled and normalised value of each 8-bit level, per
    channel. The processor computes it (on a 256-pixel grey strip, not resized), so a lookup
    gives bit for bit its own float pixels: both steps are per-value and per-channel."""
    strip = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)   # (1, 256, 3)
    out = processor(images=[Image.fromarray(strip, "RGB")], do_resize=False,
                    return_tensors="pt")["pixel_values"]                            # (1, 3, 1, 256)
    return out[0, :, 0, :].to(torch.float32).contiguous()


def image_views(img: Image.Image, spec: TilingSpec | None) -> tuple[Tiling | None, list[Image.Image]]:
    """An RGB image -> (its Tiling, its views): (None, [img]) untiled; tiled, the thumbnail
    first, then the tiles row-major (contract.tiling.tile_image; a 1x1 grid is one view).

    The thumbnail view is the image itself: the tower's own preprocessing resizes it to the
    tile side, exactly as it does an untiled image, so view 0 is the untiled view bit for bit
    whatever the processor's filter and `spec.resample` (tile_image's thumbnail uses the
    latter). The tiles are already tile-sized, which that preprocessing leaves unchanged."""
    if spec is None:
        return None, [img]
    tiling, _, tiles = tile_image(img, spec)
    return tiling, [img] + tiles


class VisionTower(nn.Module):
    """A frozen SigLIP or SigLIP2 vision encoder returning patch features of one layer."""

    def __init__(self, model: nn.Module, processor, name_or_path: str, feature_layer: int,
                 layer_index: int, dtype: torch.dtype, weights_hash: str):
        super().__init__()
        self.model = model
        self.processor = processor
        self.name_or_path = name_or_path
        self.feature_layer = feature_layer
        self.layer_index = layer_index           # index into hidden_states (0 = embeddings)
        self.dtype = dtype
        self.weights_hash = weights_hash
        self.is_naflex = model.config.model_type == "siglip2_vision_model"
        if not self.is_naflex:     # NaFlex pads patchified pixels after normalising: float path only
            table = normalisation_table(processor)
            self.register_buffer("pixel_table", table.reshape(-1), persistent=False)   # (3 * 256,)
            self.register_buffer("channel_offset", torch.arange(3, dtype=torch.int32).view(1, 3, 1, 1)
                                 * 256, persistent=False)
        self.train(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_VISION_MODEL, feature_layer: int = -2,
                        dtype: str | torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "VisionTower":
        from transformers import (AutoConfig, AutoImageProcessor, Siglip2VisionModel,
                                  SiglipVisionModel)
        from transformers.utils import logging as hf_logging

        dtype = resolve_dtype(dtype)
        model_type = AutoConfig.from_pretrained(name_or_path).model_type
        if model_type in ("siglip", "siglip_vision_model"):
            model_cls = SiglipVisionModel
        elif model_type in ("siglip2", "siglip2_vision_model"):
            model_cls = Siglip2VisionModel
        else:
            raise ValueError(f"vision model {name_or_path!r} has model_type {model_type!r}; "
                             "VisionTower supports SigLIP (siglip) and SigLIP2 (siglip2)")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()   # a full checkpoint's text weights are "unexpected": expected
        try:
            # float32 first: the weights hash must not depend on the dtype features are made in
            model = model_cls.from_pretrained(name_or_path, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        processor = AutoImageProcessor.from_pretrained(name_or_path)

        num_layers = model.config.num_hidden_layers
        index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"feature_layer={feature_layer} is out of range for {name_or_path!r}, "
                             f"which has {num_layers} layers (hidden_states has {num_layers + 1})")
        weights_hash = weights_sha256(model)     # over the weights as loaded, before trimming
        model.to(dtype)
        model.encoder.layers = model.encoder.layers[:index]     # layers above are never used
        model.head = None
        model.use_head = False
        model.requires_grad_(False)
        model.eval()
        return cls(model, processor, str(name_or_path), feature_layer, index, dtype,
                   weights_hash).to(device)

    def train(self, mode: bool = True) -> "VisionTower":
        """The tower is frozen: it stays in eval mode whatever its parent does."""
        return super().train(False)

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int | None:
        """Input side in pixels (None for SigLIP2 NaFlex, which keeps the aspect ratio)."""
        return None if self.is_naflex else self.model.config.image_size

    @property
    def num_patches(self) -> int:
        if self.is_naflex:
            return int(self.processor.max_num_patches)
        return (self.model.config.image_size // self.model.config.patch_size) ** 2

    def feature_shape(self, pool: int = 1) -> tuple[int, int]:
        """(patches, dim) of one image's features after `pool` x `pool` average pooling."""
        if pool == 1:
            return (self.num_patches, self.hidden_size)
        if self.is_naflex:
            raise ValueError("patch pooling needs a fixed square grid; SigLIP2 NaFlex has none")
        side = math.isqrt(self.num_patches)
        return (pooled_side(side, pool) ** 2, self.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- decoding, preprocessing and forward -----------------------------------------------------
    draft_to: int | None = None
    """JPEG draft size every decode for this tower uses (None: full decode); see `decode`. Set from
    what the matched features were built with: the cache builder sets `default_draft_to` (unless
    --no-jpeg-draft), an export records the training cache's (`jpeg_draft_to`), load_vision_tower
    sets it back."""

    @property
    def default_draft_to(self) -> int | None:
        """The JPEG draft size the cache builder uses: twice the input side, so the processor's
        resize still shrinks at least 2x (see contract.images.load_image); None for SigLIP2 NaFlex,
        whose input size follows the image."""
        return None if self.is_naflex else 2 * self.image_size

    def decode(self, source, name: str | None = None, max_pixels: int | None = None):
        """A file path or raw bytes -> upright RGB PIL image, decoded the way the cache decodes.

        Every online path (vlm-generate, vlm-eval, vlm-serve, the lmms-eval model) decodes
        through this, so served features equal cached ones; raises contract.images.ImageError.
        Large JPEGs are decoded at reduced scale when `draft_to` is set (PIL draft).
        """
        from vlm_dist.contract.images import DEFAULT_MAX_PIXELS, load_image
        return load_image(source, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, name=name,
                          draft_to=self.draft_to)

    def decode_video(self, source, sampling: FrameSampling, name: str | None = None,
                     max_bytes: int = DEFAULT_MAX_VIDEO_BYTES, max_pixels: int | None = None):
        """A video file path or raw bytes -> contract.video.Video (sampled RGB frames and their
        timestamps), decoded the way the cache decodes; raises contract.video.VideoError.

        What every online path calls for a video, as `decode` is for images."""
        from vlm_dist.contract.images import DEFAULT_MAX_PIXELS
        from vlm_dist.contract.video import load_video
        return load_video(source, sampling, name=name, max_bytes=max_bytes,
                          max_pixels=max_pixels or DEFAULT_MAX_PIXELS)

    def check_tiling(self, spec: TilingSpec) -> TilingSpec:
        """`spec` if this tower can encode its tiles, else TilingError: tiles are cut at the
        tower's fixed input side (SigLIP2 NaFlex has none: its input follows the image)."""
        if self.is_naflex:
            raise TilingError(f"tiling: vision model {self.name_or_path!r} is SigLIP2 NaFlex, which "
                              "keeps each image's aspect ratio and has no fixed input side to cut "
                              "tiles at; use a fixed-size SigLIP tower or no tiling")
        if spec.tile_size != self.image_size:
            raise TilingError(f"tiling.tile_size: {spec.tile_size} is not the input side of vision "
                              f"model {self.name_or_path!r} ({self.image_size} px); leave it out to "
                              "default to it")
        return spec

    def tiling_spec(self, fields: Mapping) -> TilingSpec:
        """A TilingSpec from its fields (a config or --tiling JSON), tile_size defaulting to the
        tower's input side, checked against this tower (`check_tiling`)."""
        if self.is_naflex:     # no input side to default to: say so before TilingSpec does
            return self.check_tiling(TilingSpec())
        fields = dict(fields)
        fields.setdefault("tile_size", self.image_size)
        return self.check_tiling(TilingSpec.from_dict(fields))

    def encode_views(self, images: Sequence[Image.Image], pool: int = 1) -> torch.Tensor:
        """RGB views (images, thumbnails, tiles, frames) -> features (V, P, D) on the tower's device.

        Exactly the cache builder's path (8-bit resize on the CPU, normalised in `forward`; the
        processor's float path for SigLIP2 NaFlex), so online features equal cached ones bit for
        bit on the same device and dtype."""
        images = list(images)
        if not images:
            return torch.empty((0, *self.feature_shape(pool)), dtype=self.dtype, device=self.device)
        pixels = self.preprocess(images) if self.is_naflex else self.pixels_uint8(images)
        return self(pixels, pool=pool)

    def preprocess(self, images: Sequence) -> torch.Tensor | dict[str, torch.Tensor]:
        """RGB PIL images -> the processor's pixel tensor (B, 3, H, W), float32 on the CPU.

        SigLIP2 NaFlex returns a dict (pixel_values, pixel_attention_mask,
        spatial_shapes) instead; `forward` takes either.
        """
        out = self.processor(images=list(images), return_tensors="pt")
        if self.is_naflex:
            return {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
        return out["pixel_values"]

    def pixels_uint8(self, images: Sequence) -> torch.Tensor:
        """RGB PIL images -> (B, 3, H, W) uint8, resized; `forward` normalises them on the device
        to exactly what `preprocess` gives (not for SigLIP2 NaFlex, which keeps `preprocess`)."""
        if self.is_naflex:
            raise ValueError("SigLIP2 NaFlex pixels are patchified and padded after normalising; "
                             "use preprocess()")
        return resize_uint8(self.processor, images)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor | Mapping[str, torch.Tensor],
                pool: int = 1) -> torch.Tensor:
        """Patch features (B, P, D) in the tower's dtype; `pool` > 1 average-pools the grid.

        `pixel_values` is `preprocess`'s float tensor, or `pixels_uint8`'s 8-bit one (normalised
        here, on the device, by the processor's own table)."""
        device = self.device
        if self.is_naflex:
            inputs = {k: v.to(device, non_blocking=True) for k, v in pixel_values.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            out = self.model(**inputs, output_hidden_states=True)
            feats = out.hidden_states[self.layer_index]                             # (B, P, D)
            feats = feats * inputs["pixel_attention_mask"].unsqueeze(-1).to(feats.dtype)
        else:
            pixels = pixel_values.to(device, non_blocking=True)
            if pixels.dtype == torch.uint8:                                         # (B, 3, H, W)
                pixels = self.pixel_table[pixels.to(torch.int32) + self.channel_offset]
            pixels = pixels.to(self.dtype)
            out = self.model(pixels, output_hidden_states=True)
            feats = out.hidden_states[self.layer_index]                             # (B, P, D)
        if pool != 1:
            self.feature_shape(pool)           # raises for NaFlex
            feats = pool_patches(feats, pool)
        return feats

    # -- identity --------------------------------------------------------------------------------
    def preprocessing_params(self) -> dict:
        params = json.loads(self.processor.to_json_string())
        params["processor_class"] = type(self.processor).__name__   # PIL vs torchvision backends differ
        return params

    @classmethod
    def expected_fingerprint(cls, name_or_path: str, feature_layer: int = -2,
                             dtype: str | torch.dtype | None = None, pool: int | None = None,
                             tiling: TilingSpec | None = None,
                             video_sampling: FrameSampling | None = None) -> dict:
        """The fingerprint a cache must match to be used with this encoder (loads it on the CPU).

        Leave `dtype` / `pool` as None to accept whatever the cache was built
        with (the connector takes the cache's feature shape); the fields left
        out are not compared by `check_cache_for_training`. `jpeg_draft_to` is always
        left out: training reads features only, and records the cache's value in its export.
        `tiling` / `video_sampling` (None: an untiled / video-less config) add those keys.
        """
        tower = cls.from_pretrained(name_or_path, feature_layer=feature_layer,
                                    dtype=torch.float32 if dtype is None else dtype)
        fp = tower.fingerprint(pool=1 if pool is None else pool, tiling=tiling,
                               video_sampling=video_sampling)
        if dtype is None:
            del fp["dtype"]
        if pool is None:
            del fp["pool"], fp["feature_shape"]
        del fp["jpeg_draft_to"]
        return fp

    def fingerprint(self, pool: int = 1, tiling: TilingSpec | None = None,
                    video_sampling: FrameSampling | None = None) -> dict:
        """What a feature cache must match: same weights, layer, dtype, shape and preprocessing,
        JPEG decoding included (`jpeg_draft_to`: this tower's draft_to; a cache without the field
        was decoded in full, see cache.reader.FINGERPRINT_DEFAULTS). "tiling" (the TilingSpec's
        fingerprint) and "video_sampling" (the FrameSampling's) are there only when given."""
        fp = {
            "model": self.name_or_path,
            "model_type": self.model.config.model_type,
            "weights_sha256": self.weights_hash,
            "image_size": self.image_size,
            "patch_size": self.model.config.patch_size,
            "feature_layer": self.layer_index,
            "dtype": dtype_name(self.dtype),
            "pool": pool,
            "feature_shape": list(self.feature_shape(pool)),
            "preprocessing": self.preprocessing_params(),
            "jpeg_draft_to": self.draft_to,
        }
        if tiling is not None:
            fp["tiling"] = self.check_tiling(tiling).fingerprint()
        if video_sampling is not None:
            fp["video_sampling"] = video_sampling.fingerprint()
        return fp
