"""AnyRes tiling: one image -> a global thumbnail plus a grid of tower-sized tiles, and its block.

    spec = TilingSpec(tile_size=384, tokens_per_tile=64, token_budget=1024)
    tiling, thumbnail, tiles = tile_image(img, spec)   # tiles: row-major, tile_size x tile_size
    ids = tile_block_ids(tokenizer, tiling.rows, tiling.cols, spec.tokens_per_tile, tiling.num_tiles)

The grid rule is LLaVA-NeXT's (`select_best_resolution`, called from transformers itself),
not InternVL's `dynamic_preprocess`. Why:
- Aspect ratio is kept: the image is resized to fit the chosen canvas and padded (centred),
  where InternVL stretches it onto the closest-ratio grid; small text and small objects are
  what tiling is for, and stretching distorts exactly them.
- Small images stay small: the rule maximises the resolution actually used (never above the
  original's) and then minimises padding, so an image no larger than one tile gets the 1x1
  grid (thumbnail only) instead of being upscaled onto several tiles, as InternVL's
  aspect-only choice does. Tokens go where the pixels are.
- The candidate grids are an explicit list (LLaVA-NeXT's `image_grid_pinpoints`, here in tile
  units so one config fits any tower size), which is what a fingerprint can record as is;
  `grids_up_to(n)` gives InternVL's "every grid of at most n tiles" set when wanted.
The 1x1 grid is always a candidate, and a grid whose block would exceed `token_budget` is
not; so the budget caps the grid and an over-tight budget degrades to the plain image.

Geometry, as LLaVA-NeXT's image processor does it (tests/test_tiling.py pins the tiles equal
to transformers' `LlavaNextImageProcessorPil.get_image_patches`): the canvas is
(rows * tile, cols * tile); the image is resized (spec.resample) so that its limiting side
fills the canvas, the other side `ceil`-ed and clipped; it is pasted centred on a canvas of
`fill` (black by default, as LLaVA-NeXT pads); tiles are cut row-major (left to right, top to
bottom). The thumbnail is the whole image resized to tile x tile ignoring aspect: what the
tower's own processor does to an untiled image, so it is the image's untiled view. A 1x1 grid
has no tiles (its one tile would repeat the thumbnail), and its block is exactly the plain
image block.

Token layout (choice): every line of the block ends with the "\\n" text token (byte-level
`Ċ`, id 198 in Qwen's vocabulary; looked up, never hard-coded), which the vocabulary already
has and the LLM already reads as a line break, where LLaVA-NeXT learns a new `image_newline`
vector (the embedding matrix is never resized here, and a frozen or LoRA-only embedding has
no trained vector for an unused special token such as `<|vision_pad|>`):

    <|vision_start|> thumb*T \\n  row_1: tile*T ... tile*T \\n  ...  row_R: ... \\n <|vision_end|>

T = tokens_per_tile pad slots per view (the resampler's latents). Untiled: start thumb*T end.
The "\\n" is inserted as an id, never tokenised from joined text (Qwen's BPE merges runs of
newlines into other tokens).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from PIL import Image

from vlm_dist.contract.media import IMAGE, MediaKind, token_id
from vlm_dist.errors import UserError

TILING_VERSION = 1
RULE = "llava-next-anyres"
ORDER = "row-major"
ROW_SEPARATOR = "\n"
# LLaVA-NeXT's default image_grid_pinpoints [[336,672],[672,336],[672,672],[1008,336],[336,1008]]
# (height, width at 336 px) in tile units (rows, cols).
LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


class TilingError(UserError, ValueError):
    """A tiling configuration or record that cannot be used; the message names the field."""


def grids_up_to(max_tiles: int, min_tiles: int = 1) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) with min_tiles <= rows * cols <= max_tiles (InternVL's candidate set),
    ordered by tile count, then rows."""
    return tuple(sorted(((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1)
                         if min_tiles <= r * c <= max_tiles), key=lambda g: (g[0] * g[1], g[0])))


def block_length(tokens_per_tile: int, rows: int, cols: int) -> int:
    """Tokens of one image's block: start + end, T per view, one "\\n" per line (0 when untiled).

    A 1x1 grid is untiled: 2 + T. Otherwise 2 + T * (1 + rows * cols) + (1 + rows)."""
    if rows * cols == 1:
        return 2 + tokens_per_tile
    return 2 + tokens_per_tile * (1 + rows * cols) + 1 + rows


