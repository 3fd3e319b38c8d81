"""model.tiling / model.video -> the contract's TilingSpec and FrameSampling, checked with the
key named (`--model.tiling.token_budget: ...`), at load and again once the tower is known.

    spec = tiling_spec(cfg.model, tile_size=384, tokens_per_tile=64)   # None when model.tiling is null
    sampling = frame_sampling(cfg.model)                               # None when model.video is null

`check_media_config` (run by validate_config at load) checks what needs no model: the tiling
fields (a placeholder tile side stands in for the tower's until it is loaded), tokens_per_tile
against model.num_latents with the resampler, the video fields, and the video token budget.
The training loop builds the real spec once the tower's input side and the image connector's
token count are known (`tiling_spec(..., tile_size=fingerprint["image_size"], ...)`).
"""
from __future__ import annotations

from vlm_dist.config.schema import ConfigError, ModelConfig
from vlm_dist.contract.tiling import TilingError, TilingSpec
from vlm_dist.contract.video import TIMESTAMP_FORMAT, FrameSampling, VideoError

# Text tokens of one frame's timestamp at most, for the load-time budget check: "99.9s" is 5
# characters, and Qwen's byte-level BPE (one token per digit) never makes more tokens than
# characters; a clip over 100 s takes one more per frame.
TIMESTAMP_TOKENS = len(TIMESTAMP_FORMAT.format(99.9))


def connector_tokens(m: ModelConfig, num_patches: int | None) -> int | None:
    """Slots per view the image connector makes: model.num_latents, or the patch count (mlp;
    None when not known yet)."""
    return m.num_latents if m.connector == "resampler" else num_patches


def tiling_spec(m: ModelConfig, tile_size: int | None, tokens_per_tile: int | None) -> TilingSpec | None:
    """The TilingSpec of model.tiling (None when null): `tile_size` the tower's input side and
    `tokens_per_tile` the image connector's tokens, which the configured values must equal."""
    t = m.tiling
    if t is None:
        return None
    if t.tokens_per_tile is not None and tokens_per_tile is not None and t.tokens_per_tile != tokens_per_tile:
        why = ("model.num_latents" if m.connector == "resampler"
               else "the patch count of the cache's features (connector mlp: one token per patch)")
        raise ConfigError(f"--model.tiling.tokens_per_tile={t.tokens_per_tile}: every view (thumbnail or "
                          f"tile) gets the image connector's tokens, {tokens_per_tile} ({why}); leave it out "
                          f"or set it to {tokens_per_tile}")
    if t.tile_size is not None and tile_size is not None and t.tile_size != tile_size:
        raise ConfigError(f"--model.tiling.tile_size={t.tile_size}: tiles are encoded at the vision tower's "
                          f"input side, {tile_size} px; leave it out or set it to {tile_size}")
    if tile_size is None and t.tile_size is None:
        raise ConfigError(f"--model.tiling: vision model {m.vision!r} has no fixed input side to cut tiles "
                          "at (SigLIP2 NaFlex); use a fixed-size SigLIP tower or --model.tiling=null")
    try:
        return TilingSpec(tile_size=t.tile_size or tile_size, tokens_per_tile=t.tokens_per_tile or tokens_per_tile,
                          token_budget=t.token_budget, grids=tuple(tuple(g) for g in t.grids),
                          resample=t.resample, fill=tuple(t.fill))
    except TilingError as e:      # "tiling.<field>: why" -> the flag
        raise ConfigError(f"--model.{e}") from None


def frame_sampling(m: ModelConfig) -> FrameSampling | None:
    """The FrameSampling of model.video (None when null)."""
    if m.video is None:
        return None
    try:
        return FrameSampling(num_frames=m.video.num_frames, max_fps=m.video.max_fps)
    except VideoError as e:
        key = "num_frames" if "num_frames" in e.reason else "max_fps"
        raise ConfigError(f"--model.video.{key}={getattr(m.video, key)!r}: {e.reason}") from None


def video_block_bound(num_frames: int, tokens_per_frame: int) -> int:
    """Most tokens a video block of num_frames frames takes (clips under 100 s): start, per frame
    its timestamp and slots, a separator between frames, end."""
    return num_frames * (tokens_per_frame + TIMESTAMP_TOKENS + 1) + 1


def check_media_config(m: ModelConfig) -> None:
    """Load-time checks of model.tiling and model.video (module docstring); ConfigError names the key."""
    if m.tiling is not None:
        grids = m.tiling.grids
        if not all(isinstance(g, list) and len(g) == 2 for g in grids):
            raise ConfigError(f"--model.tiling.grids={grids}: a list of [rows, cols] pairs, e.g. [[1,2],[2,2]]")
        # the tower's side is not known at load: any valid side stands in (tile_size is checked later)
        tiling_spec(m, tile_size=m.tiling.tile_size or 384,
                    tokens_per_tile=connector_tokens(m, None) or m.tiling.tokens_per_tile or 1)
    if m.video is not None:
        v = m.video
        frame_sampling(m)
        if v.tokens_per_frame < 1:
            raise ConfigError(f"--model.video.tokens_per_frame={v.tokens_per_frame}: must be >= 1")
        if v.token_budget is not None and video_block_bound(v.num_frames, v.tokens_per_frame) > v.token_budget:
            raise ConfigError(
                f"--model.video.token_budget={v.token_budget}: {v.num_frames} frames x ({v.tokens_per_frame} "
                f"slots + up to {TIMESTAMP_TOKENS} timestamp tokens + 1 separator) + 1 = "
                f"{video_block_bound(v.num_frames, v.tokens_per_frame)} tokens per video; lower "
                "--model.video.num_frames or --model.video.tokens_per_frame, or raise the budget")
