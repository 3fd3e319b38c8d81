"""What a cache build is asked to do (BuildConfig) and what it decided to do (Plan).

Both the build (vlm_dist.cache.build: plan, finalize) and the encoder (vlm_dist.cache.encode)
read these, so they live below both. The plan itself is made, saved and loaded in build.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlm_dist.contract.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from vlm_dist.contract.tiling import TilingSpec
from vlm_dist.contract.video import DEFAULT_MAX_VIDEO_BYTES, FrameSampling
from vlm_dist.model.vision import DEFAULT_VISION_MODEL

IMAGE_KIND, VIDEO_KIND = "image", "video"     # contract.media's kind names, as refs.arrow stores them


@dataclass
class BuildConfig:
    """The settings of one `vlm-cache build` (vlm_dist.cache.cli maps its flags onto these)."""

    out: str                                  # cache directory
    records: list[str] = field(default_factory=list)      # JSONL files in the sample contract
    image_lists: list[str] = field(default_factory=list)  # text files, one image path per line
    video_lists: list[str] = field(default_factory=list)  # text files, one video path per line
    image_root: str = "."                     # record image and video references are relative to this
    vision_model: str = DEFAULT_VISION_MODEL  # hub id or local directory
    feature_layer: int = -2                   # hidden_states index (-2: penultimate)
    dtype: str = "bf16"                       # stored feature dtype: bf16, fp16, fp32
    pool: int = 1                             # 2: average-pool the patch grid 2x2 (4x smaller)
    batch_size: int = 64                      # images per forward
    workers: int = 4                          # DataLoader decode/preprocess processes
    device: str = "auto"                      # auto (cuda if present), cpu, cuda, cuda:N
    shard_size: int = 1024                    # images per Arrow shard
    shard_index: int | None = None            # this process's slice (with num_shards)
    num_shards: int | None = None             # number of slices; default: launcher world size or 1
    max_pixels: int = DEFAULT_MAX_PIXELS      # larger images are failures (decompression bombs)
    max_bytes: int = DEFAULT_MAX_BYTES        # larger image files are failures (never read past this)
    tiling: TilingSpec | dict | None = None   # AnyRes: thumbnail + tiles per image (None: one view);
                                              # a dict of TilingSpec fields gets tile_size = the
                                              # tower's input side (build.resolve_tiling)
    video_sampling: FrameSampling = field(default_factory=FrameSampling)  # frames taken per video
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES  # larger video files are failures
    jpeg_draft: bool = True                   # decode large JPEGs at reduced scale (PIL draft) down to
                                              # the tower's default_draft_to; False: every pixel
    wait_timeout: float = 24 * 3600.0         # rank 0 waits this long for the other ranks' shards
    progress: bool = True                     # show the progress bar


@dataclass
class Plan:
    """The inputs resolved: every reference hashed, the unique keys sorted and cut into shards."""

    info: dict                       # what plan.json holds
    refs: list[str]                  # sorted unique references
    ref_keys: list[str | None]       # key per reference (None: unreadable)
    ref_errors: list[str | None]
    ref_records: list[list[str]]
    keys: list[str]                  # sorted unique keys
    key_ref: dict[str, str]          # key -> the first reference with it (the file decoded)
    ref_kinds: list[str] = field(default_factory=list)   # "image" or "video" per reference
    key_kind: dict[str, str] = field(default_factory=dict)  # key -> how it is decoded (default image)

    @property
    def num_shard_files(self) -> int:
        return self.info["num_shard_files"]

    def shard_keys(self, j: int) -> list[str]:
        s = self.info["shard_size"]
        return self.keys[j * s:(j + 1) * s]