@dataclass(frozen=True)
class TilingSpec:
    """How images are tiled: part of a tiled cache's encoder fingerprint (`fingerprint()`)."""

    tile_size: int = 384                  # tile and thumbnail side in pixels: the tower's input side
    tokens_per_tile: int = 64             # pad slots per view (thumbnail or tile): resampler latents
    token_budget: int | None = None       # most tokens one image's block may take (None: no cap)
    grids: tuple[tuple[int, int], ...] = LLAVA_NEXT_GRIDS  # candidate (rows, cols); 1x1 is implicit
    resample: str = "bicubic"             # PIL filter for the canvas and the thumbnail
    fill: tuple[int, int, int] = (0, 0, 0)  # RGB of the padding around the resized image
    version: int = TILING_VERSION         # bumped whenever the same spec could tile differently

    def __post_init__(self):
        def bad(key: str, why: str):
            raise TilingError(f"tiling.{key}: {why}")

        if self.version != TILING_VERSION:
            bad("version", f"{self.version!r} is not the supported version {TILING_VERSION}")
        for key in ("tile_size", "tokens_per_tile"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, f"must be a positive integer, got {v!r}")
        if self.token_budget is not None:
            if not isinstance(self.token_budget, int) or isinstance(self.token_budget, bool):
                bad("token_budget", f"must be an integer or null, got {self.token_budget!r}")
            if self.token_budget < block_length(self.tokens_per_tile, 1, 1):
                bad("token_budget", f"{self.token_budget} is below one untiled block "
                                    f"({block_length(self.tokens_per_tile, 1, 1)} tokens)")
        try:
            grids = tuple(sorted({(int(r), int(c)) for r, c in self.grids}))
        except (TypeError, ValueError):
            grids = None
        if grids is None:
            bad("grids", f"must be a list of [rows, cols] pairs, got {self.grids!r}")
        if any(r < 1 or c < 1 for r, c in grids):
            bad("grids", f"rows and cols must be >= 1, got {self.grids!r}")
        object.__setattr__(self, "grids", grids)      # canonical: sorted, unique, tuples
        if self.resample not in RESAMPLE:
            bad("resample", f"{self.resample!r} is not one of {', '.join(RESAMPLE)}")
        try:
            fill = tuple(int(v) for v in self.fill)
        except (TypeError, ValueError):
            fill = ()
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            bad("fill", f"must be three levels 0..255, got {self.fill!r}")
        object.__setattr__(self, "fill", fill)

    def candidates(self) -> list[tuple[int, int]]:
        """The grids this spec may choose: 1x1 and every configured grid within the budget."""
        out = [(1, 1)] + [g for g in self.grids if g != (1, 1)]
        if self.token_budget is not None:
            out = [g for g in out if block_length(self.tokens_per_tile, *g) <= self.token_budget]
        return out

    def max_block_length(self) -> int:
        """The longest block any image can get under this spec (for sequence-length planning)."""
        return max(block_length(self.tokens_per_tile, *g) for g in self.candidates())

    def fingerprint(self) -> dict:
        """JSON-ready description, with the rule, order and separator the code implies."""
        d = asdict(self)
        d["grids"] = [list(g) for g in self.grids]
        d["fill"] = list(self.fill)
        d.update(rule=RULE, order=ORDER, thumbnail="first, resized to tile x tile",
                 row_separator=ROW_SEPARATOR)
        return d

    def to_json(self) -> str:
        return json.dumps(self.fingerprint(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TilingSpec":
        """Inverse of `fingerprint()`; refuses another rule/order/separator or an unknown key."""
        if not isinstance(d, dict):
            raise TilingError(f"tiling: must be an object, got {type(d).__name__}")
        implied = {"rule": RULE, "order": ORDER, "row_separator": ROW_SEPARATOR,
                   "thumbnail": "first, resized to tile x tile"}
        for key, want in implied.items():
            if key in d and d[key] != want:
                raise TilingError(f"tiling.{key}: {d[key]!r} is not supported (this code: {want!r})")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known - set(implied)
        if unknown:
            raise TilingError(f"tiling: unknown key(s) {', '.join(sorted(unknown))}")
        kw = {k: d[k] for k in known if k in d}
        if "grids" in kw:
            kw["grids"] = tuple(tuple(g) for g in kw["grids"])
        if "fill" in kw:
            kw["fill"] = tuple(kw["fill"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "TilingSpec":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Tiling:
    """How one image was tiled: what a shard row / sidecar records per image key."""

    image_size: tuple[int, int]        # (width, height) of the source image
    rows: int
    cols: int
    tile_size: int
    resized_size: tuple[int, int]      # (width, height) of the image on the canvas (untiled: tile x tile)
    offset: tuple[int, int]            # (x, y) where it is pasted on the canvas (untiled: 0, 0)
    version: int = TILING_VERSION
    order: str = ORDER
    thumbnail: bool = True             # always: the thumbnail is view 0

    @property
    def num_tiles(self) -> int:
        """Tiles besides the thumbnail: rows * cols, or 0 for the 1x1 (untiled) grid."""
        return 0 if self.rows * self.cols == 1 else self.rows * self.cols

    @property
    def num_views(self) -> int:
        """Feature rows this image has in a tiled cache: thumbnail + tiles."""
        return 1 + self.num_tiles

    @property
    def canvas_size(self) -> tuple[int, int]:
        return (self.cols * self.tile_size, self.rows * self.tile_size)

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each tile on the canvas, in tile order (row-major)."""
        t = self.tile_size
        if not self.num_tiles:
            return []
        return [(c * t, r * t, (c + 1) * t, (r + 1) * t) for r in range(self.rows) for c in range(self.cols)]

    def block_length(self, tokens_per_tile: int) -> int:
        return block_length(tokens_per_tile, self.rows, self.cols)

    def to_dict(self) -> dict:
        return {"version": self.version, "image_size": list(self.image_size), "rows": self.rows,
                "cols": self.cols, "tile_size": self.tile_size, "resized_size": list(self.resized_size),
                "offset": list(self.offset), "order": self.order, "thumbnail": self.thumbnail}

    @classmethod
    def from_dict(cls, d: dict) -> "Tiling":
        try:
            if d["version"] != TILING_VERSION or d["order"] != ORDER:
                raise TilingError(f"tiling record: version {d['version']!r} / order {d['order']!r} "
                                  f"is not {TILING_VERSION} / {ORDER!r}")
            return cls(tuple(d["image_size"]), int(d["rows"]), int(d["cols"]), int(d["tile_size"]),
                       tuple(d["resized_size"]), tuple(d["offset"]), thumbnail=bool(d["thumbnail"]))
        except (KeyError, TypeError) as e:
            raise TilingError(f"tiling record {d!r}: missing or malformed field ({e})") from None


def choose_grid(width: int, height: int, spec: TilingSpec) -> tuple[int, int]:
    """(rows, cols) for a width x height image: LLaVA-NeXT's rule over `spec.candidates()`."""
    from transformers.image_processing_utils import select_best_resolution

    if width < 1 or height < 1:
        raise TilingError(f"cannot tile an empty image ({width}x{height})")
    t = spec.tile_size
    # select_best_resolution takes (height, width) pairs and keeps the first of equal ones:
    # candidates() is 1x1, then the grids sorted, so a tie has one answer whatever the config order.
    h, w = select_best_resolution((height, width), [(r * t, c * t) for r, c in spec.candidates()])
    return h // t, w // t


def plan_tiling(width: int, height: int, spec: TilingSpec) -> Tiling:
    """The tiling of a width x height image, without its pixels (lengths need only this)."""
    rows, cols = choose_grid(width, height, spec)
    if rows * cols == 1:       # untiled: the one view is the thumbnail, the image squashed onto it
        return Tiling((width, height), 1, 1, spec.tile_size, (spec.tile_size,) * 2, (0, 0))
    cw, ch = cols * spec.tile_size, rows * spec.tile_size
    # transformers' get_patch_output_size: the limiting side fills, the other is ceil-ed
    if cw / width < ch / height:
        new_w, new_h = cw, min(math.ceil(height * cw / width), ch)
    else:
        new_w, new_h = min(math.ceil(width * ch / height), cw), ch
    offset = ((cw - new_w) // 2, (ch - new_h) // 2)
    return Tiling((width, height), rows, cols, spec.tile_size, (new_w, new_h), offset)


def tile_image(img: Image.Image, spec: TilingSpec) -> tuple[Tiling, Image.Image, list[Image.Image]]:
    """An RGB image -> (its Tiling, the thumbnail, the tiles in row-major order).

    Every image is tile_size x tile_size RGB; the tiles are empty for a 1x1 grid.
    """
    if img.mode != "RGB":
        raise TilingError(f"tile_image needs an RGB image (contract.images.load_image), got {img.mode}")
    tiling = plan_tiling(img.width, img.height, spec)
    resample = RESAMPLE[spec.resample]
    thumbnail = img.resize((spec.tile_size, spec.tile_size), resample)
    if not tiling.num_tiles:
        return tiling, thumbnail, []
    canvas = Image.new("RGB", tiling.canvas_size, spec.fill)
    canvas.paste(img.resize(tiling.resized_size, resample), tiling.offset)
    return tiling, thumbnail, [canvas.crop(box) for box in tiling.tile_boxes()]


def row_separator_id(tokenizer) -> int:
    """Id of the "\\n" text token (`Ċ`); an error if the tokenizer makes "\\n" anything but one token."""
    ids = tokenizer(ROW_SEPARATOR, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} splits '\\n' into "
                         f"{len(ids)} tokens {ids}; the tiled block needs it as one token")
    return ids[0]


def tile_block_ids(tokenizer, rows: int, cols: int, tokens_per_tile: int,
                   kind: MediaKind = IMAGE) -> list[int]:
    """The token ids of one tiled image block (layout in the module docstring).

    Pad slots: tokens_per_tile * (1 + tiles), thumbnail first, then tiles row-major; the
    splice fills them in that order. Length: `block_length(tokens_per_tile, rows, cols)`.
    """
    start, pad, end = (token_id(tokenizer, t) for t in (kind.start_token, kind.pad_token, kind.end_token))
    if rows * cols == 1:
        return [start] + [pad] * tokens_per_tile + [end]
    nl = row_separator_id(tokenizer)
    ids = [start] + [pad] * tokens_per_tile + [nl]
    for _ in range(rows):
        ids += [pad] * (tokens_per_tile * cols) + [nl]
    return ids + [end]
